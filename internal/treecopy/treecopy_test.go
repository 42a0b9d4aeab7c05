package treecopy

import (
	"archive/tar"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func openRoot(t *testing.T, dir string) *os.Root {
	t.Helper()
	r, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestRoundTripKeepsTreeModesTimesAndLinks(t *testing.T) {
	src := t.TempDir()
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	must(t, os.MkdirAll(filepath.Join(src, "tree/sub/empty"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "tree/a.sh"), []byte("#!/bin/sh\necho a\n"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "tree/sub/b"), bytes.Repeat([]byte{0, 1, 2, 255}, 300000), 0o640))
	must(t, os.Symlink("../a.sh", filepath.Join(src, "tree/sub/link")))
	must(t, os.Chtimes(filepath.Join(src, "tree/a.sh"), mtime, mtime))
	must(t, os.Chmod(filepath.Join(src, "tree/sub"), 0o750))
	must(t, os.Chtimes(filepath.Join(src, "tree/sub"), mtime, mtime))

	var buf bytes.Buffer
	st, err := Write(&buf, openRoot(t, src), "tree")
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 2 || st.Dirs != 3 || st.Links != 1 || st.Bytes != 1200000+17 {
		t.Fatalf("write stats %+v", st)
	}
	dst := t.TempDir()
	got, err := Extract(&buf, openRoot(t, dst), "copy", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if got != st {
		t.Fatalf("extract stats %+v, write stats %+v", got, st)
	}
	for _, c := range []struct {
		name string
		mode fs.FileMode
	}{
		{"copy/a.sh", 0o755}, {"copy/sub/b", 0o640}, {"copy/sub", fs.ModeDir | 0o750}, {"copy/sub/empty", fs.ModeDir | 0o755},
		{"copy/sub/link", fs.ModeSymlink | 0o777},
	} {
		fi, err := os.Lstat(filepath.Join(dst, c.name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != c.mode {
			t.Errorf("%s: mode %v, want %v", c.name, fi.Mode(), c.mode)
		}
	}
	for _, n := range []string{"copy/a.sh", "copy/sub"} {
		fi, _ := os.Stat(filepath.Join(dst, n))
		if !fi.ModTime().Equal(mtime) {
			t.Errorf("%s: mtime %v, want %v", n, fi.ModTime(), mtime)
		}
	}
	b, _ := os.ReadFile(filepath.Join(dst, "copy/sub/b"))
	if !bytes.Equal(b, bytes.Repeat([]byte{0, 1, 2, 255}, 300000)) {
		t.Error("file contents differ")
	}
	if l, _ := os.Readlink(filepath.Join(dst, "copy/sub/link")); l != "../a.sh" {
		t.Errorf("link target %q", l)
	}
	left, _ := filepath.Glob(filepath.Join(dst, "copy/*.tmp"))
	if len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestExtractReplacesFileAndMergesDirectory(t *testing.T) {
	dst := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(dst, "d/keep"), 0o755))
	must(t, os.WriteFile(filepath.Join(dst, "d/f"), []byte("old"), 0o644))
	stream := tarOf(t, dir("."), file("./f", "new"), file("./g", "g"))
	if _, err := Extract(bytes.NewReader(stream), openRoot(t, dst), "d", Limits{}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, "d/f")); string(b) != "new" {
		t.Errorf("f = %q", b)
	}
	if _, err := os.Stat(filepath.Join(dst, "d/keep")); err != nil {
		t.Error("merge removed an existing directory:", err)
	}
}

// A hostile sender: every stream must be refused, and nothing may appear
// outside the destination.
func TestExtractRefusesHostileStreams(t *testing.T) {
	huge := &tar.Header{Name: ".", Typeflag: tar.TypeReg, Size: 100 << 30, Mode: 0o644}
	cases := []struct {
		name    string
		entries []entry
		lim     Limits
		want    string
	}{
		{"dotdot", []entry{dir("."), file("./../escape", "x")}, Limits{}, `".."`},
		{"absolute", []entry{dir("."), file("/etc/escape", "x")}, Limits{}, "absolute"},
		{"through symlink", []entry{dir("."), link("./l", "/"), file("./l/escape", "x")}, Limits{}, ""},
		{"through relative symlink", []entry{dir("."), link("./l", "../.."), file("./l/escape", "x")}, Limits{}, ""},
		{"dir through symlink", []entry{dir("."), link("./l", "../.."), dir("./l/escape")}, Limits{}, ""},
		{"first not dot", []entry{file("escape", "x")}, Limits{}, `not "."`},
		{"second top", []entry{dir("."), dir(".")}, Limits{}, "after its top"},
		{"entries under a file", []entry{file(".", "x"), file("./escape", "x")}, Limits{}, "after its top"},
		{"bytes limit", []entry{dir("."), file("./a", "12345"), file("./b", "123456")}, Limits{MaxBytes: 10}, "over the copy limit"},
		{"entries limit", []entry{dir("."), file("./a", ""), file("./b", "")}, Limits{MaxEntries: 2}, "over the copy limit"},
		{"hardlink", []entry{dir("."), {hdr: &tar.Header{Name: "./h", Typeflag: tar.TypeLink, Linkname: "/etc/passwd"}}}, Limits{}, "not copied"},
		{"device", []entry{dir("."), {hdr: &tar.Header{Name: "./dev", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}}}, Limits{}, "not copied"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			outer := t.TempDir()
			dst := filepath.Join(outer, "dst")
			must(t, os.Mkdir(dst, 0o755))
			_, err := Extract(bytes.NewReader(tarOf(t, c.entries...)), openRoot(t, dst), "x", c.lim)
			if err == nil {
				t.Fatal("accepted")
			}
			if c.want != "" && !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q, want %q", err, c.want)
			}
			if c.lim != (Limits{}) && !errors.Is(err, ErrLimit) {
				t.Errorf("error %v is not ErrLimit", err)
			}
			ents, _ := os.ReadDir(outer)
			if len(ents) != 1 {
				t.Errorf("written outside the destination: %v", ents)
			}
			if _, err := os.Lstat("/escape"); err == nil {
				t.Error("/escape exists")
			}
		})
	}
	t.Run("header size over limit refused before reading", func(t *testing.T) {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		must(t, tw.WriteHeader(huge))
		// No body: a stream that claims 100 GiB is refused at its header.
		_, err := Extract(&buf, openRoot(t, t.TempDir()), "x", Limits{MaxBytes: 1 << 30})
		if !errors.Is(err, ErrLimit) {
			t.Fatalf("error %v, want ErrLimit", err)
		}
	})
}

func TestExtractStripsSetID(t *testing.T) {
	dst := t.TempDir()
	e := file(".", "#!/bin/sh\n")
	e.hdr.Mode = 0o4755
	if _, err := Extract(bytes.NewReader(tarOf(t, e)), openRoot(t, dst), "f", Limits{StripSetID: true}); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(filepath.Join(dst, "f"))
	if fi.Mode() != 0o755 {
		t.Errorf("mode %v, want -rwxr-xr-x", fi.Mode())
	}
}

func TestExtractRefusesTypeConflicts(t *testing.T) {
	dst := t.TempDir()
	must(t, os.Mkdir(filepath.Join(dst, "d"), 0o755))
	must(t, os.WriteFile(filepath.Join(dst, "f"), nil, 0o644))
	if _, err := Extract(bytes.NewReader(tarOf(t, file(".", "x"))), openRoot(t, dst), "d", Limits{}); err == nil {
		t.Error("a file replaced a directory")
	}
	if _, err := Extract(bytes.NewReader(tarOf(t, dir("."))), openRoot(t, dst), "f", Limits{}); err == nil {
		t.Error("a directory replaced a file")
	}
}

// FuzzExtract feeds arbitrary streams: Extract may refuse them, but never
// writes outside its root nor panics.
func FuzzExtract(f *testing.F) {
	f.Add(tarOfF(f, dir("."), file("./a", "x"), link("./l", "/etc"), file("./l/x", "y")))
	f.Add(tarOfF(f, file(".", "hello")))
	f.Add(tarOfF(f, dir("."), dir("./d"), file("./d/../../x", "y")))
	f.Fuzz(func(t *testing.T, data []byte) {
		outer := t.TempDir()
		dst := filepath.Join(outer, "dst")
		must(t, os.Mkdir(dst, 0o755))
		r := openRoot(t, dst)
		_, _ = Extract(bytes.NewReader(data), r, "x", Limits{MaxBytes: 1 << 20, MaxEntries: 1000, StripSetID: true})
		ents, _ := os.ReadDir(outer)
		if len(ents) != 1 {
			t.Fatalf("written outside the destination: %v", ents)
		}
	})
}

type entry struct {
	hdr  *tar.Header
	body string
}

func dir(n string) entry { return entry{hdr: &tar.Header{Name: n, Typeflag: tar.TypeDir, Mode: 0o755}} }
func file(n, body string) entry {
	return entry{hdr: &tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}, body: body}
}
func link(n, target string) entry {
	return entry{hdr: &tar.Header{Name: n, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}}
}

func tarOf(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		// Headers straight from the test, even invalid ones: PAX keeps
		// names tar.Writer would otherwise reject.
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(e.hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func tarOfF(f *testing.F, entries ...entry) []byte { return tarOf(f, entries...) }

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestKeepOwners: with KeepOwners, files, directories and links get the
// owners the stream has, and a setuid file keeps its bit through the
// chown; without it they are the caller's.
func TestKeepOwners(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("giving files away needs root")
	}
	src := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(filepath.Join(src, "home"), 0o755))
	must(os.WriteFile(filepath.Join(src, "home", "prog"), []byte("x"), 0o755))
	must(os.Symlink("prog", filepath.Join(src, "home", "link")))
	must(os.Lchown(filepath.Join(src, "home"), 1001, 1001))
	must(os.Lchown(filepath.Join(src, "home", "prog"), 1000, 1000))
	must(os.Chmod(filepath.Join(src, "home", "prog"), 0o755|os.ModeSetuid))
	must(os.Lchown(filepath.Join(src, "home", "link"), 1002, 1003))
	for _, keep := range []bool{true, false} {
		var buf bytes.Buffer
		sr, err := os.OpenRoot(src)
		must(err)
		_, err = WriteWithOwners(&buf, sr, ".")
		sr.Close()
		must(err)
		dst := t.TempDir()
		dr, err := os.OpenRoot(dst)
		must(err)
		_, err = Extract(&buf, dr, "out", Limits{KeepOwners: keep})
		dr.Close()
		must(err)
		for name, want := range map[string][2]uint32{"out/home": {1001, 1001}, "out/home/prog": {1000, 1000}, "out/home/link": {1002, 1003}} {
			fi, err := os.Lstat(filepath.Join(dst, name))
			must(err)
			st := fi.Sys().(*syscall.Stat_t)
			if !keep {
				want = [2]uint32{0, 0}
			}
			if st.Uid != want[0] || st.Gid != want[1] {
				t.Errorf("keep=%v: %s is %d:%d, want %d:%d", keep, name, st.Uid, st.Gid, want[0], want[1])
			}
		}
		fi, err := os.Stat(filepath.Join(dst, "out/home/prog"))
		must(err)
		if fi.Mode()&os.ModeSetuid == 0 {
			t.Errorf("keep=%v: the setuid bit was lost: %v", keep, fi.Mode())
		}
	}
}
