package writeback

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/mvm-sh/mvm/internal/ext4"
)

// Bounds on a change set. A guest that exceeds them gets its change set
// refused (and kept for inspection), rather than a host that holds an
// arbitrarily large plan in memory or opens arbitrarily many directories
// at once.
const (
	// MaxEntries is the most entries (files, directories, links,
	// whiteouts...) one change set may hold.
	MaxEntries = 2 << 20
	// MaxNameBytes is the most bytes all names of a change set may take.
	MaxNameBytes = 256 << 20
	// MaxDepth is the deepest directory nesting a change set may have;
	// applying it holds one open directory per level.
	MaxDepth = 1024
)

// InvalidChangeSetError means the guest's change set cannot be applied as
// it is: a name that is not a plain file name, the same name twice in a
// directory, a directory reached twice, a damaged or crafted scratch
// filesystem. Nothing of it was applied.
type InvalidChangeSetError struct {
	// Path is the entry at fault, relative to the shared directory, when
	// there is one.
	Path string
	// Reason says what is wrong.
	Reason string
	// Err is the underlying error, if any (an ext4.ErrCorrupt from the
	// reader, for instance).
	Err error
}

func (e *InvalidChangeSetError) Error() string {
	msg := "invalid change set: "
	if e.Path != "" {
		msg += fmt.Sprintf("%q: ", e.Path)
	}
	msg += e.Reason
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *InvalidChangeSetError) Unwrap() error { return e.Err }

type kind uint8

const (
	kindFile kind = iota
	kindDir
	kindSymlink
	kindFifo
	kindWhiteout
	kindDevice // never written back
	kindSocket // never written back
	kindLink   // another name of an earlier entry
)

// node is one entry of the change set.
type node struct {
	name   string
	parent int32
	kind   kind
	ino    uint32
	// mode is the permission and sticky bits to apply; setid is the
	// guest's set-user-ID/set-group-ID bits, which are not.
	mode  uint32
	setid uint32
	size  int64 // regular files
	data  int64 // bytes the image stores for a regular file
	atime int64 // nanoseconds since the epoch
	mtime int64
	// first and count are a directory's entries: nodes[first:first+count];
	// for kindLink, first is the entry it links to.
	first, count int32
	// Directories: replace means the guest made the directory (opaque,
	// or none in the lower image): host entries it does not have go.
	// modeChanged and attrs say whether its mode, and its mode and times,
	// differ from the lower image's.
	replace, modeChanged, attrs bool
	// linked: a later entry is a hard link to this one.
	linked bool
}

// changeSet is a validated, complete plan of a write-back, built in one
// pass over the upper layer before anything on the host is touched.
type changeSet struct {
	nodes     []node // nodes[0] is the shared directory itself
	nameBytes int
	depth     int
	// need is the space the write-back takes on the host, for a host
	// filesystem with blocks of blockSize bytes.
	data, newDirs, symlinks int64
}

// planner builds a changeSet.
type planner struct {
	ctx          context.Context
	upper, lower *ext4.FS
	cs           changeSet
	seenDirs     map[uint32]bool  // upper directory inodes already planned
	seenLower    map[uint32]bool  // lower directory inodes already read
	firstName    map[uint32]int32 // inode -> entry that writes it (hard links)
}

// plan reads and validates the whole change set in the upper layer of
// upper against lower, the image the guest started from.
func plan(ctx context.Context, upper, lower *ext4.FS) (*changeSet, error) {
	p := &planner{
		ctx: ctx, upper: upper, lower: lower,
		seenDirs: map[uint32]bool{}, seenLower: map[uint32]bool{}, firstName: map[uint32]int32{},
	}
	root, err := upper.Lookup(UpperDir)
	if err != nil {
		return nil, &InvalidChangeSetError{Reason: "no upper layer in the scratch image", Err: err}
	}
	if !root.Mode.IsDir() {
		return nil, &InvalidChangeSetError{Reason: "the upper layer is not a directory"}
	}
	lowerRoot, err := lower.Inode(ext4.RootIno)
	if err != nil {
		return nil, fmt.Errorf("directory image: %w", err)
	}
	p.cs.nodes = append(p.cs.nodes, node{parent: -1, kind: kindDir})
	p.setAttrs(&p.cs.nodes[0], root)
	p.dirAttrs(&p.cs.nodes[0], root, lowerRoot)
	p.seenDirs[root.Ino] = true
	if err := p.dir(0, root, lowerRoot, 1); err != nil {
		return nil, err
	}
	return &p.cs, nil
}

// path is the entry's path relative to the shared directory, for
// messages.
func (cs *changeSet) path(i int32) string {
	var parts []string
	for ; i > 0; i = cs.nodes[i].parent {
		parts = append(parts, cs.nodes[i].name)
	}
	for l, r := 0, len(parts)-1; l < r; l, r = l+1, r-1 {
		parts[l], parts[r] = parts[r], parts[l]
	}
	return strings.Join(parts, "/")
}

// pathParts is path as components, for lookups below the share.
func (cs *changeSet) pathParts(i int32) []string {
	var parts []string
	for ; i > 0; i = cs.nodes[i].parent {
		parts = append(parts, cs.nodes[i].name)
	}
	for l, r := 0, len(parts)-1; l < r; l, r = l+1, r-1 {
		parts[l], parts[r] = parts[r], parts[l]
	}
	return parts
}

func (p *planner) invalid(i int32, reason string, err error) error {
	return &InvalidChangeSetError{Path: p.cs.path(i), Reason: reason, Err: err}
}

// checkName rejects what cannot be a single file name on the host.
func checkName(name string) string {
	switch {
	case name == "":
		return "empty name"
	case name == "." || name == "..":
		return "name " + name
	case len(name) > 255:
		return "name longer than 255 bytes"
	case strings.ContainsRune(name, '/'):
		return "name contains '/'"
	case strings.ContainsRune(name, 0):
		return "name contains a NUL byte"
	}
	return ""
}

// dir plans the entries of upper directory u, entry di of the plan, at
// the given depth. l is the matching lower directory, nil when there is
// none.
func (p *planner) dir(di int32, u, l *ext4.Inode, depth int) error {
	if depth > MaxDepth {
		return p.invalid(di, fmt.Sprintf("directories nested deeper than %d levels", MaxDepth), nil)
	}
	p.cs.depth = max(p.cs.depth, depth)
	first := int32(len(p.cs.nodes))
	names := map[string]bool{}
	var dirs []int32
	err := p.upper.WalkDir(u, func(e ext4.DirEntry) error {
		if len(p.cs.nodes) >= MaxEntries {
			return p.invalid(di, fmt.Sprintf("more than %d entries", MaxEntries), nil)
		}
		if len(p.cs.nodes)%1024 == 0 {
			if err := p.ctx.Err(); err != nil {
				return err
			}
		}
		if reason := checkName(e.Name); reason != "" {
			return &InvalidChangeSetError{Path: joinPath(p.cs.path(di), e.Name), Reason: reason}
		}
		if names[e.Name] {
			return &InvalidChangeSetError{Path: joinPath(p.cs.path(di), e.Name), Reason: "the name appears twice in its directory"}
		}
		names[e.Name] = true
		p.cs.nameBytes += len(e.Name)
		if p.cs.nameBytes > MaxNameBytes {
			return p.invalid(di, fmt.Sprintf("names take more than %d bytes", MaxNameBytes), nil)
		}
		i := int32(len(p.cs.nodes))
		p.cs.nodes = append(p.cs.nodes, node{name: e.Name, parent: di, ino: e.Ino})
		n := &p.cs.nodes[i]
		in, err := p.upper.Inode(e.Ino)
		if err != nil {
			return p.invalid(i, "unreadable inode", err)
		}
		p.setAttrs(n, in)
		switch {
		case in.IsWhiteout():
			n.kind = kindWhiteout
			return nil
		case in.Mode.IsDir():
			n.kind = kindDir
			if p.seenDirs[in.Ino] {
				return p.invalid(i, "a directory reached twice (a hard-linked directory or a loop)", nil)
			}
			p.seenDirs[in.Ino] = true
			dirs = append(dirs, i)
			return nil
		}
		if prev, ok := p.firstName[in.Ino]; ok {
			n.kind, n.first = kindLink, prev
			p.cs.nodes[prev].linked = true
			return nil
		}
		p.firstName[in.Ino] = i
		switch {
		case in.Mode.IsRegular():
			n.kind = kindFile
			n.size = in.Size
			if n.data, err = p.upper.DataSize(in); err != nil {
				return p.invalid(i, "unreadable file", err)
			}
			p.cs.data += n.data
			if p.cs.data > p.upper.Size() {
				// Files sharing blocks: more to write than the image
				// holds.
				return p.invalid(i, "the files hold more data than the scratch image", nil)
			}
		case in.Mode&fs.ModeSymlink != 0:
			n.kind = kindSymlink
			target, err := p.upper.Readlink(in)
			if err != nil {
				return p.invalid(i, "unreadable symlink", err)
			}
			if target == "" || strings.ContainsRune(target, 0) {
				return p.invalid(i, "symlink target is empty or contains a NUL byte", nil)
			}
			p.cs.symlinks++
		case in.Mode&fs.ModeNamedPipe != 0:
			n.kind = kindFifo
		case in.Mode&fs.ModeDevice != 0:
			n.kind = kindDevice
		case in.Mode&fs.ModeSocket != 0:
			n.kind = kindSocket
		default:
			return p.invalid(i, "unknown file type", nil)
		}
		return nil
	})
	if err != nil {
		var ice *InvalidChangeSetError
		if errors.As(err, &ice) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return p.invalid(di, "unreadable directory", err)
	}
	p.cs.nodes[di].first, p.cs.nodes[di].count = first, int32(len(p.cs.nodes))-first
	if len(dirs) == 0 {
		return nil
	}
	lowerEnts, err := p.lowerEntries(l)
	if err != nil {
		return err
	}
	for _, i := range dirs {
		n := &p.cs.nodes[i]
		in, err := p.upper.Inode(n.ino)
		if err != nil {
			return p.invalid(i, "unreadable inode", err)
		}
		var lin *ext4.Inode
		if ino, ok := lowerEnts[n.name]; ok {
			if lin, err = p.lower.Inode(ino); err != nil {
				return fmt.Errorf("directory image: %w", err)
			}
			if !lin.Mode.IsDir() {
				lin = nil
			}
		}
		opaque, _, err := p.upper.Xattr(in, "trusted.overlay.opaque")
		if err != nil {
			return p.invalid(i, "unreadable attributes", err)
		}
		if string(opaque) == "y" || lin == nil {
			// A directory the guest created or replaced: whatever the
			// host has there beyond the guest's entries goes.
			n.replace = true
			lin = nil
		}
		if lin != nil && p.seenLower[lin.Ino] {
			return fmt.Errorf("directory image: directory inode %d reached twice", lin.Ino)
		}
		if lin != nil {
			p.seenLower[lin.Ino] = true
		}
		p.dirAttrs(n, in, lin)
		if lin == nil {
			p.cs.newDirs++
		}
		if err := p.dir(i, in, lin, depth+1); err != nil {
			return err
		}
	}
	return nil
}

func joinPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// lowerEntries maps the names of lower directory l to their inodes.
func (p *planner) lowerEntries(l *ext4.Inode) (map[string]uint32, error) {
	out := map[string]uint32{}
	if l == nil {
		return out, nil
	}
	err := p.lower.WalkDir(l, func(e ext4.DirEntry) error {
		out[e.Name] = e.Ino
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("directory image: %w", err)
	}
	return out, nil
}

// setAttrs records an inode's mode and times; set-id bits are kept apart,
// since the guest does not get to grant them.
func (p *planner) setAttrs(n *node, in *ext4.Inode) {
	n.mode = uint32(in.Mode.Perm())
	if in.Mode&fs.ModeSticky != 0 {
		n.mode |= 0o1000
	}
	if in.Mode&fs.ModeSetuid != 0 {
		n.setid |= 0o4000
	}
	if in.Mode&fs.ModeSetgid != 0 {
		n.setid |= 0o2000
	}
	n.atime, n.mtime = in.Atime.UnixNano(), in.Mtime.UnixNano()
}

// dirAttrs decides which attributes of a directory are applied: all of
// them for one with no lower counterpart, else those that differ. Owners
// are never compared: the host keeps its own.
func (p *planner) dirAttrs(n *node, in, lin *ext4.Inode) {
	if lin == nil {
		n.modeChanged, n.attrs = true, true
		return
	}
	n.modeChanged = lin.Mode != in.Mode
	n.attrs = n.modeChanged || !lin.Mtime.Equal(in.Mtime)
}
