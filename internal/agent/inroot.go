package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// fsRoot is the root directory commands run in: the agent's own "/" until
// a Root call sets a template's root. Every path the agent resolves for a
// command (argv[0] in PATH, the working directory, mount targets, the
// files it writes into /etc) is resolved inside it with openat2's
// RESOLVE_IN_ROOT, exactly as the chrooted command would resolve it: an
// absolute symlink or a ".." in the image stays inside the image instead
// of reaching the agent's initramfs.
//
// The root is opened for each lookup rather than held open: a descriptor
// held for the agent's life would keep the root's mount busy when the
// guest powers off.
type fsRoot struct {
	path string // in the agent's namespace; "/" for the agent's own root
}

// hostRoot is the agent's own root.
var hostRoot = &fsRoot{path: "/"}

// isHost reports whether the root is the agent's own: commands then need
// no chroot.
func (r *fsRoot) isHost() bool { return r.path == "/" }

// resolveFlags are the openat2 resolve flags for every lookup in a root.
// RESOLVE_IN_ROOT also refuses magic links (/proc/self/fd/N).
const resolveFlags = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS

// open opens p (absolute or not: both are relative to the root) inside the
// root.
func (r *fsRoot) open(p string, flags int, mode uint32) (int, error) {
	dir, err := unix.Open(r.path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(dir)
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolveFlags}
	for {
		fd, err := unix.Openat2(dir, rel(p), &how)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			// EAGAIN: a rename raced the lookup; try again.
			continue
		}
		return fd, err
	}
}

// rel turns an absolute path into one relative to the root ("." for "/").
func rel(p string) string {
	p = strings.TrimLeft(p, "/")
	if p == "" {
		return "."
	}
	return p
}

// stat returns the attributes of what p names inside the root, following
// symlinks inside it.
func (r *fsRoot) stat(p string) (unix.Stat_t, error) {
	var st unix.Stat_t
	fd, err := r.open(p, unix.O_PATH, 0)
	if err != nil {
		return st, err
	}
	defer unix.Close(fd)
	err = unix.Fstat(fd, &st)
	return st, err
}

// mkdirAll creates the directory p inside the root like mkdir -p and
// returns an O_PATH descriptor of it. Each missing component is created
// with mkdirat under its already resolved parent, so a symlink in the
// image can redirect the path only to another place inside the root.
func (r *fsRoot) mkdirAll(p string, mode uint32) (int, error) {
	if !path.IsAbs(p) {
		return -1, fmt.Errorf("%q is not an absolute path", p)
	}
	p = path.Clean(p)
	fd, err := r.open(p, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	parent, name := path.Split(p)
	pfd, err := r.mkdirAll(parent, mode)
	if err != nil {
		return -1, err
	}
	defer unix.Close(pfd)
	if err := unix.Mkdirat(pfd, name, mode); err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, err
	}
	return r.open(p, unix.O_PATH|unix.O_DIRECTORY, 0)
}

// openRegular opens p inside the root with flags, but only if it is a
// regular file: it is looked up with O_PATH first, so a FIFO or a device
// node the image put at that name is never opened (which could block or
// have side effects).
func (r *fsRoot) openRegular(p string, flags int) (*os.File, error) {
	pfd, err := r.open(p, unix.O_PATH, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s is not a regular file", p)
	}
	// Reopening the descriptor's own inode: no second lookup by name.
	fd, err := unix.Open(fdPath(pfd), flags|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), p), nil
}

// readFile reads the regular file p inside the root, refusing files larger
// than limit: what the image holds is input the agent did not write.
func (r *fsRoot) readFile(p string, limit int64) ([]byte, error) {
	f, err := r.openRegular(p, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", p, limit)
	}
	return b, nil
}

// writeFile replaces the content of p inside the root, creating it with
// mode when missing. Only the agent's own files are written this way
// (/etc/hostname, /etc/hosts, /etc/machine-id), and only over regular
// files.
func (r *fsRoot) writeFile(p string, data []byte, mode uint32) error {
	f, err := r.openRegular(p, unix.O_WRONLY|unix.O_TRUNC)
	if errors.Is(err, unix.ENOENT) {
		var fd int
		fd, err = r.open(p, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOCTTY, mode)
		if err == nil {
			f = os.NewFile(uintptr(fd), p)
		}
	}
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// exists reports whether p names something inside the root (a dangling
// symlink does not count).
func (r *fsRoot) exists(p string) bool {
	_, err := r.stat(p)
	return err == nil
}

// fdPath is the name mount(2) and friends can be given for a descriptor
// the agent resolved itself.
func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// mountIn mounts source (of fstype, with flags and data) on the directory
// target inside the root, creating it if missing.
func (r *fsRoot) mountIn(source, target, fstype string, flags uintptr, data string) error {
	fd, err := r.mkdirAll(target, 0o755)
	if err != nil {
		return fmt.Errorf("create mount point %s: %w", target, err)
	}
	defer unix.Close(fd)
	if err := unix.Mount(source, fdPath(fd), fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", source, target, err)
	}
	return nil
}
