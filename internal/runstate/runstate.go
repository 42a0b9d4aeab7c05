// Package runstate keeps each run's files in one private directory and
// cleans up after runs that could not clean up themselves.
//
// A run directory is created 0700 and holds a lock file that the owning
// mvmctl keeps flock'ed for its whole life. The kernel drops the lock when
// that process dies, however it dies, so "lock can be taken" means "owner
// is gone" without trusting pids that may have been reused. Reclaim uses
// that to remove leftovers of crashed runs, and kills a VMM that outlived
// its owner after checking that the pid still belongs to that run.
package runstate

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	lockFile = "lock"
	vmmFile  = "vmm.pid"
)

// Run is one live run's directory.
type Run struct {
	Name    string
	Dir     string
	lock    *os.File
	created time.Time
}

// Create makes root (0700) if needed and a fresh run directory in it, and
// takes the run's lock.
func Create(root, name string) (*Run, error) {
	if err := ensurePrivateDir(root); err != nil {
		return nil, err
	}
	dir := filepath.Join(root, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create run directory: %w", err)
	}
	// The lock file is created under a temporary name, locked, and only
	// then given its real name: a concurrent Reclaim never finds an
	// unlocked lock file of a live run.
	lock, err := os.CreateTemp(dir, ".lock-")
	if err == nil {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	}
	if err == nil {
		err = os.Rename(lock.Name(), filepath.Join(dir, lockFile))
	}
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		os.RemoveAll(dir)
		return nil, fmt.Errorf("lock run directory %s: %w", dir, err)
	}
	created := time.Now().UTC()
	fmt.Fprintf(lock, "pid %d\nstarted %s\n", os.Getpid(), created.Format(time.RFC3339Nano))
	return &Run{Name: name, Dir: dir, lock: lock, created: created}, nil
}

// DetachedFile marks a run directory that outlives its owner on
// purpose: a paused sandbox waiting for a later process to resume it.
// Reclaim leaves such a directory alone.
const DetachedFile = "detached.json"

// Adopt takes over the existing run directory called name in root,
// whose owner let go of it (a detached paused sandbox): it takes the
// run's lock, and fails if a live process holds it.
func Adopt(root, name string) (*Run, error) {
	dir := filepath.Join(root, name)
	lock, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("adopt run %s: %w", name, err)
	}
	// A reclaim or a listing may hold the lock for a moment.
	for tries := 0; ; tries++ {
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			lock.Close()
			return nil, fmt.Errorf("adopt run %s: %w", name, err)
		}
		if tries >= 50 {
			lock.Close()
			return nil, fmt.Errorf("adopt run %s: another process holds it", name)
		}
		time.Sleep(20 * time.Millisecond)
	}
	created := time.Now().UTC()
	if rec, err := readRecord(filepath.Join(dir, recordFile)); err == nil && !rec.Created.IsZero() {
		created = rec.Created
	}
	_ = lock.Truncate(0)
	fmt.Fprintf(lock, "pid %d\nadopted %s\n", os.Getpid(), time.Now().UTC().Format(time.RFC3339Nano))
	return &Run{Name: name, Dir: dir, lock: lock, created: created}, nil
}

// ensurePrivateDir creates dir 0700, or checks that an existing one is a
// directory owned by us, and tightens its mode.
func ensurePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
		return fmt.Errorf("%s is owned by uid %d, not by this user", dir, st.Uid)
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("make %s private: %w", dir, err)
		}
	}
	return nil
}

// Path returns the path of a file inside the run directory.
func (r *Run) Path(name string) string { return filepath.Join(r.Dir, name) }

// RecordVMM notes the VMM's pid, so that Reclaim can kill a VMM whose owner
// died without taking it along.
func (r *Run) RecordVMM(pid int) error {
	return os.WriteFile(r.Path(vmmFile), []byte(strconv.Itoa(pid)+"\n"), 0o600)
}

// Keep moves a file out of the run directory into dir (created 0700) under
// the run's name plus suffix, and returns the new path. Used for the console
// log of a failed run, which must outlive the run directory.
func (r *Run) Keep(name, dir, suffix string) (string, error) {
	if err := ensurePrivateDir(dir); err != nil {
		return "", err
	}
	dst := filepath.Join(dir, r.Name+suffix)
	if err := os.Rename(r.Path(name), dst); err != nil {
		return "", fmt.Errorf("keep %s: %w", name, err)
	}
	return dst, nil
}

// Release gives up the run's lock without removing its directory, so that
// the next Reclaim treats it as a dead run's (and salvages what it holds),
// even one in this same process.
func (r *Run) Release() {
	r.lock.Close()
}

// Remove deletes the run directory and releases the lock.
func (r *Run) Remove() error {
	err := os.RemoveAll(r.Dir)
	r.lock.Close()
	if err != nil {
		return fmt.Errorf("remove run directory: %w", err)
	}
	return nil
}

// ReclaimSalvaging is Reclaim with a hook that runs on each dead run's
// directory (its VMM already killed) before it is removed, to move out
// what must outlive the run. A directory whose salvage fails is kept (it
// may hold the only copy of something), for a later reclaim to retry.
func ReclaimSalvaging(root string, log *slog.Logger, salvage func(dir string) error) ([]string, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("reclaim runs: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		ok, err := reclaimOne(dir, salvage)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if ok {
			log.Debug("reclaimed run", "dir", dir)
			removed = append(removed, e.Name())
		}
	}
	return removed, errors.Join(errs...)
}

// reclaimOne removes dir if its owner is gone.
func reclaimOne(dir string, salvage func(string) error) (bool, error) {
	lock, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// A run has no lock file only while Create runs (milliseconds) or
		// if it was killed in that instant; only the latter gets old.
		if fi, serr := os.Stat(dir); serr != nil || time.Since(fi.ModTime()) < time.Minute {
			return false, nil
		}
	case err != nil:
		return false, fmt.Errorf("reclaim %s: %w", dir, err)
	default:
		defer lock.Close()
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			if errors.Is(err, unix.EWOULDBLOCK) {
				return false, nil // owner alive
			}
			return false, fmt.Errorf("reclaim %s: %w", dir, err)
		}
	}
	killOrphanVMM(dir)
	if _, err := os.Stat(filepath.Join(dir, DetachedFile)); err == nil {
		// A sandbox paused and detached: not a leftover, it waits for
		// its resume (or its removal).
		return false, nil
	}
	if salvage != nil {
		if err := salvage(dir); err != nil {
			return false, fmt.Errorf("reclaim %s: kept: %w", dir, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return false, fmt.Errorf("reclaim %s: %w", dir, err)
	}
	return true, nil
}

// killOrphanVMM kills the VMM recorded in dir if that pid still runs a
// process whose working directory is dir (the backend starts the VMM
// there), so a reused pid is never hit.
func killOrphanVMM(dir string) {
	b, err := os.ReadFile(filepath.Join(dir, vmmFile))
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return
	}
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil || cwd != dir {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	// Let it finish dying before anything reads its disk images. A zombie
	// is dead enough: it holds no files.
	for i := 0; i < 200 && alive(pid); i++ {
		time.Sleep(10 * time.Millisecond)
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
		return b[i+2] != 'Z'
	}
	return true
}
