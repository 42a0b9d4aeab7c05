package dirimage

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
)

// dxLookup finds name in a directory laid out by htreeDir the way the
// kernel does (fs/ext4/namei.c: dx_probe, then ext4_htree_next_block while
// the next leaf starts with the same hash): it fails the test on a
// malformed index and returns the inode number, or 0.
func dxLookup(t *testing.T, blocks [][]byte, name string, hash func(string) uint32) uint32 {
	t.Helper()
	le := binary.LittleEndian
	h := hash(name)
	type frame struct {
		b     []byte
		off   int // of the count/limit header
		count int
		at    int
	}
	probe := func(b []byte, off, limit int) frame {
		if got := int(le.Uint16(b[off:])); got != limit {
			t.Fatalf("index limit %d, want %d", got, limit)
		}
		f := frame{b: b, off: off, count: int(le.Uint16(b[off+2:]))}
		if f.count == 0 || f.count > limit {
			t.Fatalf("index count %d", f.count)
		}
		for i := 1; i < f.count; i++ {
			if le.Uint32(b[off+8*i:]) <= h {
				f.at = i
			}
			if i > 1 && le.Uint32(b[off+8*i:]) < le.Uint32(b[off+8*(i-1):]) {
				t.Fatalf("index hashes out of order")
			}
		}
		return f
	}
	block := func(f frame, i int) []byte {
		n := int(le.Uint32(f.b[f.off+8*i+4:]))
		if n <= 0 || n >= len(blocks) {
			t.Fatalf("index points at block %d of %d", n, len(blocks))
		}
		return blocks[n]
	}
	root := blocks[0]
	if root[24+4] != hashHalfMD4 || root[24+5] != 8 || le.Uint16(root[12+4:]) != blockSize-12 {
		t.Fatalf("bad root")
	}
	frames := []frame{probe(root, 32, dxRootLimit)}
	if root[24+6] == 1 {
		frames = append(frames, probe(block(frames[0], frames[0].at), 8, dxNodeLimit))
	}
	for {
		leaf := block(frames[len(frames)-1], frames[len(frames)-1].at)
		for off := 0; off < blockSize; {
			rec := int(le.Uint16(leaf[off+4:]))
			if rec < 8 || off+rec > blockSize {
				t.Fatalf("bad record length %d at %d", rec, off)
			}
			if ino := le.Uint32(leaf[off:]); ino != 0 && string(leaf[off+8:off+8+int(leaf[off+6])]) == name {
				return ino
			}
			off += rec
		}
		// The next leaf, if it continues this hash.
		k := len(frames) - 1
		for k >= 0 && frames[k].at+1 >= frames[k].count {
			k--
		}
		if k < 0 {
			return 0
		}
		frames[k].at++
		next := le.Uint32(frames[k].b[frames[k].off+8*frames[k].at:])
		for j := k + 1; j < len(frames); j++ {
			frames[j] = probe(block(frames[j-1], frames[j-1].at), 8, dxNodeLimit)
			frames[j].at = 0
		}
		if next&^1 != h {
			return 0
		}
	}
}

// listLeaves returns every name the directory's leaves hold, as a linear
// reader (internal/ext4) sees them.
func listLeaves(t *testing.T, blocks [][]byte) map[string]uint32 {
	t.Helper()
	le := binary.LittleEndian
	out := map[string]uint32{}
	for _, b := range blocks {
		for off := 0; off < blockSize; {
			rec := int(le.Uint16(b[off+4:]))
			if rec < 8 || off+rec > blockSize {
				t.Fatalf("bad record length %d", rec)
			}
			if ino := le.Uint32(b[off:]); ino != 0 {
				name := string(b[off+8 : off+8+int(b[off+6])])
				if _, dup := out[name]; dup {
					t.Fatalf("%q listed twice", name)
				}
				out[name] = ino
			}
			off += rec
		}
	}
	return out
}

func checkHashTree(t *testing.T, names []string, hash func(string) uint32) {
	t.Helper()
	ents := make([]dentry, len(names))
	for i, n := range names {
		ents[i] = dentry{name: n, ino: uint32(100 + i), ftype: ftReg}
	}
	blocks, ok := htreeDir(7, 3, ents, hash)
	if !ok {
		t.Fatalf("%d names do not fit a hash tree", len(names))
	}
	listed := listLeaves(t, blocks)
	if listed["."] != 7 || listed[".."] != 3 || len(listed) != len(names)+2 {
		t.Fatalf("leaves list %d names, want %d and . and ..", len(listed), len(names))
	}
	for i, n := range names {
		if got := dxLookup(t, blocks, n, hash); got != uint32(100+i) {
			t.Fatalf("lookup %q: inode %d, want %d", n, got, 100+i)
		}
	}
	for _, absent := range []string{"absent", names[0] + "x", strings.Repeat("z", 255)} {
		if listed[absent] == 0 {
			if got := dxLookup(t, blocks, absent, hash); got != 0 {
				t.Fatalf("lookup of absent %q found inode %d", absent, got)
			}
		}
	}
}

func TestHashTreeLookup(t *testing.T) {
	seed := [4]uint32{1, 2, 3, 4}
	real := func(n string) uint32 { return dirHash(n, seed) }
	var short, long []string
	for i := range 20000 {
		short = append(short, fmt.Sprintf("file%06d.txt", i))
	}
	for i := range 9000 { // more leaves than the root indexes: two levels
		long = append(long, fmt.Sprintf("%06d%s", i, strings.Repeat("L", 240)))
	}
	checkHashTree(t, short, real)
	checkHashTree(t, long, real)
	// Hashes that collide a lot: runs of equal hashes longer than a leaf,
	// leaves that must end early, continuation bits, at both depths.
	weak := func(n string) uint32 { return uint32(len(n)%7) << 20 }
	checkHashTree(t, short[:3000], weak)
	checkHashTree(t, long, func(n string) uint32 { return uint32(n[5]) << 24 })
}

// FuzzHashTree: any set of names (split from the input at NUL bytes)
// laid out as a hash tree is listed whole and found by the kernel's
// lookup, with the real hash and with one that collides constantly.
func FuzzHashTree(f *testing.F) {
	f.Add([]byte("a\x00b\x00c"), uint8(0))
	f.Add(bytes.Repeat([]byte("name\x00"), 1), uint8(3))
	f.Add([]byte(strings.Repeat(strings.Repeat("x", 200)+"\x00y", 50)), uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, mode uint8) {
		seen := map[string]bool{".": true, "..": true}
		var names []string
		for i, part := range bytes.Split(data, []byte{0}) {
			n := string(part)
			if len(n) > maxName {
				n = n[:maxName]
			}
			if n == "" || strings.Contains(n, "/") || seen[n] {
				continue
			}
			seen[n] = true
			names = append(names, n)
			// Long inputs become many names: repeat with a counter.
			if mode&4 != 0 {
				for j := range 40 {
					m := fmt.Sprintf("%d.%d.%.200s", i, j, n)
					if !seen[m] {
						seen[m] = true
						names = append(names, m)
					}
				}
			}
		}
		if len(names) == 0 {
			return
		}
		hash := func(n string) uint32 { return dirHash(n, [4]uint32{uint32(mode)}) }
		if mode&1 != 0 {
			hash = func(n string) uint32 { return uint32(len(n)%3) << 30 }
		}
		checkHashTree(t, names, hash)
	})
}
