package dirimage

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
)

// staging is content for a Builder's files, appended to one file as a
// layer's would be.
type staging struct {
	t *testing.T
	f *os.File
}

func newStaging(t *testing.T) *staging {
	f, err := os.Create(filepath.Join(t.TempDir(), "staged"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &staging{t: t, f: f}
}

func (s *staging) data(b []byte) Data {
	off, err := s.f.Seek(0, 2)
	if err != nil {
		s.t.Fatal(err)
	}
	if _, err := s.f.Write(b); err != nil {
		s.t.Fatal(err)
	}
	return Data{R: s.f, Off: off, Size: int64(len(b))}
}

// fromHost adds the tree under root to a Builder, as a layer's tar
// stream would describe it: parents before children, content staged.
func fromHost(t *testing.T, root string, b *Builder, s *staging) {
	t.Helper()
	seen := map[uint64]string{}
	err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		e := Entry{Mode: st.Mode, UID: st.Uid, GID: st.Gid,
			Mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec), Atime: time.Unix(st.Atim.Sec, st.Atim.Nsec)}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			if first, ok := seen[st.Ino]; ok {
				return b.Link(rel, first)
			}
			seen[st.Ino] = rel
			c, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.Data = s.data(c)
		case unix.S_IFLNK:
			if e.Target, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			e.Major, e.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
		}
		return b.Add(rel, e)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func openImage(t *testing.T, img string) *ext4.FS {
	t.Helper()
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
	return fsys
}

// TestBuilderMatchesScan: a tree given to a Builder entry by entry, its
// content staged, makes the image the host directory makes, with the
// same digest; and the digest changes with anything the guest sees.
func TestBuilderMatchesScan(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "empty"), nil, 0o644)
	writeFile(t, filepath.Join(src, "a/b/deep"), pattern(10000, 3), 0o755)
	writeFile(t, filepath.Join(src, "zeros"), make([]byte, 3*4096+5), 0o600)
	mixed := pattern(5*4096, 4)
	clear(mixed[4096 : 3*4096])
	writeFile(t, filepath.Join(src, "a/mixed"), mixed, 0o4755)
	if err := os.Link(filepath.Join(src, "a/mixed"), filepath.Join(src, "linked")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a/b/deep", filepath.Join(src, "short")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(strings.Repeat("long/", 30), filepath.Join(src, "a/long")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(src, "fifo"), 0o620); err != nil {
		t.Fatal(err)
	}
	for i := range 300 { // a hash-tree directory
		writeFile(t, filepath.Join(src, "many", strings.Repeat("n", i%50)+string(rune('a'+i%26))+string(rune('0'+i/26))), []byte{byte(i)}, 0o644)
	}
	if err := os.Lchown(filepath.Join(src, "a/b"), 1000, 1001); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"a/b", "a", "many", "."} {
		setTimes(t, filepath.Join(src, p), time.Unix(1700000000, 5), time.Unix(1600000000, 123456789))
	}

	dir := t.TempDir()
	hostImg := filepath.Join(dir, "host.img")
	hostStats, err := BuildDir(context.Background(), src, hostImg, Options{Label: "host", Digest: true})
	if err != nil {
		t.Fatal(err)
	}
	b := NewBuilder()
	fromHost(t, src, b, newStaging(t))
	img := filepath.Join(dir, "built.img")
	st, err := b.Write(context.Background(), img, Options{Label: "built", Digest: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(st.Digest, "sha256:") || len(st.Digest) != 71 {
		t.Fatalf("digest %q", st.Digest)
	}
	if st != hostStats {
		t.Errorf("builder stats %+v, scan stats %+v", st, hostStats)
	}
	compareTrees(t, describeImage(t, openImage(t, hostImg)), describeImage(t, openImage(t, img)))

	// Written again: the same digest (the image differs: its UUID).
	again, err := b.Write(context.Background(), img+"2", Options{Digest: true})
	if err != nil || again.Digest != st.Digest {
		t.Errorf("second write: digest %s (%v), want %s", again.Digest, err, st.Digest)
	}
	// Access times do not count.
	b2 := NewBuilder()
	fromHost(t, src, b2, newStaging(t))
	if err := b2.Add("a/b", Entry{Mode: unix.S_IFDIR | 0o755, UID: 1000, GID: 1001, Mtime: time.Unix(1600000000, 123456789), Atime: time.Unix(5, 0)}); err != nil {
		t.Fatal(err)
	}
	if got, err := b2.Write(context.Background(), img+"3", Options{Digest: true}); err != nil || got.Digest != st.Digest {
		t.Errorf("another atime: digest %s (%v), want %s", got.Digest, err, st.Digest)
	}
	// Anything the guest sees changes it.
	s := newStaging(t)
	for i, change := range []func(*Builder) error{
		func(b *Builder) error { // the group alone
			return b.Add("a/b", Entry{Mode: unix.S_IFDIR | 0o755, UID: 1000, GID: 1002, Mtime: time.Unix(1600000000, 123456789)})
		},
		func(b *Builder) error { // the mtime alone
			return b.Add("a/b", Entry{Mode: unix.S_IFDIR | 0o755, UID: 1000, GID: 1001, Mtime: time.Unix(1600000000, 123456788)})
		},
		func(b *Builder) error {
			return b.Add("empty", Entry{Mode: unix.S_IFREG | 0o644, Data: s.data([]byte{0})})
		},
		func(b *Builder) error { return b.Remove("fifo") },
		func(b *Builder) error {
			return b.Add("fifo", Entry{Mode: unix.S_IFIFO | 0o620, Xattrs: map[string][]byte{"user.x": []byte("1")}})
		},
		func(b *Builder) error {
			return b.Add("zeros", Entry{Mode: unix.S_IFREG | 0o600, Data: s.data(make([]byte, 3*4096+6))})
		},
	} {
		b := NewBuilder()
		fromHost(t, src, b, newStaging(t))
		if err := change(b); err != nil {
			t.Fatal(err)
		}
		got, err := b.Write(context.Background(), filepath.Join(dir, "changed.img"), Options{Digest: true})
		if err != nil {
			t.Fatal(err)
		}
		if got.Digest == st.Digest {
			t.Errorf("change %d left the digest as it was", i)
		}
	}
}

// TestBuilderKeepsWhatHostsCannot: owners, device nodes, set-ID bits and
// extended attributes come from the entries, not from the host.
func TestBuilderKeepsWhatHostsCannot(t *testing.T) {
	s := newStaging(t)
	b := NewBuilder()
	mtime := time.Unix(1500000000, 42)
	add := func(p string, e Entry) {
		t.Helper()
		e.Mtime = mtime
		if err := b.Add(p, e); err != nil {
			t.Fatal(err)
		}
	}
	add(".", Entry{Mode: unix.S_IFDIR | 0o700, UID: 7, GID: 8})
	add("dev/null", Entry{Mode: unix.S_IFCHR | 0o666, Major: 1, Minor: 3})
	add("dev/sda", Entry{Mode: unix.S_IFBLK | 0o660, GID: 6, Major: 8, Minor: 0})
	add("dev/big", Entry{Mode: unix.S_IFCHR | 0o600, Major: 300, Minor: 70000})
	add("usr/bin/su", Entry{Mode: unix.S_IFREG | 0o4755, Data: s.data([]byte("#!su"))})
	add("home/u/f", Entry{Mode: unix.S_IFREG | 0o640, UID: 100000, GID: 65534, Data: s.data([]byte("mine")),
		Xattrs: map[string][]byte{"security.capability": {1, 2, 3}, "user.note": []byte("hello")}})
	add("sock", Entry{Mode: unix.S_IFSOCK | 0o755})
	img := filepath.Join(t.TempDir(), "img")
	if _, err := b.Write(context.Background(), img, Options{Label: "x"}); err != nil {
		t.Fatal(err)
	}
	fsys := openImage(t, img)
	got := describeImage(t, fsys)
	m := "mtime 1500000000.000000042"
	want := map[string]string{
		".":          "mode 40700 uid 7 gid 8 " + m + " links 5",
		"dev":        "mode 40755 uid 0 gid 0 " + m + " links 2",
		"dev/null":   "mode 20666 uid 0 gid 0 " + m + " dev 1:3",
		"dev/sda":    "mode 60660 uid 0 gid 6 " + m + " dev 8:0",
		"dev/big":    "mode 20600 uid 0 gid 0 " + m + " dev 300:70000",
		"usr":        "mode 40755 uid 0 gid 0 " + m + " links 3",
		"usr/bin":    "mode 40755 uid 0 gid 0 " + m + " links 2",
		"usr/bin/su": "mode 104755 uid 0 gid 0 " + m + " size 4",
		"home":       "mode 40755 uid 0 gid 0 " + m + " links 3",
		"home/u":     "mode 40755 uid 0 gid 0 " + m + " links 2",
		"home/u/f":   "mode 100640 uid 100000 gid 65534 " + m + " size 4",
		"sock":       "mode 140755 uid 0 gid 0 " + m,
	}
	for k, d := range got {
		if i := strings.Index(d, " sha "); i >= 0 {
			got[k] = d[:i] // content: checked below
		}
	}
	compareTrees(t, want, got)
	f, err := fsys.Lookup("home/u/f")
	if err != nil {
		t.Fatal(err)
	}
	if f.UID != 100000 || f.GID != 65534 || f.Mode.Perm() != 0o640 {
		t.Errorf("home/u/f: uid %d gid %d mode %v", f.UID, f.GID, f.Mode)
	}
	var buf bytes.Buffer
	if err := fsys.CopyFile(context.Background(), f, &buf); err != nil || buf.String() != "mine" {
		t.Errorf("home/u/f content %q (%v)", buf.String(), err)
	}
	for name, want := range map[string]string{"security.capability": "\x01\x02\x03", "user.note": "hello"} {
		v, ok, err := fsys.Xattr(f, name)
		if err != nil || !ok || string(v) != want {
			t.Errorf("xattr %s = %q, %v, %v; want %q", name, v, ok, err, want)
		}
	}
	su, err := fsys.Lookup("usr/bin/su")
	if err != nil || su.Mode&fs.ModeSetuid == 0 {
		t.Errorf("usr/bin/su: %v %v", su, err)
	}
}

// TestBuilderPaths: how entries find their place, and what is refused.
func TestBuilderPaths(t *testing.T) {
	s := newStaging(t)
	file := func(c string) Entry { return Entry{Mode: unix.S_IFREG | 0o644, Data: s.data([]byte(c))} }
	dir := Entry{Mode: unix.S_IFDIR | 0o755}
	link := func(target string) Entry { return Entry{Mode: unix.S_IFLNK | 0o777, Target: target} }
	b := NewBuilder()
	steps := []struct {
		op   func() error
		fail error // nil: must succeed
	}{
		{func() error { return b.Add("usr/lib/x", file("x")) }, nil},
		{func() error { return b.Add("lib", link("usr/lib")) }, nil},
		{func() error { return b.Add("lib/y", file("y")) }, nil},             // through the symlink
		{func() error { return b.Add("abs", link("/usr/../usr/lib")) }, nil}, // absolute, with ..
		{func() error { return b.Add("abs/z", file("z")) }, nil},
		{func() error { return b.Add("up", link("../../../../usr")) }, nil}, // .. stops at the root
		{func() error { return b.Add("up/lib/w", file("w")) }, nil},
		{func() error { return b.Add("./a//b/./c", file("c")) }, nil},
		{func() error { return b.Add("a/b", dir) }, nil}, // a directory again: content kept
		{func() error { return b.Add("../escape", file("e")) }, ErrPath},
		{func() error { return b.Add("a/../../escape", file("e")) }, ErrPath},
		{func() error { return b.Add("usr/lib/x/under", file("u")) }, ErrPath},
		{func() error { return b.Add("loop1", link("loop2")) }, nil},
		{func() error { return b.Add("loop2", link("loop1")) }, nil},
		{func() error { return b.Add("loop1/f", file("l")) }, ErrPath},
		{func() error { return b.Add("nul\x00", file("n")) }, ErrPath},
		{func() error { return b.Add(strings.Repeat("n", 256), file("n")) }, ErrPath},
		{func() error { return b.Add("bad", link("")) }, ErrPath},
		{func() error { return b.Add(".", file("root")) }, ErrPath},
		{func() error { return b.Link("hard", "usr/lib/x") }, nil},
		{func() error { return b.Link("hard2", "lib/x") }, nil}, // the target's directories are followed
		{func() error { return b.Link("h3", "missing") }, fs.ErrNotExist},
		{func() error { return b.Link("h4", "usr") }, ErrPath},
		{func() error { return b.Link("h5", "../x") }, ErrPath},
		{func() error { return b.Add("gone/dir/f", file("g")) }, nil},
		{func() error { return b.Remove("gone") }, nil},
		{func() error { return b.Remove("never/was") }, nil},
		{func() error { return b.Add("opaque/old", file("o")) }, nil},
		{func() error { return b.Clear("opaque") }, nil},
		{func() error { return b.Add("opaque/new", file("n")) }, nil},
		{func() error { return b.Add("replaced/f", file("r")) }, nil},
		{func() error { return b.Add("replaced", file("now a file")) }, nil},
		{func() error { return b.Add("sym-replaced", link("usr")) }, nil},
		{func() error { return b.Remove("sym-replaced") }, nil}, // the link, not usr
	}
	for i, st := range steps {
		err := st.op()
		if st.fail == nil && err != nil {
			t.Errorf("step %d: %v", i, err)
		}
		if st.fail != nil && !errors.Is(err, st.fail) {
			t.Errorf("step %d: error %v, want %v", i, err, st.fail)
		}
	}
	img := filepath.Join(t.TempDir(), "img")
	if _, err := b.Write(context.Background(), img, Options{}); err != nil {
		t.Fatal(err)
	}
	fsys := openImage(t, img)
	var paths []string
	for p := range describeImage(t, fsys) {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	want := []string{".", "a", "a/b", "a/b/c", "abs", "hard", "hard2", "lib", "loop1", "loop2",
		"opaque", "opaque/new", "replaced", "up", "usr", "usr/lib", "usr/lib/w", "usr/lib/x", "usr/lib/y", "usr/lib/z"}
	if !slices.Equal(paths, want) {
		t.Errorf("paths %v\nwant  %v", paths, want)
	}
	x, err := fsys.Lookup("usr/lib/x")
	if err != nil || x.Nlink != 3 {
		t.Fatalf("usr/lib/x: %v (%v), want 3 links (x, hard, hard2)", x, err)
	}
	for _, p := range []string{"hard", "hard2"} {
		if in, err := fsys.Lookup(p); err != nil || in.Ino != x.Ino {
			t.Errorf("%s is not usr/lib/x: %v %v", p, in, err)
		}
	}
	if r, err := fsys.Lookup("replaced"); err != nil || !r.Mode.IsRegular() {
		t.Errorf("replaced: %v %v", r, err)
	}
	if in, err := fsys.Lookup("usr"); err != nil || !in.Mode.IsDir() {
		t.Errorf("usr after removing a symlink to it: %v %v", in, err)
	}
}

// TestBuilderLimits: the number of files is bounded, and removed files
// do not count.
func TestBuilderLimits(t *testing.T) {
	s := newStaging(t)
	b := NewBuilder()
	b.SetMaxNodes(10)
	f := Entry{Mode: unix.S_IFREG | 0o644, Data: s.data(nil)}
	for i := range 9 {
		if err := b.Add("d/f"+string(rune('a'+i)), f); err != nil && i < 8 {
			t.Fatalf("file %d: %v", i, err)
		}
	}
	if err := b.Add("d/more", f); !errors.Is(err, ErrTooManyFiles) {
		t.Fatalf("11th file: %v, want ErrTooManyFiles", err)
	}
	if err := b.Remove("d"); err != nil {
		t.Fatal(err)
	}
	if b.Len() != 1 {
		t.Errorf("Len %d after removing everything", b.Len())
	}
	for i := range 9 {
		if err := b.Add("again"+string(rune('a'+i)), f); err != nil {
			t.Fatalf("after removal, file %d: %v", i, err)
		}
	}
	// Content that is not all there.
	b = NewBuilder()
	if err := b.Add("short", Entry{Mode: unix.S_IFREG | 0o644, Data: Data{R: s.f, Off: 0, Size: 1 << 20}}); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "img")
	if _, err := b.Write(context.Background(), img, Options{}); err == nil {
		t.Error("content beyond the end of its file: no error")
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("failed write left %s (%v)", img, err)
	}
	if err := b.Add("bad", Entry{Mode: unix.S_IFREG | 0o644, Xattrs: map[string][]byte{"system.nfs4_acl": nil}}); err == nil {
		t.Error("unsupported xattr namespace accepted")
	}
	if err := b.Add("bad", Entry{Mode: unix.S_IFREG | 0o644, Xattrs: map[string][]byte{"user.big": make([]byte, 5000)}}); err == nil {
		t.Error("xattr larger than a block accepted")
	}
	if err := b.Add("bad", Entry{Mode: 0o170644}); err == nil {
		t.Error("unknown file type accepted")
	}
}
