package dirimage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A Builder assembles a tree that is not a host directory (the layers of
// a container image, a root filesystem tarball) in memory, entry by entry,
// and writes it as an image. Metadata lives in the Builder, so owners,
// device nodes and set-user-ID bits need no privilege on the host; only
// regular-file content lives elsewhere (Entry.Data), typically in a
// staging file, and is read when the image is written.
//
// Paths are relative to the tree's root, slash-separated; "" and "."
// components are ignored and ".." is refused. Directories on the way to
// an entry that are symlinks in the tree are followed, within the tree
// (as chroot would: an absolute target starts at its root, ".." stops
// there), so that an entry under "lib/" lands in "usr/lib/" when "lib" is
// a symlink to "usr/lib". Missing directories on the way are created
// (mode 0755, owned by root, with the entry's modification time).
//
// A Builder is not safe for concurrent use.
type Builder struct {
	root     *node
	live     int // nodes in the tree, the root included
	maxNodes int
	gen      uint32
}

// DefaultMaxNodes bounds the files (inodes) of a Builder's tree: a tree
// in memory costs a few hundred bytes per file.
const DefaultMaxNodes = 2 << 20

// Limits of one entry, those of Linux.
const (
	MaxPath   = unix.PathMax - 1 // a path of at most 4095 bytes
	MaxTarget = unix.PathMax - 1 // a symlink target
	// maxHops is how many symlinks resolving one path may follow, as
	// Linux's ELOOP limit.
	maxHops = 40
)

// ErrPath is wrapped by errors about a path a Builder refuses: a ".."
// component, a NUL byte, a name or path that is too long, a directory on
// the way that is not one, a loop of symlinks.
var ErrPath = errors.New("invalid path")

// ErrTooManyFiles means the tree would have more than its limit of files.
var ErrTooManyFiles = errors.New("too many files")

// Entry is one file of a Builder's tree.
type Entry struct {
	// Mode is the st_mode: the file type (unix.S_IFREG, S_IFDIR,
	// S_IFLNK, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK) and the permission
	// bits, set-user-ID, set-group-ID and sticky included.
	Mode     uint32
	UID, GID uint32
	// Mtime is the modification time; a zero Atime or Ctime is Mtime.
	Mtime, Atime, Ctime time.Time
	// Major and Minor are a device node's numbers.
	Major, Minor uint32
	// Target is a symlink's target (1 to MaxTarget bytes, any but NUL).
	Target string
	// Data is a regular file's content.
	Data Data
	// Xattrs are extended attributes by full name: "user.", "trusted."
	// and "security." names, and POSIX ACLs ("system.posix_acl_access",
	// "system.posix_acl_default") in the form the system calls use. See
	// SupportedXattr.
	Xattrs map[string][]byte
}

// Data is where a regular file's content is: Size bytes at Off in R. R
// must stay readable, and the bytes unchanged, until Write has returned.
// Blocks of zeros become holes in the image.
type Data struct {
	R    io.ReaderAt
	Off  int64
	Size int64
}

// NewBuilder returns a Builder holding an empty root directory (mode
// 0755, owned by root).
func NewBuilder() *Builder {
	root := &node{mode: unix.S_IFDIR | 0o755, children: map[string]*node{}}
	return &Builder{root: root, live: 1, maxNodes: DefaultMaxNodes}
}

// SetMaxNodes changes the limit on the number of files (DefaultMaxNodes).
func (b *Builder) SetMaxNodes(n int) { b.maxNodes = n }

// Len is the number of files in the tree, the root included.
func (b *Builder) Len() int { return b.live }

// splitPath returns the names of a path, or an error wrapping ErrPath.
func splitPath(p string) ([]string, error) {
	if len(p) > MaxPath {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrPath, len(p), MaxPath)
	}
	if strings.IndexByte(p, 0) >= 0 {
		return nil, fmt.Errorf("%w: NUL byte in %q", ErrPath, p)
	}
	var names []string
	for name := range strings.SplitSeq(p, "/") {
		switch {
		case name == "" || name == ".":
			continue
		case name == "..":
			return nil, fmt.Errorf("%w: %q has a \"..\" component", ErrPath, p)
		case len(name) > maxName:
			return nil, fmt.Errorf("%w: a name in %q is longer than %d bytes", ErrPath, p, maxName)
		}
		names = append(names, name)
	}
	return names, nil
}

// walker resolves directories of the tree, following symlinks.
type walker struct {
	b      *Builder
	create bool      // make missing directories
	mtime  time.Time // of the directories it makes
	hops   int
}

// dir returns the directory that names lead to from the directories in
// stack (the last is where the walk is; stack[0] is the root), or nil
// when one is missing and w.create is false.
func (w *walker) dir(stack []*node, names []string) ([]*node, error) {
	for _, name := range names {
		cur := stack[len(stack)-1]
		switch name {
		case "", ".":
			continue
		case "..":
			if len(stack) > 1 {
				stack = stack[:len(stack)-1]
			}
			continue
		}
		next := cur.children[name]
		switch {
		case next == nil:
			if !w.create {
				return nil, nil
			}
			if err := w.b.grow(1); err != nil {
				return nil, err
			}
			next = &node{mode: unix.S_IFDIR | 0o755, children: map[string]*node{}}
			next.mtime = timespec(w.mtime)
			next.atime, next.ctime = next.mtime, next.mtime
			cur.children[name] = next
		case next.isLnk():
			if w.hops++; w.hops > maxHops {
				return nil, fmt.Errorf("%w: more than %d symlinks on the way", ErrPath, maxHops)
			}
			from := stack
			if strings.HasPrefix(next.target, "/") {
				from = stack[:1]
			}
			var err error
			if stack, err = w.dir(slices.Clone(from), strings.Split(next.target, "/")); err != nil || stack == nil {
				return nil, err
			}
			continue
		case !next.isDir():
			return nil, fmt.Errorf("%w: %q is not a directory", ErrPath, name)
		}
		stack = append(stack, next)
	}
	return stack, nil
}

// parent resolves the directory holding the last name of p: the names
// and that directory, nil if it is missing and create is false.
func (b *Builder) parent(p string, create bool, mtime time.Time) (names []string, dir *node, err error) {
	if names, err = splitPath(p); err != nil {
		return nil, nil, err
	}
	if len(names) == 0 {
		return nil, nil, nil
	}
	w := &walker{b: b, create: create, mtime: mtime}
	stack, err := w.dir([]*node{b.root}, names[:len(names)-1])
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", p, err)
	}
	if stack == nil {
		return names, nil, nil
	}
	return names, stack[len(stack)-1], nil
}

func (b *Builder) grow(n int) error {
	if b.live+n > b.maxNodes {
		return fmt.Errorf("%w: more than %d", ErrTooManyFiles, b.maxNodes)
	}
	b.live += n
	return nil
}

// count is the number of names under n, n's own included: what adding
// them added to Builder.live.
func count(n *node) int {
	c := 1
	for _, k := range n.children {
		c += count(k)
	}
	return c
}

func (b *Builder) unlink(dir *node, name string) {
	if old := dir.children[name]; old != nil {
		b.live -= count(old)
		delete(dir.children, name)
	}
}

func timespec(t time.Time) unix.Timespec {
	if t.IsZero() {
		return unix.Timespec{}
	}
	return unix.Timespec{Sec: t.Unix(), Nsec: int64(t.Nanosecond())}
}

// meta fills n's metadata from e.
func (n *node) setMeta(e *Entry) error {
	n.mode = e.Mode
	n.uid, n.gid = e.UID, e.GID
	n.mtime = timespec(e.Mtime)
	n.atime, n.ctime = n.mtime, n.mtime
	if !e.Atime.IsZero() {
		n.atime = timespec(e.Atime)
	}
	if !e.Ctime.IsZero() {
		n.ctime = timespec(e.Ctime)
	}
	n.xattrs = nil
	if len(e.Xattrs) == 0 {
		return nil
	}
	xs := make([]xattr, 0, len(e.Xattrs))
	for name, v := range e.Xattrs {
		if !SupportedXattr(name) {
			return fmt.Errorf("extended attribute %q: namespace not supported by ext4", name)
		}
		x, err := diskXattr(name, v)
		if err != nil {
			return fmt.Errorf("extended attribute %q: %w", name, err)
		}
		xs = append(xs, x)
	}
	sortXattrs(xs)
	if !inodeXattrs(make([]byte, inodeSize), xs) {
		if _, err := xattrBlock(xs); err != nil {
			return err
		}
	}
	n.xattrs = xs
	return nil
}

// Add puts an entry at path p, replacing what was there, except that a
// directory added where there is one only takes the new metadata and
// keeps its content. The root ("" or ".") can only take a directory's
// metadata.
func (b *Builder) Add(p string, e Entry) error {
	typ := e.Mode & unix.S_IFMT
	switch typ {
	case unix.S_IFREG, unix.S_IFDIR, unix.S_IFLNK, unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
	default:
		return fmt.Errorf("%s: unknown file type %#o", p, typ)
	}
	if e.Mode&^(unix.S_IFMT|0o7777) != 0 {
		return fmt.Errorf("%s: mode %#o has unknown bits", p, e.Mode)
	}
	switch typ {
	case unix.S_IFLNK:
		if e.Target == "" || len(e.Target) > MaxTarget || strings.IndexByte(e.Target, 0) >= 0 {
			return fmt.Errorf("%s: %w: symlink target must be 1 to %d bytes without NUL", p, ErrPath, MaxTarget)
		}
	case unix.S_IFREG:
		if e.Data.Size < 0 || (e.Data.Size > 0 && e.Data.R == nil) {
			return fmt.Errorf("%s: no content for %d bytes", p, e.Data.Size)
		}
	}
	names, dir, err := b.parent(p, true, e.Mtime)
	if err != nil {
		return err
	}
	if names == nil { // the root
		if typ != unix.S_IFDIR {
			return fmt.Errorf("%q: %w: the root can only be a directory", p, ErrPath)
		}
		if err := b.root.setMeta(&e); err != nil {
			return fmt.Errorf("/: %w", err)
		}
		return nil
	}
	name := names[len(names)-1]
	if old := dir.children[name]; old != nil && old.isDir() && typ == unix.S_IFDIR {
		if err := old.setMeta(&e); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		return nil
	}
	n := &node{}
	if err := n.setMeta(&e); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	switch typ {
	case unix.S_IFDIR:
		n.children = map[string]*node{}
	case unix.S_IFREG:
		n.staged, n.src, n.srcOff, n.size, n.alloc = true, e.Data.R, e.Data.Off, e.Data.Size, e.Data.Size
	case unix.S_IFLNK:
		n.target, n.size = e.Target, int64(len(e.Target))
	case unix.S_IFCHR, unix.S_IFBLK:
		n.rdev = unix.Mkdev(e.Major, e.Minor)
	}
	b.unlink(dir, name)
	if err := b.grow(1); err != nil {
		return err
	}
	n.path = name
	dir.children[name] = n
	return nil
}

// Link makes p a hard link to the file at target (a path in the tree; its
// last name is not followed if it is a symlink), replacing what was at p.
// The target must exist and not be a directory.
func (b *Builder) Link(p, target string) error {
	tnames, tdir, err := b.parent(target, false, time.Time{})
	if err != nil {
		return err
	}
	var t *node
	if tdir != nil {
		t = tdir.children[tnames[len(tnames)-1]]
	}
	switch {
	case tnames == nil:
		return fmt.Errorf("%s: %w: cannot link to the root", p, ErrPath)
	case t == nil:
		return fmt.Errorf("%s: hard link to %s: %w", p, target, fs.ErrNotExist)
	case t.isDir():
		return fmt.Errorf("%s: hard link to %s: %w: a directory", p, target, ErrPath)
	}
	names, dir, err := b.parent(p, true, time.Unix(t.mtime.Sec, t.mtime.Nsec))
	if err != nil {
		return err
	}
	if names == nil {
		return fmt.Errorf("%q: %w: the root cannot be a link", p, ErrPath)
	}
	name := names[len(names)-1]
	if dir.children[name] == t {
		return nil
	}
	b.unlink(dir, name)
	if err := b.grow(1); err != nil {
		return err
	}
	dir.children[name] = t
	return nil
}

// Remove deletes p and, for a directory, everything in it; a missing p is
// not an error. The last name is not followed: removing a symlink removes
// the link.
func (b *Builder) Remove(p string) error {
	names, dir, err := b.parent(p, false, time.Time{})
	if err != nil {
		return err
	}
	if names == nil {
		return fmt.Errorf("%q: %w: cannot remove the root", p, ErrPath)
	}
	if dir != nil {
		b.unlink(dir, names[len(names)-1])
	}
	return nil
}

// Clear empties the directory at p (following symlinks), keeping the
// directory itself; a missing p, or one that is not a directory, is left
// as it is.
func (b *Builder) Clear(p string) error {
	names, err := splitPath(p)
	if err != nil {
		return err
	}
	w := &walker{b: b}
	stack, err := w.dir([]*node{b.root}, names)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	if stack == nil {
		return nil
	}
	d := stack[len(stack)-1]
	for name := range d.children {
		b.unlink(d, name)
	}
	return nil
}

// Write writes the tree as an ext4 image to the new file img (see Build
// for what it keeps). It can be called again after more changes.
func (b *Builder) Write(ctx context.Context, img string, o Options) (Stats, error) {
	t, err := b.number(ctx)
	if err != nil {
		return Stats{}, err
	}
	if err := t.write(ctx, img, o); err != nil {
		return Stats{}, fmt.Errorf("write image: %w", err)
	}
	return t.stats, nil
}

// number gives the tree's nodes their inode numbers, in the order a scan
// of the same tree on the host would (the entries of a directory, sorted
// by name, side by side; then its subdirectories, depth first), so that
// the same tree makes the same image, and the same digest, from either.
func (b *Builder) number(ctx context.Context) (*tree, error) {
	b.gen++
	gen := b.gen
	root := b.root
	root.ino, root.links, root.gen = 2, 2, gen
	t := &tree{nodes: make([]*node, 1, b.live)}
	t.nodes[0] = root
	t.stats.Dirs = 1
	t.stats.Bytes = blockSize
	next := uint32(firstIno)
	stack := []*node{root}
	for len(stack) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		names := make([]string, 0, len(d.children))
		for name := range d.children {
			names = append(names, name)
		}
		slices.Sort(names)
		d.kids = make([]dirent, 0, len(names))
		var subdirs []*node
		for _, name := range names {
			n := d.children[name]
			d.kids = append(d.kids, dirent{name, n})
			if n.gen == gen { // another name of a file already numbered
				n.links++
				continue
			}
			if next == 0 {
				return nil, errors.New("too many files for one ext4 filesystem")
			}
			n.gen, n.ino, n.links = gen, next, 1
			next++
			switch {
			case n.isDir():
				n.links = 2
				d.links++
				n.parent = d.ino
				subdirs = append(subdirs, n)
				t.stats.Dirs++
				t.stats.Bytes += blockSize
			case n.isReg():
				t.stats.Files++
				t.stats.Bytes += (n.size + blockSize - 1) &^ (blockSize - 1)
			case n.isLnk():
				t.stats.Others++
				t.stats.Bytes += blockSize
			default:
				t.stats.Others++
			}
			t.nodes = append(t.nodes, n)
		}
		for i := len(subdirs) - 1; i >= 0; i-- {
			stack = append(stack, subdirs[i])
		}
	}
	return t, nil
}
