package ext4

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/ext4/ext4craft"
)

// smallImage builds a small ext4 image (1 KiB blocks, a few hundred KiB,
// metadata checksums on, as mke2fs makes them by default) of a tree with
// a bit of everything the reader handles, and returns its bytes. It is
// the seed of the fuzz target and the base of the hostile-image tests.
func smallImage(t testing.TB, size string) []byte {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	mustWrite := func(p string, data []byte) {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(src, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, p), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mustWrite("upper/small", []byte("hello\n"))
	mustWrite("upper/empty", nil)
	mustWrite("upper/three-blocks", bytes.Repeat([]byte("0123456789abcdef"), 3*1024/16))
	for i := 0; i < 40; i++ {
		mustWrite("upper/many/"+strings.Repeat("n", 20)+itoa(i), []byte{byte(i)})
	}
	// Five separate extents: more than the inode holds, so an index
	// block.
	sp, err := os.Create(filepath.Join(src, "upper/sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < 5; i++ {
		if _, err := sp.WriteAt([]byte("data"), i*8192); err != nil {
			t.Fatal(err)
		}
	}
	sp.Close()
	if err := os.Symlink("small", filepath.Join(src, "upper/fast")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(strings.Repeat("long/", 20), filepath.Join(src, "upper/slow")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "upper/opaque"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "work"), 0o700); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img")
	run(t, "truncate", "-s", size, img)
	run(t, "mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "64", "-O", "^has_journal,^resize_inode", "-d", src, img)
	// What mkfs -d cannot make without root: a whiteout (0:0), a fifo,
	// an opaque directory, and an attribute too big for the inode.
	debugfs(t, img, "cd upper", "mknod gone c 0 0", "mknod pipe p",
		"ea_set opaque trusted.overlay.opaque y",
		"ea_set small user.big "+strings.Repeat("v", 600))
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
}

func debugfs(t testing.TB, img string, cmds ...string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "cmds")
	if err := os.WriteFile(f, []byte(strings.Join(cmds, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("debugfs", "-w", "-f", f, img).CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("debugfs: ")) && bytes.Contains(out, []byte("rror")) {
		t.Fatalf("debugfs %q: %v\n%s", cmds, err, out)
	}
}

// memImage is an image held in memory, editable with ext4craft.
type memImage []byte

func (m memImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m)) {
		return 0, io.EOF
	}
	n := copy(p, m[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m memImage) WriteAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > int64(len(m)) {
		return 0, io.ErrShortWrite
	}
	return copy(m[off:], p), nil
}

// craft returns a copy of img edited by edit.
func craft(t testing.TB, img []byte, edit func(im *ext4craft.Image) error) []byte {
	t.Helper()
	m := memImage(bytes.Clone(img))
	im, err := ext4craft.Open(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := edit(im); err != nil {
		t.Fatal(err)
	}
	return m
}

func lookup(im *ext4craft.Image, path string) uint32 {
	ino, err := im.Lookup(path)
	if err != nil {
		panic(err)
	}
	return ino
}

// walkAll reads everything reachable in fsys the way a write-back does:
// every directory once, every file's data, every symlink and attribute.
// It returns the first error and what it saw.
func walkAll(fsys *FS) (names []string, err error) {
	root, err := fsys.Inode(RootIno)
	if err != nil {
		return nil, err
	}
	seen := map[uint32]bool{RootIno: true}
	type item struct {
		in   *Inode
		path string
	}
	queue := []item{{root, ""}}
	var first error
	keep := func(err error) {
		if first == nil && err != nil {
			first = err
		}
	}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		keep(fsys.WalkDir(d.in, func(e DirEntry) error {
			p := d.path + "/" + e.Name
			names = append(names, p)
			in, err := fsys.Inode(e.Ino)
			if err != nil {
				keep(err)
				return nil
			}
			_, _, err = fsys.Xattr(in, "trusted.overlay.opaque")
			keep(err)
			switch {
			case in.Mode.IsDir():
				if !seen[in.Ino] {
					seen[in.Ino] = true
					queue = append(queue, item{in, p})
				}
			case in.Mode.IsRegular():
				_, err := fsys.CopyData(context.Background(), in, discardAt{})
				keep(err)
			case in.Mode&fs.ModeSymlink != 0:
				_, err := fsys.Readlink(in)
				keep(err)
			}
			return nil
		}))
	}
	return names, first
}

type discardAt struct{}

func (discardAt) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }

func open(t testing.TB, img []byte) *FS {
	t.Helper()
	fsys, err := Open(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return fsys
}

func TestSmallImageReadsWhole(t *testing.T) {
	img := smallImage(t, "256K")
	fsys := open(t, img)
	names, err := walkAll(fsys)
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	joined := strings.Join(names, "\n")
	for _, want := range []string{"/upper/gone", "/upper/pipe", "/upper/sparse", "/upper/slow", "/upper/many/" + strings.Repeat("n", 20) + "39"} {
		if !strings.Contains(joined, want+"\n") && !strings.HasSuffix(joined, want) {
			t.Errorf("walk did not see %s", want)
		}
	}
	in, err := fsys.Lookup("upper/small")
	if err != nil {
		t.Fatal(err)
	}
	if v, ok, err := fsys.Xattr(in, "user.big"); err != nil || !ok || len(v) != 600 {
		t.Errorf("attribute in a block: %d bytes, %v, %v", len(v), ok, err)
	}
	sp, err := fsys.Lookup("upper/sparse")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := fsys.DataSize(sp); err != nil || n != 4*1024+4 {
		t.Errorf("DataSize(sparse) = %d, %v; want four whole blocks and 4 bytes", n, err)
	}
	var b bytes.Buffer
	if err := fsys.CopyFile(context.Background(), sp, &b); err != nil || b.Len() != 4*8192+4 || !bytes.Equal(b.Bytes()[8192:8196], []byte("data")) {
		t.Errorf("CopyFile(sparse) = %d bytes, %v", b.Len(), err)
	}
	if wh, err := fsys.Lookup("upper/gone"); err != nil || !wh.IsWhiteout() {
		t.Errorf("whiteout: %v, %v", wh, err)
	}
}

// TestHostileImages feeds the reader images as a hostile guest leaves
// them, checksums valid, and checks that each is either read for what it
// is (names reported as they are, for the caller to judge) or refused
// with ErrCorrupt, quickly and within a small multiple of the image in
// reads.
func TestHostileImages(t *testing.T) {
	base := smallImage(t, "256K")
	cases := []struct {
		name      string
		edit      func(im *ext4craft.Image) error
		wantErr   bool     // walking it fails with ErrCorrupt
		wantNames []string // names the walk reports
	}{
		{"slash and dot-dot in a name", func(im *ext4craft.Image) error {
			return im.Rename(lookup(im, "upper/many"), strings.Repeat("n", 20)+"1", []byte("../../../etc/x"))
		}, false, []string{"/upper/many/../../../etc/x"}},
		{"empty name", func(im *ext4craft.Image) error {
			return im.Rename(lookup(im, "upper"), "small", nil)
		}, false, []string{"/upper/"}},
		{"duplicate names", func(im *ext4craft.Image) error {
			return im.Rename(lookup(im, "upper"), "fast", []byte("gone"))
		}, false, []string{"/upper/gone", "/upper/gone"}},
		{"endless extent tree", func(im *ext4craft.Image) error {
			return im.EndlessExtents(lookup(im, "upper/three-blocks"))
		}, true, nil},
		{"directory claiming 256 GiB", func(im *ext4craft.Image) error {
			return im.SetSize(lookup(im, "upper/many"), 256<<30)
		}, false, []string{"/upper/many/" + strings.Repeat("n", 20) + "0"}},
		{"file claiming 2^40 bytes", func(im *ext4craft.Image) error {
			return im.SetSize(lookup(im, "upper/small"), 1<<40)
		}, false, nil},
		{"the same blocks many times over", func(im *ext4craft.Image) error {
			return im.SharedExtents(lookup(im, "upper/three-blocks"))
		}, true, nil},
		{"unknown file type", func(im *ext4craft.Image) error {
			return im.SetMode(lookup(im, "upper/small"), 0o070644)
		}, true, nil},
		{"directory claiming to be a file", func(im *ext4craft.Image) error {
			return im.SetMode(lookup(im, "upper/many"), 0o100644)
		}, false, nil},
		{"file claiming to be a directory", func(im *ext4craft.Image) error {
			return im.SetMode(lookup(im, "upper/three-blocks"), 0o040755)
		}, true, nil},
		{"symlink claiming a huge target", func(im *ext4craft.Image) error {
			return im.SetSize(lookup(im, "upper/slow"), 1<<20)
		}, true, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img := craft(t, base, tc.edit)
			fsys := open(t, img)
			start := time.Now()
			names, err := walkAll(fsys)
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("walk took %s", d)
			}
			if tc.wantErr && !errors.Is(err, ErrCorrupt) {
				t.Errorf("walk = %v, want ErrCorrupt", err)
			}
			if !tc.wantErr && err != nil {
				t.Errorf("walk = %v, want no error", err)
			}
			joined := "\n" + strings.Join(names, "\n") + "\n"
			for _, w := range tc.wantNames {
				if !strings.Contains(joined, "\n"+w+"\n") {
					t.Errorf("walk did not report %q", w)
				}
				joined = strings.Replace(joined, "\n"+w+"\n", "\n", 1)
			}
			// A sound walk reads the image about once; a crafted one is
			// cut off by the budget.
			limit := 4 * int64(len(img))
			if tc.wantErr {
				limit = BudgetFactor*int64(len(img)) + BudgetSlack
			}
			if used := BudgetFactor*int64(len(img)) + BudgetSlack - fsys.budget.Load(); used > limit {
				t.Errorf("walk read %d bytes of a %d-byte image", used, len(img))
			}
		})
	}
}

// TestDamagedMetadataIsRefused flips bytes of each checksummed structure
// without fixing the checksum, and damages the superblock's geometry with
// the checksum fixed: each is refused with ErrCorrupt, never a panic.
func TestDamagedMetadataIsRefused(t *testing.T) {
	base := smallImage(t, "256K")
	flip := func(off int64) func([]byte) {
		return func(b []byte) { b[off] ^= 0x40 }
	}
	withSB := func(edit func(sb []byte)) func([]byte) {
		return func(b []byte) {
			sb := b[1024:2048]
			edit(sb)
			le.PutUint32(sb[0x3FC:], crc32c(^uint32(0), sb[:0x3FC]))
		}
	}
	fsys := open(t, base)
	small, err := fsys.Lookup("upper/small")
	if err != nil {
		t.Fatal(err)
	}
	g := (small.Ino - 1) / fsys.inodesPerGroup
	inodeOff := fsys.groups[g].inodeTable*fsys.blockSize + int64((small.Ino-1)%fsys.inodesPerGroup)*fsys.inodeSize
	many, _ := fsys.Lookup("upper/many")
	var dirBlock int64
	_ = fsys.Extents(many, func(e Extent) error { dirBlock = e.physical; return errors.New("stop") })
	cases := []struct {
		name   string
		damage func([]byte)
		at     string // "open" or "walk"
	}{
		{"superblock checksum", flip(1024 + 0x60 + 3), "open"},
		{"group descriptor checksum", flip(2048 + 8), "open"},
		{"inode checksum", flip(inodeOff + 0x10), "walk"},
		{"directory block checksum", flip(dirBlock + 20), "walk"},
		{"image truncated", nil, "open"},
		{"block size 2^40", withSB(func(sb []byte) { le.PutUint32(sb[24:], 30) }), "open"},
		{"no inodes per group", withSB(func(sb []byte) { le.PutUint32(sb[40:], 0) }), "open"},
		{"more blocks than the image", withSB(func(sb []byte) { le.PutUint32(sb[4:], 1<<30) }), "open"},
		{"inode size not a power of two", withSB(func(sb []byte) { le.PutUint16(sb[88:], 200) }), "open"},
		{"inodes count off", withSB(func(sb []byte) { le.PutUint32(sb[0:], le.Uint32(sb[0:])+1) }), "open"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img := bytes.Clone(base)
			if tc.damage != nil {
				tc.damage(img)
			} else {
				img = img[:len(img)/2]
			}
			fsys, err := Open(bytes.NewReader(img), int64(len(img)))
			if tc.at == "open" {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("Open = %v, want ErrCorrupt", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if _, err := walkAll(fsys); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") {
				t.Errorf("walk = %v, want a checksum error", err)
			}
		})
	}
}

// TestBudgetStopsRereading: however the image's metadata points at the
// same blocks again and again (many names for one big file, shared
// blocks), reading stops after BudgetFactor times the image's size.
func TestBudgetStopsRereading(t *testing.T) {
	img := smallImage(t, "256K")
	fsys := open(t, img)
	fsys.budget.Store(3 * int64(len(img))) // as if a walk had already read most of its share
	for i := 0; ; i++ {
		in, err := fsys.Lookup("upper/three-blocks")
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Lookup: %v", err)
			}
			break
		}
		if _, err := fsys.CopyData(context.Background(), in, discardAt{}); err != nil {
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "times its size") {
				t.Fatalf("CopyData = %v, want the budget's error", err)
			}
			break
		}
		if i > 10000 {
			t.Fatal("the budget never ran out")
		}
	}
}

func TestCopyDataStopsWhenCancelled(t *testing.T) {
	img := smallImage(t, "256K")
	fsys := open(t, img)
	in, err := fsys.Lookup("upper/three-blocks")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := fsys.CopyData(ctx, in, discardAt{}); !errors.Is(err, context.Canceled) {
		t.Errorf("CopyData with a cancelled context = %v", err)
	}
	if err := fsys.CopyFile(ctx, in, io.Discard); !errors.Is(err, context.Canceled) {
		t.Errorf("CopyFile with a cancelled context = %v", err)
	}
}
