package dirimage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
)

func writeFile(t *testing.T, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>12)
		if b[i] == 0 {
			b[i] = 1
		}
	}
	return b
}

// fsck runs a full, read-only e2fsck and fails the test on any finding.
func fsck(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if line != "" && !strings.HasPrefix(line, "Pass ") && !strings.HasPrefix(line, "e2fsck ") && !strings.Contains(line, " files (") {
			t.Errorf("e2fsck: %s", line)
		}
	}
}

func build(t *testing.T, src string) (*ext4.FS, string, Stats) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "lower.img")
	st, err := Build(context.Background(), src, img, "mvm-dir-0")
	if err != nil {
		t.Fatal(err)
	}
	fsck(t, img)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := ext4.Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	return fsys, img, st
}

// describeHost describes every path under root as a user would compare
// it: type, mode bits, owner, size, mtime to the nanosecond, content hash,
// symlink target, device numbers, link count and which paths are one file.
func describeHost(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	group := map[uint64]string{}
	err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		d := fmt.Sprintf("mode %o uid %d gid %d mtime %d.%09d", st.Mode, st.Uid, st.Gid, st.Mtim.Sec, st.Mtim.Nsec)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if _, ok := group[st.Ino]; !ok {
				group[st.Ino] = rel
			}
			d += fmt.Sprintf(" size %d sha %x links %d same-as %s", st.Size, sha256.Sum256(b), st.Nlink, group[st.Ino])
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			d += " -> " + target
		case unix.S_IFCHR, unix.S_IFBLK:
			d += fmt.Sprintf(" dev %d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFDIR:
			d += fmt.Sprintf(" links %d", st.Nlink)
		}
		out[rel] = d
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// describeImage describes the image the same way, through internal/ext4,
// the reader the write-back uses.
func describeImage(t *testing.T, fsys *ext4.FS) map[string]string {
	t.Helper()
	out := map[string]string{}
	group := map[uint32]string{}
	var walk func(rel string, in *ext4.Inode)
	walk = func(rel string, in *ext4.Inode) {
		d := fmt.Sprintf("mode %o uid %d gid %d mtime %d.%09d", unixMode(in), in.UID, in.GID, in.Mtime.Unix(), in.Mtime.Nanosecond())
		switch {
		case in.Mode.IsRegular():
			var b bytes.Buffer
			if err := fsys.CopyFile(context.Background(), in, &b); err != nil {
				t.Fatalf("%s: %v", rel, err)
			}
			if _, ok := group[in.Ino]; !ok {
				group[in.Ino] = rel
			}
			d += fmt.Sprintf(" size %d sha %x links %d same-as %s", in.Size, sha256.Sum256(b.Bytes()), in.Nlink, group[in.Ino])
		case in.Mode&os.ModeSymlink != 0:
			target, err := fsys.Readlink(in)
			if err != nil {
				t.Fatalf("%s: %v", rel, err)
			}
			d += " -> " + target
		case in.Mode&os.ModeDevice != 0:
			d += fmt.Sprintf(" dev %d:%d", in.Major, in.Minor)
		case in.Mode.IsDir():
			d += fmt.Sprintf(" links %d", in.Nlink)
		}
		out[rel] = d
		if !in.Mode.IsDir() {
			return
		}
		ents, err := fsys.ReadDir(in)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		for _, e := range ents {
			child, err := fsys.Inode(e.Ino)
			if err != nil {
				t.Fatalf("%s/%s: %v", rel, e.Name, err)
			}
			walk(filepath.Join(rel, e.Name), child)
		}
	}
	root, err := fsys.Inode(ext4.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	walk(".", root)
	return out
}

// unixMode turns a Go file mode back into st_mode bits.
func unixMode(in *ext4.Inode) uint32 {
	m := uint32(in.Mode.Perm())
	if in.Mode&os.ModeSetuid != 0 {
		m |= unix.S_ISUID
	}
	if in.Mode&os.ModeSetgid != 0 {
		m |= unix.S_ISGID
	}
	if in.Mode&os.ModeSticky != 0 {
		m |= unix.S_ISVTX
	}
	switch {
	case in.Mode.IsDir():
		m |= unix.S_IFDIR
	case in.Mode&os.ModeSymlink != 0:
		m |= unix.S_IFLNK
	case in.Mode&os.ModeCharDevice != 0:
		m |= unix.S_IFCHR
	case in.Mode&os.ModeDevice != 0:
		m |= unix.S_IFBLK
	case in.Mode&os.ModeNamedPipe != 0:
		m |= unix.S_IFIFO
	case in.Mode&os.ModeSocket != 0:
		m |= unix.S_IFSOCK
	default:
		m |= unix.S_IFREG
	}
	return m
}

func compareTrees(t *testing.T, want, got map[string]string) {
	t.Helper()
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	bad := 0
	for _, k := range keys {
		if want[k] != got[k] {
			if bad++; bad <= 20 {
				t.Errorf("%q:\n host:  %s\n image: %s", k, want[k], got[k])
			}
		}
	}
	if bad > 20 {
		t.Errorf("... %d differences in all", bad)
	}
}

func setTimes(t *testing.T, p string, atime, mtime time.Time) {
	t.Helper()
	ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		t.Fatal(err)
	}
}

// TestBuildKeepsEverything builds an image of a tree with every kind of
// file and attribute the guest can see, checks it with e2fsck and reads
// it back with internal/ext4.
func TestBuildKeepsEverything(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "empty"), nil, 0o644)
	writeFile(t, filepath.Join(src, "one"), []byte("x"), 0o600)
	writeFile(t, filepath.Join(src, "block"), pattern(4096, 1), 0o640)
	writeFile(t, filepath.Join(src, "block+1"), pattern(4097, 2), 0o644)
	writeFile(t, filepath.Join(src, "big"), pattern(3<<20+123, 3), 0o755)
	writeFile(t, filepath.Join(src, "setuid"), []byte("#!/bin/sh\n"), 0o4755|os.ModeSetuid)
	if err := os.Chmod(filepath.Join(src, "setuid"), 0o755|os.ModeSetuid|os.ModeSetgid); err != nil {
		t.Fatal(err)
	}
	// Blocks of zeros in a file, and an all-zero file: holes in the image.
	zeros := append(append(pattern(5000, 4), make([]byte, 3*4096)...), pattern(10, 5)...)
	writeFile(t, filepath.Join(src, "zeros inside"), zeros, 0o644)
	writeFile(t, filepath.Join(src, "all zeros"), make([]byte, 20000), 0o644)
	for _, name := range []string{"new\nline", "tab\there", "spaces  and ünïcödé ✓", "\xff\xfe not utf-8", "-dash", ".hidden", strings.Repeat("n", 255)} {
		writeFile(t, filepath.Join(src, "names", name), []byte(name), 0o644)
	}
	writeFile(t, filepath.Join(src, "deep/a/b/c/d/e/f/g/leaf"), []byte("leaf"), 0o644)
	if err := os.Mkdir(filepath.Join(src, "sticky"), 0o1777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(src, "sticky"), 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "private"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "lost+found"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Hard links: in one directory, across directories, three names.
	if err := os.Link(filepath.Join(src, "one"), filepath.Join(src, "one-again")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(src, "big"), filepath.Join(src, "deep/a/big-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(src, "big"), filepath.Join(src, "names/big-link")); err != nil {
		t.Fatal(err)
	}
	// Symlinks: fast (in the inode, up to 59 bytes) and slow (a block).
	for name, target := range map[string]string{
		"link-rel":   "one",
		"link-abs":   "/etc/passwd",
		"link-59":    strings.Repeat("a", 59),
		"link-60":    strings.Repeat("b", 60),
		"link-4095":  strings.Repeat("c/", 2047) + "c",
		"link-dir":   "deep/a",
		"link-dead":  "nowhere/at/all",
		"link-weird": "new\nline \xff",
	} {
		if err := os.Symlink(target, filepath.Join(src, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mkfifo(filepath.Join(src, "fifo"), 0o620); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(src, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if os.Geteuid() == 0 {
		// Device nodes, in both encodings, and owners beyond 16 bits.
		for name, dev := range map[string]uint64{"null": unix.Mkdev(1, 3), "big-dev": unix.Mkdev(300, 70000)} {
			if err := unix.Mknod(filepath.Join(src, name), unix.S_IFCHR|0o666, int(dev)); err != nil {
				t.Fatal(err)
			}
		}
		if err := unix.Mknod(filepath.Join(src, "blockdev"), unix.S_IFBLK|0o660, int(unix.Mkdev(8, 1))); err != nil {
			t.Fatal(err)
		}
		for name, id := range map[string]int{"one": 1234, "deep/a": 70000, "sock": 5, "link-rel": 4000000000} {
			if err := os.Lchown(filepath.Join(src, name), id, id+1); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Timestamps: nanoseconds, before 1970, after 2038, far future.
	times := map[string]time.Time{
		"one":       time.Unix(1700000000, 123456789),
		"big":       time.Unix(-12345, 678),
		"block":     time.Unix(1<<31+100, 999999999),
		"block+1":   time.Unix(13000000000, 5), // year 2381
		"deep":      time.Unix(1, 1),
		"link-rel":  time.Unix(1600000000, 42),
		"fifo":      time.Unix(1500000000, 500),
		"names":     time.Unix(1400000000, 7),
		"all zeros": time.Unix(0, 0),
	}
	for name, ts := range times {
		setTimes(t, filepath.Join(src, name), ts.Add(time.Hour), ts)
	}
	setTimes(t, src, time.Unix(1234567890, 1), time.Unix(1234567890, 987654321))

	fsys, img, st := build(t, src)
	compareTrees(t, describeHost(t, src), describeImage(t, fsys))
	if st.Files != 16 || st.Dirs != 13 {
		t.Errorf("stats %+v", st)
	}
	root, err := fsys.Inode(ext4.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	if !root.Atime.Equal(time.Unix(1234567890, 1)) {
		t.Errorf("root atime %v", root.Atime)
	}
	// Zero blocks take no space in the image.
	for name, want := range map[string]int64{"all zeros": 0, "zeros inside": 3 * 8, "empty": 0} {
		in := lookup(t, fsys, name)
		if got := blocks512(t, img, in.Ino); got != want {
			t.Errorf("%s: %d sectors allocated in the image, want %d", name, got, want)
		}
	}
}

func lookup(t *testing.T, fsys *ext4.FS, p string) *ext4.Inode {
	t.Helper()
	in, err := fsys.Lookup(p)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// blocks512 reads i_blocks of an inode with debugfs, which ext4.Inode
// does not expose.
func blocks512(t *testing.T, img string, ino uint32) int64 {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", fmt.Sprintf("stat <%d>", ino), img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	var n int64
	i := strings.Index(string(out), "Blockcount: ")
	if i < 0 {
		t.Fatalf("no block count in %s", out)
	}
	fmt.Sscanf(string(out[i+len("Blockcount: "):]), "%d", &n)
	return n
}

// TestBuildLargeDirectories: directories of one block (a list), of a
// one-level hash tree, and of a two-level one (long names make many
// leaves), plus a directory with more subdirectories than a link count
// holds. e2fsck checks every hash and the tree's order; ext4 reads the
// names back.
func TestBuildLargeDirectories(t *testing.T) {
	src := t.TempDir()
	mk := func(dir string, n int, name func(i int) string) {
		if err := os.MkdirAll(filepath.Join(src, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		for i := range n {
			f, err := os.Create(filepath.Join(src, dir, name(i)))
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
	}
	mk("small", 100, func(i int) string { return fmt.Sprintf("f%d", i) })
	mk("flat", 5000, func(i int) string { return fmt.Sprintf("file%06d.txt", i) })
	mk("long", 9000, func(i int) string { return fmt.Sprintf("%06d%s", i, strings.Repeat("L", 240)) })
	fsys, img, _ := build(t, src)
	for dir, n := range map[string]int{"small": 100, "flat": 5000, "long": 9000} {
		in := lookup(t, fsys, dir)
		ents, err := fsys.ReadDir(in)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != n {
			t.Errorf("%s: %d entries, want %d", dir, len(ents), n)
		}
		seen := map[string]bool{}
		for _, e := range ents {
			seen[e.Name] = true
		}
		if len(seen) != n {
			t.Errorf("%s: %d distinct names, want %d", dir, len(seen), n)
		}
	}
	// The large ones are hash trees of the expected depth; the small one
	// is a plain list.
	for dir, want := range map[string]string{"small": "Not a hash-indexed directory", "flat": "Indirect levels: 0", "long": "Indirect levels: 1"} {
		out, err := exec.Command("debugfs", "-R", "htree_dump /"+dir, img).CombinedOutput()
		if err != nil || !strings.Contains(string(out), want) {
			t.Errorf("htree_dump /%s: %v, want %q in\n%.500s", dir, err, want, out)
		}
	}
}

// TestBuildManySubdirs: a directory with more subdirectories than a link
// count can hold gets the count 1 (dir_nlink), which e2fsck accepts. The
// tree is made in memory: 65 000 host directories take seconds to create.
func TestBuildManySubdirs(t *testing.T) {
	now := unix.NsecToTimespec(time.Now().UnixNano())
	root := &node{ino: 2, mode: unix.S_IFDIR | 0o755, links: 2, atime: now, mtime: now, ctime: now}
	tr := &tree{nodes: []*node{root}}
	for i := range maxLinks + 10 {
		d := &node{ino: uint32(firstIno + i), mode: unix.S_IFDIR | 0o700, links: 2, parent: 2, mtime: now}
		root.links++
		root.kids = append(root.kids, dirent{fmt.Sprintf("d%d", i), d})
		tr.nodes = append(tr.nodes, d)
	}
	img := filepath.Join(t.TempDir(), "img")
	if _, err := writeImage(context.Background(), tr, img, Options{Label: "x"}, 0); err != nil {
		t.Fatal(err)
	}
	fsck(t, img)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := ext4.Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	in, err := fsys.Inode(ext4.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	if in.Nlink != 1 {
		t.Errorf("root has %d links, want 1 (too many to count)", in.Nlink)
	}
	ents, err := fsys.ReadDir(in)
	if err != nil || len(ents) != maxLinks+10 {
		t.Errorf("root lists %d entries (%v), want %d", len(ents), err, maxLinks+10)
	}
}

// TestBuildExtentTrees: a sparse file with more data runs than the inode
// holds (a tree of depth 1), more than four leaves hold (depth 2), and a
// file larger than one extent and one block group.
func TestBuildExtentTrees(t *testing.T) {
	src := t.TempDir()
	islands := func(name string, n int) {
		f, err := os.Create(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for i := range n {
			if _, err := f.WriteAt(pattern(100, byte(i)), int64(i)*2*blockSize); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Truncate(int64(n)*2*blockSize + 12345); err != nil {
			t.Fatal(err)
		}
	}
	islands("five", 5)
	islands("many", 4*extentsPerNode+7)
	writeFile(t, filepath.Join(src, "huge"), pattern(blocksPerGroup*blockSize+3*blockSize+1, 9), 0o644)
	fsys, _, _ := build(t, src)
	compareTrees(t, describeHost(t, src), describeImage(t, fsys))

	// Where the host allocated less than the data (compression), the
	// first layout is too small and a larger one is made.
	tr, err := scan(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range tr.nodes {
		n.alloc = 0
	}
	img := filepath.Join(t.TempDir(), "img")
	if _, err := writeImage(context.Background(), tr, img, Options{Label: "x"}, 0); !errors.Is(err, errImageFull) {
		t.Fatalf("layout from allocation alone: %v, want errImageFull", err)
	}
	if err := tr.write(context.Background(), img, Options{Label: "x"}); err != nil {
		t.Fatal(err)
	}
	fsck(t, img)
}

// TestBuildHugeSparseFile: a 1 TiB file with two blocks of data makes a
// small image, not one with metadata for 1 TiB.
func TestBuildHugeSparseFile(t *testing.T) {
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 1<<40 - 5} {
		if _, err := f.WriteAt([]byte("data!"), off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	fsys, img, _ := build(t, src)
	in := lookup(t, fsys, "sparse")
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if in.Size != 1<<40 || fi.Size() > 1<<30 || blocks512(t, img, in.Ino) != 16 {
		t.Errorf("size %d in an image of %d bytes, %d sectors", in.Size, fi.Size(), blocks512(t, img, in.Ino))
	}
}

func TestDirHash(t *testing.T) {
	// From `debugfs -R "dx_hash -h 4 [-s 00112233-4455-6677-8899-aabbccddeeff] NAME"`
	// (hash 4: half_md4 with unsigned characters).
	seed := [4]uint32{0x33221100, 0x77665544, 0xbbaa9988, 0xffeeddcc}
	tests := []struct {
		name             string
		seeded, unseeded uint32
	}{
		{"a", 0x93752ee6 &^ 1, 0xd5fa7d7a},
		{"file000001.txt", 0x3f05213a, 0x437adf7c},
		{"hé", 0x50c1e9bc, 0x7f7116d0},
		{"ab", 0x26fb5c24, 0xee5ef564},
		{"abcd", 0xf4e4a464, 0xad7557a8},
		{"abcdefghijklmnopqrstuvwxyz012345", 0xfb45178c, 0x19643b1a},
		{"abcdefghijklmnopqrstuvwxyz0123456", 0x01d37544, 0x16ed9a9c},
		{strings.Repeat("n", 255), 0xd0365ba6, 0xc0f8fde8},
		{"\xff\xfe\x80", 0x9c2dd302, 0x6542b330},
	}
	for _, tt := range tests {
		if got := dirHash(tt.name, seed); got != tt.seeded {
			t.Errorf("dirHash(%q, seed) = %#x, want %#x", tt.name, got, tt.seeded)
		}
		if got := dirHash(tt.name, [4]uint32{}); got != tt.unseeded {
			t.Errorf("dirHash(%q) = %#x, want %#x", tt.name, got, tt.unseeded)
		}
	}
}

// TestSplitKeepsEqualHashesTogether: a leaf does not end between two
// entries of the same hash unless the run of equal hashes fills it.
func TestSplitKeepsEqualHashesTogether(t *testing.T) {
	name := strings.Repeat("x", 200) // 208 bytes a record: 19 fit in a block
	var ents []dentry
	for i := range 18 {
		ents = append(ents, dentry{name: name, hash: uint32(2 * i)})
	}
	// A run of 5 equal hashes straddling the first block's end.
	for range 5 {
		ents = append(ents, dentry{name: name, hash: 100})
	}
	// A run of 40 equal hashes: longer than a block.
	for range 40 {
		ents = append(ents, dentry{name: name, hash: 200})
	}
	ents = append(ents, dentry{name: name, hash: 300})
	runs, cont := split(ents, blockSize, blockSize, true)
	var lens []int
	for _, r := range runs {
		lens = append(lens, len(r))
	}
	if got, want := fmt.Sprint(lens, cont), fmt.Sprint([]int{18, 5, 19, 19, 3}, []bool{false, false, false, true, true}); got != want {
		t.Errorf("runs and continuations %s, want %s", got, want)
	}
}

// countdown is a context that reports itself cancelled from its after-th
// Err call on (never if after is 0), so that a test can cancel a build at
// an exact point of its work.
type countdown struct {
	context.Context
	after int64
	calls atomic.Int64
}

func (c *countdown) Err() error {
	if n := c.calls.Add(1); c.after > 0 && n >= c.after {
		return context.Canceled
	}
	return nil
}

// TestBuildCancelled: a build stops at the first check after its context
// is cancelled, in the scan or in the copy, and leaves no image; and the
// checks come often enough that a cancellation at any moment is acted on
// within milliseconds.
func TestBuildCancelled(t *testing.T) {
	src := t.TempDir()
	for i := range 3000 {
		writeFile(t, filepath.Join(src, fmt.Sprintf("d%d/f%d", i%30, i)), pattern(20000, byte(i)), 0o644)
	}
	writeFile(t, filepath.Join(src, "big"), pattern(64<<20, 1), 0o644)
	img := filepath.Join(t.TempDir(), "lower.img")
	count := &countdown{Context: context.Background()}
	if _, err := Build(count, src, img, "x"); err != nil {
		t.Fatal(err)
	}
	os.Remove(img)
	checks := count.calls.Load()
	if checks < 100 {
		t.Fatalf("only %d cancellation checks in a build of 3000 files", checks)
	}
	for _, after := range []int64{1, 2, 20, checks / 3, checks - 70, checks - 1} {
		_, err := Build(&countdown{Context: context.Background(), after: after}, src, img, "x")
		if !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled at check %d of %d: error %v", after, checks, err)
		}
		if _, err := os.Stat(img); !os.IsNotExist(err) {
			t.Errorf("cancelled at check %d of %d: image left behind (%v)", after, checks, err)
		}
	}
	// Wall-clock: cancel a real context during the build.
	start := time.Now()
	if _, err := Build(context.Background(), src, img, "x"); err != nil {
		t.Fatal(err)
	}
	full := time.Since(start)
	for _, frac := range []time.Duration{10, 3, 2} {
		ctx, cancel := context.WithCancel(context.Background())
		var cancelled time.Time
		time.AfterFunc(full/frac, func() { cancelled = time.Now(); cancel() })
		_, err := Build(ctx, src, img, "x")
		done := time.Now()
		cancel()
		if err == nil {
			continue // finished first: nothing to measure
		}
		if !errors.Is(err, context.Canceled) || done.Sub(cancelled) > 500*time.Millisecond {
			t.Errorf("cancelled after %s (a whole build takes %s): error %v %s later", full/frac, full, err, done.Sub(cancelled))
		}
	}
}

// TestBuildXattrs: extended attributes and ACLs reach the image, in the
// inode when they fit and in a block when not; e2fsck checks their
// layout and hashes, debugfs (which decodes ACLs back) reads their values.
func TestBuildXattrs(t *testing.T) {
	src := t.TempDir()
	le := binary.LittleEndian
	acl := func(entries ...[3]uint32) []byte {
		b := le.AppendUint32(nil, 2)
		for _, e := range entries {
			b = le.AppendUint16(b, uint16(e[0]))
			b = le.AppendUint16(b, uint16(e[1]))
			b = le.AppendUint32(b, e[2])
		}
		return b
	}
	const undefined = 0xffffffff
	access := acl([3]uint32{1, 6, undefined}, [3]uint32{2, 4, 1234}, [3]uint32{4, 4, undefined}, [3]uint32{8, 5, 99}, [3]uint32{0x10, 7, undefined}, [3]uint32{0x20, 0, undefined})
	dflt := acl([3]uint32{1, 7, undefined}, [3]uint32{4, 5, undefined}, [3]uint32{0x20, 5, undefined})
	attrs := map[string]map[string][]byte{
		"small": {"user.a": []byte("1")},
		"two":   {"user.mime_type": []byte("text/plain"), "user.origin": []byte("https://example.com/x")},
		"big":   {"user.big": bytes.Repeat([]byte("v"), 1000), "user.other": []byte("o")},
		"acl":   {"system.posix_acl_access": access, "user.x": nil},
		"dir":   {"system.posix_acl_default": dflt, "system.posix_acl_access": access},
	}
	if os.Geteuid() == 0 {
		attrs["small"]["trusted.t"] = []byte("trusted")
		attrs["two"]["security.capability"] = []byte("\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
	}
	for name, xs := range attrs {
		p := filepath.Join(src, name)
		if name == "dir" {
			if err := os.Mkdir(p, 0o755); err != nil {
				t.Fatal(err)
			}
		} else {
			writeFile(t, p, []byte(name), 0o644)
		}
		for k, v := range xs {
			if err := unix.Lsetxattr(p, k, v, 0); err != nil {
				t.Fatalf("setxattr %s %s: %v", name, k, err)
			}
		}
	}
	_, img, _ := build(t, src)
	for name, xs := range attrs {
		for k := range xs {
			want, err := getxattr(filepath.Join(src, name), k) // as the host returns it
			if err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(t.TempDir(), "value")
			if b, err := exec.Command("debugfs", "-R", fmt.Sprintf("ea_get -f %s /%s %s", out, name, k), img).CombinedOutput(); err != nil {
				t.Fatalf("debugfs ea_get: %v\n%s", err, b)
			}
			got, err := os.ReadFile(out)
			if strings.HasPrefix(k, "system.posix_acl_") && len(got) >= 4 {
				// debugfs gives the id 0 where it means nothing; the kernel
				// gives ACL_UNDEFINED_ID.
				for e := got[4:]; len(e) >= 8; e = e[8:] {
					if tag := le.Uint16(e); tag != 2 && tag != 8 {
						le.PutUint32(e[4:], undefined)
					}
				}
			}
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s %s: image has %q (%v), host %q", name, k, got, err, want)
			}
		}
	}

	// Where they went: the inode for small sets, a block for large ones.
	for name, inBlock := range map[string]bool{"small": false, "two": os.Geteuid() == 0, "big": true, "acl": false, "dir": false} {
		out, err := exec.Command("debugfs", "-R", "stat /"+name, img).CombinedOutput()
		if err != nil {
			t.Fatal(err)
		}
		if got := !strings.Contains(string(out), "File ACL: 0"); got != inBlock {
			t.Errorf("%s: attributes in a block: %v, want %v\n%s", name, got, inBlock, out)
		}
	}
}

func TestDiskACLRejectsGarbage(t *testing.T) {
	for _, v := range [][]byte{nil, {2, 0, 0}, {1, 0, 0, 0}, {2, 0, 0, 0, 1, 0}, {2, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0}} {
		if _, err := diskACL(v); err == nil {
			t.Errorf("diskACL(%x) accepted", v)
		}
	}
}

func TestBuildErrors(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "file"), nil, 0o644)
	img := filepath.Join(t.TempDir(), "img")
	for _, src := range []string{filepath.Join(dir, "missing"), filepath.Join(dir, "file")} {
		if _, err := Build(context.Background(), src, img, "x"); err == nil || !strings.Contains(err.Error(), src) {
			t.Errorf("Build(%s) = %v, want an error naming it", src, err)
		}
	}
}

// FuzzBuild makes a small tree from the input (names with any bytes,
// files of any size with runs of zeros and holes, directories, symlinks
// of any length, hard links, fifos), builds its image, and checks it with
// e2fsck and against the host through internal/ext4.
func FuzzBuild(f *testing.F) {
	f.Add([]byte("\x00a\x10\x01b\x02c\x03d\x04e\x05"))
	f.Add([]byte("\x01dir\x00\x00file\x90\x02\x03link-to-something-rather-long-indeed-more-than-sixty-bytes-long\x04x"))
	f.Add(bytes.Repeat([]byte("\x00name\xff"), 30))
	f.Fuzz(func(t *testing.T, data []byte) {
		src := t.TempDir()
		dirs := []string{src}
		var files []string
		for i := 0; len(data) >= 2 && i < 40; i++ {
			op, n := data[0], int(data[1])
			data = data[2:]
			name := fmt.Sprintf("%d", i)
			if k := min(n%32, len(data)); k > 0 {
				name += string(bytes.ReplaceAll(bytes.ReplaceAll(data[:k], []byte{0}, []byte{1}), []byte("/"), []byte{2}))
				data = data[k:]
			}
			p := filepath.Join(dirs[int(op>>3)%len(dirs)], name)
			switch op % 6 {
			case 0, 1: // a file: n selects its size and where zeros go
				size := n * n * 37 % (300 << 10)
				b := pattern(size, op)
				if n%3 == 0 && size > 8192 {
					clear(b[4096 : size/2])
				}
				writeFile(t, p, b, 0o644)
				if n%4 == 1 { // and a hole at the end
					if err := os.Truncate(p, int64(size)+int64(n)*100000); err != nil {
						t.Fatal(err)
					}
				}
				files = append(files, p)
			case 2:
				if err := os.Mkdir(p, os.FileMode(0o700|n&0o77)); err != nil {
					t.Fatal(err)
				}
				dirs = append(dirs, p)
			case 3:
				if err := os.Symlink(strings.Repeat("t", 1+n*16%4000), p); err != nil {
					t.Fatal(err)
				}
			case 4:
				if len(files) > 0 {
					if err := os.Link(files[n%len(files)], p); err != nil {
						t.Fatal(err)
					}
				}
			case 5:
				if err := unix.Mkfifo(p, 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
		fsys, _, _ := build(t, src)
		compareTrees(t, describeHost(t, src), describeImage(t, fsys))
	})
}
