package mvm

import (
	"bytes"
	"context"
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

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/diskusage"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/template"
)

// A snapshot is a VM booted to an idle agent and saved: its RAM in a file
// that every restore maps copy-on-write (so one snapshot serves any number
// of runs, concurrently, and no run ever writes it), and its device state.
// A run restores one instead of booting when everything that shaped the
// saved machine matches (see snapshotKey); the run's own disks go into
// drive slots the snapshot was taken with, which is what lets runs with
// --add-dir restore too.

// snapshotFormat changes whenever what a snapshot holds, or how runs use
// it, changes.
const snapshotFormat = "2"

// snapshotDirSlots is how many shared directories a run may have and
// still restore: each has a read-only slot for its image and a writable
// one for its changes. QEMU's microvm machine has eight virtio devices:
// the agent's channel, a template's two drives, and two directories.
const snapshotDirSlots = 2

// placeholderSize is the size of the files in the drive slots of a
// snapshot. The guest learns a drive's capacity when it probes it, at
// boot, and keeps it across the restore; it must be at least as large as
// any image a run puts in the slot. The files are sparse: the size costs
// nothing.
const placeholderSize = 1 << 40

// snapshotMeta is snapshot.json, written last: a snapshot directory
// without it is incomplete and never used.
type snapshotMeta struct {
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
	RAMCtime  int64  `json:"ram_ctime_ns"`
	CPUs      int    `json:"cpus"`
	MemoryMiB uint64 `json:"memory_mib"`
	Accel     string `json:"accel"`
}

// SnapshotInfo describes a saved snapshot.
type SnapshotInfo struct {
	// Dir holds its files.
	Dir string
	// Size is what it takes on disk (the RAM file is sparse).
	Size int64
	// Took is how long booting and saving took.
	Took time.Duration
}

// snapshotKey is everything a restored machine depends on: the VMM build,
// the kernel and initramfs, the machine's shape and the drive layout. Two
// configurations with one key can share a snapshot; any difference means
// a cold boot.
func snapshotKey(ctx context.Context, r resolved, img image.Image, t *template.Template) (string, error) {
	sn, ok := r.backend.(backend.Snapshotter)
	if !ok {
		return "", errors.New("the backend cannot restore snapshots")
	}
	vmm, err := sn.SnapshotKey(ctx)
	if err != nil {
		return "", err
	}
	kernel, err := fileIdentity(img.Kernel)
	if err != nil {
		return "", err
	}
	initrd, err := fileIdentity(img.Initrd)
	if err != nil {
		return "", err
	}
	tmpl := "none"
	if t != nil {
		// The template's disk is in its slot when the snapshot is taken
		// and at every restore: it must be the very same content.
		tmpl = t.Revision + " " + t.Digest + " " + t.Rootfs.Digest
	}
	return strings.Join([]string{
		"format " + snapshotFormat,
		"vmm " + vmm,
		"kernel " + kernel,
		"initrd " + initrd,
		"template " + tmpl,
		"args " + strings.Join(r.KernelArgs, " "),
		"cpus " + strconv.Itoa(r.CPUs),
		"memory " + strconv.FormatUint(r.memMiB, 10),
		"accel " + string(r.accel.Kind),
		"slots " + strconv.Itoa(snapshotDirSlots),
	}, "\n"), nil
}

// fileIdentity names a file's content well enough for a cache key without
// reading it: cached kernels and initramfs files are content-addressed
// and never rewritten in place, and a user's own kernel changes its size
// or modification time when it is rebuilt.
func fileIdentity(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", path, err)
	}
	return fmt.Sprintf("%s size=%d mtime=%d.%09d ino=%d", path, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ino), nil
}

// snapshotRoot holds the snapshots of the default image, or a template's
// (which the template store removes with the template).
func snapshotRoot(r resolved, root *rootPlan) string {
	if root != nil {
		return root.snapshots
	}
	return filepath.Join(r.CacheDir, "snapshots")
}

// snapshotDir is where the snapshot with key lives: one per machine
// configuration.
func snapshotDir(r resolved, key string, root *rootPlan) string {
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(snapshotRoot(r, root), hex.EncodeToString(sum[:12]))
}

// errCorruptSnapshot marks a snapshot of the configuration asked for
// whose files do not match its record (a RAM file of another size or
// changed since it was saved, a device state with another digest): it is
// discarded, so that it is rebuilt rather than checked again at every run.
var errCorruptSnapshot = errors.New("corrupt snapshot")

// checkedSnapshot is a snapshot that matched its record, with what the
// check saw: the record's bytes and the identity of its two files. A
// snapshot is only ever replaced whole (a new directory, new files, then
// a rename), so the same inodes later mean the same snapshot.
type checkedSnapshot struct {
	dir        string
	record     []byte
	ram, state fileID
}

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

// findSnapshot checks the snapshot in dir against key, and returns it or
// why it cannot be used: errCorruptSnapshot for one that is damaged, with
// the snapshot as it was read (what to discard).
func findSnapshot(dir, key string) (*checkedSnapshot, error) {
	record := filepath.Join(dir, "snapshot.json")
	b, err := os.ReadFile(record)
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNoSnapshot
	}
	if err != nil {
		return nil, err
	}
	c := &checkedSnapshot{dir: dir, record: b}
	var meta snapshotMeta
	if err := json.Unmarshal(b, &meta); err != nil {
		return c, fmt.Errorf("%w: its record: %w", errCorruptSnapshot, err)
	}
	if meta.Format != snapshotFormat || meta.Key != key {
		return nil, errors.New("the snapshot was made for another configuration")
	}
	var bad string
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(dir, "ram"), &st); err != nil || st.Size != meta.RAMSize {
		bad = "its RAM file is missing or not of the recorded size"
	} else if st.Ctim.Nano() != meta.RAMCtime {
		bad = "its RAM file was changed after it was saved"
	} else if c.state, err = statID(filepath.Join(dir, "state")); err != nil {
		bad = "its device state is missing"
	} else if sum, err := fileSHA256(filepath.Join(dir, "state")); err != nil || sum != meta.StateSHA256 {
		bad = "its device state does not match its digest"
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
	return c, fmt.Errorf("%w: %s", errCorruptSnapshot, bad)
}

// What became of a checked snapshot.
type snapshotChange int

const (
	snapshotSame     snapshotChange = iota
	snapshotReplaced                // a new one (record, files) took its place
	snapshotWritten                 // its RAM file or state was written in place
)

// errSnapshotReplaced and errSnapshotWritten: the files a restoring VMM
// opened are not the snapshot that was checked.
var (
	errSnapshotReplaced = errors.New("the snapshot was replaced while it restored")
	errSnapshotWritten  = errors.New("the snapshot's RAM file or state was written while it restored")
)

// change says whether the snapshot is still the one checked: after its
// state is loaded, that the VMM has the files that were checked; after a
// run, that the run's VMM did not write the RAM file it had open. A
// snapshot is only ever replaced whole (new files, then a rename), so
// other inodes mean another snapshot, and the same inode with another
// change time the same file written.
func (c *checkedSnapshot) change() snapshotChange {
	b, err := os.ReadFile(filepath.Join(c.dir, "snapshot.json"))
	if err != nil || !bytes.Equal(b, c.record) {
		return snapshotReplaced
	}
	for _, f := range []struct {
		name string
		id   fileID
	}{{"ram", c.ram}, {"state", c.state}} {
		now, err := statID(filepath.Join(c.dir, f.name))
		switch {
		case err != nil || now.ino != f.id.ino:
			return snapshotReplaced
		case now.ctime != f.id.ctime:
			return snapshotWritten
		}
	}
	return snapshotSame
}

// checkBeforeResume is the restore's BeforeResume: the guest runs only
// from the snapshot that was checked.
func (c *checkedSnapshot) checkBeforeResume() error {
	switch c.change() {
	case snapshotReplaced:
		return errSnapshotReplaced
	case snapshotWritten:
		return errSnapshotWritten
	}
	return nil
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

// errNoSnapshot: nothing saved for this configuration (yet, or since the
// kernel, the agent, QEMU or the machine's shape changed).
var errNoSnapshot = errors.New("no snapshot for this configuration")

// errSnapshotsLocked: a template's snapshots are being removed.
var errSnapshotsLocked = errors.New("the template's snapshots are being removed")

// lockSnapshots takes a shared lock on root/lock, the lock a template
// store takes exclusively, without waiting, before it removes a
// revision's snapshots: a run holds it from its check of a snapshot until
// its VMM has the files open, and PrepareSnapshot while it makes one. A
// root that does not exist (nothing to restore) is not made.
func lockSnapshots(root string) (release func(), err error) {
	f, err := os.OpenFile(filepath.Join(root, "lock"), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, errSnapshotsLocked
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}

// discardSnapshot removes a snapshot that failed to restore, so that it
// is rebuilt rather than tried again. Runs restoring it right now keep
// their open files.
func discardSnapshot(dir string) {
	if trash, ok := moveAside(dir); ok {
		_ = os.RemoveAll(trash)
	}
}

// moveAside renames a snapshot directory to a name no run looks for (and
// that pruneStaleSnapshots removes if its caller dies before it does).
func moveAside(dir string) (string, bool) {
	trash := dir + ".discarded-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	return trash, os.Rename(dir, trash) == nil
}

// discardChecked removes the snapshot c checked, and only that one: it is
// moved aside first, and put back when what was moved turns out to be a
// snapshot that replaced it meanwhile. It reports whether it removed it.
func discardChecked(c *checkedSnapshot) bool {
	trash, ok := moveAside(c.dir)
	if !ok {
		return false
	}
	if b, err := os.ReadFile(filepath.Join(trash, "snapshot.json")); err == nil && !bytes.Equal(b, c.record) {
		// Another snapshot: back in place, unless yet another came.
		if os.Rename(trash, c.dir) == nil {
			return false
		}
	}
	_ = os.RemoveAll(trash)
	return true
}

// slotDrives is the drive layout of a snapshotted machine: on a template,
// its disk and the root's writable layer; then for each of the
// snapshotDirSlots directory slots, a read-only drive and a writable one.
// Slots the run does not use hold placeholders: the shared read-only one
// of the snapshot, and a file of the run's for writable ones (never
// shared: the guest could write it), rwSize bytes long.
//
// When the snapshot is taken rwSize is placeholderSize, which is what the
// guest learns; at a restore it is 0. The restored guest still believes
// the slot holds a TiB, but QEMU checks every request against the image's
// real size and fails what lies beyond it (EIO in the guest): an empty
// file is a slot the guest can neither read nor write, where a sparse TiB
// would let it allocate a TiB of the host's disk.
func slotDrives(root *rootPlan, dirs []*dirPlan, roPlaceholder, runDir string, rwSize int64) ([]backend.Drive, error) {
	var drives []backend.Drive
	if root != nil {
		upper := backend.Drive{Label: rootLabel, Path: root.upper}
		if upper.Path == "" {
			upper = backend.Drive{Path: filepath.Join(runDir, "slot-root.img")}
			if err := sparseFile(upper.Path, rwSize); err != nil {
				return nil, err
			}
		}
		drives = append(drives, backend.Drive{Label: root.lowerLabel, Path: root.lower, ReadOnly: true}, upper)
	}
	for i := 0; i < snapshotDirSlots; i++ {
		ro := backend.Drive{Path: roPlaceholder, ReadOnly: true}
		rw := backend.Drive{}
		if i < len(dirs) {
			d := dirs[i]
			ro = backend.Drive{Label: d.lowerLabel, Path: d.lower, ReadOnly: true}
			if d.upper != "" {
				rw = backend.Drive{Label: d.upperLabel, Path: d.upper}
			}
		}
		if rw.Path == "" {
			p := filepath.Join(runDir, "slot-"+strconv.Itoa(i)+".img")
			if err := sparseFile(p, rwSize); err != nil {
				return nil, err
			}
			rw.Path = p
		}
		drives = append(drives, ro, rw)
	}
	return drives, nil
}

func sparseFile(path string, size int64) error {
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

// PrepareSnapshot boots cfg's image to an idle guest agent and saves it,
// so that later sandboxes with a matching Config (same image, vCPUs,
// memory, accelerator, kernel arguments, and at most two shared
// directories) restore it instead of booting. It replaces the snapshot
// for that configuration, atomically: runs restoring the old one are not
// disturbed. Only Config's machine fields matter; Dirs must be empty.
func PrepareSnapshot(ctx context.Context, cfg Config) (SnapshotInfo, error) {
	start := time.Now()
	if len(cfg.Dirs) > 0 {
		return SnapshotInfo{}, invalid("Dirs", "a snapshot is taken without shared directories; runs add theirs")
	}
	r, err := resolve(cfg)
	if err != nil {
		return SnapshotInfo{}, err
	}
	img, err := loadImage(r)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if err := defaultBackend(&r); err != nil {
		return SnapshotInfo{}, err
	}
	var (
		root *rootPlan
		t    *template.Template
	)
	if r.Template != "" || r.Image != "" {
		// The template's disk goes into its slot as it will at every
		// restore; the root's writable layer is a placeholder.
		sb := newSandbox(r, img)
		undo, err := sb.leaseTemplate(ctx)
		if err != nil {
			return SnapshotInfo{}, err
		}
		defer func() { _ = undo(context.Background()) }()
		root, img, t = sb.root, sb.img, sb.root.lease.Template
	}
	key, err := snapshotKey(ctx, r, img, t)
	if err != nil {
		return SnapshotInfo{}, err
	}
	final := snapshotDir(r, key, root)
	if err := os.MkdirAll(snapshotRoot(r, root), 0o755); err != nil {
		return SnapshotInfo{}, err
	}
	unlock, err := lockSnapshots(snapshotRoot(r, root))
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer unlock()
	tmp, err := os.MkdirTemp(snapshotRoot(r, root), ".tmp-")
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return SnapshotInfo{}, err
	}
	// The machine's run directory holds its console log and the writable
	// placeholders, which the snapshot does not need.
	runDir, err := os.MkdirTemp(tmp, "run-")
	if err != nil {
		return SnapshotInfo{}, err
	}
	roPlaceholder := filepath.Join(tmp, "placeholder")
	if err := sparseFile(roPlaceholder, placeholderSize); err != nil {
		return SnapshotInfo{}, err
	}
	drives, err := slotDrives(root, nil, roPlaceholder, runDir, placeholderSize)
	if err != nil {
		return SnapshotInfo{}, err
	}
	bc := backend.Config{
		Name: "snapshot", RunDir: runDir, ConsoleLog: filepath.Join(runDir, "console.log"),
		Kernel: img.Kernel, Initrd: img.Initrd, KernelArgs: r.KernelArgs,
		CPUs: r.CPUs, MemoryMiB: r.memMiB, Accel: r.accel.Kind,
		Drives: drives, Snapshot: &backend.Snapshot{Dir: tmp},
	}
	m, err := r.backend.Start(ctx, bc)
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("boot for a snapshot: %w", err)
	}
	stopCtx := context.WithoutCancel(ctx)
	defer func() { _ = m.Stop(stopCtx) }()
	if err := quiesceForSnapshot(ctx, m); err != nil {
		return SnapshotInfo{}, err
	}
	saver, ok := m.(backend.SnapshotSaver)
	if !ok {
		return SnapshotInfo{}, errors.New("the backend cannot save snapshots")
	}
	if err := saver.SaveSnapshot(ctx); err != nil {
		return SnapshotInfo{}, err
	}
	if err := os.RemoveAll(runDir); err != nil {
		return SnapshotInfo{}, err
	}
	sum, err := fileSHA256(filepath.Join(tmp, "state"))
	if err != nil {
		return SnapshotInfo{}, err
	}
	var ram unix.Stat_t
	if err := unix.Stat(filepath.Join(tmp, "ram"), &ram); err != nil {
		return SnapshotInfo{}, err
	}
	meta := snapshotMeta{
		Format: snapshotFormat, Key: key, Created: time.Now().UTC(), StateSHA256: sum, RAMSize: ram.Size, RAMCtime: ram.Ctim.Nano(),
		CPUs: r.CPUs, MemoryMiB: r.memMiB, Accel: string(r.accel.Kind),
	}
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return SnapshotInfo{}, err
	}
	if err := atomicfile.WriteBytes(filepath.Join(tmp, "snapshot.json"), 0o644, append(b, '\n')); err != nil {
		return SnapshotInfo{}, err
	}
	// Replace atomically: the old one moves aside (runs restoring it keep
	// their open files), the new one takes its name.
	old := final + ".old-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := os.Rename(final, old); err == nil {
		defer os.RemoveAll(old)
	} else if !errors.Is(err, os.ErrNotExist) {
		return SnapshotInfo{}, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return SnapshotInfo{}, err
	}
	pruneStaleSnapshots(snapshotRoot(r, root), key)
	return SnapshotInfo{Dir: final, Size: diskusage.Of(final), Took: time.Since(start)}, nil
}

// pruneStaleSnapshots removes the snapshots in root that no run can
// restore any more, so that rebuilding the kernel or the agent, or
// upgrading QEMU, does not leave one more RAM file behind each time: those
// of another snapshot format, those made from a kernel or initramfs file
// that is gone or has changed since, and those of an older build of the
// VMM binary that current (the key just saved) names. Snapshots of other
// machine shapes that are still valid stay, and so does what other
// processes are making. Leftovers of killed processes (snapshots moved
// aside, half-made ones an hour old) go too. A run restoring a snapshot
// removed here keeps its open files.
func pruneStaleSnapshots(root, current string) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	vmm := keyField(current, "vmm")
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		switch name := e.Name(); {
		case strings.Contains(name, ".old-") || strings.Contains(name, ".discarded-"):
			// Moved aside to be removed by a process that did not live
			// to remove it.
			_ = os.RemoveAll(dir)
		case strings.HasPrefix(name, ".tmp-"):
			// One being made takes seconds; an hour-old one was left by
			// a PrepareSnapshot that was killed.
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				_ = os.RemoveAll(dir)
			}
		case strings.HasPrefix(name, "."):
		case staleSnapshot(dir, vmm):
			discardSnapshot(dir)
		}
	}
}

// staleSnapshot reports whether the snapshot in dir can never be restored
// again (see pruneStaleSnapshots).
func staleSnapshot(dir, vmm string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "snapshot.json"))
	if errors.Is(err, os.ErrNotExist) {
		// Snapshots are renamed into place complete: this is a leftover.
		return true
	}
	var meta snapshotMeta
	if err != nil || json.Unmarshal(b, &meta) != nil || meta.Format != snapshotFormat {
		return err == nil
	}
	for _, f := range []string{"kernel", "initrd"} {
		v := keyField(meta.Key, f)
		path, _, _ := strings.Cut(v, " ")
		if id, err := fileIdentity(path); path == "" || err != nil || id != v {
			return true
		}
	}
	// The VMM's part of the key is "NAME PATH IDENTITY...": the same
	// binary path with another identity is an older build.
	old := strings.Fields(keyField(meta.Key, "vmm"))
	cur := strings.Fields(vmm)
	return len(old) > 1 && len(cur) > 1 && old[1] == cur[1] && keyField(meta.Key, "vmm") != vmm
}

// keyField returns the value of a snapshot key's line "NAME VALUE".
func keyField(key, name string) string {
	for line := range strings.SplitSeq(key, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	return ""
}

// quiesceForSnapshot waits for the freshly booted agent, warms it up with
// one command (so the restored guest has its code paths translated and
// cached), and leaves it idle: no stream open, nothing in flight.
func quiesceForSnapshot(ctx context.Context, m backend.Machine) error {
	conn, err := m.DialAgent(ctx)
	if err != nil {
		return err
	}
	c, err := agentclient.Dial(conn)
	if err != nil {
		return err
	}
	defer c.Close()
	hctx, cancel := context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	h, err := c.Hello(hctx)
	if err != nil {
		select {
		case <-m.Done():
			_ = m.Stop(context.WithoutCancel(ctx))
			return fmt.Errorf("boot for a snapshot: %w", vmEnded(m))
		case <-time.After(100 * time.Millisecond):
		}
		return fmt.Errorf("boot for a snapshot: %w", err)
	}
	if !h.Has(agentproto.CapSnapshot) {
		return fmt.Errorf("the guest agent (%s) cannot be snapshotted", h.AgentVersion)
	}
	p, err := c.Exec(hctx, agentclient.ExecSpec{Argv: []string{"true"}})
	if err != nil {
		return err
	}
	if st, err := p.Wait(hctx); err != nil || st.Code != 0 {
		return fmt.Errorf("warm-up command: %+v %v", st, err)
	}
	return c.Quiesce(hctx)
}

// SnapshotFor returns the snapshot a sandbox with cfg would restore, or
// why it would boot instead (no snapshot, a stale one for another QEMU,
// kernel or machine). It starts nothing.
func SnapshotFor(ctx context.Context, cfg Config) (string, error) {
	r, err := resolve(cfg)
	if err != nil {
		return "", err
	}
	img, err := loadImage(r)
	if err != nil {
		return "", err
	}
	if err := defaultBackend(&r); err != nil {
		return "", err
	}
	sb := newSandbox(r, img)
	if r.Template != "" || r.Image != "" {
		undo, err := sb.leaseTemplate(ctx)
		if err != nil {
			return "", err
		}
		defer func() { _ = undo(context.Background()) }()
	}
	c, unlock, why := sb.snapshot(ctx)
	if c == nil {
		return "", errors.New(why)
	}
	unlock()
	return c.dir, nil
}
