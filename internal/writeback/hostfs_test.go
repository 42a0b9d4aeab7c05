package writeback

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// withoutOpenat2 runs f as on a kernel without openat2.
func withoutOpenat2(t *testing.T, f func()) {
	t.Helper()
	old := openat2
	openat2 = func(int, string, *unix.OpenHow) (int, error) { return -1, unix.ENOSYS }
	noOpenat2.Store(false)
	defer func() { openat2 = old; noOpenat2.Store(false) }()
	f()
	if !noOpenat2.Load() {
		t.Error("ENOSYS from openat2 did not switch to the fallback")
	}
}

func openRoot(t *testing.T, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func TestOpenBeneathRefusesSymlinksAtAnyDepth(t *testing.T) {
	for _, mode := range []string{"openat2", "fallback"} {
		t.Run(mode, func(t *testing.T) {
			work := t.TempDir()
			share, outside := filepath.Join(work, "share"), filepath.Join(work, "outside")
			for _, d := range []string{filepath.Join(share, "a/b/c"), filepath.Join(outside, "b/c")} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Symlink(outside, filepath.Join(share, "l")); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(outside, filepath.Join(share, "a/l")); err != nil {
				t.Fatal(err)
			}
			root := openRoot(t, share)
			check := func() {
				fd, err := openBeneath(root, []string{"a", "b", "c"})
				if err != nil {
					t.Errorf("a/b/c: %v", err)
				} else {
					unix.Close(fd)
				}
				for _, parts := range [][]string{{"l"}, {"l", "b"}, {"a", "l", "b", "c"}, {"a", ".."}, {".."}, {"a/b"}} {
					if fd, err := openBeneath(root, parts); err == nil {
						unix.Close(fd)
						t.Errorf("%q opened", parts)
					}
				}
			}
			if mode == "fallback" {
				withoutOpenat2(t, check)
			} else {
				check()
			}
		})
	}
}

func TestRemoveAtNeverFollows(t *testing.T) {
	work := t.TempDir()
	share, outside := filepath.Join(work, "share"), filepath.Join(work, "outside")
	if err := os.MkdirAll(filepath.Join(share, "d/e"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "precious"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"link", "d/link", "d/e/link"} {
		if err := os.Symlink(outside, filepath.Join(share, l)); err != nil {
			t.Fatal(err)
		}
	}
	root := openRoot(t, share)
	for _, name := range []string{"link", "d", "missing"} {
		if _, err := removeAt(root, name); err != nil {
			t.Fatalf("removeAt(%s): %v", name, err)
		}
	}
	if ents, err := os.ReadDir(share); err != nil || len(ents) != 0 {
		t.Errorf("share after removing everything: %v, %v", ents, err)
	}
	if b, err := os.ReadFile(filepath.Join(outside, "precious")); err != nil || string(b) != "x" {
		t.Errorf("file outside the share: %q, %v", b, err)
	}
}

func TestCheckName(t *testing.T) {
	long := strings.Repeat("x", 255)
	for name, bad := range map[string]bool{
		"ok": false, "with space": false, "new\nline": false, "ünï": false, long: false, "...": false, "-": false,
		"": true, ".": true, "..": true, "a/b": true, "/": true, "a\x00b": true, long + "x": true,
	} {
		if got := checkName(name) != ""; got != bad {
			t.Errorf("checkName(%q) invalid = %v, want %v", name, got, bad)
		}
	}
}

func TestFirstLines(t *testing.T) {
	out := "img: Entry 'a\x1b[2Jb' in /upper (12) has illegal characters in its name.\n\n\nimg: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.\n\t(i.e., without -a or -p options)\n"
	want := `img: Entry 'a\x1b[2Jb' in /upper (12) has illegal characters in its name.; img: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.; (i.e., without -a or -p options)`
	if got := firstLines(out, 6); got != want {
		t.Errorf("firstLines = %q\nwant %q", got, want)
	}
	if got := firstLines("1\n2\n3\n", 2); got != "1; 2; ..." {
		t.Errorf("firstLines(3 lines, 2) = %q", got)
	}
}
