package writeback

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The host side of a write-back works on directory file descriptors only:
// every name it passes to the kernel is a single component relative to an
// open directory of the share, opened with O_NOFOLLOW, so no symlink
// (planted by the guest in its change set, or present on the host) is ever
// followed and nothing outside the share can be reached. Multi-component
// lookups (the source of a hard link) use openat2 with RESOLVE_BENEATH and
// RESOLVE_NO_SYMLINKS, or, on kernels without openat2, an openat per
// component with O_NOFOLLOW|O_DIRECTORY: the same guarantee, one call per
// component.

const (
	dirFlags  = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	tmpPrefix = ".mvm-writeback-"
)

// openat2 is unix.Openat2; tests replace it to exercise the fallback.
var openat2 = unix.Openat2

// noOpenat2 is set once openat2 turned out to be missing (ENOSYS): the
// kernel is older than 5.6, or a seccomp filter hides it.
var noOpenat2 atomic.Bool

// openDirAt opens the directory name in dirfd without following a
// symlink.
func openDirAt(dirfd int, name string) (int, error) {
	for {
		fd, err := unix.Openat(dirfd, name, dirFlags, 0)
		if err == unix.EINTR {
			continue
		}
		return fd, err
	}
}

// openBeneath opens the directory at the path made of parts below root,
// refusing any symlink and anything outside root.
func openBeneath(root int, parts []string) (int, error) {
	if len(parts) == 0 {
		return unix.Dup(root)
	}
	for _, p := range parts {
		// The change set's names are validated already; the fallback
		// below is only as safe as they are: never step up or across.
		if checkName(p) != "" {
			return -1, unix.EINVAL
		}
	}
	if !noOpenat2.Load() {
		how := &unix.OpenHow{
			Flags:   dirFlags,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		}
		for {
			fd, err := openat2(root, strings.Join(parts, "/"), how)
			switch err {
			case nil:
				return fd, nil
			case unix.EINTR, unix.EAGAIN:
				continue // EAGAIN: a concurrent rename; retry
			case unix.ENOSYS:
				noOpenat2.Store(true)
			case unix.ENAMETOOLONG:
				// Longer than PATH_MAX: walk it instead.
			default:
				return -1, err
			}
			break
		}
	}
	fd, err := unix.Dup(root)
	if err != nil {
		return -1, err
	}
	for _, p := range parts {
		next, err := openDirAt(fd, p)
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}

// lstatAt is fstatat(AT_SYMLINK_NOFOLLOW); ok is false when nothing is
// there.
func lstatAt(dirfd int, name string) (st unix.Stat_t, ok bool, err error) {
	err = unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
	if err == unix.ENOENT {
		return st, false, nil
	}
	return st, err == nil, err
}

// removeAt removes name from dirfd, a directory with all its content. A
// symlink is removed as a link; nothing is followed. A missing name is not
// an error. It returns whether something was removed.
func removeAt(dirfd int, name string) (bool, error) {
	err := unix.Unlinkat(dirfd, name, 0)
	switch err {
	case nil:
		return true, nil
	case unix.ENOENT:
		return false, nil
	case unix.EISDIR, unix.EPERM:
		// A directory (EPERM is what POSIX allows instead of EISDIR).
	default:
		return false, err
	}
	fd, oerr := openDirAt(dirfd, name)
	if oerr != nil {
		if oerr == unix.ENOTDIR || oerr == unix.ELOOP {
			return false, err // not a directory after all: the unlink's error stands
		}
		return false, oerr
	}
	d := os.NewFile(uintptr(fd), name)
	defer d.Close()
	if err := emptyDir(fd, d); err != nil {
		return false, err
	}
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && err != unix.ENOENT {
		return false, err
	}
	return true, nil
}

// emptyDir removes everything in the directory open as fd (d wraps it).
func emptyDir(fd int, d *os.File) error {
	for pass := 0; ; pass++ {
		removed := 0
		for {
			names, err := d.Readdirnames(1024)
			for _, n := range names {
				if _, err := removeAt(fd, n); err != nil {
					return fmt.Errorf("%s: %w", n, err)
				}
				removed++
			}
			if err == io.EOF || len(names) == 0 {
				break
			}
			if err != nil {
				return err
			}
		}
		// Removing entries while reading may skip some: go again from
		// the start until a pass finds nothing.
		if removed == 0 || pass > 8 {
			return nil
		}
		if _, err := d.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
}

// listAt returns the names in the directory open as fd.
func listAt(fd int) ([]string, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	d := os.NewFile(uintptr(dup), "")
	defer d.Close()
	return d.Readdirnames(-1)
}

// tmpName returns a fresh name for a file being written into a directory;
// the caller creates it with O_EXCL (or an equivalent) and retries on
// EEXIST.
func tmpName() string {
	return tmpPrefix + strconv.FormatUint(rand.Uint64(), 36)
}

// createAt runs create with fresh temporary names until one does not
// exist yet, and returns the name it used.
func createAt(create func(name string) error) (string, error) {
	for range 100 {
		name := tmpName()
		err := create(name)
		if err == unix.EEXIST {
			continue
		}
		return name, err
	}
	return "", errors.New("no free temporary name")
}

// futimens sets the times of the file open as fd: utimensat with a NULL
// path, which futimens(3) is.
func futimens(fd int, ts *[2]unix.Timespec) error {
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// fdWriter writes to a file descriptor at offsets.
type fdWriter int

func (fd fdWriter) WriteAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		m, err := unix.Pwrite(int(fd), p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			return n, io.ErrShortWrite
		}
		n += m
	}
	return n, nil
}
