// Package ext4 reads ext4 filesystem images without mounting them: inodes,
// directories, file contents, symlinks, device numbers and extended
// attributes. It is what lets mvm copy a guest's changes out of a disk
// image after the VM has stopped, without root, loop devices or FUSE, and
// with every byte of a file name preserved (newlines included), which the
// text output of debugfs cannot promise.
//
// The images come from a guest that may be hostile, so every image is
// treated as attacker input:
//   - every offset and length read from it is checked against the image
//     size, the filesystem's block count and the structure it lies in
//     before it is used, and nothing is allocated from a size the image
//     claims without such a check;
//   - metadata checksums (superblock, group descriptors, inodes, extent
//     tree blocks, directory blocks, attribute blocks) are verified when
//     the filesystem has metadata_csum;
//   - extent trees must be well formed: depth strictly decreasing, each
//     node visited once, extents in ascending, non-overlapping order, all
//     within the filesystem;
//   - directories are read block by block from their mapped blocks only,
//     however large a size their inode claims;
//   - the total number of bytes an FS reads is bounded by a multiple of the
//     image size (BudgetFactor), so no image, however crafted, makes a walk
//     over it run for longer than reading the image a few times would.
//
// A malformed image yields an error that wraps ErrCorrupt; never a panic,
// an endless loop or an allocation larger than the image. Cycles between
// directories (a directory linked twice) are the walker's to detect: each
// directory has an inode number, and a walker visits each once.
//
// It reads what Linux and mke2fs write by default (extents, 64-bit
// descriptors, flex_bg, htree directories, metadata checksums) and refuses,
// with an error wrapping ErrUnsupported, what it does not understand
// (inline data, encryption, indirect block maps, meta_bg), and, with
// ErrNeedsRecovery, a journal that still needs replaying (run e2fsck
// first).
package ext4

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync/atomic"
	"time"
)

// RootIno is the inode number of the root directory.
const RootIno = 2

const (
	superblockOffset = 1024
	magic            = 0xEF53

	compatHasJournal = 0x4

	incompatFiletype   = 0x2
	incompatRecover    = 0x4
	incompatJournalDev = 0x8
	incompatMetaBG     = 0x10
	incompatExtents    = 0x40
	incompat64bit      = 0x80
	incompatEAInode    = 0x400
	incompatDirData    = 0x1000
	incompatCsumSeed   = 0x2000
	incompatInlineData = 0x8000
	incompatEncrypt    = 0x10000

	roCompatGdtCsum      = 0x10
	roCompatMetadataCsum = 0x400

	bgInodeUninit = 0x1

	flagIndex      = 0x1000
	flagExtents    = 0x80000
	flagInlineData = 0x10000000
	flagEncrypt    = 0x800

	extentMagic = 0xF30A
	xattrMagic  = 0xEA020000

	maxExtentDepth = 5
	// maxSymlink is the longest symlink target Linux creates (PATH_MAX
	// less the terminating NUL).
	maxSymlink = 4095
	// copyChunk is how much file data is moved per read: small enough
	// that a cancelled copy stops within milliseconds, large enough to
	// stream at disk speed.
	copyChunk = 1 << 20
)

var (
	// ErrNeedsRecovery means the filesystem's journal holds transactions
	// that were never applied (the guest did not unmount it): replay them
	// with e2fsck before reading.
	ErrNeedsRecovery = errors.New("ext4: journal needs recovery")
	// ErrCorrupt is wrapped by every error about a malformed image: bad
	// magic, an offset outside the image, a checksum mismatch, a cycle,
	// more work than the image's size allows.
	ErrCorrupt = errors.New("ext4: corrupt image")
	// ErrUnsupported is wrapped by errors about valid ext4 features this
	// reader does not implement.
	ErrUnsupported = errors.New("ext4: unsupported feature")
)

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrUnsupported}, args...)...)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the kernel's crc32c_le: no inversion on the way in or out,
// which Go's crc32.Update does.
func crc32c(crc uint32, p []byte) uint32 {
	return ^crc32.Update(^crc, castagnoli, p)
}

var le = binary.LittleEndian

// group is what the reader needs of one block group's descriptor.
type group struct {
	inodeTable   int64
	flags        uint16
	itableUnused uint32
}

// FS is an opened image. Its methods may be called from several
// goroutines.
type FS struct {
	r              io.ReaderAt
	size           int64
	blockSize      int64
	blocks         int64
	inodes         uint32
	inodesPerGroup uint32
	inodeSize      int64
	groups         []group
	filetype       bool
	csum           bool   // metadata_csum
	unusedKnown    bool   // bg_itable_unused is maintained (gdt_csum or metadata_csum)
	seed           uint32 // checksum seed of metadata_csum
	budget         atomic.Int64
}

// BudgetFactor bounds the work of an FS: it reads at most BudgetFactor
// times the image's size (plus BudgetSlack) over its lifetime. A walk
// over a sound image reads each byte once or twice; only an image whose
// metadata points many times at the same blocks needs more, and that is
// corruption.
const (
	BudgetFactor = 8
	BudgetSlack  = 1 << 20
)

// Open reads and checks the superblock and group descriptors of the image
// in r, which holds size bytes.
func Open(r io.ReaderAt, size int64) (*FS, error) {
	f := &FS{r: r, size: size}
	if size < superblockOffset+1024 {
		return nil, corrupt("image of %d bytes is too small", size)
	}
	f.budget.Store(BudgetFactor*size + BudgetSlack)
	sb := make([]byte, 1024)
	if err := f.readAt(sb, superblockOffset); err != nil {
		return nil, fmt.Errorf("ext4: read superblock: %w", err)
	}
	if le.Uint16(sb[56:]) != magic {
		return nil, corrupt("not an ext2/3/4 filesystem (bad magic)")
	}
	incompat, roCompat := le.Uint32(sb[96:]), le.Uint32(sb[100:])
	f.csum = roCompat&roCompatMetadataCsum != 0
	if f.csum {
		if sb[0x175] != 1 {
			return nil, corrupt("unknown checksum type %d", sb[0x175])
		}
		if got, want := le.Uint32(sb[0x3FC:]), crc32c(^uint32(0), sb[:0x3FC]); got != want {
			return nil, corrupt("superblock checksum 0x%08x, want 0x%08x", got, want)
		}
		if incompat&incompatCsumSeed != 0 {
			f.seed = le.Uint32(sb[0x270:])
		} else {
			f.seed = crc32c(^uint32(0), sb[104:120])
		}
	}
	switch {
	case incompat&incompatRecover != 0:
		return nil, ErrNeedsRecovery
	case incompat&(incompatInlineData|incompatEncrypt|incompatDirData|incompatEAInode|incompatJournalDev|incompatMetaBG) != 0:
		return nil, unsupported("incompat features 0x%x", incompat)
	}
	f.filetype = incompat&incompatFiletype != 0
	f.unusedKnown = f.csum || roCompat&roCompatGdtCsum != 0

	logBlock := le.Uint32(sb[24:])
	if logBlock > 6 {
		return nil, corrupt("block size 2^%d", 10+logBlock)
	}
	f.blockSize = 1024 << logBlock
	f.blocks = int64(le.Uint32(sb[4:]))
	descSize := int64(32)
	if incompat&incompat64bit != 0 {
		f.blocks |= int64(le.Uint32(sb[0x150:])) << 32
		descSize = int64(le.Uint16(sb[0xFE:]))
		if descSize < 64 || descSize > 1024 || descSize&(descSize-1) != 0 {
			return nil, corrupt("group descriptor size %d", descSize)
		}
	}
	f.inodes = le.Uint32(sb[0:])
	f.inodesPerGroup = le.Uint32(sb[40:])
	blocksPerGroup := int64(le.Uint32(sb[32:]))
	firstData := int64(le.Uint32(sb[20:]))
	f.inodeSize = 128
	if le.Uint32(sb[76:]) >= 1 {
		f.inodeSize = int64(le.Uint16(sb[88:]))
	}
	switch {
	case f.inodeSize < 128 || f.inodeSize > f.blockSize || f.inodeSize&(f.inodeSize-1) != 0:
		return nil, corrupt("inode size %d", f.inodeSize)
	case blocksPerGroup == 0 || blocksPerGroup > 8*f.blockSize:
		return nil, corrupt("%d blocks per group", blocksPerGroup)
	case f.inodesPerGroup == 0 || int64(f.inodesPerGroup) > 8*f.blockSize:
		return nil, corrupt("%d inodes per group", f.inodesPerGroup)
	case f.blocks <= firstData || f.blocks > size/f.blockSize:
		return nil, corrupt("%d blocks of %d bytes in an image of %d bytes", f.blocks, f.blockSize, size)
	case firstData > 1:
		return nil, corrupt("first data block %d", firstData)
	}
	ngroups := (f.blocks - firstData + blocksPerGroup - 1) / blocksPerGroup
	if int64(f.inodes) != ngroups*int64(f.inodesPerGroup) {
		return nil, corrupt("%d inodes, but %d groups of %d", f.inodes, ngroups, f.inodesPerGroup)
	}
	gdtOff := (firstData + 1) * f.blockSize
	if ngroups*descSize > size-gdtOff {
		return nil, corrupt("%d group descriptors do not fit in the image", ngroups)
	}
	gdt := make([]byte, ngroups*descSize)
	if err := f.readAt(gdt, gdtOff); err != nil {
		return nil, fmt.Errorf("ext4: read group descriptors: %w", err)
	}
	tableBlocks := (int64(f.inodesPerGroup)*f.inodeSize + f.blockSize - 1) / f.blockSize
	f.groups = make([]group, ngroups)
	for g := range f.groups {
		d := gdt[int64(g)*descSize : int64(g+1)*descSize]
		if f.csum {
			if got, want := le.Uint16(d[0x1E:]), f.descCsum(uint32(g), d); got != want {
				return nil, corrupt("group %d descriptor checksum 0x%04x, want 0x%04x", g, got, want)
			}
		}
		gr := group{
			inodeTable:   int64(le.Uint32(d[8:])),
			flags:        le.Uint16(d[0x12:]),
			itableUnused: uint32(le.Uint16(d[0x1C:])),
		}
		if descSize >= 64 {
			gr.inodeTable |= int64(le.Uint32(d[0x28:])) << 32
			gr.itableUnused |= uint32(le.Uint16(d[0x32:])) << 16
		}
		if gr.inodeTable <= firstData || gr.inodeTable > f.blocks-tableBlocks {
			return nil, corrupt("group %d inode table at block %d", g, gr.inodeTable)
		}
		if gr.itableUnused > f.inodesPerGroup {
			return nil, corrupt("group %d: %d unused inodes of %d", g, gr.itableUnused, f.inodesPerGroup)
		}
		f.groups[g] = gr
	}
	return f, nil
}

// Size is the size of the image in bytes.
func (f *FS) Size() int64 { return f.size }

func (f *FS) descCsum(g uint32, d []byte) uint16 {
	var b [4]byte
	le.PutUint32(b[:], g)
	c := crc32c(f.seed, b[:])
	c = crc32c(c, d[:0x1E])
	c = crc32c(c, []byte{0, 0})
	c = crc32c(c, d[0x20:])
	return uint16(c)
}

// readAt fills p from offset off of the image, which must lie inside it,
// and charges the read to the budget.
func (f *FS) readAt(p []byte, off int64) error {
	if off < 0 || off > f.size || int64(len(p)) > f.size-off {
		return corrupt("read of %d bytes at offset %d is outside the image (%d bytes)", len(p), off, f.size)
	}
	if f.budget.Add(-int64(len(p))) < 0 {
		f.budget.Add(int64(len(p))) // not read
		return corrupt("reading it takes more than %d times its size", BudgetFactor)
	}
	n, err := f.r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// block reads filesystem block n, which must lie inside the filesystem.
func (f *FS) block(n int64) ([]byte, error) {
	if n <= 0 || n >= f.blocks {
		return nil, corrupt("block %d is outside the filesystem (%d blocks)", n, f.blocks)
	}
	b := make([]byte, f.blockSize)
	return b, f.readAt(b, n*f.blockSize)
}

// Inode is the metadata of one file.
type Inode struct {
	Ino   uint32
	Mode  fs.FileMode // type and permission bits, as Go's io/fs
	UID   uint32
	GID   uint32
	Size  int64
	Mtime time.Time
	Atime time.Time
	Nlink uint16
	// Major and Minor are the device numbers of a device node. An overlay
	// whiteout is a character device 0:0.
	Major, Minor uint32

	flags    uint32
	seed     uint32   // checksum seed of this inode's blocks
	block    [60]byte // i_block: extent tree root, fast symlink, device
	blocks   int64    // i_blocks, in 512-byte units (huge_file aside)
	fileACL  int64
	extraRaw []byte // bytes after the 128-byte base inode
}

// IsWhiteout reports whether the inode is an overlayfs whiteout.
func (in *Inode) IsWhiteout() bool {
	return in.Mode&fs.ModeCharDevice != 0 && in.Major == 0 && in.Minor == 0
}

// Inode reads inode number ino.
func (f *FS) Inode(ino uint32) (*Inode, error) {
	if ino == 0 || ino > f.inodes {
		return nil, corrupt("inode %d out of range (%d inodes)", ino, f.inodes)
	}
	g, idx := (ino-1)/f.inodesPerGroup, (ino-1)%f.inodesPerGroup
	gr := f.groups[g]
	if f.unusedKnown && (gr.flags&bgInodeUninit != 0 || idx >= f.inodesPerGroup-gr.itableUnused) {
		return nil, corrupt("inode %d is not in use", ino)
	}
	raw := make([]byte, f.inodeSize)
	if err := f.readAt(raw, gr.inodeTable*f.blockSize+int64(idx)*f.inodeSize); err != nil {
		return nil, fmt.Errorf("ext4: read inode %d: %w", ino, err)
	}
	var extra int64
	if f.inodeSize > 128 {
		extra = int64(le.Uint16(raw[0x80:]))
		if extra&3 != 0 || 128+extra > f.inodeSize {
			return nil, corrupt("inode %d: extra size %d", ino, extra)
		}
	}
	in := &Inode{
		Ino:     ino,
		UID:     uint32(le.Uint16(raw[2:])) | uint32(le.Uint16(raw[0x78:]))<<16,
		GID:     uint32(le.Uint16(raw[0x18:])) | uint32(le.Uint16(raw[0x7A:]))<<16,
		Size:    int64(le.Uint32(raw[4:])) | int64(le.Uint32(raw[0x6C:]))<<32,
		Nlink:   le.Uint16(raw[0x1A:]),
		flags:   le.Uint32(raw[0x20:]),
		blocks:  int64(le.Uint32(raw[0x1C:])) | int64(le.Uint16(raw[0x74:]))<<32,
		fileACL: int64(le.Uint32(raw[0x68:])) | int64(le.Uint16(raw[0x76:]))<<32,
	}
	if f.csum {
		var b [4]byte
		le.PutUint32(b[:], ino)
		in.seed = crc32c(f.seed, b[:])
		in.seed = crc32c(in.seed, raw[0x64:0x68]) // i_generation
		if err := f.checkInodeCsum(in.seed, raw, extra); err != nil {
			return nil, fmt.Errorf("inode %d: %w", ino, err)
		}
	}
	var ok bool
	if in.Mode, ok = goMode(le.Uint16(raw[0:])); !ok {
		return nil, corrupt("inode %d: mode 0%o", ino, le.Uint16(raw[0:]))
	}
	if in.Nlink == 0 {
		return nil, corrupt("inode %d is deleted (no links) but referenced", ino)
	}
	if in.Size < 0 {
		return nil, corrupt("inode %d: size %d", ino, in.Size)
	}
	copy(in.block[:], raw[0x28:0x64])
	// The extra fields, then the in-inode attribute area.
	in.extraRaw = raw[128:]
	in.Mtime = inodeTime(le.Uint32(raw[0x10:]), raw, 0x88, extra)
	in.Atime = inodeTime(le.Uint32(raw[0x08:]), raw, 0x8C, extra)
	if in.Mode&(fs.ModeCharDevice|fs.ModeDevice) != 0 {
		b0, b1 := le.Uint32(in.block[0:]), le.Uint32(in.block[4:])
		if b0 != 0 {
			in.Major, in.Minor = (b0>>8)&0xff, b0&0xff
		} else {
			in.Major, in.Minor = (b1&0xfff00)>>8, (b1&0xff)|((b1>>12)&0xfff00)
		}
	}
	switch {
	case in.flags&flagInlineData != 0:
		return nil, unsupported("inode %d uses inline data", ino)
	case in.flags&flagEncrypt != 0:
		return nil, unsupported("inode %d is encrypted", ino)
	}
	return in, nil
}

// checkInodeCsum verifies an inode's checksum (ext4_inode_csum in the
// kernel): the whole on-disk inode with its checksum fields taken as zero,
// the high half only when the inode's extra size covers it.
func (f *FS) checkInodeCsum(seed uint32, raw []byte, extra int64) error {
	zero := []byte{0, 0}
	c := crc32c(seed, raw[:0x7C])
	c = crc32c(c, zero)
	c = crc32c(c, raw[0x7E:128])
	want := uint32(le.Uint16(raw[0x7C:]))
	hiFits := extra >= 4
	if f.inodeSize > 128 {
		c = crc32c(c, raw[128:0x82])
		off := 0x82
		if hiFits {
			c = crc32c(c, zero)
			off += 2
			want |= uint32(le.Uint16(raw[0x82:])) << 16
		}
		c = crc32c(c, raw[off:])
	}
	if !hiFits {
		c &= 0xFFFF
	}
	if c != want {
		return corrupt("inode checksum 0x%08x, want 0x%08x", want, c)
	}
	return nil
}

// inodeTime decodes a timestamp with its nanosecond/epoch extension, when
// the inode is large enough to carry one.
func inodeTime(secs uint32, raw []byte, extraOff int, extraIsize int64) time.Time {
	s := int64(int32(secs))
	var ns int64
	if 128+extraIsize >= int64(extraOff)+4 {
		x := le.Uint32(raw[extraOff:])
		s += int64(x&3) << 32
		ns = min(int64(x>>2), 999_999_999)
	}
	return time.Unix(s, ns)
}

// goMode converts an on-disk mode; ok is false for an unknown file type.
func goMode(m uint16) (mode fs.FileMode, ok bool) {
	perm := fs.FileMode(m & 0o777)
	if m&0o4000 != 0 {
		perm |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		perm |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		perm |= fs.ModeSticky
	}
	switch m & 0o170000 {
	case 0o100000:
	case 0o040000:
		perm |= fs.ModeDir
	case 0o120000:
		perm |= fs.ModeSymlink
	case 0o020000:
		perm |= fs.ModeDevice | fs.ModeCharDevice
	case 0o060000:
		perm |= fs.ModeDevice
	case 0o010000:
		perm |= fs.ModeNamedPipe
	case 0o140000:
		perm |= fs.ModeSocket
	default:
		return 0, false
	}
	return perm, true
}

// Extent is a run of a file's content that the image stores: bytes
// [Offset, Offset+Length) of the file. What no extent covers (holes, and
// extents allocated but not yet written) reads as zeros.
type Extent struct {
	Offset, Length int64
	physical       int64 // byte offset in the image
}

// maxLogicalBlocks is the size of ext4's logical block space (32-bit
// block numbers).
const maxLogicalBlocks = 1 << 32

// Extents calls fn for each initialised extent of a regular file,
// directory or slow symlink, in ascending order, clipped to its size. The
// tree is checked as it is walked: an error comes before any extent that
// follows the fault, and fn may have seen the ones before it.
func (f *FS) Extents(in *Inode, fn func(Extent) error) error {
	if in.flags&flagExtents == 0 {
		if in.Size == 0 || in.blocks == 0 {
			// Nothing stored: an empty file, or a size made only of
			// holes in a file that never had a block.
			return nil
		}
		return unsupported("inode %d uses indirect block maps", in.Ino)
	}
	w := &extentWalk{f: f, in: in, fn: fn, visited: map[int64]bool{}}
	if err := w.node(in.block[:], -1, 0, maxLogicalBlocks); err != nil {
		return fmt.Errorf("inode %d: %w", in.Ino, err)
	}
	return nil
}

type extentWalk struct {
	f       *FS
	in      *Inode
	fn      func(Extent) error
	visited map[int64]bool
	next    int64 // first logical block the next extent may start at
}

// node walks one node of the tree. depth is the depth its parent expects
// (-1 for the root, whose own header says); [lo, hi) is the logical range
// its parent's index entry gives it.
func (w *extentWalk) node(b []byte, depth int, lo, hi int64) error {
	if len(b) < 12 || le.Uint16(b[0:]) != extentMagic {
		return corrupt("bad extent header")
	}
	entries, maxEntries, d := int(le.Uint16(b[2:])), int(le.Uint16(b[4:])), int(le.Uint16(b[6:]))
	switch {
	case depth < 0 && d > maxExtentDepth:
		return corrupt("extent tree depth %d", d)
	case depth >= 0 && d != depth:
		return corrupt("extent node depth %d under a node of depth %d", d, depth+1)
	case 12+maxEntries*12 > len(b) || entries > maxEntries:
		return corrupt("extent node with %d of %d entries in %d bytes", entries, maxEntries, len(b))
	}
	for i := 0; i < entries; i++ {
		e := b[12+i*12:]
		first := int64(le.Uint32(e[0:]))
		if first < lo || first < w.next || first >= hi {
			return corrupt("extent at logical block %d out of order", first)
		}
		if d == 0 {
			n := int64(le.Uint16(e[4:]))
			uninit := n > 32768
			if uninit {
				n -= 32768
			}
			phys := int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:]))
			switch {
			case n == 0:
				return corrupt("empty extent at logical block %d", first)
			case first+n > hi:
				return corrupt("extent at logical block %d overruns its node", first)
			case phys <= 0 || phys > w.f.blocks-n:
				return corrupt("extent at block %d (+%d) is outside the filesystem", phys, n)
			}
			w.next = first + n
			if uninit {
				continue
			}
			off := first * w.f.blockSize
			if off >= w.in.Size {
				continue
			}
			ext := Extent{Offset: off, Length: min(n*w.f.blockSize, w.in.Size-off), physical: phys * w.f.blockSize}
			if err := w.fn(ext); err != nil {
				return err
			}
			continue
		}
		child := int64(le.Uint32(e[4:])) | int64(le.Uint16(e[8:]))<<32
		if w.visited[child] {
			return corrupt("extent tree block %d is reached twice", child)
		}
		w.visited[child] = true
		end := hi
		if i+1 < entries {
			end = int64(le.Uint32(b[12+(i+1)*12:]))
		}
		cb, err := w.f.block(child)
		if err != nil {
			return err
		}
		if err := w.f.checkExtentCsum(w.in, cb); err != nil {
			return err
		}
		if err := w.node(cb, d-1, first, end); err != nil {
			return err
		}
	}
	return nil
}

func (f *FS) checkExtentCsum(in *Inode, b []byte) error {
	if !f.csum {
		return nil
	}
	maxEntries := int(le.Uint16(b[4:]))
	tail := 12 + maxEntries*12
	if tail+4 > len(b) {
		return corrupt("extent block has no room for its checksum")
	}
	if got, want := le.Uint32(b[tail:]), crc32c(in.seed, b[:tail]); got != want {
		return corrupt("extent block checksum 0x%08x, want 0x%08x", got, want)
	}
	return nil
}

// DataSize is the number of bytes of a file's content the image really
// stores: the sum of its initialised extents, clipped to its size. It is
// what copying the file with CopyData writes.
func (f *FS) DataSize(in *Inode) (int64, error) {
	var n int64
	err := f.Extents(in, func(e Extent) error { n += e.Length; return nil })
	return n, err
}

// CopyData writes the content of a regular file to w, each stored extent
// at its offset, leaving holes unwritten (the caller sets the size, e.g.
// with Truncate, and so keeps a sparse file sparse). It returns the bytes
// written; it stops, with an error wrapping ctx.Err(), within one chunk of
// ctx being cancelled.
func (f *FS) CopyData(ctx context.Context, in *Inode, w io.WriterAt) (int64, error) {
	buf := make([]byte, min(copyChunk, max(f.blockSize, in.Size)))
	var written int64
	err := f.Extents(in, func(e Extent) error {
		for done := int64(0); done < e.Length; {
			if err := ctx.Err(); err != nil {
				return err
			}
			c := buf[:min(int64(len(buf)), e.Length-done)]
			if err := f.readAt(c, e.physical+done); err != nil {
				return err
			}
			if _, err := w.WriteAt(c, e.Offset+done); err != nil {
				return err
			}
			done += int64(len(c))
			written += int64(len(c))
		}
		return nil
	})
	return written, err
}

// CopyFile writes the content of a regular file (or a slow symlink's
// target) to w, in order, holes and unwritten extents as zeros. A sparse
// file of a large size writes that many zeros: use CopyData to keep holes.
func (f *FS) CopyFile(ctx context.Context, in *Inode, w io.Writer) error {
	var pos int64
	zeros := make([]byte, 64<<10)
	writeZeros := func(n int64) error {
		for n > 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			c := min(n, int64(len(zeros)))
			if _, err := w.Write(zeros[:c]); err != nil {
				return err
			}
			n -= c
		}
		return nil
	}
	_, err := f.CopyData(ctx, in, writerAtFunc(func(p []byte, off int64) (int, error) {
		if err := writeZeros(off - pos); err != nil {
			return 0, err
		}
		n, err := w.Write(p)
		pos = off + int64(n)
		return n, err
	}))
	if err != nil {
		return err
	}
	return writeZeros(in.Size - pos)
}

type writerAtFunc func(p []byte, off int64) (int, error)

func (fn writerAtFunc) WriteAt(p []byte, off int64) (int, error) { return fn(p, off) }

// Readlink returns a symlink's target.
func (f *FS) Readlink(in *Inode) (string, error) {
	if in.Mode&fs.ModeSymlink == 0 {
		return "", fmt.Errorf("ext4: inode %d is not a symlink", in.Ino)
	}
	if in.Size > maxSymlink || in.Size > f.blockSize {
		return "", corrupt("symlink inode %d: target of %d bytes", in.Ino, in.Size)
	}
	if in.flags&flagExtents == 0 && in.Size < int64(len(in.block)) {
		return string(in.block[:in.Size]), nil
	}
	b := make([]byte, 0, in.Size)
	_, err := f.CopyData(context.Background(), in, writerAtFunc(func(p []byte, off int64) (int, error) {
		if off != int64(len(b)) {
			return 0, corrupt("symlink inode %d has a hole", in.Ino)
		}
		b = append(b, p...)
		return len(p), nil
	}))
	if err != nil {
		return "", err
	}
	if int64(len(b)) != in.Size {
		return "", corrupt("symlink inode %d: %d of %d bytes stored", in.Ino, len(b), in.Size)
	}
	return string(b), nil
}

// DirEntry is one name in a directory.
type DirEntry struct {
	Name string
	Ino  uint32
}

// WalkDir calls fn for each entry of a directory except its own "." and
// ".." (the first two entries), in on-disk order. Any other entry is
// reported as it is, however odd its name ("." or ".." again, an empty
// name, a name with a slash): judging names is the caller's business. It
// reads one block at a time, only the blocks the directory's extents map.
func (f *FS) WalkDir(in *Inode, fn func(DirEntry) error) error {
	if !in.Mode.IsDir() {
		return fmt.Errorf("ext4: inode %d is not a directory", in.Ino)
	}
	if in.flags&flagExtents == 0 {
		return unsupported("directory inode %d does not use extents", in.Ino)
	}
	seen := 0 // entries seen so far, to skip "." and ".."
	b := make([]byte, f.blockSize)
	err := f.Extents(in, func(e Extent) error {
		if e.Length%f.blockSize != 0 {
			return corrupt("directory size %d is not a whole number of blocks", in.Size)
		}
		for off := int64(0); off < e.Length; off += f.blockSize {
			if err := f.readAt(b, e.physical+off); err != nil {
				return err
			}
			lblk := (e.Offset + off) / f.blockSize
			if err := f.dirBlock(in, lblk, b, &seen, fn); err != nil {
				return fmt.Errorf("directory inode %d block %d: %w", in.Ino, lblk, err)
			}
		}
		return nil
	})
	return err
}

// dirBlock parses one directory block.
func (f *FS) dirBlock(in *Inode, lblk int64, b []byte, seen *int, fn func(DirEntry) error) error {
	end := len(b)
	if f.csum {
		if t := b[len(b)-12:]; le.Uint32(t) == 0 && le.Uint16(t[4:]) == 12 && t[6] == 0 && t[7] == 0xDE {
			if got, want := le.Uint32(t[8:]), crc32c(in.seed, b[:len(b)-12]); got != want {
				return corrupt("checksum 0x%08x, want 0x%08x", got, want)
			}
			end = len(b) - 12
		} else if err := f.checkDxCsum(in, lblk, b); err != nil {
			return err
		}
	}
	for off := 0; off < end; {
		if end-off < 8 {
			return corrupt("truncated entry at offset %d", off)
		}
		ino := le.Uint32(b[off:])
		recLen := int(le.Uint16(b[off+4:]))
		nameLen := int(b[off+6])
		if !f.filetype {
			nameLen = int(le.Uint16(b[off+6:]))
		}
		if recLen < 12 || recLen%4 != 0 || recLen > end-off || 8+nameLen > recLen || nameLen > 255 {
			return corrupt("bad entry at offset %d (length %d, name %d)", off, recLen, nameLen)
		}
		if ino > f.inodes {
			return corrupt("entry at offset %d names inode %d of %d", off, ino, f.inodes)
		}
		if ino != 0 {
			name := string(b[off+8 : off+8+nameLen])
			*seen++
			if !(lblk == 0 && (*seen == 1 && name == "." || *seen == 2 && name == "..")) {
				if err := fn(DirEntry{Name: name, Ino: ino}); err != nil {
					return err
				}
			}
		}
		off += recLen
	}
	return nil
}

// checkDxCsum verifies a block of a hashed directory's index (the root at
// logical block 0, or an interior node), whose checksum sits in a tail
// after the index entries rather than in a fake directory entry.
func (f *FS) checkDxCsum(in *Inode, lblk int64, b []byte) error {
	if in.flags&flagIndex == 0 {
		return corrupt("no checksum tail")
	}
	var countOff int
	switch {
	case lblk == 0 && le.Uint16(b[4:]) == 12 && int(le.Uint16(b[16:])) == len(b)-12:
		countOff = 32 // ".", "..", dx_root_info
	case le.Uint32(b) == 0 && int(le.Uint16(b[4:])) == len(b):
		countOff = 8 // an empty entry spanning the block
	default:
		return corrupt("no checksum tail and not an index block")
	}
	limit, count := int(le.Uint16(b[countOff:])), int(le.Uint16(b[countOff+2:]))
	if count > limit || countOff+limit*8+8 > len(b) {
		return corrupt("index of %d of %d entries", count, limit)
	}
	t := b[countOff+limit*8:]
	c := crc32c(in.seed, b[:countOff+count*8])
	c = crc32c(c, t[:4])
	c = crc32c(c, []byte{0, 0, 0, 0})
	if got := le.Uint32(t[4:]); got != c {
		return corrupt("index checksum 0x%08x, want 0x%08x", got, c)
	}
	return nil
}

// ReadDir lists a directory as WalkDir does. The list takes memory in
// proportion to the directory's stored blocks; walkers of untrusted images
// that must bound memory use WalkDir.
func (f *FS) ReadDir(in *Inode) ([]DirEntry, error) {
	var out []DirEntry
	err := f.WalkDir(in, func(e DirEntry) error { out = append(out, e); return nil })
	return out, err
}

// Lookup resolves a slash-separated path from the root, without following
// symlinks.
func (f *FS) Lookup(path string) (*Inode, error) {
	in, err := f.Inode(RootIno)
	if err != nil {
		return nil, err
	}
	errFound := errors.New("found")
	for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
		if part == "" {
			continue
		}
		var ino uint32
		err := f.WalkDir(in, func(e DirEntry) error {
			if e.Name == part {
				ino = e.Ino
				return errFound
			}
			return nil
		})
		if err != nil && !errors.Is(err, errFound) {
			return nil, err
		}
		if ino == 0 {
			return nil, fmt.Errorf("ext4: %s: %w", path, fs.ErrNotExist)
		}
		if in, err = f.Inode(ino); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// xattr name prefixes by index, as stored on disk.
var xattrPrefix = map[uint8]string{1: "user.", 4: "trusted.", 6: "security.", 7: "system."}

// Xattr returns the value of the extended attribute name (e.g.
// "trusted.overlay.opaque"), looking in the inode body and then in its
// attribute block.
func (f *FS) Xattr(in *Inode, name string) ([]byte, bool, error) {
	if extra := len(in.extraRaw); extra >= 4 {
		isize := int(le.Uint16(in.extraRaw[0:]))
		if body := in.extraRaw; isize+4 <= len(body) && le.Uint32(body[isize:]) == xattrMagic {
			entries := body[isize+4:]
			v, ok, err := findXattr(entries, entries, name)
			if err != nil || ok {
				if err != nil {
					err = fmt.Errorf("inode %d attributes: %w", in.Ino, err)
				}
				return v, ok, err
			}
		}
	}
	if in.fileACL == 0 {
		return nil, false, nil
	}
	blk, err := f.block(in.fileACL)
	if err != nil {
		return nil, false, fmt.Errorf("inode %d attribute block: %w", in.Ino, err)
	}
	if le.Uint32(blk[0:]) != xattrMagic || le.Uint32(blk[8:]) != 1 {
		return nil, false, corrupt("inode %d attribute block %d: bad header", in.Ino, in.fileACL)
	}
	if f.csum {
		var nb [8]byte
		le.PutUint64(nb[:], uint64(in.fileACL))
		c := crc32c(f.seed, nb[:])
		c = crc32c(c, blk[:0x10])
		c = crc32c(c, []byte{0, 0, 0, 0})
		c = crc32c(c, blk[0x14:])
		if got := le.Uint32(blk[0x10:]); got != c {
			return nil, false, corrupt("inode %d attribute block checksum 0x%08x, want 0x%08x", in.Ino, got, c)
		}
	}
	v, ok, err := findXattr(blk[32:], blk, name)
	if err != nil {
		err = fmt.Errorf("inode %d attribute block: %w", in.Ino, err)
	}
	return v, ok, err
}

// findXattr scans xattr entries; value offsets are relative to base.
func findXattr(entries, base []byte, name string) ([]byte, bool, error) {
	for off := 0; off+4 <= len(entries) && le.Uint32(entries[off:]) != 0; {
		if off+16 > len(entries) {
			return nil, false, corrupt("truncated attribute entry")
		}
		nameLen := int(entries[off])
		idx := entries[off+1]
		valOff := int(le.Uint16(entries[off+2:]))
		valInum := le.Uint32(entries[off+4:])
		valSize := int64(le.Uint32(entries[off+8:]))
		if off+16+nameLen > len(entries) {
			return nil, false, corrupt("attribute name overruns its area")
		}
		full := xattrPrefix[idx] + string(entries[off+16:off+16+nameLen])
		if full == name {
			if valInum != 0 || int64(valOff)+valSize > int64(len(base)) {
				return nil, false, corrupt("attribute %s: value outside its area", name)
			}
			return append([]byte(nil), base[valOff:int64(valOff)+valSize]...), true, nil
		}
		off += (16 + nameLen + 3) &^ 3
	}
	return nil, false, nil
}

// OpenFile opens the image file at path for reading; closing it is the
// returned function's job.
func OpenFile(path string) (*FS, func(), error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	fsys, err := Open(f, fi.Size())
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return fsys, func() { f.Close() }, nil
}
