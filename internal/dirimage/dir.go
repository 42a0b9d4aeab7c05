package dirimage

import (
	"encoding/binary"
	"math/bits"
	"slices"
)

// Directory blocks, in the format ext4 reads without metadata checksums:
// a linear list of entries for small directories, and a hash tree
// ("htree", dir_index) for those that need more than one block, so that
// the guest finds a name in a directory of 100 000 files without reading
// all of it. A hash tree stays readable as a linear directory (the index
// hides in entries no reader lists), which is what internal/ext4 does.

// dentry is one name as a directory block stores it.
type dentry struct {
	name  string
	ino   uint32
	ftype uint8
	hash  uint32 // only for hash trees
}

// File type codes of directory entries (the filetype feature).
const (
	ftReg     = 1
	ftDir     = 2
	ftChr     = 3
	ftBlk     = 4
	ftFifo    = 5
	ftSock    = 6
	ftSymlink = 7
)

// recLen is the space an entry with an n-byte name needs.
func recLen(n int) int { return (8 + n + 3) &^ 3 }

func putDirent(b []byte, ino uint32, rec int, name string, ftype uint8) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], ino)
	le.PutUint16(b[4:], uint16(rec))
	b[6] = byte(len(name))
	b[7] = ftype
	copy(b[8:], name)
}

// packLeaf writes entries into one block; the last one's record reaches
// the end of the block. off is where the first goes.
func packLeaf(b []byte, off int, ents []dentry) {
	for i, e := range ents {
		rec := recLen(len(e.name))
		if i == len(ents)-1 {
			rec = len(b) - off
		}
		putDirent(b[off:], e.ino, rec, e.name, e.ftype)
		off += rec
	}
}

// split cuts ents into runs that each fit in space bytes (room is the
// space of the first run, which may be smaller). With hashed set, a run
// does not end between two entries of equal hash when it can end before
// them (the tree's index could not tell where to look otherwise);
// continued[i] says run i starts in the middle of such a group.
func split(ents []dentry, first, space int, hashed bool) (runs [][]dentry, continued []bool) {
	start, used, room := 0, 0, first
	for i := 0; i < len(ents); i++ {
		rec := recLen(len(ents[i].name))
		if used+rec <= room {
			used += rec
			continue
		}
		end := i
		if hashed {
			j := i
			for j > start && ents[j].hash == ents[j-1].hash {
				j--
			}
			if j > start {
				end = j
			}
		}
		runs = append(runs, ents[start:end])
		continued = append(continued, len(runs) > 1 && ents[start].hash == ents[start-1].hash)
		start, used, room = end, 0, space
		i = end - 1
	}
	runs = append(runs, ents[start:])
	continued = append(continued, len(runs) > 1 && start > 0 && ents[start].hash == ents[start-1].hash)
	return runs, continued
}

// linearDir lays out a directory as a plain list: "." and ".." and then
// the entries, in order.
func linearDir(self, parent uint32, ents []dentry) [][]byte {
	first := make([]byte, blockSize)
	putDirent(first, self, 12, ".", ftDir)
	if len(ents) == 0 {
		putDirent(first[12:], parent, blockSize-12, "..", ftDir)
		return [][]byte{first}
	}
	putDirent(first[12:], parent, 12, "..", ftDir)
	runs, _ := split(ents, blockSize-24, blockSize, false)
	out := make([][]byte, len(runs))
	for i, r := range runs {
		b, off := first, 24
		if i > 0 {
			b, off = make([]byte, blockSize), 0
		}
		packLeaf(b, off, r)
		out[i] = b
	}
	return out
}

// Hash tree geometry for 4 KiB blocks without checksums: the root holds
// 508 index entries after "." and ".." and its 8-byte info, an interior
// node 511. Without the large_dir feature the kernel reads at most one
// level of interior nodes.
const (
	dxRootLimit = (blockSize - 12 - 12 - 8) / 8
	dxNodeLimit = (blockSize - 8) / 8
	hashHalfMD4 = 1
)

// htreeDir lays out a directory as a hash tree. It reports false when the
// entries need more leaves than two index levels can address; the
// directory is then written as a plain list, which the kernel still reads.
// hash is the directory hash (dirHash with the filesystem's seed; tests
// use weaker ones to make collisions).
func htreeDir(self, parent uint32, ents []dentry, hash func(string) uint32) ([][]byte, bool) {
	sorted := slices.Clone(ents)
	for i := range sorted {
		sorted[i].hash = hash(sorted[i].name)
	}
	slices.SortStableFunc(sorted, func(a, b dentry) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return 0
	})
	leaves, continued := split(sorted, blockSize, blockSize, true)
	levels, nodes := 0, 0
	switch {
	case len(leaves) <= dxRootLimit:
	case len(leaves) <= dxRootLimit*dxNodeLimit:
		levels, nodes = 1, (len(leaves)+dxNodeLimit-1)/dxNodeLimit
	default:
		return nil, false
	}
	// Logical blocks: the root, the interior nodes, the leaves.
	out := make([][]byte, 1+nodes+len(leaves))
	type ref struct{ hash, block uint32 }
	refs := make([]ref, len(leaves))
	for i, l := range leaves {
		b := make([]byte, blockSize)
		packLeaf(b, 0, l)
		out[1+nodes+i] = b
		refs[i] = ref{l[0].hash, uint32(1 + nodes + i)}
		if continued[i] {
			refs[i].hash |= 1
		}
	}
	le := binary.LittleEndian
	// putIndex writes a count/limit header and entries at b[off:]; the
	// first entry's hash is implied by the parent and its slot holds the
	// header.
	putIndex := func(b []byte, off, limit int, rs []ref) {
		le.PutUint16(b[off:], uint16(limit))
		le.PutUint16(b[off+2:], uint16(len(rs)))
		le.PutUint32(b[off+4:], rs[0].block)
		for i, r := range rs[1:] {
			le.PutUint32(b[off+8+8*i:], r.hash)
			le.PutUint32(b[off+12+8*i:], r.block)
		}
	}
	top := refs
	if levels == 1 {
		top = make([]ref, nodes)
		for j := range nodes {
			rs := refs[j*dxNodeLimit : min(len(refs), (j+1)*dxNodeLimit)]
			b := make([]byte, blockSize)
			putDirent(b, 0, blockSize, "", 0) // an empty entry spanning the block
			putIndex(b, 8, dxNodeLimit, rs)
			out[1+j] = b
			top[j] = ref{rs[0].hash, uint32(1 + j)}
		}
	}
	root := make([]byte, blockSize)
	putDirent(root, self, 12, ".", ftDir)
	putDirent(root[12:], parent, blockSize-12, "..", ftDir)
	// dx_root_info: reserved (4), hash version, info length, levels, flags.
	root[24+4] = hashHalfMD4
	root[24+5] = 8
	root[24+6] = byte(levels)
	putIndex(root, 32, dxRootLimit, top)
	out[0] = root
	return out, true
}

// dirBlocks lays out a directory: a hash tree when it needs more than one
// block, else a plain list.
func dirBlocks(self, parent uint32, ents []dentry, seed [4]uint32) (blocks [][]byte, indexed bool) {
	lin := linearDir(self, parent, ents)
	if len(lin) == 1 {
		return lin, false
	}
	if h, ok := htreeDir(self, parent, ents, func(name string) uint32 { return dirHash(name, seed) }); ok {
		return h, true
	}
	return lin, false
}

// dirHash is ext4's directory hash for the half-MD4 algorithm with names
// read as unsigned bytes (the superblock says so), as the kernel computes
// it for lookups: 32 bytes of name per round, seeded from the
// superblock's hash seed, the low bit cleared.
func dirHash(name string, seed [4]uint32) uint32 {
	buf := [4]uint32{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476}
	if seed != [4]uint32{} {
		buf = seed
	}
	var in [8]uint32
	for p := name; ; p = p[32:] {
		hashBuf(p, len(p), &in)
		halfMD4(&buf, &in)
		if len(p) <= 32 {
			break
		}
	}
	h := buf[1] &^ 1
	if h == 0x7fffffff<<1 { // reserved for end-of-directory in readdir
		h = (0x7fffffff - 1) << 1
	}
	return h
}

// hashBuf fills in with up to 32 bytes of s, big-endian in each word and
// padded with a pattern made of the remaining length n.
func hashBuf(s string, n int, in *[8]uint32) {
	pad := uint32(n) | uint32(n)<<8
	pad |= pad << 16
	val := pad
	if len(s) > 32 {
		s = s[:32]
	}
	w := 0
	for i := 0; i < len(s); i++ {
		val = uint32(s[i]) + val<<8
		if i%4 == 3 {
			in[w] = val
			w++
			val = pad
		}
	}
	if w < 8 {
		in[w] = val
		w++
	}
	for ; w < 8; w++ {
		in[w] = pad
	}
}

// halfMD4 is the MD4 compression function cut to three rounds of eight
// steps, over eight input words, as ext4 defines it.
func halfMD4(buf *[4]uint32, in *[8]uint32) {
	const k2, k3 = 0x5a827999, 0x6ed9eba1
	f := func(x, y, z uint32) uint32 { return z ^ (x & (y ^ z)) }
	g := func(x, y, z uint32) uint32 { return (x & y) + ((x ^ y) & z) }
	h := func(x, y, z uint32) uint32 { return x ^ y ^ z }
	a, b, c, d := buf[0], buf[1], buf[2], buf[3]
	r := bits.RotateLeft32

	a = r(a+f(b, c, d)+in[0], 3)
	d = r(d+f(a, b, c)+in[1], 7)
	c = r(c+f(d, a, b)+in[2], 11)
	b = r(b+f(c, d, a)+in[3], 19)
	a = r(a+f(b, c, d)+in[4], 3)
	d = r(d+f(a, b, c)+in[5], 7)
	c = r(c+f(d, a, b)+in[6], 11)
	b = r(b+f(c, d, a)+in[7], 19)

	a = r(a+g(b, c, d)+in[1]+k2, 3)
	d = r(d+g(a, b, c)+in[3]+k2, 5)
	c = r(c+g(d, a, b)+in[5]+k2, 9)
	b = r(b+g(c, d, a)+in[7]+k2, 13)
	a = r(a+g(b, c, d)+in[0]+k2, 3)
	d = r(d+g(a, b, c)+in[2]+k2, 5)
	c = r(c+g(d, a, b)+in[4]+k2, 9)
	b = r(b+g(c, d, a)+in[6]+k2, 13)

	a = r(a+h(b, c, d)+in[3]+k3, 3)
	d = r(d+h(a, b, c)+in[7]+k3, 9)
	c = r(c+h(d, a, b)+in[2]+k3, 11)
	b = r(b+h(c, d, a)+in[6]+k3, 15)
	a = r(a+h(b, c, d)+in[1]+k3, 3)
	d = r(d+h(a, b, c)+in[5]+k3, 9)
	c = r(c+h(d, a, b)+in[0]+k3, 11)
	b = r(b+h(c, d, a)+in[4]+k3, 15)

	buf[0] += a
	buf[1] += b
	buf[2] += c
	buf[3] += d
}
