package writeback_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
	"github.com/mvm-sh/mvm/internal/ext4/ext4craft"
	"github.com/mvm-sh/mvm/internal/writeback"
)

// edit rewrites the fixture's scratch image as a guest with root on its
// raw disk can (checksums kept valid), and reopens it.
func (f *fixture) edit(t *testing.T, fn func(im *ext4craft.Image) error) {
	t.Helper()
	img, err := os.OpenFile(f.upperImg, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	im, err := ext4craft.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := fn(im); err != nil {
		t.Fatal(err)
	}
	f.upper = open(t, f.upperImg)
}

func ino(im *ext4craft.Image, path string) uint32 {
	n, err := im.Lookup(path)
	if err != nil {
		panic(err)
	}
	return n
}

// outsideDir makes a directory beside the share, with content, for
// checking that a write-back never reaches it.
func outsideDir(t *testing.T, f *fixture) (string, map[string]node) {
	t.Helper()
	out := filepath.Join(filepath.Dir(f.host), "outside")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(out, "x"), "outside", tHost)
	writeFile(t, filepath.Join(out, "f"), "outside f", tHost)
	return out, snapshot(t, out)
}

var long = strings.Repeat("A", 60)

// TestInvalidChangeSets: each change set the guest crafted is refused as a
// whole with *InvalidChangeSetError naming the entry and the reason; the
// share and its siblings are left exactly as they were, the valid
// entries of the set included.
func TestInvalidChangeSets(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		upper    []ent
		edit     func(im *ext4craft.Image) error
		wantPath string
		want     string // in the reason
	}{
		{"dot-dot path in a name", []ent{file("sub/"+long, "evil")},
			func(im *ext4craft.Image) error {
				return im.Rename(ino(im, "upper/sub"), long, []byte("../../../outside/x"))
			}, "sub/../../../outside/x", "'/'"},
		{"empty name", []ent{file("sub/victim", "evil")},
			func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper/sub"), "victim", nil) },
			"sub/", "empty name"},
		{"dot-dot name", []ent{dir("sub"), dir("sub/dd"), file("sub/dd/x", "evil")},
			func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper/sub"), "dd", []byte("..")) },
			"sub/..", "name .."},
		{"dot name", []ent{file("d0t", "evil")},
			func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper"), "d0t", []byte(".")) },
			".", "name ."},
		{"NUL in a name", []ent{file("nul", "evil")},
			func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper"), "nul", []byte("a\x00b")) },
			"a\x00b", "NUL"},
		{"directory and symlink of the same name, a link through it", []ent{
			dir("a"), file("a/f", "evil"), symlink("b", "../outside"), hardlink("link", "a/f"),
		}, func(im *ext4craft.Image) error { return im.Rename(ino(im, "upper"), "b", []byte("a")) },
			"a", "twice"},
		{"hard-linked directory", []ent{dir("d1"), file("d1/f", "x"), dir("d2")},
			func(im *ext4craft.Image) error {
				return im.SetEntryIno(ino(im, "upper"), "d2", ino(im, "upper/d1"))
			}, "d", "reached twice"},
		{"directory loop", []ent{dir("d1"), dir("d1/sub")},
			func(im *ext4craft.Image) error {
				return im.SetEntryIno(ino(im, "upper/d1"), "sub", ino(im, "upper"))
			}, "d1/sub", "reached twice"},
		{"the same blocks many times over", []ent{file("big", randomData(64<<10, 3))},
			func(im *ext4craft.Image) error { return im.SharedExtents(ino(im, "upper/big")) },
			"big", "more data than the scratch image"},
		{"endless extent tree", []ent{file("big", randomData(64<<10, 3))},
			func(im *ext4craft.Image) error { return im.EndlessExtents(ino(im, "upper/big")) },
			"big", "unreadable file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			upper := append([]ent{file("valid.txt", "a valid entry of the same set").at(t1)}, tc.upper...)
			f := newFixture(t, layers{lower: []ent{file("keep", "k"), dir("sub")}, upper: upper})
			outside, outsideBefore := outsideDir(t, f)
			f.edit(t, tc.edit)
			before := snapshot(t, f.host)
			start := time.Now()
			_, err := writeback.Apply(context.Background(), f.upper, f.lower, f.host)
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("Apply took %s", d)
			}
			var ice *writeback.InvalidChangeSetError
			if !errors.As(err, &ice) {
				t.Fatalf("Apply = %v, want *InvalidChangeSetError", err)
			}
			if !strings.HasPrefix(ice.Path, tc.wantPath) || !strings.Contains(ice.Reason, tc.want) {
				t.Errorf("error %q: path %q, reason %q; want path %q, reason with %q", err, ice.Path, ice.Reason, tc.wantPath, tc.want)
			}
			if diff := cmp.Diff(before, snapshot(t, f.host)); diff != "" {
				t.Errorf("the share changed (-before +after):\n%s", diff)
			}
			if diff := cmp.Diff(outsideBefore, snapshot(t, outside)); diff != "" {
				t.Errorf("the directory beside the share changed (-before +after):\n%s", diff)
			}
		})
	}
}

// TestCommitRefusesCraftedImage: with e2fsck in front, a crafted name is
// caught by the check; the result is the same class of error and an
// untouched share.
func TestCommitRefusesCraftedImage(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{lower: []ent{file("keep", "k")}, upper: []ent{file(long, "evil"), file("valid", "v")}})
	outside, outsideBefore := outsideDir(t, f)
	f.edit(t, func(im *ext4craft.Image) error {
		return im.Rename(ino(im, "upper"), long, []byte("../outside/x"))
	})
	before := snapshot(t, f.host)
	_, err := writeback.Commit(context.Background(), f.pending())
	var ice *writeback.InvalidChangeSetError
	if !errors.As(err, &ice) {
		t.Fatalf("Commit = %v, want *InvalidChangeSetError", err)
	}
	if diff := cmp.Diff(before, snapshot(t, f.host)); diff != "" {
		t.Errorf("the share changed (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(outsideBefore, snapshot(t, outside)); diff != "" {
		t.Errorf("the directory beside the share changed (-before +after):\n%s", diff)
	}
}

// TestOversizedDirectoryIsReadFromItsBlocks: a directory inode claiming
// 256 GiB is read from the blocks it has, quickly, and written back as
// what it holds.
func TestOversizedDirectoryIsReadFromItsBlocks(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{upper: []ent{dir("d").at(t2), file("d/a", "a").at(t1), file("d/b", "b").at(t1)}})
	f.edit(t, func(im *ext4craft.Image) error { return im.SetSize(ino(im, "upper/d"), 256<<30) })
	start := time.Now()
	if _, err := writeback.Apply(context.Background(), f.upper, f.lower, f.host); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Apply took %s", d)
	}
	checkTree(t, f.host, map[string]node{
		".": dirNode("0755"), "d": dirNode("0755"), "d/a": fileNode("a", "0644", t1), "d/b": fileNode("b", "0644", t1),
	})
}

func TestTooDeep(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{upper: []ent{dir("d")}})
	// mkfs.ext4 -d of a tree this deep crashes (e2fsprogs 1.47.0):
	// debugfs makes the levels instead.
	cmds := "cd upper/d\n" + strings.Repeat("mkdir d\ncd d\n", writeback.MaxDepth)
	script := filepath.Join(t.TempDir(), "cmds")
	if err := os.WriteFile(script, []byte(cmds), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("debugfs", "-w", "-f", script, f.upperImg).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out[max(0, len(out)-500):])
	}
	f.upper = open(t, f.upperImg)
	before := snapshot(t, f.host)
	_, err := writeback.Apply(context.Background(), f.upper, f.lower, f.host)
	var ice *writeback.InvalidChangeSetError
	if !errors.As(err, &ice) || !strings.Contains(ice.Reason, "deeper") {
		t.Fatalf("Apply = %v, want an invalid change set, too deep", err)
	}
	if diff := cmp.Diff(before, snapshot(t, f.host)); diff != "" {
		t.Errorf("the share changed (-before +after):\n%s", diff)
	}
}

// TestNoPrivilegeFromTheGuest: as root, what the guest made belongs to the
// share's owner, set-id bits and file capabilities are gone, device nodes
// and sockets are not written back.
func TestNoPrivilegeFromTheGuest(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{file("was-file", "host data")},
		upper: []ent{
			file("suid", "#!/bin/sh\n").mode(0o4755).owner(0, 0).at(t1),
			file("sgid", "x").mode(0o2755).owner(0, 0).at(t1),
			file("mine", "x").owner(2000, 2000).at(t1),
			dir("newdir").mode(0o2775).owner(0, 0).at(t2),
			file("newdir/f", "x").at(t1),
			symlink("link", "mine").owner(0, 0).at(t1),
			fifo("pipe").owner(0, 0).at(t1),
			hardlink("mine2", "mine"),
			blockdev("disk", 8, 0).mode(0o666).at(t1),
			chardev("mem", 1, 1).mode(0o666).at(t1),
			chardev("was-file", 1, 3).mode(0o666).at(t1),
		},
	})
	// The capability attribute of a binary that could raise its
	// privileges when run.
	f.edit(t, func(im *ext4craft.Image) error { return nil })
	if out, err := exec.Command("debugfs", "-w", "-R", "ea_set upper/suid security.capability 0x0100000200200000000000000000000000000000", f.upperImg).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	f.upper = open(t, f.upperImg)
	if err := os.Chown(f.host, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	st, err := writeback.Apply(context.Background(), f.upper, f.lower, f.host)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	own := func(n node) node { n.UID, n.GID = 1000, 1000; return n }
	links := func(n node, k int) node { n.Links = k; return n }
	checkTree(t, f.host, map[string]node{
		".":        own(dirNode("0755")),
		"was-file": fileNode("host data", "0644", t0),
		"suid":     own(fileNode("#!/bin/sh\n", "0755", t1)),
		"sgid":     own(fileNode("x", "0755", t1)),
		"mine":     own(links(fileNode("x", "0644", t1), 2)),
		"mine2":    own(links(fileNode("x", "0644", t1), 2)),
		"newdir":   own(dirNode("0775")),
		"newdir/f": own(fileNode("x", "0644", t1)),
		"link":     own(linkNode("mine", t1)),
		"pipe":     own(node{Type: "fifo", Perm: "0644", Mtime: t1}),
	})
	if _, err := unix.Lgetxattr(filepath.Join(f.host, "suid"), "security.capability", make([]byte, 64)); !errors.Is(err, unix.ENODATA) {
		t.Errorf("security.capability on the written file: %v, want none", err)
	}
	if st.Devices != 3 || st.SetIDDropped != 3 {
		t.Errorf("Stats = %+v, want 3 device nodes not written and set-id bits dropped on 3", st)
	}
}

// TestSparseFileStaysSparse: a 100 GiB file the guest made with truncate
// is written back with its size and none of its holes.
func TestSparseFileStaysSparse(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{upper: []ent{file("small", "s")}})
	_ = f
	work := t.TempDir()
	up := filepath.Join(work, "scratch", writeback.UpperDir)
	if err := os.MkdirAll(up, 0o755); err != nil {
		t.Fatal(err)
	}
	big, err := os.Create(filepath.Join(up, "huge"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := big.WriteAt([]byte("in the middle"), 50<<30); err != nil {
		t.Fatal(err)
	}
	if err := big.Truncate(100 << 30); err != nil {
		t.Fatal(err)
	}
	big.Close()
	img := filepath.Join(work, "upper.img")
	upper := mkfs(t, filepath.Join(work, "scratch"), img)
	host := filepath.Join(work, "host")
	if err := os.Mkdir(host, 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	st, err := writeback.Apply(context.Background(), upper, f.lower, host)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Apply took %s", d)
	}
	var s unix.Stat_t
	if err := unix.Stat(filepath.Join(host, "huge"), &s); err != nil {
		t.Fatal(err)
	}
	if s.Size != 100<<30 || s.Blocks*512 > 1<<20 {
		t.Errorf("written back: %d bytes in %d bytes of disk, want 100 GiB in at most 1 MiB", s.Size, s.Blocks*512)
	}
	b := make([]byte, 13)
	fh, _ := os.Open(filepath.Join(host, "huge"))
	defer fh.Close()
	if _, err := fh.ReadAt(b, 50<<30); err != nil || string(b) != "in the middle" {
		t.Errorf("data at 50 GiB: %q, %v", b, err)
	}
	if st.Bytes > 4096 {
		t.Errorf("Stats.Bytes = %d, want only the stored block", st.Bytes)
	}
}

// mountTmpfs mounts a tmpfs of the given size at a new directory.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestNoSpaceIsRefusedBeforeStarting(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{file("keep", "k")},
		upper: []ent{file("a-small-one", "x"), file("big", randomData(4<<20, 5))},
	})
	small := mountTmpfs(t, "2m")
	host := filepath.Join(small, "share")
	if err := os.Mkdir(host, 0o755); err != nil {
		t.Fatal(err)
	}
	copyTree(t, f.host, host)
	before := snapshot(t, host)
	_, err := writeback.Apply(context.Background(), f.upper, f.lower, host)
	var nse *writeback.NoSpaceError
	if !errors.As(err, &nse) {
		t.Fatalf("Apply = %v, want *NoSpaceError", err)
	}
	if nse.Need < 4<<20 || nse.Free >= 2<<20 || !strings.Contains(err.Error(), "needs 4.") {
		t.Errorf("error %q: need %d, free %d", err, nse.Need, nse.Free)
	}
	if diff := cmp.Diff(before, snapshot(t, host)); diff != "" {
		t.Errorf("the share changed (-before +after):\n%s", diff)
	}
}

// TestInterruptedWriteBack: cancelling the context stops the write-back
// in the middle of a large file, promptly, and leaves no temporary file.
func TestInterruptedWriteBack(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{upper: []ent{file("large", randomData(48<<20, 7))}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := writeback.Apply(ctx, f.upper, f.lower, f.host)
		done <- err
	}()
	// Cancel once the temporary file exists.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		ents, _ := os.ReadDir(f.host)
		if len(ents) > 0 {
			break
		}
		time.Sleep(200 * time.Microsecond)
	}
	cancel()
	start := time.Now()
	var err error
	select {
	case err = <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the write-back did not stop within 5 s of the cancellation")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("stopped %s after the cancellation, want within 1 s", d)
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Apply = %v, want context.Canceled", err)
	}
	if ents, _ := os.ReadDir(f.host); len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("left in the share: %q", names)
	}
}

// TestHostSymlinkInPlaceOfGuestDirectory: a host-side symlink in the
// share, pointing outside, where the guest has a directory with content:
// the link is replaced, never traversed.
func TestHostSymlinkInPlaceOfGuestDirectory(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{dir("d"), file("d/f", "lower")},
		upper: []ent{opaqueDir("d").at(t2), file("d/f", "guest").at(t1), whiteout("w")},
	})
	outside, outsideBefore := outsideDir(t, f)
	if err := os.RemoveAll(filepath.Join(f.host, "d")); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"d", "w"} {
		if err := os.Symlink(outside, filepath.Join(f.host, l)); err != nil {
			t.Fatal(err)
		}
	}
	f.apply(t)
	checkTree(t, f.host, map[string]node{".": dirNode("0755"), "d": dirNode("0755"), "d/f": fileNode("guest", "0644", t1)})
	if diff := cmp.Diff(outsideBefore, snapshot(t, outside)); diff != "" {
		t.Errorf("the directory beside the share changed (-before +after):\n%s", diff)
	}
}

// TestCommitRefusesReplacedShare: the record names the directory the run
// started with; a symlink or another directory now at its path (a nested
// share the guest replaced, for one) is refused.
func TestCommitRefusesReplacedShare(t *testing.T) {
	t.Parallel()
	f := newFixture(t, commitLayers)
	dir := filepath.Dir(f.lowerImg)
	p := f.pending()
	if err := writeback.SavePending(dir, p); err != nil {
		t.Fatal(err)
	}
	other, _ := outsideDir(t, f)
	otherBefore := snapshot(t, other)
	moved := f.host + ".moved"
	if err := os.Rename(f.host, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(other, f.host); err != nil {
		t.Fatal(err)
	}
	rec, err := writeback.LoadPending(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeback.Commit(context.Background(), rec); !errors.Is(err, writeback.ErrHostDirReplaced) {
		t.Fatalf("Commit = %v, want ErrHostDirReplaced", err)
	}
	if diff := cmp.Diff(otherBefore, snapshot(t, other)); diff != "" {
		t.Errorf("the other directory changed (-before +after):\n%s", diff)
	}
	// The directory itself, moved back, is fine.
	if err := os.Remove(f.host); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(moved, f.host); err != nil {
		t.Fatal(err)
	}
	if _, err := writeback.Commit(context.Background(), rec); err != nil {
		t.Fatalf("Commit into the original directory: %v", err)
	}
	checkTree(t, f.host, commitWant)
}

var _ = fmt.Sprint
var _ = ext4.RootIno
