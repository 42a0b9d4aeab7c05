package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/diskusage"
	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/units"
	"github.com/mvm-sh/mvm/internal/writeback"
)

func checkE2fsprogs(h *Host) Result {
	r := Result{ID: "e2fsprogs"}
	m := h.missing("--add-dir", dirimage.Deps()...)
	if m == nil {
		r.Status, r.Message = OK, "mkfs.ext4 and e2fsck (for --add-dir)"
		return r
	}
	// Debian leaves the sbin directories out of a regular user's PATH:
	// the package is there, the programs are not found.
	var inSbin []string
	for _, d := range m.Missing {
		for _, dir := range []string{"/usr/sbin", "/sbin"} {
			if fi, err := os.Stat(h.path(filepath.Join(dir, d.What))); err == nil && fi.Mode().IsRegular() {
				inSbin = append(inSbin, filepath.Join(dir, d.What))
				break
			}
		}
	}
	if len(inSbin) == len(m.Missing) {
		r.Status, r.Fix = Warn, `export PATH="$PATH:/usr/sbin:/sbin"`
		r.Message = "--add-dir cannot find " + strings.Join(inSbin, " and ") + ": the sbin directories are not in PATH (add the fix to ~/.profile to keep it)"
		return r
	}
	r.Status, r.Fix = Warn, h.install(m.Packages()...)
	r.Message = "missing " + describeMissing(m) + ": --add-dir cannot make its images"
	return r
}

// debianDeps are what building a template from Debian needs: mmdebstrap,
// the archive's keyring, and without root newuidmap for its unshare mode.
func debianDeps(h *Host) []hostdeps.Dep {
	deps := []hostdeps.Dep{
		hostdeps.Program("mmdebstrap", "mmdebstrap"),
		hostdeps.File("/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring"),
	}
	if h.Euid != 0 {
		deps = append(deps, hostdeps.Program("newuidmap", "uidmap"))
	}
	return deps
}

func checkMmdebstrap(h *Host) Result {
	r := Result{ID: "mmdebstrap"}
	if m := h.missing("Debian templates", debianDeps(h)...); m != nil {
		r.Status, r.Fix = Warn, h.install(m.Packages()...)
		r.Message = "missing " + describeMissing(m) + ": needed only to build templates from Debian"
		return r
	}
	r.Status, r.Message = OK, "mmdebstrap and the Debian archive keyring (for templates from Debian)"
	return r
}

// nearestExisting is dir or its closest ancestor that exists.
func nearestExisting(dir string) string {
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		if _, err := os.Lstat(p); err == nil || p == filepath.Dir(p) {
			return p
		}
	}
}

func checkDiskSpace(h *Host, id, what, dir string) Result {
	r := Result{ID: id}
	if dir == "" {
		r.Status, r.Message = Fail, fmt.Sprintf("no %s directory: %v", what, h.DirErr)
		return r
	}
	at := nearestExisting(dir)
	var st unix.Statfs_t
	if err := unix.Statfs(at, &st); err != nil {
		r.Status, r.Message = Warn, fmt.Sprintf("cannot tell the free space of %s: %v", at, err)
		return r
	}
	free := st.Bavail * uint64(st.Bsize)
	if free < h.minFree() {
		r.Status = Warn
		r.Message = fmt.Sprintf("only %s free for the %s directory %s (below %s): a kernel build unpacks about 1.5 GiB, and read-write directories need room for what the guest writes",
			units.FormatBytes(int64(free)), what, dir, units.FormatBytes(int64(h.minFree())))
		return r
	}
	r.Status, r.Message = OK, fmt.Sprintf("%s free for the %s directory %s", units.FormatBytes(int64(free)), what, dir)
	return r
}

// checkPrivateDir checks that dir (the state or the run directory) is a
// directory of this user's that only they can enter, or that it can be
// created. runstate tightens the run directory's mode itself, so a loose
// mode there is only noted.
func checkPrivateDir(h *Host, id, what, dir string, isRunDir bool) Result {
	r := Result{ID: id}
	if dir == "" {
		r.Status, r.Message = Fail, fmt.Sprintf("no %s: %v", what, h.DirErr)
		return r
	}
	stat := os.Stat
	if isRunDir {
		// Runs refuse a run directory that is a symlink.
		stat = os.Lstat
	}
	fi, err := stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		parent := nearestExisting(dir)
		if err := unix.Access(parent, unix.W_OK|unix.X_OK); err != nil {
			r.Status, r.Fix = Fail, h.sudo("install -d -m 0700 -o "+userOr(h.User)+" "+dir)
			r.Message = fmt.Sprintf("the %s %s does not exist, and %s is not writable to create it", what, dir, parent)
			return r
		}
		r.Status, r.Message = OK, fmt.Sprintf("%s does not exist yet; the first run creates it (0700)", dir)
		return r
	}
	if err != nil {
		r.Status, r.Message = Fail, fmt.Sprintf("%s %s: %v", what, dir, err)
		return r
	}
	if !fi.IsDir() {
		r.Status = Fail
		r.Message = fmt.Sprintf("the %s %s is not a directory", what, dir)
		if fi.Mode()&fs.ModeSymlink != 0 {
			r.Message = fmt.Sprintf("the %s %s is a symlink; runs want a real directory (set MVM_RUN_DIR to where it points)", what, dir)
		}
		return r
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != h.Uid {
		r.Status, r.Fix = Fail, h.sudo("chown -R "+userOr(h.User)+" "+dir)
		r.Message = fmt.Sprintf("the %s %s belongs to uid %d, not to you (uid %d)", what, dir, st.Uid, h.Uid)
		return r
	}
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		r.Status, r.Fix = Fail, "chmod 0700 "+dir
		r.Message = fmt.Sprintf("the %s %s is not writable: %v", what, dir, err)
		return r
	}
	mode := fi.Mode().Perm()
	r.Status, r.Message = OK, fmt.Sprintf("%s (mode %04o, yours)", dir, mode)
	if mode&0o077 != 0 {
		if isRunDir {
			r.Message += "; the next run makes it 0700"
		} else {
			r.Status, r.Fix = Warn, "chmod 0700 "+dir
			r.Message = fmt.Sprintf("the %s %s has mode %04o: other users can read what it keeps (console logs, staged changes)", what, dir, mode)
		}
	}
	if isRunDir {
		if n := countEntries(dir); n > 0 {
			r.Message += fmt.Sprintf("; %d run %s in it (live runs, or leftovers the next run reclaims)", n, pluralWord(n, "directory", "directories"))
		}
	}
	return r
}

func pluralWord(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func countEntries(dir string) int {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			n++
		}
	}
	return n
}

func checkStaged(h *Host) Result {
	r := Result{ID: "staged"}
	if h.StateDir == "" {
		r.Status, r.Message = Skip, "no state directory"
		return r
	}
	dir := filepath.Join(h.StateDir, "staged")
	list, err := writeback.ListStaged(dir)
	if err != nil {
		r.Status, r.Message = Warn, fmt.Sprintf("cannot list the kept changes in %s: %v", dir, err)
		return r
	}
	if len(list) == 0 {
		r.Status, r.Message = OK, "no kept changes of read-write directories"
		return r
	}
	var size int64
	bad := 0
	for _, s := range list {
		size += s.Size
		if s.Err != nil {
			bad++
		}
	}
	r.Status, r.Fix = Warn, "mvmctl recover"
	r.Message = fmt.Sprintf("%d change %s of read-write directories could not be written back and %s kept in %s (%s, the oldest from %s)",
		len(list), pluralWord(len(list), "set", "sets"), pluralWord(len(list), "is", "are"), dir, units.FormatBytes(size), units.Age(time.Since(list[0].Created())))
	if bad > 0 {
		r.Message += fmt.Sprintf("; %d with an unreadable record", bad)
	}
	return r
}

func checkLogs(h *Host) Result {
	r := Result{ID: "logs", Status: OK}
	if h.StateDir == "" {
		r.Status, r.Message = Skip, "no state directory"
		return r
	}
	dir := filepath.Join(h.StateDir, "logs")
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		r.Status, r.Message = Warn, fmt.Sprintf("cannot list %s: %v", dir, err)
		return r
	}
	var (
		n      int
		size   int64
		newest string
		newAt  time.Time
	)
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		size += fi.Size()
		if !strings.HasSuffix(e.Name(), ".console.log") {
			continue
		}
		n++
		if fi.ModTime().After(newAt) {
			newest, newAt = filepath.Join(dir, e.Name()), fi.ModTime()
		}
	}
	if n == 0 {
		r.Message = "no console logs of failed runs kept"
		return r
	}
	r.Message = fmt.Sprintf("%d console %s of failed runs kept in %s (%s; the newest 20 stay), the last %s: %s",
		n, pluralWord(n, "log", "logs"), dir, units.FormatBytes(size), units.Age(time.Since(newAt)), newest)
	return r
}

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// checkTemplates reads the template records in DATA/templates, the
// store's layout: NAME.json, each naming its root filesystem by digest.
// It only reads records; the template store checks their files.
func checkTemplates(h *Host) Result {
	r := Result{ID: "templates", Status: OK}
	if h.DataDir == "" {
		r.Status, r.Message = Skip, "no data directory"
		return r
	}
	dir := filepath.Join(h.DataDir, "templates")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		r.Message = "no templates (" + dir + " does not exist)"
		return r
	}
	if err != nil {
		r.Status, r.Message = Warn, fmt.Sprintf("cannot list %s: %v", dir, err)
		return r
	}
	var names, bad []string
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || strings.HasPrefix(name, ".") || !e.Type().IsRegular() {
			continue
		}
		if err := readTemplateRecord(filepath.Join(dir, e.Name())); err != nil {
			bad = append(bad, fmt.Sprintf("%s (%v)", name, err))
			continue
		}
		names = append(names, name)
	}
	switch {
	case len(bad) > 0:
		r.Status = Warn
		r.Message = fmt.Sprintf("%d of %d template records in %s are damaged: %s; create those templates again", len(bad), len(bad)+len(names), dir, strings.Join(bad, ", "))
	case len(names) == 0:
		r.Message = "no templates in " + dir
	default:
		shown := names
		if len(shown) > 10 {
			shown = append(shown[:10:10], "...")
		}
		r.Message = fmt.Sprintf("%d %s in %s: %s", len(names), pluralWord(len(names), "template", "templates"), dir, strings.Join(shown, ", "))
	}
	return r
}

// templateRecordLimit bounds what is read of one record: they are a few
// hundred bytes.
const templateRecordLimit = 1 << 20

func readTemplateRecord(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var rec struct {
		Rootfs struct {
			Digest string `json:"digest"`
		} `json:"rootfs"`
	}
	dec := json.NewDecoder(io.LimitReader(f, templateRecordLimit))
	if err := dec.Decode(&rec); err != nil {
		return fmt.Errorf("unreadable: %w", err)
	}
	if !digestRE.MatchString(rec.Rootfs.Digest) {
		return fmt.Errorf("no valid rootfs digest")
	}
	return nil
}

// snapshotDirs are where snapshots are kept: the default image's and
// those of templates.
func snapshotDirs(h *Host) []string {
	return []string{filepath.Join(h.CacheDir, "snapshots"), filepath.Join(h.CacheDir, "templates", "snapshots")}
}

// checkSnapshots says whether `mvmctl exec` would restore a snapshot of
// the default VM (a stale one, for another QEMU or kernel, is a warning:
// runs still work, they boot), and counts the snapshots kept in the cache
// and the space they take.
func checkSnapshots(ctx context.Context, h *Host, f *facts) Result {
	r := Result{ID: "snapshots", Status: OK}
	if h.CacheDir == "" {
		r.Status, r.Message = Skip, "no cache directory"
		return r
	}
	defaultSnap := ""
	if h.DefaultSnapshot != nil && f.imgErr == nil {
		if _, err := h.DefaultSnapshot(ctx); err != nil {
			r.Status = Warn
			r.Fix = "mvmctl bootstrap"
			defaultSnap = "; exec boots instead of restoring: " + err.Error()
		} else {
			defaultSnap = "; exec restores the default VM's"
		}
	}
	n := 0
	var size int64
	for _, d := range snapshotDirs(h) {
		// A snapshot is a directory with its record: the default VM's
		// right below, a template's one level further (by revision).
		for _, pattern := range []string{"*/snapshot.json", "*/*/snapshot.json"} {
			records, _ := filepath.Glob(filepath.Join(d, pattern))
			for _, rec := range records {
				if dir := filepath.Dir(rec); !strings.HasPrefix(filepath.Base(dir), ".") {
					n++
					size += diskusage.Of(dir)
				}
			}
		}
	}
	kept := "no snapshots"
	if n > 0 {
		kept = fmt.Sprintf("%d %s (%s", n, pluralWord(n, "snapshot", "snapshots"), units.FormatBytes(size))
		if h.SnapshotBudget > 0 {
			kept += " of a " + units.FormatBytes(h.SnapshotBudget) + " budget"
		}
		kept += ")"
	}
	if h.AutoSnapshot {
		kept += "; a run that boots for want of one makes it"
	} else {
		kept += "; runs make none themselves (MVM_NO_AUTO_SNAPSHOT)"
	}
	r.Message = kept + defaultSnap
	if last := lastLogLine(h.HealLog); strings.Contains(last, " failed for ") {
		// The newest heal failed: every run of that configuration
		// boots, and tries again.
		r.Status = Warn
		r.Message += "; the last snapshot made after a run failed: " + last
		if r.Fix == "" {
			r.Fix = "see " + h.HealLog
		}
	}
	return r
}

// lastLogLine is the last line of the (small, bounded) log at path.
func lastLogLine(path string) string {
	if path == "" {
		return ""
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return lastLine(string(b))
}

// checkPool says whether the user's pool runs and what it holds: runs
// that match a shape of it start from a VM restored ahead of time.
func checkPool(h *Host) Result {
	r := Result{ID: "pool", Status: OK}
	if !h.PoolRunning {
		r.Message = "no pool is running (mvmctl pool start keeps VMs ready, for runs that start in tens of milliseconds)"
		return r
	}
	r.Message = "running: " + strings.Join(h.Pool, "; ")
	if h.PoolProblem != "" {
		r.Status = Warn
		r.Message += "; " + lastLine(strings.ReplaceAll(h.PoolProblem, "\n", " "))
		r.Fix = "see mvmctl pool status and the pool's log"
	}
	return r
}
