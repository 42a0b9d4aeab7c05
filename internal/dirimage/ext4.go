package dirimage

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The read-only image is written here rather than by `mkfs.ext4 -d`:
// mke2fs 1.47.0 adds each name by scanning the whole directory, twice for
// the lookups around it, through an eight-block cache, which is quadratic
// in the size of one directory (one directory of 40 000 files took 78-100
// s, of 100 000 files 14 minutes). The tree is known before the first byte
// is written, so every block and inode can be laid out in one pass
// instead (100 000 files: about 1.5 s).
//
// The format is deliberately plain, what ext4 has read since Linux 2.6.28
// and e2fsck checks: 4 KiB blocks, 32768 blocks per group, 256-byte inodes
// (nanosecond timestamps), extents, file types in directory entries, hash
// tree directories, sparse superblock backups, 48-bit block counts
// (huge_file), extended attributes, no journal (the guest mounts it
// read-only), no checksums, no flex_bg, no lost+found. Blocks
// are given out in order, so the used blocks of each group, and the used
// inodes, are a prefix: the bitmaps and counters follow from where
// allocation ended.

const (
	blockSize      = 4096
	blocksPerGroup = 8 * blockSize // what one bitmap block covers
	inodeSize      = 256
	extraIsize     = 32 // i_extra_isize: up to i_projid
	descSize       = 32
	maxGroups      = 1 << 17 // 2^32 blocks: no 64bit feature
	maxExtentLen   = 32768
	extentsPerNode = (blockSize - 12) / 12
	maxLinks       = 65000
)

// Superblock feature flags.
const (
	compatDirIndex    = 0x20
	incompatFiletype  = 0x2
	incompatExtents   = 0x40
	roCompatSparse    = 0x1
	roCompatLargeFile = 0x2
	roCompatHugeFile  = 0x8
	roCompatDirNlink  = 0x20
	roCompatExtraIsz  = 0x40
	flagUnsignedHash  = 0x2
)

// Inode flags.
const (
	inodeIndexFl   = 0x1000
	inodeExtentsFl = 0x80000
)

var errImageFull = errors.New("image layout too small for the tree")

// geometry is the layout of the block groups.
type geometry struct {
	groups         uint32
	inodesPerGroup uint32
	itableBlocks   uint32
	gdtBlocks      uint32
}

// hasSuper reports whether group g holds a superblock backup (sparse_super:
// groups 0, 1 and powers of 3, 5 and 7).
func hasSuper(g uint32) bool {
	if g <= 1 {
		return true
	}
	for _, b := range []uint32{3, 5, 7} {
		n := b
		for n < g {
			n *= b
		}
		if n == g {
			return true
		}
	}
	return false
}

func (geo geometry) start(g uint32) uint64 { return uint64(g) * blocksPerGroup }

// blockBitmap is the first block after the group's superblock backup.
func (geo geometry) blockBitmap(g uint32) uint64 {
	b := geo.start(g)
	if hasSuper(g) {
		b += 1 + uint64(geo.gdtBlocks)
	}
	return b
}

func (geo geometry) inodeTable(g uint32) uint64 { return geo.blockBitmap(g) + 2 }
func (geo geometry) dataStart(g uint32) uint64 {
	return geo.inodeTable(g) + uint64(geo.itableBlocks)
}

// planGeometry finds the fewest groups that hold the given number of
// inodes and data blocks.
func planGeometry(inodes, blocks uint64) (geometry, error) {
	groups := max(1, (blocks+blocksPerGroup-1)/blocksPerGroup, (inodes+blocksPerGroup-1)/blocksPerGroup)
	for ; groups <= maxGroups; groups++ {
		ipg := (inodes + groups - 1) / groups
		ipg = max(16, (ipg+15)&^15) // whole inode table blocks
		if ipg > blocksPerGroup {
			continue
		}
		geo := geometry{
			groups:         uint32(groups),
			inodesPerGroup: uint32(ipg),
			itableBlocks:   uint32(ipg * inodeSize / blockSize),
			gdtBlocks:      uint32((groups*descSize + blockSize - 1) / blockSize),
		}
		var capacity uint64
		for g := uint32(0); g < geo.groups; g++ {
			capacity += geo.start(g) + blocksPerGroup - geo.dataStart(g)
		}
		if capacity >= blocks {
			return geo, nil
		}
	}
	return geometry{}, fmt.Errorf("tree too large for one image (%d blocks, %d inodes)", blocks, inodes)
}

// estimateBlocks bounds the data blocks the tree needs: file contents,
// extent tree blocks, directory blocks, long symlink targets and
// attribute blocks. A sparse file counts what the host allocated for it,
// so that a 1 TiB file with a few bytes of data does not make a 1 TiB
// image with 8192 groups of metadata; on a filesystem that compresses,
// allocation can be less than the data, and Build then retries with room
// for all of it.
func estimateBlocks(t *tree) uint64 {
	var total uint64 = 16
	for _, n := range t.nodes {
		if len(n.xattrs) > 0 {
			total++
		}
		switch {
		case n.isReg():
			b := uint64(min(n.size, n.alloc+blockSize)+blockSize-1) / blockSize
			total += b + treeBlocksBound(b)
		case n.isDir():
			bytes := 24
			for _, k := range n.kids {
				bytes += recLen(len(k.name))
			}
			// Each block wastes less than one largest entry; a hash tree
			// may end a leaf early, and adds index blocks.
			lin := uint64(bytes/(blockSize-recLen(maxName))) + 1
			total += 2*lin + lin/dxNodeLimit + 3 + treeBlocksBound(2*lin)
		case n.isLnk() && len(n.target) >= 60:
			total++
		}
	}
	return total
}

// treeBlocksBound bounds the extent tree blocks of a file of n blocks:
// at worst one extent per block.
func treeBlocksBound(n uint64) uint64 {
	if n <= 4 {
		return 0
	}
	return n/(extentsPerNode-1) + 3
}

// extent maps len blocks from logical block lblk to physical block pblk.
type extent struct {
	lblk uint32
	len  uint32
	pblk uint64
}

// imageWriter writes one image.
type imageWriter struct {
	ctx  context.Context
	f    *os.File
	geo  geometry
	seed [4]uint32
	now  unix.Timespec

	next      uint64 // next free block
	group     uint32 // the group next is in
	lastIno   uint32
	dirs      []uint32 // directories per group
	data      seqWriter
	itable    seqWriter
	buf, zero []byte

	// With Options.Digest: the tree's hash, and that of the file being
	// copied.
	digest, content hash.Hash
	rec             []byte
}

// writeImage writes the tree t, whose files are still on the host or
// staged, to the new file img, and returns the tree's digest if o asks
// for it.
func writeImage(ctx context.Context, t *tree, img string, o Options, extraBlocks uint64) (string, error) {
	inodes := uint64(firstIno - 1 + len(t.nodes) - 1)
	geo, err := planGeometry(inodes, estimateBlocks(t)+extraBlocks)
	if err != nil {
		return "", err
	}
	if err := os.Remove(img); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return "", err
	}
	defer f.Close()
	// Sparse: only what is written takes space.
	if err := f.Truncate(int64(geo.groups) * blocksPerGroup * blockSize); err != nil {
		return "", err
	}
	w := &imageWriter{
		ctx:     ctx,
		f:       f,
		geo:     geo,
		now:     stampTime(),
		next:    geo.dataStart(0),
		lastIno: firstIno - 1, // the reserved inodes are in use
		dirs:    make([]uint32, geo.groups),
		data:    seqWriter{f: f, max: 4 << 20},
		itable:  seqWriter{f: f, max: 1 << 20},
		buf:     make([]byte, 1<<20),
		zero:    make([]byte, blockSize),
	}
	if o.Digest {
		w.digest, w.content = sha256.New(), sha256.New()
	}
	var seed [16]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return "", err
	}
	for i := range w.seed {
		w.seed[i] = binary.LittleEndian.Uint32(seed[4*i:])
	}
	for i, n := range t.nodes {
		if i%64 == 0 {
			if err := ctx.Err(); err != nil {
				return "", err
			}
		}
		if err := w.writeNode(n); err != nil {
			return "", err
		}
	}
	if err := w.data.flush(); err != nil {
		return "", err
	}
	if err := w.itable.flush(); err != nil {
		return "", err
	}
	if err := w.writeMetadata(o.Label); err != nil {
		return "", err
	}
	if w.digest == nil {
		return "", nil
	}
	return "sha256:" + hex.EncodeToString(w.digest.Sum(nil)), nil
}

// hashNode adds one inode to the tree's digest: a record of its metadata
// (fixed-width little-endian fields; strings with their length first),
// then, for a directory, its entries in order, for a symlink its target,
// for a regular file the hash of its content (the non-zero blocks, each
// with its logical block number: holes and blocks of zeros are alike, as
// they are in the image).
func (w *imageWriter) hashNode(n *node, size int64) {
	le := binary.LittleEndian
	r := w.rec[:0]
	r = le.AppendUint32(r, n.ino)
	r = le.AppendUint32(r, n.mode)
	r = le.AppendUint32(r, n.uid)
	r = le.AppendUint32(r, n.gid)
	r = le.AppendUint64(r, uint64(n.mtime.Sec))
	r = le.AppendUint32(r, uint32(n.mtime.Nsec))
	var major, minor uint32
	if typ := n.mode & unix.S_IFMT; typ == unix.S_IFCHR || typ == unix.S_IFBLK {
		major, minor = unix.Major(n.rdev), unix.Minor(n.rdev)
	}
	r = le.AppendUint32(r, major)
	r = le.AppendUint32(r, minor)
	if n.isDir() {
		size = 0 // its entries say it all
	}
	r = le.AppendUint64(r, uint64(size))
	r = le.AppendUint32(r, uint32(len(n.xattrs)))
	for _, x := range n.xattrs {
		r = append(r, x.index)
		r = le.AppendUint32(r, uint32(len(x.name)))
		r = append(r, x.name...)
		r = le.AppendUint32(r, uint32(len(x.value)))
		r = append(r, x.value...)
	}
	switch {
	case n.isDir():
		r = le.AppendUint32(r, uint32(len(n.kids)))
		for _, k := range n.kids {
			r = le.AppendUint32(r, k.n.ino)
			r = le.AppendUint32(r, uint32(len(k.name)))
			r = append(r, k.name...)
		}
	case n.isLnk():
		r = le.AppendUint32(r, uint32(len(n.target)))
		r = append(r, n.target...)
	case n.isReg():
		r = w.content.Sum(r)
	}
	w.digest.Write(r)
	if cap(r) <= 1<<16 {
		w.rec = r[:0]
	}
}

// alloc hands out up to n contiguous blocks at the allocation cursor.
func (w *imageWriter) alloc(n uint64) (start, count uint64, err error) {
	end := w.geo.start(w.group) + blocksPerGroup
	if w.next == end {
		w.group++
		if w.group == w.geo.groups {
			return 0, 0, errImageFull
		}
		w.next = w.geo.dataStart(w.group)
		end = w.geo.start(w.group) + blocksPerGroup
	}
	start, count = w.next, min(n, end-w.next)
	w.next += count
	return start, count, nil
}

// writeBlocks writes data (whole blocks) at logical block lblk of a file,
// allocating as it goes, and extends exts.
func (w *imageWriter) writeBlocks(data []byte, lblk uint64, exts []extent) ([]extent, error) {
	for len(data) > 0 {
		start, count, err := w.alloc(uint64(len(data) / blockSize))
		if err != nil {
			return exts, err
		}
		if err := w.data.writeAt(data[:count*blockSize], int64(start)*blockSize); err != nil {
			return exts, err
		}
		for c := count; c > 0; {
			if k := len(exts) - 1; k >= 0 && exts[k].len < maxExtentLen &&
				uint64(exts[k].lblk)+uint64(exts[k].len) == lblk && exts[k].pblk+uint64(exts[k].len) == start {
				take := min(c, maxExtentLen-uint64(exts[k].len))
				exts[k].len += uint32(take)
				lblk, start, c = lblk+take, start+take, c-take
				continue
			}
			take := min(c, maxExtentLen)
			exts = append(exts, extent{lblk: uint32(lblk), len: uint32(take), pblk: start})
			lblk, start, c = lblk+take, start+take, c-take
		}
		data = data[count*blockSize:]
	}
	return exts, nil
}

// writeNode writes one inode's data, then the inode.
func (w *imageWriter) writeNode(n *node) error {
	var (
		iblock [60]byte
		flags  uint32
		blocks uint64 // in the image, extent tree included
		size   = n.size
		exts   []extent
		err    error
	)
	le := binary.LittleEndian
	switch n.mode & unix.S_IFMT {
	case unix.S_IFREG:
		if w.content != nil {
			w.content.Reset()
		}
		if n.staged {
			exts, err = w.copyStaged(n)
		} else {
			exts, size, err = w.copyFile(n)
		}
		if err != nil {
			return err
		}
	case unix.S_IFDIR:
		ents := make([]dentry, len(n.kids))
		for i, k := range n.kids {
			ents[i] = dentry{name: k.name, ino: k.n.ino, ftype: fileType(k.n.mode)}
		}
		parent := n.parent
		if n.ino == 2 {
			parent = 2
		}
		blks, indexed := dirBlocks(n.ino, parent, ents, w.seed)
		if indexed {
			flags |= inodeIndexFl
		}
		for i, b := range blks {
			if exts, err = w.writeBlocks(b, uint64(i), exts); err != nil {
				return err
			}
		}
		size = int64(len(blks)) * blockSize
		g := (n.ino - 1) / w.geo.inodesPerGroup
		w.dirs[g]++
	case unix.S_IFLNK:
		if len(n.target) < len(iblock) {
			copy(iblock[:], n.target) // a fast symlink: the target in the inode
			break
		}
		b := make([]byte, blockSize)
		copy(b, n.target)
		if exts, err = w.writeBlocks(b, 0, nil); err != nil {
			return err
		}
	case unix.S_IFCHR, unix.S_IFBLK:
		major, minor := unix.Major(n.rdev), unix.Minor(n.rdev)
		if major < 256 && minor < 256 {
			le.PutUint32(iblock[0:], major<<8|minor)
		} else {
			le.PutUint32(iblock[4:], minor&0xff|major<<8|(minor&^0xff)<<12)
		}
	}
	if n.isReg() || n.isDir() || (n.isLnk() && len(n.target) >= len(iblock)) {
		flags |= inodeExtentsFl
		var tree uint64
		if iblock, tree, err = w.extentTree(exts); err != nil {
			return err
		}
		blocks = tree
		for _, e := range exts {
			blocks += uint64(e.len)
		}
	}
	rec := make([]byte, inodeSize)
	if len(n.xattrs) > 0 && !inodeXattrs(rec, n.xattrs) {
		b, err := xattrBlock(n.xattrs)
		if err != nil {
			return fmt.Errorf("%s: %w", n.path, err)
		}
		at, _, err := w.alloc(1)
		if err != nil {
			return err
		}
		if err := w.data.writeAt(b, int64(at)*blockSize); err != nil {
			return err
		}
		le.PutUint32(rec[104:], uint32(at))
		le.PutUint16(rec[118:], uint16(at>>32))
		blocks++
	}
	links := n.links
	if n.isDir() && links > maxLinks {
		links = 1 // dir_nlink: too many subdirectories to count
	} else if links > maxLinks {
		return fmt.Errorf("%s: more than %d hard links", n.path, maxLinks)
	}

	le.PutUint16(rec[0:], uint16(n.mode))
	le.PutUint16(rec[2:], uint16(n.uid))
	le.PutUint32(rec[4:], uint32(size))
	le.PutUint32(rec[108:], uint32(uint64(size)>>32))
	putTime(rec, 8, 140, n.atime)
	putTime(rec, 12, 132, n.ctime)
	putTime(rec, 16, 136, n.mtime)
	putTime(rec, 144, 148, w.now) // i_crtime: made now
	le.PutUint16(rec[24:], uint16(n.gid))
	le.PutUint16(rec[26:], uint16(links))
	// i_blocks in 512-byte units, 48 bits with huge_file.
	le.PutUint32(rec[28:], uint32(blocks*(blockSize/512)))
	le.PutUint16(rec[116:], uint16(blocks*(blockSize/512)>>32))
	le.PutUint32(rec[32:], flags)
	copy(rec[40:100], iblock[:])
	le.PutUint16(rec[120:], uint16(n.uid>>16))
	le.PutUint16(rec[122:], uint16(n.gid>>16))
	le.PutUint16(rec[128:], extraIsize)
	if w.digest != nil {
		w.hashNode(n, size)
	}
	g, idx := (n.ino-1)/w.geo.inodesPerGroup, (n.ino-1)%w.geo.inodesPerGroup
	w.lastIno = max(w.lastIno, n.ino)
	return w.itable.writeAt(rec, int64(w.geo.inodeTable(g))*blockSize+int64(idx)*inodeSize)
}

// putTime stores a timestamp: the low 32 bits of the seconds at off, and
// at extraOff the two epoch bits that extend them to 34 and the
// nanoseconds.
func putTime(rec []byte, off, extraOff int, ts unix.Timespec) {
	sec := min(max(ts.Sec, -1<<31), 1<<34+1<<31-1)
	epoch := (sec - int64(int32(sec))) >> 32
	binary.LittleEndian.PutUint32(rec[off:], uint32(sec))
	binary.LittleEndian.PutUint32(rec[extraOff:], uint32(epoch&3)|uint32(ts.Nsec)<<2)
}

func fileType(mode uint32) uint8 {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return ftReg
	case unix.S_IFDIR:
		return ftDir
	case unix.S_IFCHR:
		return ftChr
	case unix.S_IFBLK:
		return ftBlk
	case unix.S_IFIFO:
		return ftFifo
	case unix.S_IFSOCK:
		return ftSock
	case unix.S_IFLNK:
		return ftSymlink
	}
	return 0
}

// copyFile copies a regular file's content into the image. Holes in the
// host file, and blocks of zeros, stay holes in the image (as with
// mke2fs). A file that grew since the scan is cut at the scanned size; one
// that shrank is recorded at its new size.
func (w *imageWriter) copyFile(n *node) ([]extent, int64, error) {
	f, err := os.OpenFile(n.path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	fd := int(f.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, 0, fmt.Errorf("stat %s: %w", n.path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, 0, fmt.Errorf("%s: changed to another type of file while the image was built", n.path)
	}
	size := min(n.size, st.Size)
	var exts []extent
	// pos is block-aligned: a block is read whole (holes read as zeros)
	// and never twice, whatever the host filesystem's block size.
	for pos := int64(0); pos < size; {
		start, end := pos, size
		if st.Blocks*512 < size { // it has holes: copy only the data
			off, err := unix.Seek(fd, pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				break // only a hole is left
			}
			if err != nil {
				return nil, 0, fmt.Errorf("seek %s: %w", n.path, err)
			}
			hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
			if err != nil {
				return nil, 0, fmt.Errorf("seek %s: %w", n.path, err)
			}
			start, end = max(pos, off&^(blockSize-1)), min(hole, size)
		}
		for off := start; off < end; {
			if err := w.ctx.Err(); err != nil {
				return nil, 0, err
			}
			want := min(int64(len(w.buf)), end-off)
			got, err := f.ReadAt(w.buf[:want], off)
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, 0, fmt.Errorf("read %s: %w", n.path, err)
			}
			if exts, err = w.writeNonZero(w.buf[:got], off, exts); err != nil {
				return nil, 0, err
			}
			off += int64(got)
			if int64(got) < want { // it shrank
				return exts, off, nil
			}
		}
		pos = (end + blockSize - 1) &^ (blockSize - 1)
	}
	return exts, size, nil
}

// copyStaged copies a Builder's file into the image from where its
// content is staged; it must all be there.
func (w *imageWriter) copyStaged(n *node) ([]extent, error) {
	var exts []extent
	for off := int64(0); off < n.size; {
		if err := w.ctx.Err(); err != nil {
			return nil, err
		}
		want := min(int64(len(w.buf)), n.size-off)
		got, err := n.src.ReadAt(w.buf[:want], n.srcOff+off)
		if int64(got) < want {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("read content of %s: %w", n.path, err)
		}
		if exts, err = w.writeNonZero(w.buf[:got], off, exts); err != nil {
			return nil, err
		}
		off += int64(got)
	}
	return exts, nil
}

// writeNonZero writes the blocks of p (file content read at offset off, a
// multiple of the block size) that are not all zeros; a short last block
// is padded with zeros.
func (w *imageWriter) writeNonZero(p []byte, off int64, exts []extent) ([]extent, error) {
	if tail := len(p) % blockSize; tail != 0 {
		p = p[:len(p)+blockSize-tail] // w.buf is block-aligned: pad in place
		clear(p[len(p)-blockSize+tail:])
	}
	lblk := uint64(off / blockSize)
	run := -1 // first block of the current run of non-zero blocks
	var err error
	var num [8]byte
	for i := 0; i <= len(p)/blockSize; i++ {
		zero := i == len(p)/blockSize || bytes.Equal(p[i*blockSize:(i+1)*blockSize], w.zero)
		if !zero && w.content != nil {
			binary.LittleEndian.PutUint64(num[:], lblk+uint64(i))
			w.content.Write(num[:])
			w.content.Write(p[i*blockSize : (i+1)*blockSize])
		}
		switch {
		case !zero && run < 0:
			run = i
		case zero && run >= 0:
			if exts, err = w.writeBlocks(p[run*blockSize:i*blockSize], lblk+uint64(run), exts); err != nil {
				return exts, err
			}
			run = -1
		}
	}
	return exts, nil
}

// extentTree returns the inode's i_block for exts (an extent tree root)
// and writes the tree's other blocks, if it needs any.
func (w *imageWriter) extentTree(exts []extent) (root [60]byte, blocks uint64, err error) {
	le := binary.LittleEndian
	header := func(b []byte, entries, limit, depth int) {
		le.PutUint16(b[0:], 0xF30A)
		le.PutUint16(b[2:], uint16(entries))
		le.PutUint16(b[4:], uint16(limit))
		le.PutUint16(b[6:], uint16(depth))
	}
	leafEntry := func(b []byte, e extent) {
		le.PutUint32(b[0:], e.lblk)
		le.PutUint16(b[4:], uint16(e.len))
		le.PutUint16(b[6:], uint16(e.pblk>>32))
		le.PutUint32(b[8:], uint32(e.pblk))
	}
	type child struct {
		lblk  uint32
		block uint64
	}
	indexEntry := func(b []byte, c child) {
		le.PutUint32(b[0:], c.lblk)
		le.PutUint32(b[4:], uint32(c.block))
		le.PutUint16(b[8:], uint16(c.block>>32))
	}
	if len(exts) <= 4 {
		header(root[:], len(exts), 4, 0)
		for i, e := range exts {
			leafEntry(root[12+12*i:], e)
		}
		return root, 0, nil
	}
	// writeNode puts one tree block and returns where it went.
	writeNode := func(b []byte) (uint64, error) {
		start, _, err := w.alloc(1)
		if err != nil {
			return 0, err
		}
		blocks++
		return start, w.data.writeAt(b, int64(start)*blockSize)
	}
	var level []child
	for i := 0; i < len(exts); i += extentsPerNode {
		part := exts[i:min(len(exts), i+extentsPerNode)]
		b := make([]byte, blockSize)
		header(b, len(part), extentsPerNode, 0)
		for j, e := range part {
			leafEntry(b[12+12*j:], e)
		}
		at, err := writeNode(b)
		if err != nil {
			return root, 0, err
		}
		level = append(level, child{part[0].lblk, at})
	}
	depth := 1
	for ; len(level) > 4; depth++ {
		var up []child
		for i := 0; i < len(level); i += extentsPerNode {
			part := level[i:min(len(level), i+extentsPerNode)]
			b := make([]byte, blockSize)
			header(b, len(part), extentsPerNode, depth)
			for j, c := range part {
				indexEntry(b[12+12*j:], c)
			}
			at, err := writeNode(b)
			if err != nil {
				return root, 0, err
			}
			up = append(up, child{part[0].lblk, at})
		}
		level = up
	}
	header(root[:], len(level), 4, depth)
	for i, c := range level {
		indexEntry(root[12+12*i:], c)
	}
	return root, blocks, nil
}

// writeMetadata writes the bitmaps, the group descriptors and the
// superblock with its backups, now that allocation is over.
func (w *imageWriter) writeMetadata(label string) error {
	geo := w.geo
	le := binary.LittleEndian
	gdt := make([]byte, int(geo.gdtBlocks)*blockSize)
	var freeBlocks, freeInodes uint64
	bitmap := make([]byte, blockSize)
	setPrefix := func(n uint32) {
		clear(bitmap)
		for i := uint32(0); i < n/8; i++ {
			bitmap[i] = 0xff
		}
		if n%8 != 0 {
			bitmap[n/8] = byte(1)<<(n%8) - 1
		}
	}
	for g := uint32(0); g < geo.groups; g++ {
		var used uint64
		switch {
		case g < w.group:
			used = blocksPerGroup
		case g == w.group:
			used = w.next - geo.start(g)
		default:
			used = geo.dataStart(g) - geo.start(g)
		}
		first := g * geo.inodesPerGroup // inodes before this group
		usedInodes := min(geo.inodesPerGroup, max(w.lastIno, first)-first)
		freeBlocks += blocksPerGroup - used
		freeInodes += uint64(geo.inodesPerGroup - usedInodes)

		setPrefix(uint32(used))
		if err := writeFull(w.f, bitmap, int64(geo.blockBitmap(g))*blockSize); err != nil {
			return err
		}
		setPrefix(usedInodes)
		for i := geo.inodesPerGroup; i < blocksPerGroup; i++ { // padding
			bitmap[i/8] |= 1 << (i % 8)
		}
		if err := writeFull(w.f, bitmap, int64(geo.blockBitmap(g)+1)*blockSize); err != nil {
			return err
		}
		d := gdt[g*descSize:]
		le.PutUint32(d[0:], uint32(geo.blockBitmap(g)))
		le.PutUint32(d[4:], uint32(geo.blockBitmap(g)+1))
		le.PutUint32(d[8:], uint32(geo.inodeTable(g)))
		le.PutUint16(d[12:], uint16(blocksPerGroup-used))
		le.PutUint16(d[14:], uint16(geo.inodesPerGroup-usedInodes))
		le.PutUint16(d[16:], uint16(w.dirs[g]))
	}

	sb := make([]byte, 1024)
	le.PutUint32(sb[0:], geo.groups*geo.inodesPerGroup)
	le.PutUint32(sb[4:], geo.groups*blocksPerGroup)
	le.PutUint32(sb[12:], uint32(freeBlocks))
	le.PutUint32(sb[16:], uint32(freeInodes))
	le.PutUint32(sb[20:], 0) // first data block
	le.PutUint32(sb[24:], 2) // log2(block size) - 10
	le.PutUint32(sb[28:], 2) // cluster size: the same
	le.PutUint32(sb[32:], blocksPerGroup)
	le.PutUint32(sb[36:], blocksPerGroup) // clusters per group
	le.PutUint32(sb[40:], geo.inodesPerGroup)
	le.PutUint32(sb[48:], uint32(w.now.Sec)) // write time
	le.PutUint16(sb[54:], 0xffff)            // max mount count: none
	le.PutUint16(sb[56:], 0xEF53)
	le.PutUint16(sb[58:], 1)                 // clean
	le.PutUint16(sb[60:], 1)                 // on errors: continue
	le.PutUint32(sb[64:], uint32(w.now.Sec)) // last check
	le.PutUint32(sb[76:], 1)                 // dynamic revision
	le.PutUint32(sb[84:], firstIno)
	le.PutUint16(sb[88:], inodeSize)
	le.PutUint32(sb[92:], compatDirIndex|compatXattr)
	le.PutUint32(sb[96:], incompatFiletype|incompatExtents)
	le.PutUint32(sb[100:], roCompatSparse|roCompatLargeFile|roCompatHugeFile|roCompatDirNlink|roCompatExtraIsz)
	if _, err := rand.Read(sb[104:120]); err != nil { // UUID
		return err
	}
	sb[104+6] = sb[104+6]&0x0f | 0x40 // version 4
	sb[104+8] = sb[104+8]&0x3f | 0x80 // variant
	copy(sb[120:136], label)
	for i, s := range w.seed {
		le.PutUint32(sb[236+4*i:], s)
	}
	sb[252] = hashHalfMD4
	le.PutUint32(sb[264:], uint32(w.now.Sec)) // mkfs time
	le.PutUint16(sb[348:], extraIsize)        // min extra isize
	le.PutUint16(sb[350:], extraIsize)        // wanted extra isize
	le.PutUint32(sb[352:], flagUnsignedHash)

	for g := uint32(0); g < geo.groups; g++ {
		if !hasSuper(g) {
			continue
		}
		le.PutUint16(sb[90:], uint16(g)) // block group of this copy
		off := int64(geo.start(g)) * blockSize
		if g == 0 {
			off = 1024
		}
		if err := writeFull(w.f, sb, off); err != nil {
			return err
		}
		if err := writeFull(w.f, gdt, int64(geo.start(g)+1)*blockSize); err != nil {
			return err
		}
	}
	return nil
}

func writeFull(f *os.File, p []byte, off int64) error {
	_, err := f.WriteAt(p, off)
	return err
}

// seqWriter batches writes that follow each other in the file into large
// ones: blocks are allocated in order, so file contents, and inodes, come
// almost always one after the other.
type seqWriter struct {
	f   *os.File
	off int64
	buf []byte
	max int
}

func (s *seqWriter) writeAt(p []byte, off int64) error {
	if len(s.buf) > 0 && (off != s.off+int64(len(s.buf)) || len(s.buf)+len(p) > s.max) {
		if err := s.flush(); err != nil {
			return err
		}
	}
	if len(p) >= s.max {
		return writeFull(s.f, p, off)
	}
	if len(s.buf) == 0 {
		s.off = off
		if s.buf == nil {
			s.buf = make([]byte, 0, s.max)
		}
	}
	s.buf = append(s.buf, p...)
	return nil
}

func (s *seqWriter) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	err := writeFull(s.f, s.buf, s.off)
	s.buf = s.buf[:0]
	return err
}

// stampTime is the time the image's superblock and creation times record:
// the kernel's coarse realtime clock, the one it stamps files with and the
// one time(2) (and so e2fsck and mkfs) reads. The precise clock can be a
// tick ahead of it, and a superblock written at 12:00:00.001 and checked
// a millisecond later by a tool whose clock still says 11:59:59 is "last
// written in the future".
func stampTime() unix.Timespec {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_REALTIME_COARSE, &ts); err != nil {
		return unix.NsecToTimespec(time.Now().UnixNano())
	}
	return ts
}
