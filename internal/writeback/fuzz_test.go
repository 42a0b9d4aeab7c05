package writeback_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mvm-sh/mvm/internal/ext4"
	"github.com/mvm-sh/mvm/internal/ext4/ext4craft"
	"github.com/mvm-sh/mvm/internal/writeback"
)

// smallImage makes a small ext4 image (1 KiB blocks, metadata checksums,
// as mke2fs makes them) of the tree ents, then runs the debugfs commands
// cmds on it (for what mkfs -d cannot make without root), and returns its
// bytes.
func smallImage(t testing.TB, size string, ents []ent, cmds ...string) []byte {
	t.Helper()
	work := t.TempDir()
	src := filepath.Join(work, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		p := filepath.Join(src, e.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		var err error
		switch e.kind {
		case kFile:
			err = os.WriteFile(p, []byte(e.data), 0o644)
		case kDir:
			err = os.Mkdir(p, 0o755)
		case kSymlink:
			err = os.Symlink(e.target, p)
		case kHardlink:
			err = os.Link(filepath.Join(src, e.target), p)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(work, "img")
	for _, args := range [][]string{
		{"truncate", "-s", size, img},
		{"mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "64", "-O", "^has_journal,^resize_inode", "-d", src, img},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%q: %v\n%s", args, err, out)
		}
	}
	if len(cmds) > 0 {
		script := filepath.Join(work, "cmds")
		if err := os.WriteFile(script, []byte(strings.Join(cmds, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("debugfs", "-w", "-f", script, img).CombinedOutput(); err != nil {
			t.Fatalf("debugfs: %v\n%s", err, out)
		}
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openBytes(t testing.TB, b []byte) (*ext4.FS, error) {
	t.Helper()
	return ext4.Open(bytes.NewReader(b), int64(len(b)))
}

type memDev []byte

func (m memDev) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m)) {
		return 0, io.EOF
	}
	return copy(p, m[off:]), nil
}

func (m memDev) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }

// FuzzChangeSet applies fuzzed scratch images (an upper layer) to a fresh
// share beside a directory it must never touch, against a fixed lower
// image. Whatever the bytes: no panic, an error of a known class or a
// write-back, and the neighbouring directory unchanged. The seeds are
// upper layers as an overlay leaves them (whiteouts, an opaque directory,
// hard links, a fifo, a device node), made with mkfs.ext4 -d and debugfs,
// and their crafted variants.
//
//	go test -run '^$' -fuzz FuzzChangeSet -fuzztime 30s -fuzzminimizetime 5s ./internal/writeback/
func FuzzChangeSet(f *testing.F) {
	lower, err := openBytes(f, smallImage(f, "96K", []ent{
		file("gone", "g"), dir("tree"), file("tree/a", "a"), dir("op"), file("op/old", "o"), file("mod", "old"),
	}))
	if err != nil {
		f.Fatal(err)
	}
	base := smallImage(f, "96K", []ent{
		dir("upper"), dir("work"),
		file("upper/mod", "new content"),
		file("upper/"+long, "x"),
		dir("upper/op"), file("upper/op/new", "n"),
		dir("upper/d"), file("upper/d/f", "f"), hardlink("upper/d/g", "upper/d/f"),
		symlink("upper/link", "../outside"),
		file("upper/three", strings.Repeat("0123456789abcdef", 3*1024/16)),
	}, "cd upper", "mknod gone c 0 0", "mknod pipe p", "mknod disk b 8 0",
		"ea_set op trusted.overlay.opaque y", "cd /", "mknod upper/tree c 0 0")
	f.Add(base)
	// The seed itself is a sound change set: it applies.
	if up, err := openBytes(f, base); err != nil {
		f.Fatal(err)
	} else if st, err := writeback.Apply(context.Background(), up, lower, f.TempDir()); err != nil || st.Links != 1 || st.Devices != 1 || st.Written < 5 {
		f.Fatalf("the seed change set: %+v, %v", st, err)
	}
	for _, edit := range []func(im *ext4craft.Image) error{
		func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper"), long, []byte("../../outside/x")) },
		func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper"), "link", []byte("d")) },
		func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper"), "pipe", nil) },
		func(im *ext4craft.Image) error { return im.SetEntryIno(ino(im, "upper/d"), "g", ino(im, "upper")) },
		func(im *ext4craft.Image) error { return im.EndlessExtents(ino(im, "upper/three")) },
		func(im *ext4craft.Image) error { return im.SharedExtents(ino(im, "upper/three")) },
		func(im *ext4craft.Image) error { return im.SetSize(ino(im, "upper/op"), 256<<30) },
	} {
		m := memDev(bytes.Clone(base))
		im, err := ext4craft.Open(m)
		if err != nil {
			f.Fatal(err)
		}
		if err := edit(im); err != nil {
			f.Fatal(err)
		}
		f.Add([]byte(m))
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		upper, err := openBytes(t, img)
		if err != nil {
			return
		}
		work := t.TempDir()
		share, outside := filepath.Join(work, "share"), filepath.Join(work, "outside")
		for _, d := range []string{share, outside} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		writeFile(t, filepath.Join(outside, "x"), "outside", tHost)
		writeFile(t, filepath.Join(share, "mod"), "old", tHost)
		if err := os.Symlink(outside, filepath.Join(share, "tree")); err != nil {
			t.Fatal(err)
		}
		before := snapshot(t, outside)
		_, err = writeback.Apply(context.Background(), upper, lower, share)
		var ice *writeback.InvalidChangeSetError
		var nse *writeback.NoSpaceError
		if err != nil && !errors.As(err, &ice) && !errors.As(err, &nse) && !strings.Contains(err.Error(), "write back") {
			t.Fatalf("Apply: an error of no known class: %v", err)
		}
		if diff := cmp.Diff(before, snapshot(t, outside)); diff != "" {
			t.Fatalf("the directory beside the share changed (-before +after):\n%s", diff)
		}
		if ents, _ := os.ReadDir(work); len(ents) != 2 {
			t.Fatalf("the write-back made %d entries beside the share", len(ents)-2)
		}
	})
}
