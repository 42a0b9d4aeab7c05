package writeback

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
)

// NoSpaceError means the host filesystem has too little room for the
// write-back; it was refused before anything was written.
type NoSpaceError struct {
	// Need is what the write-back would take, Free what the host
	// filesystem has, in bytes (or inodes, when Inodes is set).
	Need, Free int64
	Inodes     bool
}

func (e *NoSpaceError) Error() string {
	if e.Inodes {
		return fmt.Sprintf("not enough inodes on the host filesystem: the write-back needs %d, %d are free", e.Need, e.Free)
	}
	return fmt.Sprintf("not enough space on the host filesystem: the write-back needs %s, %s is free",
		formatBytes(e.Need), formatBytes(e.Free))
}

// applier writes a validated change set into the share open as root.
type applier struct {
	ctx      context.Context
	upper    *ext4.FS
	cs       *changeSet
	root     int
	chown    bool // running as root: new entries get the share's owner
	uid, gid int
	written  map[int32]devIno // link sources as written
	stats    Stats
}

type devIno struct{ dev, ino uint64 }

// checkSpace refuses a change set that would not fit on the filesystem
// of the share open as root.
func checkSpace(root int, cs *changeSet) error {
	var sf unix.Statfs_t
	if err := unix.Fstatfs(root, &sf); err != nil {
		return fmt.Errorf("statfs of the shared directory: %w", err)
	}
	bsize := max(int64(sf.Bsize), 512)
	free := int64(sf.Bavail) * bsize
	if unix.Geteuid() == 0 {
		free = int64(sf.Bfree) * bsize
	}
	// Every file's data rounded up to whole blocks, plus a block per
	// new directory and per symlink (a long target takes one), plus a
	// block per file for the rounding of its tail.
	files := int64(0)
	for i := range cs.nodes {
		if cs.nodes[i].kind == kindFile {
			files++
		}
	}
	need := cs.data + (files+cs.newDirs+cs.symlinks)*bsize
	if need > free {
		return &NoSpaceError{Need: need, Free: free}
	}
	if sf.Files > 0 {
		if entries := int64(len(cs.nodes)); entries > int64(sf.Ffree) {
			return &NoSpaceError{Need: entries, Free: int64(sf.Ffree), Inodes: true}
		}
	}
	return nil
}

// apply writes the change set. It stops between entries, and within a
// large file, once ctx is done, leaving no temporary file behind.
func (a *applier) apply() error {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < uint64(a.cs.depth+64) {
		return fmt.Errorf("the change set is %d directories deep, more than the open file limit (%d) allows", a.cs.depth, rl.Cur)
	}
	rootNode := &a.cs.nodes[0]
	if err := a.dir(a.root, 0); err != nil {
		return err
	}
	return a.dirAttrs(a.root, rootNode, false)
}

func (a *applier) fail(i int32, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("write-back interrupted at %q: %w", a.cs.path(i), err)
	}
	return fmt.Errorf("write back %q: %w", a.cs.path(i), err)
}

// dir applies the entries of directory node di onto the host directory
// open as fd: first what is not a directory, in order, then each
// subdirectory, so that the first name of a hard link is always written
// before the others (the order the plan numbered them in).
func (a *applier) dir(fd int, di int32) error {
	d := a.cs.nodes[di]
	if d.replace {
		if err := a.prune(fd, di); err != nil {
			return a.fail(di, err)
		}
	}
	for i := d.first; i < d.first+d.count; i++ {
		if err := a.ctx.Err(); err != nil {
			return a.fail(i, err)
		}
		if a.cs.nodes[i].kind == kindDir {
			continue
		}
		if err := a.entry(fd, i); err != nil {
			return a.fail(i, err)
		}
	}
	for i := d.first; i < d.first+d.count; i++ {
		if a.cs.nodes[i].kind != kindDir {
			continue
		}
		if err := a.ctx.Err(); err != nil {
			return a.fail(i, err)
		}
		if err := a.subdir(fd, i); err != nil {
			return err
		}
	}
	return nil
}

func (a *applier) subdir(fd int, i int32) error {
	n := &a.cs.nodes[i]
	st, ok, err := lstatAt(fd, n.name)
	if err != nil {
		return a.fail(i, err)
	}
	if ok && st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(fd, n.name, 0); err != nil {
			return a.fail(i, err)
		}
		ok = false
	}
	created := false
	if !ok {
		if err := unix.Mkdirat(fd, n.name, 0o700); err != nil {
			return a.fail(i, err)
		}
		created = true
	}
	cfd, err := openDirAt(fd, n.name)
	if err != nil {
		return a.fail(i, err)
	}
	defer unix.Close(cfd)
	if created && a.chown {
		if err := unix.Fchown(cfd, a.uid, a.gid); err != nil {
			return a.fail(i, err)
		}
	}
	a.stats.Dirs++
	if err := a.dir(cfd, i); err != nil {
		return err
	}
	// The host had no directory here (the guest made it, or the host
	// deleted it during the run): it gets all of the guest's attributes.
	if err := a.dirAttrs(cfd, n, created); err != nil {
		return a.fail(i, err)
	}
	return nil
}

// prune removes the host entries of the directory open as fd that the
// change set's directory di does not have.
func (a *applier) prune(fd int, di int32) error {
	d := a.cs.nodes[di]
	keep := make(map[string]bool, d.count)
	for i := d.first; i < d.first+d.count; i++ {
		keep[a.cs.nodes[i].name] = true
	}
	names, err := listAt(fd)
	if err != nil {
		return err
	}
	for _, name := range names {
		if keep[name] {
			continue
		}
		if removed, err := removeAt(fd, name); err != nil {
			return fmt.Errorf("remove %q: %w", name, err)
		} else if removed {
			a.stats.Deleted++
		}
	}
	return nil
}

// entry applies one entry that is not a directory.
func (a *applier) entry(fd int, i int32) error {
	n := &a.cs.nodes[i]
	if n.setid != 0 && (n.kind == kindFile || n.kind == kindFifo) {
		a.stats.SetIDDropped++
	}
	switch n.kind {
	case kindWhiteout:
		removed, err := removeAt(fd, n.name)
		if removed {
			a.stats.Deleted++
		}
		return err
	case kindDevice:
		a.stats.Devices++
		return nil
	case kindSocket:
		a.stats.Sockets++
		return nil
	case kindLink:
		return a.link(fd, i)
	}
	in, err := a.upper.Inode(n.ino)
	if err != nil {
		return err
	}
	var tmp string
	switch n.kind {
	case kindFile:
		tmp, err = a.file(fd, n, in)
	case kindSymlink:
		tmp, err = a.symlink(fd, n, in)
	case kindFifo:
		tmp, err = a.fifo(fd, n)
	default:
		return fmt.Errorf("unexpected entry kind %d", n.kind)
	}
	if err != nil {
		return err
	}
	if err := a.replace(fd, tmp, n.name); err != nil {
		return err
	}
	if n.linked {
		var st unix.Stat_t
		if err := unix.Fstatat(fd, n.name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		a.written[i] = devIno{uint64(st.Dev), st.Ino}
	}
	a.stats.Written++
	return nil
}

// replace renames the finished temporary entry tmp over name, first
// removing a directory that is in the way (rename cannot replace one with
// a file). On failure the temporary entry is removed.
func (a *applier) replace(fd int, tmp, name string) error {
	st, ok, err := lstatAt(fd, name)
	if err == nil && ok && st.Mode&unix.S_IFMT == unix.S_IFDIR {
		_, err = removeAt(fd, name)
	}
	if err == nil {
		err = unix.Renameat(fd, tmp, fd, name)
	}
	if err != nil {
		_ = unix.Unlinkat(fd, tmp, 0)
	}
	return err
}

func (a *applier) times(n *node) *[2]unix.Timespec {
	return &[2]unix.Timespec{unix.NsecToTimespec(n.atime), unix.NsecToTimespec(n.mtime)}
}

// file writes a regular file to a new temporary name in fd and returns
// the name: its stored extents at their offsets, the holes left as holes,
// then its size, mode, owner and times.
func (a *applier) file(fd int, n *node, in *ext4.Inode) (tmp string, err error) {
	var ffd int
	tmp, err = createAt(func(name string) error {
		var err error
		ffd, err = unix.Openat(fd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		return err
	})
	if err != nil {
		return "", err
	}
	defer func() {
		if cerr := unix.Close(ffd); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			_ = unix.Unlinkat(fd, tmp, 0)
		}
	}()
	written, err := a.upper.CopyData(a.ctx, in, fdWriter(ffd))
	a.stats.Bytes += written
	if err != nil {
		return tmp, err
	}
	if err := unix.Ftruncate(ffd, in.Size); err != nil {
		return tmp, err
	}
	return tmp, a.fdAttrs(ffd, n)
}

// fdAttrs gives the entry open as fd its owner (as root: the share's),
// mode (set-id bits dropped) and times. chown clears set-id bits and
// creation honours the umask, so the mode comes after both.
func (a *applier) fdAttrs(fd int, n *node) error {
	if a.chown {
		if err := unix.Fchown(fd, a.uid, a.gid); err != nil {
			return err
		}
	}
	if err := unix.Fchmod(fd, n.mode); err != nil {
		return err
	}
	return futimens(fd, a.times(n))
}

func (a *applier) symlink(fd int, n *node, in *ext4.Inode) (string, error) {
	target, err := a.upper.Readlink(in)
	if err != nil {
		return "", err
	}
	tmp, err := createAt(func(name string) error { return unix.Symlinkat(target, fd, name) })
	if err != nil {
		return "", err
	}
	if a.chown {
		err = unix.Fchownat(fd, tmp, a.uid, a.gid, unix.AT_SYMLINK_NOFOLLOW)
	}
	if err == nil {
		err = unix.UtimesNanoAt(fd, tmp, a.times(n)[:], unix.AT_SYMLINK_NOFOLLOW)
	}
	if err != nil {
		_ = unix.Unlinkat(fd, tmp, 0)
	}
	return tmp, err
}

// fifo makes a named pipe. A pipe gives its opener nothing it could not
// have with one of its own, so a guest's fifo is written back as such.
// Its attributes are set through a descriptor (a non-blocking read-only
// open of a fifo does not wait for a writer), never by name.
func (a *applier) fifo(fd int, n *node) (string, error) {
	tmp, err := createAt(func(name string) error { return unix.Mknodat(fd, name, unix.S_IFIFO|0o600, 0) })
	if err != nil {
		return "", err
	}
	pfd, err := unix.Openat(fd, tmp, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err == nil {
		err = a.fdAttrs(pfd, n)
		unix.Close(pfd)
	}
	if err != nil {
		_ = unix.Unlinkat(fd, tmp, 0)
	}
	return tmp, err
}

// link makes another name for an entry written earlier in this
// write-back, after checking that what is at that entry's place is still
// the file this write-back put there: a hard link never reaches a file the
// write-back did not write.
func (a *applier) link(fd int, i int32) error {
	n := &a.cs.nodes[i]
	src := n.first
	switch a.cs.nodes[src].kind {
	case kindDevice:
		a.stats.Devices++
		return nil
	case kindSocket:
		a.stats.Sockets++
		return nil
	}
	want, ok := a.written[src]
	if !ok {
		return fmt.Errorf("hard link to %q, which was not written", a.cs.path(src))
	}
	parts := a.cs.pathParts(src)
	pfd, err := openBeneath(a.root, parts[:len(parts)-1])
	if err != nil {
		return fmt.Errorf("hard link to %q: %w", a.cs.path(src), err)
	}
	defer unix.Close(pfd)
	srcName := parts[len(parts)-1]
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, srcName, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("hard link to %q: %w", a.cs.path(src), err)
	}
	if (devIno{uint64(st.Dev), st.Ino}) != want {
		return fmt.Errorf("hard link to %q: it was replaced during the write-back", a.cs.path(src))
	}
	tmp, err := createAt(func(name string) error { return unix.Linkat(pfd, srcName, fd, name, 0) })
	if err != nil {
		return err
	}
	if err := a.replace(fd, tmp, n.name); err != nil {
		return err
	}
	a.stats.Links++
	return nil
}

// dirAttrs applies a directory's mode and times, after its entries (whose
// writing changed its mtime): all of them for a directory this write-back
// created, else those the guest changed. Set-id bits the host directory
// already has and the guest kept stay; the guest adds none.
func (a *applier) dirAttrs(fd int, n *node, created bool) error {
	if !created && !n.attrs {
		return nil
	}
	if created || n.modeChanged {
		mode := n.mode
		if !created {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return err
			}
			mode |= st.Mode & n.setid
		}
		if n.setid&^mode != 0 {
			a.stats.SetIDDropped++
		}
		if err := unix.Fchmod(fd, mode); err != nil {
			return err
		}
	}
	return futimens(fd, a.times(n))
}
