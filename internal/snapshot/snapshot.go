// Package snapshot is the store of saved VMs: a VM booted to an idle
// agent and saved, its RAM in a file that every restore maps
// copy-on-write (so one snapshot serves any number of runs, concurrently,
// and no run ever writes it) and its device state. A run restores one
// instead of booting when everything that shaped the saved machine
// matches (see Key); the run's own disks go into drive slots the
// snapshot was taken with, which is what lets runs with shared
// directories restore too.
//
// A store is a directory (the default image's, or one template
// revision's) holding one directory per machine configuration, named by
// the digest of its key. A snapshot is only ever replaced whole: a new
// directory, new files, then a rename. Which snapshot a run wants and
// what it does when one fails is the SDK's business; this package knows
// the files.
package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/diskusage"
	"github.com/mvm-sh/mvm/internal/lockfile"
)

// Format changes whenever what a snapshot holds, or how runs use it,
// changes.
const Format = "2"

// PlaceholderSize is the size of the files in the drive slots of a
// snapshot being taken. The guest learns a drive's capacity when it
// probes it, at boot, and keeps it across the restore; it must be at
// least as large as any image a run puts in the slot. The files are
// sparse: the size costs nothing.
const PlaceholderSize = 1 << 40

// Files of a snapshot directory.
const (
	recordFile = "snapshot.json"
	ramFile    = "ram"
	stateFile  = "state"
	// PlaceholderFile is the shared read-only drive of the slots a run
	// leaves empty.
	PlaceholderFile = "placeholder"
	// RootFile is, in a template's snapshot, the root's writable layer as
	// the saved guest has it mounted: each restore starts from a copy.
	RootFile = "root.img"
)

// Meta is snapshot.json, written last: a snapshot directory without it
// is incomplete and never used.
type Meta struct {
	Format  string    `json:"format"`
	Key     string    `json:"key"`
	Created time.Time `json:"created"`
	// StateSHA256 is the device state file's digest, checked before each
	// restore (it is small); RAMSize the RAM file's size.
	StateSHA256 string `json:"state_sha256"`
	RAMSize     int64  `json:"ram_size"`
	// RAMCtime is the RAM file's change time once saved, in nanoseconds:
	// anything that writes, truncates or punches the file changes it, and
	// nobody can set it back. A RAM file is too large to hash at every
	// run; this catches a VMM that wrote its RAM file (see
	// docs/snapshots.md) or anyone else who changed it.
	RAMCtime int64 `json:"ram_ctime_ns"`
	// RootSize and RootCtime are the root layer's (RootFile), in a
	// snapshot that has one: a restore copies it, so that it is only
	// read, never written, and checked as the RAM file is.
	RootSize  int64  `json:"root_size,omitempty"`
	RootCtime int64  `json:"root_ctime_ns,omitempty"`
	CPUs      int    `json:"cpus"`
	MemoryMiB uint64 `json:"memory_mib"`
	Accel     string `json:"accel"`
}

// KeyParts is everything a restored machine depends on.
type KeyParts struct {
	// VMM identifies the VMM build (backend.Snapshotter's SnapshotKey).
	VMM string
	// Kernel and Initrd are the files booted; their identity goes into
	// the key.
	Kernel, Initrd string
	// Template identifies the template's disk, "" for none: the disk is
	// in its slot when the snapshot is taken and at every restore, so it
	// must be the very same content.
	Template  string
	Args      []string
	CPUs      int
	MemoryMiB uint64
	Accel     string
	// Slots is the number of directory slots (see devices).
	Slots int
	// Root, on a template, says how its root is in the snapshot: the
	// guest has it mounted on a writable layer of this many bytes (a
	// restore copies the saved layer, so a run of another root space
	// boots).
	Root int64
}

// Key is the key of a machine made of p. Two configurations with one key
// can share a snapshot; any difference means a cold boot.
func Key(p KeyParts) (string, error) {
	kernel, err := FileIdentity(p.Kernel)
	if err != nil {
		return "", err
	}
	initrd, err := FileIdentity(p.Initrd)
	if err != nil {
		return "", err
	}
	tmpl := p.Template
	if tmpl == "" {
		tmpl = "none"
	}
	lines := []string{
		"format " + Format,
		"vmm " + p.VMM,
		"kernel " + kernel,
		"initrd " + initrd,
		"template " + tmpl,
		"args " + strings.Join(p.Args, " "),
		"cpus " + strconv.Itoa(p.CPUs),
		"memory " + strconv.FormatUint(p.MemoryMiB, 10),
		"accel " + p.Accel,
		"slots " + strconv.Itoa(p.Slots),
	}
	if p.Root > 0 {
		lines = append(lines, "root mounted "+strconv.FormatInt(p.Root, 10))
	}
	return strings.Join(lines, "\n"), nil
}

// FileIdentity names a file's content well enough for a cache key without
// reading it: cached kernels and initramfs files are content-addressed
// and never rewritten in place, and a user's own kernel changes its size
// or modification time when it is rebuilt.
func FileIdentity(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", path, err)
	}
	return fmt.Sprintf("%s size=%d mtime=%d.%09d ino=%d", path, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ino), nil
}

// keyField returns the value of a key's line "NAME VALUE".
func keyField(key, name string) string {
	for line := range strings.SplitSeq(key, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	return ""
}

// Errors of Find and Lock.
var (
	// ErrNone: nothing saved for this configuration (yet, or since the
	// kernel, the agent, QEMU or the machine's shape changed).
	ErrNone = errors.New("no snapshot for this configuration")
	// ErrCorrupt: a snapshot of the configuration asked for whose files
	// do not match its record (a RAM file of another size or changed
	// since it was saved, a device state with another digest). Its
	// caller discards it, so that it is rebuilt rather than checked again
	// at every run.
	ErrCorrupt = errors.New("corrupt snapshot")
	// ErrLocked: the store's snapshots are being removed (a template
	// revision going away).
	ErrLocked = errors.New("the template's snapshots are being removed")
	// ErrReplaced and ErrWritten: the files a restoring VMM opened are
	// not the snapshot that was checked.
	ErrReplaced = errors.New("the snapshot was replaced while it restored")
	ErrWritten  = errors.New("the snapshot's RAM file or state was written while it restored")
)

// Store is a directory of snapshots.
type Store struct{ Root string }

// Dir is where the snapshot with key lives: one per machine
// configuration.
func (s Store) Dir(key string) string {
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(s.Root, hex.EncodeToString(sum[:12]))
}

// Lock takes a shared lock on the store, the lock a template store takes
// exclusively, without waiting, before it removes a revision's
// snapshots: a run holds it from its check of a snapshot until its VMM
// has the files open, and Begin's caller while it makes one. A store
// that does not exist (nothing to restore) is not made: the error is
// then os.ErrNotExist.
func (s Store) Lock() (release func(), err error) {
	l, err := lockfile.Take(filepath.Join(s.Root, "lock"), unix.LOCK_SH|unix.LOCK_NB, true)
	switch {
	case errors.Is(err, lockfile.ErrWouldBlock):
		return nil, ErrLocked
	case err != nil:
		return nil, err
	}
	return l.Release, nil
}

// Checked is a snapshot that matched its record, with what the check
// saw: the record's bytes and the identity of its two files. The same
// inodes later mean the same snapshot.
type Checked struct {
	// Dir holds its files.
	Dir              string
	record           []byte
	ram, state, root fileID
	hasRoot          bool
}

// Root is the saved root layer a restore copies (see RootFile), "" for a
// snapshot without one.
func (c *Checked) Root() string {
	if !c.hasRoot {
		return ""
	}
	return filepath.Join(c.Dir, RootFile)
}

// Placeholder is the read-only drive for the slots a run leaves empty.
func (c *Checked) Placeholder() string { return filepath.Join(c.Dir, PlaceholderFile) }

// fileID is what tells one file from another, and a file from itself
// changed: its inode and its change time.
type fileID struct {
	ino   uint64
	ctime int64
}

func statID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, err
	}
	return fileID{ino: st.Ino, ctime: st.Ctim.Nano()}, nil
}

// Find checks the snapshot of key against its record, and returns it or
// why it cannot be used: ErrNone, ErrCorrupt for one that is damaged
// (with the snapshot as it was read: what to discard), or another error
// for one that is not to blame (made for another configuration, being
// replaced).
func (s Store) Find(key string) (*Checked, error) {
	dir := s.Dir(key)
	record := filepath.Join(dir, recordFile)
	b, err := os.ReadFile(record)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNone
	}
	if err != nil {
		return nil, err
	}
	c := &Checked{Dir: dir, record: b}
	var meta Meta
	if err := json.Unmarshal(b, &meta); err != nil {
		return c, fmt.Errorf("%w: its record: %w", ErrCorrupt, err)
	}
	if meta.Format != Format || meta.Key != key {
		return nil, errors.New("the snapshot was made for another configuration")
	}
	var bad string
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(dir, ramFile), &st); err != nil || st.Size != meta.RAMSize {
		bad = "its RAM file is missing or not of the recorded size"
	} else if st.Ctim.Nano() != meta.RAMCtime {
		bad = "its RAM file was changed after it was saved"
	} else if c.state, err = statID(filepath.Join(dir, stateFile)); err != nil {
		bad = "its device state is missing"
	} else if sum, err := fileSHA256(filepath.Join(dir, stateFile)); err != nil || sum != meta.StateSHA256 {
		bad = "its device state does not match its digest"
	} else if meta.RootSize > 0 {
		var rs unix.Stat_t
		if err := unix.Stat(filepath.Join(dir, RootFile), &rs); err != nil || rs.Size != meta.RootSize {
			bad = "its root layer is missing or not of the recorded size"
		} else if rs.Ctim.Nano() != meta.RootCtime {
			bad = "its root layer was changed after it was saved"
		} else {
			c.root, c.hasRoot = fileID{ino: rs.Ino, ctime: rs.Ctim.Nano()}, true
		}
	}
	if bad == "" {
		c.ram = fileID{ino: st.Ino, ctime: st.Ctim.Nano()}
		return c, nil
	}
	// A snapshot that another process replaced while this one looked
	// (the files then come from two snapshots) is not damaged.
	if again, err := os.ReadFile(record); err != nil || !bytes.Equal(again, b) {
		return nil, errors.New("the snapshot was being replaced")
	}
	return c, fmt.Errorf("%w: %s", ErrCorrupt, bad)
}

// Change is what became of a checked snapshot.
type Change int

const (
	Same     Change = iota
	Replaced        // a new one (record, files) took its place
	Written         // its RAM file or state was written in place
)

// Change says whether the snapshot is still the one checked: after its
// state is loaded, that the VMM has the files that were checked; after a
// run, that the run's VMM did not write the RAM file it had open. Other
// inodes mean another snapshot, and the same inode with another change
// time the same file written.
func (c *Checked) Change() Change {
	b, err := os.ReadFile(filepath.Join(c.Dir, recordFile))
	if err != nil || !bytes.Equal(b, c.record) {
		return Replaced
	}
	files := []struct {
		name string
		id   fileID
	}{{ramFile, c.ram}, {stateFile, c.state}}
	if c.hasRoot {
		files = append(files, struct {
			name string
			id   fileID
		}{RootFile, c.root})
	}
	for _, f := range files {
		now, err := statID(filepath.Join(c.Dir, f.name))
		switch {
		case err != nil || now.ino != f.id.ino:
			return Replaced
		case now.ctime != f.id.ctime:
			return Written
		}
	}
	return Same
}

// CheckBeforeResume is a restore's last check, once the VMM has loaded
// the state: the guest runs only from the snapshot that was checked.
func (c *Checked) CheckBeforeResume() error {
	switch c.Change() {
	case Replaced:
		return ErrReplaced
	case Written:
		return ErrWritten
	}
	return nil
}

// Discard removes the snapshot c checked, and only that one: it is moved
// aside first, and put back when what was moved turns out to be a
// snapshot that replaced it meanwhile. It reports whether it removed it.
// Runs restoring it right now keep their open files.
func (c *Checked) Discard() bool {
	trash, ok := moveAside(c.Dir)
	if !ok {
		return false
	}
	if b, err := os.ReadFile(filepath.Join(trash, recordFile)); err == nil && !bytes.Equal(b, c.record) {
		// Another snapshot: back in place, unless yet another came.
		if os.Rename(trash, c.Dir) == nil {
			return false
		}
	}
	_ = os.RemoveAll(trash)
	return true
}

// moveAside renames a snapshot directory to a name no run looks for (and
// that PruneStale removes if its caller dies before it does).
func moveAside(dir string) (string, bool) {
	trash := dir + ".discarded-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	return trash, os.Rename(dir, trash) == nil
}

func discard(dir string) {
	if trash, ok := moveAside(dir); ok {
		_ = os.RemoveAll(trash)
	}
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// CopyRoot copies the saved root layer (Checked.Root) to dst, a file of
// the run's, private to it: only its data regions, in the kernel.
func CopyRoot(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	err = copyData(int(in.Fd()), int(out.Fd()), fi.Size())
	if err == nil {
		err = out.Truncate(fi.Size())
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("copy the snapshot's root layer: %w", err)
	}
	return nil
}

// copyData copies the data regions (SEEK_DATA to SEEK_HOLE) of the first
// size bytes of in to the same offsets of out.
func copyData(in, out int, size int64) error {
	for pos := int64(0); pos < size; {
		data, err := unix.Seek(in, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(in, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		hole = min(hole, size)
		for off := data; off < hole; {
			woff := off
			n, err := unix.CopyFileRange(in, &off, out, &woff, int(hole-off), 0)
			if err != nil {
				return err
			}
			if n == 0 {
				return io.ErrUnexpectedEOF
			}
		}
		pos = hole
	}
	return nil
}

// SparseFile makes path a sparse file of size bytes, private to the run.
func SparseFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Saving is a snapshot being made: a private directory in the store that
// no run looks at until Commit renames it into place.
type Saving struct {
	// Dir is where the VMM saves (its RAM file and state).
	Dir string
	// RunDir holds the saving machine's console log and the writable
	// placeholders, which the snapshot does not keep.
	RunDir string
	store  Store
	key    string
	unlock func()
}

// Begin starts making the snapshot of key, with the store locked until
// Close. The directory is world-readable, as the store is: snapshots are
// shared by a user's runs, and a root run's jailed VMM reads them.
func (s Store) Begin(key string) (*Saving, error) {
	if err := os.MkdirAll(s.Root, 0o755); err != nil {
		return nil, err
	}
	unlock, err := s.Lock()
	if err != nil {
		return nil, err
	}
	sv := &Saving{store: s, key: key, unlock: unlock}
	if sv.Dir, err = os.MkdirTemp(s.Root, ".tmp-"); err != nil {
		sv.Close()
		return nil, err
	}
	if err := os.Chmod(sv.Dir, 0o755); err != nil {
		sv.Close()
		return nil, err
	}
	if sv.RunDir, err = os.MkdirTemp(sv.Dir, "run-"); err != nil {
		sv.Close()
		return nil, err
	}
	if err := SparseFile(sv.Placeholder(), PlaceholderSize); err != nil {
		sv.Close()
		return nil, err
	}
	return sv, nil
}

// Placeholder is the read-only drive of every empty slot.
func (sv *Saving) Placeholder() string { return filepath.Join(sv.Dir, PlaceholderFile) }

// Root is where a template's root layer is made for the saving guest to
// mount; Commit keeps it (read-only) when it is there.
func (sv *Saving) Root() string { return filepath.Join(sv.Dir, RootFile) }

// Commit records the saved files and replaces the snapshot of the key
// with them, atomically: the old one moves aside (runs restoring it keep
// their open files) and the new one takes its name. It then prunes what
// no run can restore any more. meta's Format, Key, Created and file
// fields are filled in here.
func (sv *Saving) Commit(meta Meta) (string, error) {
	if err := os.RemoveAll(sv.RunDir); err != nil {
		return "", err
	}
	sum, err := fileSHA256(filepath.Join(sv.Dir, stateFile))
	if err != nil {
		return "", err
	}
	var ram unix.Stat_t
	if err := unix.Stat(filepath.Join(sv.Dir, ramFile), &ram); err != nil {
		return "", err
	}
	meta.Format, meta.Key, meta.Created = Format, sv.key, time.Now().UTC()
	meta.StateSHA256, meta.RAMSize, meta.RAMCtime = sum, ram.Size, ram.Ctim.Nano()
	if f, err := os.Open(sv.Root()); err == nil {
		// Durable before the record says the snapshot is usable, as
		// the RAM file is (the VMM has ended: nothing writes it now).
		err = f.Sync()
		f.Close()
		if err != nil {
			return "", err
		}
	}
	if err := os.Chmod(sv.Root(), 0o444); err == nil {
		var rs unix.Stat_t
		if err := unix.Stat(sv.Root(), &rs); err != nil {
			return "", err
		}
		meta.RootSize, meta.RootCtime = rs.Size, rs.Ctim.Nano()
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return "", err
	}
	if err := atomicfile.WriteBytes(filepath.Join(sv.Dir, recordFile), 0o644, append(b, '\n')); err != nil {
		return "", err
	}
	final := sv.store.Dir(sv.key)
	old := final + ".old-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := os.Rename(final, old); err == nil {
		defer os.RemoveAll(old)
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if err := os.Rename(sv.Dir, final); err != nil {
		return "", err
	}
	sv.Dir = ""
	sv.store.PruneStale(sv.key)
	return final, nil
}

// Close removes what Commit did not take, and unlocks the store.
func (sv *Saving) Close() {
	if sv.Dir != "" {
		_ = os.RemoveAll(sv.Dir)
		sv.Dir = ""
	}
	if sv.unlock != nil {
		sv.unlock()
		sv.unlock = nil
	}
}

// PruneStale removes the snapshots in the store that no run can restore
// any more, so that rebuilding the kernel or the agent, or upgrading
// QEMU, does not leave one more RAM file behind each time: those of
// another format, those made from a kernel or initramfs file that is gone
// or has changed since, and those of an older build of the VMM binary
// that current (the key just saved) names. Snapshots of other machine
// shapes that are still valid stay, and so does what other processes are
// making. Leftovers of killed processes (snapshots moved aside, half-made
// ones an hour old) go too. A run restoring a snapshot removed here keeps
// its open files.
func (s Store) PruneStale(current string) {
	ents, err := os.ReadDir(s.Root)
	if err != nil {
		return
	}
	vmm := keyField(current, "vmm")
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(s.Root, e.Name())
		switch name := e.Name(); {
		case strings.Contains(name, ".old-") || strings.Contains(name, ".discarded-"):
			// Moved aside to be removed by a process that did not live
			// to remove it.
			_ = os.RemoveAll(dir)
		case strings.HasPrefix(name, ".tmp-"):
			// One being made takes seconds; an hour-old one was left by
			// a process that was killed while it saved.
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				_ = os.RemoveAll(dir)
			}
		case strings.HasPrefix(name, "."):
		case stale(dir, vmm):
			discard(dir)
		}
	}
}

// stale reports whether the snapshot in dir can never be restored again
// (see PruneStale).
func stale(dir, vmm string) bool {
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if errors.Is(err, os.ErrNotExist) {
		// Snapshots are renamed into place complete: this is a leftover.
		return true
	}
	var meta Meta
	if err != nil || json.Unmarshal(b, &meta) != nil || meta.Format != Format {
		return err == nil
	}
	for _, f := range []string{"kernel", "initrd"} {
		v := keyField(meta.Key, f)
		path, _, _ := strings.Cut(v, " ")
		if id, err := FileIdentity(path); path == "" || err != nil || id != v {
			return true
		}
	}
	// The VMM's part of the key is "NAME PATH IDENTITY...": the same
	// binary path with another identity is an older build.
	old := strings.Fields(keyField(meta.Key, "vmm"))
	cur := strings.Fields(vmm)
	return len(old) > 1 && len(cur) > 1 && old[1] == cur[1] && keyField(meta.Key, "vmm") != vmm
}

// usedFile's modification time is when a run last restored the snapshot
// (its record's is when it was made): the budget removes the snapshots
// used longest ago first.
const usedFile = "used"

// MarkUsed records that a run restores the snapshot in dir now. It costs
// a utimes (or, the first time, a create); failing, it only makes the
// snapshot look older to the budget.
func MarkUsed(dir string) {
	p := filepath.Join(dir, usedFile)
	now := time.Now()
	if err := os.Chtimes(p, now, now); errors.Is(err, os.ErrNotExist) {
		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|unix.O_NOFOLLOW, 0o644); err == nil {
			f.Close()
		}
	}
}

// Usage is one snapshot in a store, as the budget sees it.
type Usage struct {
	Dir string
	// Meta is its record: the machine configuration it restores.
	Meta Meta
	// Size is the disk space its files take (the RAM file is sparse).
	Size int64
	// Made is when it was saved, LastUsed when a run last restored it
	// (Made if none did).
	Made, LastUsed time.Time
	store          Store
}

// List returns the store's complete snapshots; a store that does not
// exist has none.
func (s Store) List() ([]Usage, error) {
	ents, err := os.ReadDir(s.Root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Usage
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		dir := filepath.Join(s.Root, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, recordFile))
		if err != nil {
			continue
		}
		var meta Meta
		if json.Unmarshal(b, &meta) != nil {
			continue
		}
		u := Usage{Dir: dir, Meta: meta, Size: diskusage.Of(dir), Made: meta.Created, LastUsed: meta.Created, store: s}
		if fi, err := os.Stat(filepath.Join(dir, usedFile)); err == nil && fi.ModTime().After(u.LastUsed) {
			u.LastUsed = fi.ModTime()
		}
		out = append(out, u)
	}
	return out, nil
}

// Remove removes the snapshot unless a run is restoring from its store
// at this moment (between its check of a snapshot and its VMM having the
// files open, a run holds the store's lock shared): it takes that lock
// exclusively, without waiting, and reports false when it could not.
// Runs already restored keep their open files.
func (u Usage) Remove() (bool, error) {
	l, err := lockfile.Take(filepath.Join(u.store.Root, "lock"), unix.LOCK_EX|unix.LOCK_NB, true)
	if errors.Is(err, lockfile.ErrWouldBlock) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer l.Release()
	trash, ok := moveAside(u.Dir)
	if !ok {
		return false, nil
	}
	return true, os.RemoveAll(trash)
}
