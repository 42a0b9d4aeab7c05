// Package ext4 reads ext4 filesystem images without mounting them: inodes,
// directories, file contents, symlinks, device numbers and extended
// attributes. It is what lets mvm copy a guest's changes out of a disk
// image after the VM has stopped, without root, loop devices or FUSE, and
// with every byte of a file name preserved (newlines included), which the
// text output of debugfs cannot promise.
//
// It reads what Linux and mke2fs write by default (extents, 64-bit
// descriptors, flex_bg, htree directories, metadata checksums, which it
// ignores) and refuses, with an error, what it does not understand (inline
// data, encryption, a journal that still needs recovery: run e2fsck first).
package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"time"
)

// RootIno is the inode number of the root directory.
const RootIno = 2

const (
	superblockOffset = 1024
	magic            = 0xEF53

	incompatFiletype   = 0x2
	incompatRecover    = 0x4
	incompatJournalDev = 0x8
	incompatMetaBG     = 0x10
	incompatExtents    = 0x40
	incompat64bit      = 0x80
	incompatInlineData = 0x8000
	incompatEncrypt    = 0x10000
	incompatDirData    = 0x1000
	incompatEAInode    = 0x400

	flagExtents    = 0x80000
	flagInlineData = 0x10000000

	extentMagic = 0xF30A
	xattrMagic  = 0xEA020000
)

// ErrNeedsRecovery means the filesystem's journal holds transactions that
// were never applied (the guest did not unmount it): replay them with
// `e2fsck -p` (or `e2fsck -E journal_only`) before reading.
var ErrNeedsRecovery = errors.New("ext4: journal needs recovery")

// FS is an opened image.
type FS struct {
	r              io.ReaderAt
	blockSize      int64
	inodesPerGroup uint32
	inodeSize      int64
	descSize       int64
	groups         uint32
	gdtBlock       int64
	inodeTables    []int64 // block number of each group's inode table
}

// Open reads the superblock and group descriptors of the image in r.
func Open(r io.ReaderAt) (*FS, error) {
	sb := make([]byte, 1024)
	if _, err := r.ReadAt(sb, superblockOffset); err != nil {
		return nil, fmt.Errorf("ext4: read superblock: %w", err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[56:]) != magic {
		return nil, errors.New("ext4: not an ext2/3/4 filesystem (bad magic)")
	}
	incompat := le.Uint32(sb[96:])
	switch {
	case incompat&incompatRecover != 0:
		return nil, ErrNeedsRecovery
	case incompat&(incompatInlineData|incompatEncrypt|incompatDirData|incompatEAInode|incompatJournalDev|incompatMetaBG) != 0:
		return nil, fmt.Errorf("ext4: unsupported features (incompat 0x%x)", incompat)
	}
	f := &FS{
		r:              r,
		blockSize:      1024 << le.Uint32(sb[24:]),
		inodesPerGroup: le.Uint32(sb[40:]),
		inodeSize:      128,
		descSize:       32,
	}
	if le.Uint32(sb[76:]) >= 1 {
		f.inodeSize = int64(le.Uint16(sb[88:]))
	}
	if incompat&incompat64bit != 0 {
		f.descSize = int64(le.Uint16(sb[254:]))
	}
	inodes := le.Uint32(sb[0:])
	if f.inodesPerGroup == 0 || f.blockSize > 65536 || f.inodeSize < 128 || f.descSize < 32 {
		return nil, errors.New("ext4: corrupt superblock")
	}
	f.groups = (inodes + f.inodesPerGroup - 1) / f.inodesPerGroup
	f.gdtBlock = int64(le.Uint32(sb[20:])) + 1
	gdt := make([]byte, int64(f.groups)*f.descSize)
	if _, err := r.ReadAt(gdt, f.gdtBlock*f.blockSize); err != nil {
		return nil, fmt.Errorf("ext4: read group descriptors: %w", err)
	}
	f.inodeTables = make([]int64, f.groups)
	for g := range f.inodeTables {
		d := gdt[int64(g)*f.descSize:]
		tbl := int64(le.Uint32(d[8:]))
		if f.descSize >= 64 {
			tbl |= int64(le.Uint32(d[40:])) << 32
		}
		f.inodeTables[g] = tbl
	}
	return f, nil
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
	block    [60]byte // i_block: extent tree root, fast symlink, device
	fileACL  int64
	extraRaw []byte // bytes after the 128-byte base inode
}

// IsWhiteout reports whether the inode is an overlayfs whiteout.
func (in *Inode) IsWhiteout() bool {
	return in.Mode&fs.ModeCharDevice != 0 && in.Major == 0 && in.Minor == 0
}

// Inode reads inode number ino.
func (f *FS) Inode(ino uint32) (*Inode, error) {
	if ino == 0 || (ino-1)/f.inodesPerGroup >= f.groups {
		return nil, fmt.Errorf("ext4: inode %d out of range", ino)
	}
	g, idx := (ino-1)/f.inodesPerGroup, (ino-1)%f.inodesPerGroup
	raw := make([]byte, f.inodeSize)
	if _, err := f.r.ReadAt(raw, f.inodeTables[g]*f.blockSize+int64(idx)*f.inodeSize); err != nil {
		return nil, fmt.Errorf("ext4: read inode %d: %w", ino, err)
	}
	le := binary.LittleEndian
	mode := le.Uint16(raw[0:])
	in := &Inode{
		Ino:     ino,
		Mode:    goMode(mode),
		UID:     uint32(le.Uint16(raw[2:])) | uint32(le.Uint16(raw[120:]))<<16,
		GID:     uint32(le.Uint16(raw[24:])) | uint32(le.Uint16(raw[122:]))<<16,
		Size:    int64(le.Uint32(raw[4:])) | int64(le.Uint32(raw[108:]))<<32,
		Nlink:   le.Uint16(raw[26:]),
		flags:   le.Uint32(raw[32:]),
		fileACL: int64(le.Uint32(raw[104:])) | int64(le.Uint16(raw[118:]))<<32,
	}
	copy(in.block[:], raw[40:100])
	var extra uint16
	if f.inodeSize > 128 {
		extra = le.Uint16(raw[128:])
		in.extraRaw = raw[128:]
	}
	in.Mtime = inodeTime(le.Uint32(raw[16:]), raw, 0x88, extra)
	in.Atime = inodeTime(le.Uint32(raw[8:]), raw, 0x8C, extra)
	if in.Mode&(fs.ModeCharDevice|fs.ModeDevice) != 0 {
		b0, b1 := le.Uint32(in.block[0:]), le.Uint32(in.block[4:])
		if b0 != 0 {
			in.Major, in.Minor = (b0>>8)&0xff, b0&0xff
		} else {
			in.Major, in.Minor = (b1&0xfff00)>>8, (b1&0xff)|((b1>>12)&0xfff00)
		}
	}
	if in.flags&flagInlineData != 0 {
		return nil, fmt.Errorf("ext4: inode %d uses inline data, which is not supported", ino)
	}
	return in, nil
}

// inodeTime decodes a timestamp with its nanosecond/epoch extension, when
// the inode is large enough to carry one.
func inodeTime(secs uint32, raw []byte, extraOff int, extraIsize uint16) time.Time {
	s := int64(int32(secs))
	var ns int64
	if int(128+extraIsize) >= extraOff+4 && len(raw) >= extraOff+4 {
		x := binary.LittleEndian.Uint32(raw[extraOff:])
		s += int64(x&3) << 32
		ns = int64(x >> 2)
	}
	return time.Unix(s, ns)
}

func goMode(m uint16) fs.FileMode {
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
	}
	return perm
}

// extent maps logical blocks [logical, logical+length) to physical ones;
// an uninitialized extent reads as zeros.
type extent struct {
	logical  int64
	length   int64
	physical int64
	uninit   bool
}

// extents returns the inode's extent list in logical order.
func (f *FS) extents(in *Inode) ([]extent, error) {
	if in.flags&flagExtents == 0 {
		if in.Size == 0 {
			return nil, nil
		}
		return nil, fmt.Errorf("ext4: inode %d uses indirect block maps, which are not supported", in.Ino)
	}
	var out []extent
	if err := f.walkExtents(in.block[:], 0, &out); err != nil {
		return nil, fmt.Errorf("ext4: inode %d: %w", in.Ino, err)
	}
	return out, nil
}

func (f *FS) walkExtents(node []byte, depthSeen int, out *[]extent) error {
	le := binary.LittleEndian
	if len(node) < 12 || le.Uint16(node[0:]) != extentMagic {
		return errors.New("bad extent header")
	}
	entries, depth := int(le.Uint16(node[2:])), int(le.Uint16(node[6:]))
	if depthSeen > 8 || 12+entries*12 > len(node) {
		return errors.New("corrupt extent tree")
	}
	for i := 0; i < entries; i++ {
		e := node[12+i*12:]
		if depth == 0 {
			length := int64(le.Uint16(e[4:]))
			uninit := length > 32768
			if uninit {
				length -= 32768
			}
			*out = append(*out, extent{
				logical:  int64(le.Uint32(e[0:])),
				length:   length,
				physical: int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:])),
				uninit:   uninit,
			})
			continue
		}
		child := int64(le.Uint32(e[4:])) | int64(le.Uint16(e[8:]))<<32
		buf := make([]byte, f.blockSize)
		if _, err := f.r.ReadAt(buf, child*f.blockSize); err != nil {
			return err
		}
		if err := f.walkExtents(buf, depthSeen+1, out); err != nil {
			return err
		}
	}
	return nil
}

// CopyFile writes the content of a regular file (or a slow symlink's
// target) to w. Holes and uninitialized extents read as zeros.
func (f *FS) CopyFile(in *Inode, w io.Writer) error {
	exts, err := f.extents(in)
	if err != nil {
		return err
	}
	var pos int64
	zeros := make([]byte, 64<<10)
	writeZeros := func(n int64) error {
		for n > 0 {
			c := min(n, int64(len(zeros)))
			if _, err := w.Write(zeros[:c]); err != nil {
				return err
			}
			n -= c
		}
		return nil
	}
	buf := make([]byte, 256<<10)
	for _, e := range exts {
		start := e.logical * f.blockSize
		if start >= in.Size {
			break
		}
		if start > pos {
			if err := writeZeros(start - pos); err != nil {
				return err
			}
			pos = start
		}
		n := min(e.length*f.blockSize, in.Size-start)
		if e.uninit {
			if err := writeZeros(n); err != nil {
				return err
			}
			pos += n
			continue
		}
		src := io.NewSectionReader(f.r, e.physical*f.blockSize, n)
		if _, err := io.CopyBuffer(w, src, buf); err != nil {
			return fmt.Errorf("ext4: inode %d: %w", in.Ino, err)
		}
		pos += n
	}
	return writeZeros(in.Size - pos)
}

// Readlink returns a symlink's target.
func (f *FS) Readlink(in *Inode) (string, error) {
	if in.Mode&fs.ModeSymlink == 0 {
		return "", fmt.Errorf("ext4: inode %d is not a symlink", in.Ino)
	}
	if in.Size < 60 && in.flags&flagExtents == 0 {
		return string(in.block[:in.Size]), nil
	}
	var b strings.Builder
	if err := f.CopyFile(in, &b); err != nil {
		return "", err
	}
	return b.String(), nil
}

// DirEntry is one name in a directory.
type DirEntry struct {
	Name string
	Ino  uint32
}

// ReadDir lists a directory, without "." and "..", in on-disk order.
func (f *FS) ReadDir(in *Inode) ([]DirEntry, error) {
	if !in.Mode.IsDir() {
		return nil, fmt.Errorf("ext4: inode %d is not a directory", in.Ino)
	}
	var data strings.Builder
	if err := f.CopyFile(in, &data); err != nil {
		return nil, err
	}
	b := []byte(data.String())
	le := binary.LittleEndian
	var out []DirEntry
	for off := 0; off+8 <= len(b); {
		ino := le.Uint32(b[off:])
		recLen := int(le.Uint16(b[off+4:]))
		nameLen := int(b[off+6])
		if recLen < 8 || off+recLen > len(b) || 8+nameLen > recLen {
			return nil, fmt.Errorf("ext4: directory inode %d is corrupt at offset %d", in.Ino, off)
		}
		if ino != 0 {
			name := string(b[off+8 : off+8+nameLen])
			if name != "." && name != ".." {
				out = append(out, DirEntry{Name: name, Ino: ino})
			}
		}
		off += recLen
	}
	return out, nil
}

// Lookup resolves a slash-separated path from the root, without following
// symlinks.
func (f *FS) Lookup(path string) (*Inode, error) {
	in, err := f.Inode(RootIno)
	if err != nil {
		return nil, err
	}
	for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
		if part == "" {
			continue
		}
		ents, err := f.ReadDir(in)
		if err != nil {
			return nil, err
		}
		found := false
		for _, e := range ents {
			if e.Name == part {
				if in, err = f.Inode(e.Ino); err != nil {
					return nil, err
				}
				found = true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("ext4: %s: %w", path, fs.ErrNotExist)
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
	le := binary.LittleEndian
	if len(in.extraRaw) >= 4 {
		extra := int(le.Uint16(in.extraRaw[0:]))
		if body := in.extraRaw; extra+4 <= len(body) && le.Uint32(body[extra:]) == xattrMagic {
			entries := body[extra+4:]
			if v, ok := findXattr(entries, entries, name); ok {
				return v, true, nil
			}
		}
	}
	if in.fileACL != 0 {
		blk := make([]byte, f.blockSize)
		if _, err := f.r.ReadAt(blk, in.fileACL*f.blockSize); err != nil {
			return nil, false, fmt.Errorf("ext4: inode %d xattr block: %w", in.Ino, err)
		}
		if le.Uint32(blk[0:]) == xattrMagic {
			if v, ok := findXattr(blk[32:], blk, name); ok {
				return v, true, nil
			}
		}
	}
	return nil, false, nil
}

// findXattr scans xattr entries; value offsets are relative to base.
func findXattr(entries, base []byte, name string) ([]byte, bool) {
	le := binary.LittleEndian
	for off := 0; off+16 <= len(entries); {
		if le.Uint32(entries[off:]) == 0 {
			break
		}
		nameLen := int(entries[off])
		idx := entries[off+1]
		valOff := int(le.Uint16(entries[off+2:]))
		valSize := int(le.Uint32(entries[off+8:]))
		if off+16+nameLen > len(entries) {
			break
		}
		full := xattrPrefix[idx] + string(entries[off+16:off+16+nameLen])
		if full == name && valOff+valSize <= len(base) {
			return append([]byte(nil), base[valOff:valOff+valSize]...), true
		}
		off += (16 + nameLen + 3) &^ 3
	}
	return nil, false
}
