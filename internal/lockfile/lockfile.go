// Package lockfile takes flock(2) locks on files that other mvm processes
// lock too: a template store's objects and names, a snapshot store.
// flock locks belong to the open file, so they die with the process that
// held them and a crashed holder never leaves a stale lock behind.
package lockfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrWouldBlock is a lock taken with LOCK_NB that another process holds.
var ErrWouldBlock = errors.New("lock held by another process")

// Lock is a held lock; Release (or the process's end) drops it.
type Lock struct{ f *os.File }

// Take locks path (creating it when create is set) with how (LOCK_SH or
// LOCK_EX, with LOCK_NB not to wait). Once locked it checks that path
// still names the file it locked, so that a lock file removed or renamed
// meanwhile is not taken for the current one. Without create, a missing
// file (or directory) gives (nil, nil).
func Take(path string, how int, create bool) (*Lock, error) {
	for range 100 {
		flags := os.O_RDONLY
		if create {
			flags = os.O_RDWR | os.O_CREATE
		}
		f, err := os.OpenFile(path, flags|syscall.O_CLOEXEC, 0o644)
		if errors.Is(err, fs.ErrNotExist) && !create {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		for {
			err = unix.Flock(int(f.Fd()), how)
			if !errors.Is(err, unix.EINTR) {
				break
			}
		}
		if err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, ErrWouldBlock
			}
			return nil, err
		}
		var a, b unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &a); err != nil {
			f.Close()
			return nil, err
		}
		err = unix.Stat(path, &b)
		if err == nil && a.Dev == b.Dev && a.Ino == b.Ino {
			return &Lock{f}, nil
		}
		f.Close()
		if !create && errors.Is(err, unix.ENOENT) {
			return nil, nil
		}
	}
	return nil, fmt.Errorf("lock %s: it keeps being replaced", path)
}

// File is the locked file, for a holder that records itself in it.
func (l *Lock) File() *os.File { return l.f }

// Release drops the lock; it is safe on a nil or released lock.
func (l *Lock) Release() {
	if l != nil && l.f != nil {
		l.f.Close() // closing drops the lock
		l.f = nil
	}
}
