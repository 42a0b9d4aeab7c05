// Package ext4craft edits ext4 images the way a hostile guest rewrites its
// own disk: it gives directory entries arbitrary name bytes (slashes, "..",
// nothing at all, a name already used), makes inodes claim sizes they do
// not have and turns extent trees into endless ones, and it keeps every
// checksum valid, so that only a reader's own checks can catch the result.
//
// It exists for tests: unit tests of the reader and of the write-back,
// fuzz seeds, and a program run as root inside a test VM against its raw
// scratch disk. It is written independently of package ext4, which it
// serves to test, and understands only what mke2fs and Linux write by
// default (extents, 64-bit descriptors, metadata_csum).
package ext4craft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
)

// Device is what an image is edited through: a file or a block device.
type Device interface {
	io.ReaderAt
	io.WriterAt
}

// Image is an opened ext4 filesystem.
type Image struct {
	d              Device
	bs             int64
	inodeSize      int64
	inodesPerGroup uint32
	descSize       int64
	gdtOff         int64
	csum           bool
	seed           uint32
	groups         uint32
}

var le = binary.LittleEndian

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(crc uint32, p []byte) uint32 { return ^crc32.Update(^crc, castagnoli, p) }

// Open reads the superblock of the filesystem on d.
func Open(d Device) (*Image, error) {
	sb := make([]byte, 1024)
	if _, err := d.ReadAt(sb, 1024); err != nil {
		return nil, err
	}
	if le.Uint16(sb[56:]) != 0xEF53 {
		return nil, errors.New("ext4craft: not an ext4 filesystem")
	}
	im := &Image{
		d:              d,
		bs:             1024 << le.Uint32(sb[24:]),
		inodeSize:      int64(le.Uint16(sb[88:])),
		inodesPerGroup: le.Uint32(sb[40:]),
		descSize:       32,
		csum:           le.Uint32(sb[100:])&0x400 != 0,
	}
	if le.Uint32(sb[96:])&0x80 != 0 {
		im.descSize = int64(le.Uint16(sb[0xFE:]))
	}
	im.gdtOff = (int64(le.Uint32(sb[20:])) + 1) * im.bs
	im.groups = (le.Uint32(sb[0:]) + im.inodesPerGroup - 1) / im.inodesPerGroup
	if le.Uint32(sb[96:])&0x2000 != 0 {
		im.seed = le.Uint32(sb[0x270:])
	} else {
		im.seed = crc32c(^uint32(0), sb[104:120])
	}
	return im, nil
}

// BlockSize is the filesystem's block size.
func (im *Image) BlockSize() int64 { return im.bs }

func (im *Image) inodeOff(ino uint32) (int64, error) {
	g := (ino - 1) / im.inodesPerGroup
	if ino == 0 || g >= im.groups {
		return 0, fmt.Errorf("ext4craft: inode %d out of range", ino)
	}
	d := make([]byte, im.descSize)
	if _, err := im.d.ReadAt(d, im.gdtOff+int64(g)*im.descSize); err != nil {
		return 0, err
	}
	tbl := int64(le.Uint32(d[8:]))
	if im.descSize >= 64 {
		tbl |= int64(le.Uint32(d[0x28:])) << 32
	}
	return tbl*im.bs + int64((ino-1)%im.inodesPerGroup)*im.inodeSize, nil
}

// Inode returns the raw on-disk inode ino.
func (im *Image) Inode(ino uint32) ([]byte, error) {
	off, err := im.inodeOff(ino)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, im.inodeSize)
	_, err = im.d.ReadAt(raw, off)
	return raw, err
}

// WriteInode writes raw as inode ino, with its checksum recomputed.
func (im *Image) WriteInode(ino uint32, raw []byte) error {
	off, err := im.inodeOff(ino)
	if err != nil {
		return err
	}
	if im.csum {
		var b [4]byte
		le.PutUint32(b[:], ino)
		seed := crc32c(crc32c(im.seed, b[:]), raw[0x64:0x68])
		le.PutUint16(raw[0x7C:], 0)
		extra := int64(0)
		if im.inodeSize > 128 {
			extra = int64(le.Uint16(raw[0x80:]))
			if extra >= 4 {
				le.PutUint16(raw[0x82:], 0)
			}
		}
		c := crc32c(seed, raw)
		le.PutUint16(raw[0x7C:], uint16(c))
		if extra >= 4 {
			le.PutUint16(raw[0x82:], uint16(c>>16))
		}
	}
	_, err = im.d.WriteAt(raw, off)
	return err
}

func (im *Image) inodeSeed(ino uint32, raw []byte) uint32 {
	var b [4]byte
	le.PutUint32(b[:], ino)
	return crc32c(crc32c(im.seed, b[:]), raw[0x64:0x68])
}

// Blocks returns the physical blocks of inode ino, in logical order
// (holes left out), from an extent tree of any depth.
func (im *Image) Blocks(ino uint32) ([]int64, error) {
	raw, err := im.Inode(ino)
	if err != nil {
		return nil, err
	}
	var out []int64
	err = im.walk(raw[0x28:0x64], 0, &out)
	return out, err
}

func (im *Image) walk(node []byte, level int, out *[]int64) error {
	if le.Uint16(node) != 0xF30A || level > 5 {
		return errors.New("ext4craft: bad extent node")
	}
	n, depth := int(le.Uint16(node[2:])), le.Uint16(node[6:])
	for i := 0; i < n; i++ {
		e := node[12+12*i:]
		if depth == 0 {
			length := int64(le.Uint16(e[4:]))
			if length > 32768 {
				length -= 32768
			}
			start := int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:]))
			for b := start; b < start+length; b++ {
				*out = append(*out, b)
			}
			continue
		}
		child := int64(le.Uint32(e[4:])) | int64(le.Uint16(e[8:]))<<32
		b := make([]byte, im.bs)
		if _, err := im.d.ReadAt(b, child*im.bs); err != nil {
			return err
		}
		if err := im.walk(b, level+1, out); err != nil {
			return err
		}
	}
	return nil
}

// Entry is a directory entry's place on disk.
type Entry struct {
	Block  int64 // physical block
	Offset int   // within the block
	Ino    uint32
	Name   []byte
}

// Entries lists the entries of directory inode dir, "." and ".."
// included, deleted ones (inode 0) left out.
func (im *Image) Entries(dir uint32) ([]Entry, error) {
	blocks, err := im.Blocks(dir)
	if err != nil {
		return nil, err
	}
	var out []Entry
	b := make([]byte, im.bs)
	for _, blk := range blocks {
		if _, err := im.d.ReadAt(b, blk*im.bs); err != nil {
			return nil, err
		}
		for off := 0; off+8 <= len(b); {
			rec := int(le.Uint16(b[off+4:]))
			if rec < 8 || off+rec > len(b) {
				break
			}
			if ino := le.Uint32(b[off:]); ino != 0 {
				nl := int(b[off+6])
				out = append(out, Entry{Block: blk, Offset: off, Ino: ino, Name: append([]byte(nil), b[off+8:off+8+nl]...)})
			}
			off += rec
		}
	}
	return out, nil
}

// Lookup resolves a slash-separated path from the root directory.
func (im *Image) Lookup(path string) (uint32, error) {
	ino := uint32(2)
	for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
		if part == "" {
			continue
		}
		ents, err := im.Entries(ino)
		if err != nil {
			return 0, err
		}
		found := uint32(0)
		for _, e := range ents {
			if string(e.Name) == part {
				found = e.Ino
				break
			}
		}
		if found == 0 {
			return 0, fmt.Errorf("ext4craft: %s: no entry %q", path, part)
		}
		ino = found
	}
	return ino, nil
}

// Rename gives the entry old of directory dir the name bytes new, which
// may be anything (a slash, "..", nothing) as long as they fit in the
// entry's record. The block's checksum is recomputed.
func (im *Image) Rename(dir uint32, old string, new []byte) error {
	ents, err := im.Entries(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if string(e.Name) != old {
			continue
		}
		b := make([]byte, im.bs)
		if _, err := im.d.ReadAt(b, e.Block*im.bs); err != nil {
			return err
		}
		rec := int(le.Uint16(b[e.Offset+4:]))
		if 8+len(new) > rec || len(new) > 255 {
			return fmt.Errorf("ext4craft: %d-byte name does not fit a %d-byte record", len(new), rec)
		}
		b[e.Offset+6] = byte(len(new))
		clear(b[e.Offset+8 : e.Offset+rec])
		copy(b[e.Offset+8:], new)
		if err := im.fixDirCsum(dir, b); err != nil {
			return err
		}
		_, err = im.d.WriteAt(b, e.Block*im.bs)
		return err
	}
	return fmt.Errorf("ext4craft: no entry %q in directory inode %d", old, dir)
}

// SetEntryIno makes the entry name of directory dir point at inode ino:
// a second name for a directory, a loop, a link the link count does not
// know about.
func (im *Image) SetEntryIno(dir uint32, name string, ino uint32) error {
	ents, err := im.Entries(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if string(e.Name) != name {
			continue
		}
		b := make([]byte, im.bs)
		if _, err := im.d.ReadAt(b, e.Block*im.bs); err != nil {
			return err
		}
		le.PutUint32(b[e.Offset:], ino)
		if err := im.fixDirCsum(dir, b); err != nil {
			return err
		}
		_, err = im.d.WriteAt(b, e.Block*im.bs)
		return err
	}
	return fmt.Errorf("ext4craft: no entry %q in directory inode %d", name, dir)
}

func (im *Image) fixDirCsum(dir uint32, b []byte) error {
	if !im.csum {
		return nil
	}
	t := b[len(b)-12:]
	if le.Uint32(t) != 0 || le.Uint16(t[4:]) != 12 || t[7] != 0xDE {
		return errors.New("ext4craft: directory block without a checksum tail (an htree block?)")
	}
	raw, err := im.Inode(dir)
	if err != nil {
		return err
	}
	le.PutUint32(t[8:], crc32c(im.inodeSeed(dir, raw), b[:len(b)-12]))
	return nil
}

// SetSize makes inode ino claim size bytes.
func (im *Image) SetSize(ino uint32, size int64) error {
	raw, err := im.Inode(ino)
	if err != nil {
		return err
	}
	le.PutUint32(raw[4:], uint32(size))
	le.PutUint32(raw[0x6C:], uint32(size>>32))
	return im.WriteInode(ino, raw)
}

// SetMode sets the on-disk mode (type and permission bits) of inode ino.
func (im *Image) SetMode(ino uint32, mode uint16) error {
	raw, err := im.Inode(ino)
	if err != nil {
		return err
	}
	le.PutUint16(raw[0:], mode)
	return im.WriteInode(ino, raw)
}

// EndlessExtents turns the extent tree of inode ino (a file with at least
// one data block) into one with no end: the inode's root points, four
// times, at the file's first block, which becomes an index node whose
// every entry points at itself. A reader that trusts the tree walks it
// forever (4 × 340^depth nodes); the claimed depths do not even decrease.
func (im *Image) EndlessExtents(ino uint32) error {
	blocks, err := im.Blocks(ino)
	if err != nil {
		return err
	}
	if len(blocks) == 0 {
		return fmt.Errorf("ext4craft: inode %d has no block to loop through", ino)
	}
	loop := blocks[0]
	raw, err := im.Inode(ino)
	if err != nil {
		return err
	}
	node := make([]byte, im.bs)
	maxEntries := (int(im.bs) - 12 - 4) / 12
	header(node, maxEntries, maxEntries, 5)
	for i := 0; i < maxEntries; i++ {
		index(node[12+12*i:], uint32(i), loop)
	}
	if im.csum {
		le.PutUint32(node[12+12*maxEntries:], crc32c(im.inodeSeed(ino, raw), node[:12+12*maxEntries]))
	}
	if _, err := im.d.WriteAt(node, loop*im.bs); err != nil {
		return err
	}
	root := raw[0x28:0x64]
	clear(root)
	header(root, 4, 4, 5)
	for i := 0; i < 4; i++ {
		index(root[12+12*i:], uint32(i), loop)
	}
	return im.WriteInode(ino, raw)
}

// SharedExtents makes inode ino (a file with at least one data block) a
// file whose every extent maps the same physical blocks: as many extents
// as a block holds, each covering most of the filesystem. Each is valid on
// its own; together the file claims far more data than the image has.
func (im *Image) SharedExtents(ino uint32) error {
	blocks, err := im.Blocks(ino)
	if err != nil {
		return err
	}
	if len(blocks) == 0 {
		return fmt.Errorf("ext4craft: inode %d has no block", ino)
	}
	sb := make([]byte, 1024)
	if _, err := im.d.ReadAt(sb, 1024); err != nil {
		return err
	}
	total := int64(le.Uint32(sb[4:]))
	length := min(total-2, 32768)
	leaf := blocks[0]
	raw, err := im.Inode(ino)
	if err != nil {
		return err
	}
	node := make([]byte, im.bs)
	maxEntries := (int(im.bs) - 12 - 4) / 12
	header(node, maxEntries, maxEntries, 0)
	for i := 0; i < maxEntries; i++ {
		e := node[12+12*i:]
		le.PutUint32(e[0:], uint32(int64(i)*length))
		le.PutUint16(e[4:], uint16(length))
		le.PutUint16(e[6:], 0)
		le.PutUint32(e[8:], 1)
	}
	if im.csum {
		le.PutUint32(node[12+12*maxEntries:], crc32c(im.inodeSeed(ino, raw), node[:12+12*maxEntries]))
	}
	if _, err := im.d.WriteAt(node, leaf*im.bs); err != nil {
		return err
	}
	root := raw[0x28:0x64]
	clear(root)
	header(root, 1, 4, 1)
	index(root[12:], 0, leaf)
	size := int64(maxEntries) * length * im.bs
	le.PutUint32(raw[4:], uint32(size))
	le.PutUint32(raw[0x6C:], uint32(size>>32))
	return im.WriteInode(ino, raw)
}

func header(b []byte, entries, max int, depth uint16) {
	le.PutUint16(b[0:], 0xF30A)
	le.PutUint16(b[2:], uint16(entries))
	le.PutUint16(b[4:], uint16(max))
	le.PutUint16(b[6:], depth)
	le.PutUint32(b[8:], 0)
}

func index(b []byte, logical uint32, child int64) {
	le.PutUint32(b[0:], logical)
	le.PutUint32(b[4:], uint32(child))
	le.PutUint16(b[8:], uint16(child>>32))
	le.PutUint16(b[10:], 0)
}
