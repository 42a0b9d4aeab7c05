package ext4

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mkfs builds an ext4 image from dir with the host's mke2fs, the tool
// mvm itself uses, and opens it.
func mkfs(t *testing.T, dir string, extra ...string) (*FS, string) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "fs.img")
	args := append([]string{"-q", "-F", "-b", "4096", "-d", dir}, extra...)
	args = append(args, img, "64M")
	if out, err := exec.Command("mkfs.ext4", args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	return fsys, img
}

func write(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func read(t *testing.T, fsys *FS, in *Inode) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := fsys.CopyFile(context.Background(), in, &b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestFilesRoundTrip(t *testing.T) {
	src := t.TempDir()
	files := map[string][]byte{
		"empty":                  {},
		"one":                    {'x'},
		"block":                  random(t, 4096),
		"big":                    random(t, 3<<20+17),
		"dir/sub/deep":           random(t, 12345),
		"with space":             []byte("s"),
		"new\nline":              []byte("n"),
		"ünïcödé ✓":              []byte("u"),
		"dir/mode600":            []byte("secret"),
		strings.Repeat("n", 255): []byte("long name"),
	}
	for name, data := range files {
		mode := os.FileMode(0o644)
		if strings.HasSuffix(name, "mode600") {
			mode = 0o600
		}
		write(t, filepath.Join(src, name), data, mode)
	}
	mtime := time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)
	if err := os.Chtimes(filepath.Join(src, "one"), mtime, mtime); err != nil {
		t.Fatal(err)
	}
	fsys, img := mkfs(t, src)
	for name, data := range files {
		in, err := fsys.Lookup(name)
		if err != nil {
			t.Fatalf("Lookup(%q): %v", name, err)
		}
		if !in.Mode.IsRegular() || in.Size != int64(len(data)) {
			t.Errorf("%q: mode %v size %d, want regular of %d", name, in.Mode, in.Size, len(data))
		}
		if got := read(t, fsys, in); !bytes.Equal(got, data) {
			t.Errorf("%q: content differs (%d bytes read)", name, len(got))
		}
	}
	in, _ := fsys.Lookup("dir/mode600")
	if in.Mode.Perm() != 0o600 {
		t.Errorf("mode600 perm %v", in.Mode.Perm())
	}
	// mke2fs -d keeps whole seconds; a kernel writing the file stores
	// nanoseconds too, which debugfs can set the same way.
	in, _ = fsys.Lookup("one")
	if !in.Mtime.Equal(mtime.Truncate(time.Second)) {
		t.Errorf("mtime %v, want %v", in.Mtime, mtime.Truncate(time.Second))
	}
	if out, err := exec.Command("debugfs", "-w", "-R", "sif /one mtime_extra 493827156", img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	in, _ = fsys.Lookup("one")
	if !in.Mtime.Equal(mtime) {
		t.Errorf("mtime %v, want %v (nanoseconds from the extra field)", in.Mtime, mtime)
	}
	if _, err := fsys.Lookup("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Lookup(missing) = %v", err)
	}
}

func TestSparseFileWithExtentTree(t *testing.T) {
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	// Twenty separate extents: more than the four the inode holds, so the
	// tree gets an index level.
	want := make([]byte, 20<<20+1)
	for i := 0; i < 20; i++ {
		off := int64(i) << 20
		chunk := random(t, 4096)
		copy(want[off:], chunk)
		if _, err := f.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteAt([]byte{0}, 20<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	fsys, _ := mkfs(t, src)
	in, err := fsys.Lookup("sparse")
	if err != nil {
		t.Fatal(err)
	}
	if got := read(t, fsys, in); !bytes.Equal(got, want) {
		t.Fatal("sparse file content differs")
	}
}

func TestDirectoriesSymlinksSpecials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("device nodes and trusted.* xattrs in the source tree need root")
	}
	src := t.TempDir()
	// Enough entries for an htree-indexed directory.
	var names []string
	for i := 0; i < 3000; i++ {
		n := filepath.Join("many", strings.Repeat("f", i%40)+"-"+string(rune('a'+i%26))+"-"+itoa(i))
		write(t, filepath.Join(src, n), nil, 0o644)
		names = append(names, filepath.Base(n))
	}
	long := strings.Repeat("t/", 60) + "end"
	for name, target := range map[string]string{"short": "target", "long": long} {
		if err := os.Symlink(target, filepath.Join(src, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mknod(filepath.Join(src, "whiteout"), unix.S_IFCHR|0o644, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(src, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(src, "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "opaque"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(src, "opaque"), "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		t.Fatal(err)
	}
	fsys, _ := mkfs(t, src)

	dir, err := fsys.Lookup("many")
	if err != nil {
		t.Fatal(err)
	}
	ents, err := fsys.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name)
	}
	sort.Strings(got)
	sort.Strings(names)
	if strings.Join(got, "\n") != strings.Join(names, "\n") {
		t.Errorf("large directory: %d names read, want %d", len(got), len(names))
	}

	for name, want := range map[string]string{"short": "target", "long": long} {
		in, err := fsys.Lookup(name)
		if err != nil {
			t.Fatal(err)
		}
		if target, err := fsys.Readlink(in); err != nil || target != want {
			t.Errorf("Readlink(%s) = %q, %v", name, target, err)
		}
	}
	wh, _ := fsys.Lookup("whiteout")
	null, _ := fsys.Lookup("null")
	if !wh.IsWhiteout() || null.IsWhiteout() || null.Major != 1 || null.Minor != 3 {
		t.Errorf("devices: whiteout %v %d:%d, null %v %d:%d", wh.Mode, wh.Major, wh.Minor, null.Mode, null.Major, null.Minor)
	}
	if fifo, _ := fsys.Lookup("fifo"); fifo.Mode&fs.ModeNamedPipe == 0 {
		t.Errorf("fifo mode %v", fifo.Mode)
	}
	op, _ := fsys.Lookup("opaque")
	if v, ok, err := fsys.Xattr(op, "trusted.overlay.opaque"); err != nil || !ok || string(v) != "y" {
		t.Errorf("opaque xattr = %q %v %v", v, ok, err)
	}
	if _, ok, _ := fsys.Xattr(dir, "trusted.overlay.opaque"); ok {
		t.Error("a plain directory reported the opaque xattr")
	}
}

func TestRefusesUnrecoveredJournalAndGarbage(t *testing.T) {
	if _, err := Open(bytes.NewReader(make([]byte, 8192)), 8192); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Open of zeros = %v, want ErrCorrupt", err)
	}
	src := t.TempDir()
	_, img := mkfs(t, src)
	// Mark the journal as needing recovery, as a crashed guest leaves it.
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4)
	if _, err := f.ReadAt(b, 1024+96); err != nil {
		t.Fatal(err)
	}
	b[0] |= incompatRecover
	if _, err := f.WriteAt(b, 1024+96); err != nil {
		t.Fatal(err)
	}
	fixSuperblockCsum(t, f)
	fi, _ := f.Stat()
	if _, err := Open(f, fi.Size()); !errors.Is(err, ErrNeedsRecovery) {
		t.Errorf("Open = %v, want ErrNeedsRecovery", err)
	}
}

func itoa(i int) string {
	const digits = "0123456789"
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{digits[i%10]}, b...)
	}
	return string(b)
}

// fixSuperblockCsum recomputes the superblock checksum after a test
// changed the superblock, as a guest rewriting its disk would.
func fixSuperblockCsum(t *testing.T, f *os.File) {
	t.Helper()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		t.Fatal(err)
	}
	le.PutUint32(sb[0x3FC:], crc32c(^uint32(0), sb[:0x3FC]))
	if _, err := f.WriteAt(sb, 1024); err != nil {
		t.Fatal(err)
	}
}
