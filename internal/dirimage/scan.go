package dirimage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// node is one inode of the tree to image: a directory, a file (with all
// its hard links inside the tree), a symlink or a special file.
type node struct {
	ino      uint32
	mode     uint32 // st_mode: type and permission bits
	uid, gid uint32
	size     int64
	alloc    int64 // bytes the host filesystem allocated (st_blocks)
	atime    unix.Timespec
	mtime    unix.Timespec
	ctime    unix.Timespec
	rdev     uint64
	links    uint32 // names inside the tree; for a directory 2 + subdirectories
	parent   uint32 // a directory's parent
	path     string // host path: a regular file is opened to copy it
	target   string // symlink target
	xattrs   []xattr
	kids     []dirent

	// A Builder's nodes: a regular file's content is srcSize bytes at
	// srcOff in src (staged), and a directory's entries are in children
	// until the tree is numbered (gen says in which Write).
	staged   bool
	src      io.ReaderAt
	srcOff   int64
	children map[string]*node
	gen      uint32
}

// dirent is one name in a directory.
type dirent struct {
	name string
	n    *node
}

func (n *node) isDir() bool { return n.mode&unix.S_IFMT == unix.S_IFDIR }
func (n *node) isReg() bool { return n.mode&unix.S_IFMT == unix.S_IFREG }
func (n *node) isLnk() bool { return n.mode&unix.S_IFMT == unix.S_IFLNK }

// tree is a scanned host directory: its nodes in inode number order
// (the root, inode 2, first; then firstIno, firstIno+1, ...).
type tree struct {
	nodes []*node
	stats Stats
}

// firstIno is the first inode number ext4 gives to files: 1-10 are
// reserved (2 is the root).
const firstIno = 11

// maxName is ext4's (and Linux's) limit on one name.
const maxName = 255

// scan reads the tree under dir without following symlinks (except dir
// itself). Names, attributes and symlink targets are read now; file
// contents later, when the image is written. A directory's entries are
// numbered together, then its subdirectories are scanned, so the inodes
// of one directory lie side by side in the image. Hard links are found by
// device and inode number. It checks ctx between directories and every
// few hundred entries, so that a cancelled build stops at once.
func scan(ctx context.Context, dir string) (*tree, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("%s is not a directory", dir)
	}
	root := newNode(&st)
	root.ino = 2
	root.path = dir
	var err error
	if root.xattrs, err = readXattrs(dir); err != nil {
		return nil, err
	}
	t := &tree{nodes: []*node{root}}
	t.stats.Dirs = 1
	t.stats.Bytes = blockSize
	type fileKey struct{ dev, ino uint64 }
	seen := map[fileKey]*node{}
	next := uint32(firstIno)

	type pending struct {
		path string
		n    *node
	}
	stack := []pending{{dir, root}}
	for len(stack) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		p := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		f, names, err := readDir(p.path)
		if err != nil {
			return nil, err
		}
		fd := int(f.Fd())
		var subdirs []pending
		for i, name := range names {
			if i%256 == 255 {
				if err := ctx.Err(); err != nil {
					f.Close()
					return nil, err
				}
			}
			if len(name) > maxName {
				f.Close()
				return nil, fmt.Errorf("%s: name longer than %d bytes", filepath.Join(p.path, name), maxName)
			}
			var st unix.Stat_t
			if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				f.Close()
				return nil, fmt.Errorf("stat %s: %w", filepath.Join(p.path, name), err)
			}
			typ := st.Mode & unix.S_IFMT
			key := fileKey{uint64(st.Dev), st.Ino}
			if typ != unix.S_IFDIR && st.Nlink > 1 {
				if n, ok := seen[key]; ok {
					n.links++
					p.n.kids = append(p.n.kids, dirent{name, n})
					continue
				}
			}
			if next == 0 {
				f.Close()
				return nil, errors.New("too many files for one ext4 filesystem")
			}
			n := newNode(&st)
			n.ino = next
			n.path = filepath.Join(p.path, name)
			next++
			if n.xattrs, err = readXattrs(n.path); err != nil {
				f.Close()
				return nil, err
			}
			if typ != unix.S_IFDIR && st.Nlink > 1 {
				seen[key] = n
			}
			switch typ {
			case unix.S_IFDIR:
				t.stats.Dirs++
				t.stats.Bytes += blockSize
				p.n.links++ // the child's ".."
				n.parent = p.n.ino
				subdirs = append(subdirs, pending{n.path, n})
			case unix.S_IFREG:
				t.stats.Files++
				t.stats.Bytes += (n.size + blockSize - 1) &^ (blockSize - 1)
			case unix.S_IFLNK:
				t.stats.Others++
				t.stats.Bytes += blockSize // a long target takes a block
				target, err := readlinkat(fd, name, int(st.Size))
				if err != nil {
					f.Close()
					return nil, fmt.Errorf("readlink %s: %w", filepath.Join(p.path, name), err)
				}
				n.target = target
				n.size = int64(len(target))
			default:
				t.stats.Others++
				n.size = 0
			}
			t.nodes = append(t.nodes, n)
			p.n.kids = append(p.n.kids, dirent{name, n})
		}
		f.Close()
		// Scanned in order: push in reverse.
		for i := len(subdirs) - 1; i >= 0; i-- {
			stack = append(stack, subdirs[i])
		}
	}
	return t, nil
}

func newNode(st *unix.Stat_t) *node {
	n := &node{
		mode:  st.Mode,
		uid:   st.Uid,
		gid:   st.Gid,
		size:  st.Size,
		alloc: st.Blocks * 512,
		atime: st.Atim,
		mtime: st.Mtim,
		ctime: st.Ctim,
		rdev:  st.Rdev,
		links: 1,
	}
	if n.isDir() {
		n.links = 2
	}
	return n
}

// readDir opens a directory and lists it, sorted, so that the same tree
// always makes the same image. The caller closes f.
func readDir(dir string) (f *os.File, names []string, err error) {
	if f, err = os.Open(dir); err != nil {
		return nil, nil, err
	}
	if names, err = f.Readdirnames(-1); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("read directory %s: %w", dir, err)
	}
	slices.Sort(names)
	return f, names, nil
}

// readlinkat reads a symlink's target; size is what lstat said, and a
// target that changed length in between is an error rather than a cut.
func readlinkat(dirfd int, name string, size int) (string, error) {
	if size > unix.PathMax {
		return "", fmt.Errorf("target longer than %d bytes", unix.PathMax)
	}
	buf := make([]byte, size+1)
	n, err := unix.Readlinkat(dirfd, name, buf)
	if err != nil {
		return "", err
	}
	if n != size {
		return "", errors.New("symlink changed while being read")
	}
	if strings.IndexByte(string(buf[:n]), 0) >= 0 {
		return "", errors.New("NUL byte in symlink target")
	}
	return string(buf[:n]), nil
}
