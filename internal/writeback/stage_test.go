package writeback_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/writeback"
)

// runDirOn makes a write-back directory under parent, as a run leaves it:
// a sparse "upper.img" (64 MiB, data at a few places), a "lower.img" and
// the record.
func runDirOn(t *testing.T, parent string) (dir string, upper []byte) {
	t.Helper()
	dir = filepath.Join(parent, "run", "dirs", "0")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(dir, "upper.img"))
	if err != nil {
		t.Fatal(err)
	}
	upper = make([]byte, 64<<20)
	for i, off := range []int{0, 5 << 20, 33<<20 + 100, 64<<20 - 7} {
		chunk := []byte(randomData(min(7000, len(upper)-off), uint64(i)))
		copy(upper[off:], chunk)
		if _, err := f.WriteAt(chunk, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(int64(len(upper))); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.WriteFile(filepath.Join(dir, "lower.img"), []byte(randomData(300000, 9)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := writeback.Pending{Host: "/somewhere", Guest: "/w", Lower: filepath.Join(dir, "lower.img"), Upper: filepath.Join(dir, "upper.img"), Created: time.Now().UTC()}
	if err := writeback.SavePending(dir, p); err != nil {
		t.Fatal(err)
	}
	return dir, upper
}

func blocksOf(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestStageAcrossFilesystems: the run directory on a tmpfs (as under
// $XDG_RUNTIME_DIR), the staged directory on disk. The copy keeps every
// byte and the holes, and only then is the source removed.
func TestStageAcrossFilesystems(t *testing.T) {
	t.Parallel()
	src, upper := runDirOn(t, mountTmpfs(t, "256m"))
	dst := filepath.Join(t.TempDir(), "state", "staged", "run-0")
	kept, err := writeback.Stage(src, dst)
	if err != nil {
		t.Fatalf("Stage: %v", err)
	}
	if kept != dst {
		t.Errorf("Stage = %q, want %q", kept, dst)
	}
	if _, err := os.Lstat(src); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("source after Stage: %v, want it gone", err)
	}
	got, err := os.ReadFile(filepath.Join(dst, "upper.img"))
	if err != nil || !bytes.Equal(got, upper) {
		t.Fatalf("staged upper.img differs (%d bytes, %v)", len(got), err)
	}
	if used := blocksOf(t, filepath.Join(dst, "upper.img")); used > 1<<20 {
		t.Errorf("staged upper.img takes %d bytes on disk: holes were filled", used)
	}
	p, err := writeback.LoadPending(dst)
	if err != nil || p.Host != "/somewhere" || p.Upper != filepath.Join(dst, "upper.img") {
		t.Errorf("LoadPending after Stage = %+v, %v", p, err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(dst)); len(ents) != 1 {
		t.Errorf("staged/ holds %d entries, want only the change set", len(ents))
	}
}

// TestStageFailureKeepsTheSource: a destination too small for the copy
// fails the staging; the source is intact and no partial copy is left.
func TestStageFailureKeepsTheSource(t *testing.T) {
	t.Parallel()
	src, upper := runDirOn(t, t.TempDir())
	small := mountTmpfs(t, "100k")
	dst := filepath.Join(small, "staged", "run-0")
	if _, err := writeback.Stage(src, dst); err == nil {
		t.Fatal("Stage onto a full filesystem succeeded")
	} else if !strings.Contains(err.Error(), src) {
		t.Errorf("error %q does not name the source", err)
	}
	got, err := os.ReadFile(filepath.Join(src, "upper.img"))
	if err != nil || !bytes.Equal(got, upper) {
		t.Errorf("source after a failed Stage differs (%v)", err)
	}
	if _, err := writeback.LoadPending(src); err != nil {
		t.Errorf("source record after a failed Stage: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(small, "staged")); len(ents) != 0 {
		t.Errorf("left on the destination: %v", ents)
	}
}

func stagedSet(t *testing.T, staged, name string, created time.Time, size int) string {
	t.Helper()
	dir := filepath.Join(staged, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "upper.img"), []byte(randomData(size, uint64(len(name)))), 0o600); err != nil {
		t.Fatal(err)
	}
	p := writeback.Pending{Host: "/h/" + name, Lower: "lower.img", Upper: "upper.img", Created: created}
	if err := writeback.SavePending(dir, p); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestListAndPruneStaged(t *testing.T) {
	t.Parallel()
	staged := t.TempDir()
	now := time.Now()
	var dirs []string
	for i := 0; i < 6; i++ {
		// Created out of order, so that listing has to sort.
		age := time.Duration((i*4)%6+1) * time.Hour
		dirs = append(dirs, stagedSet(t, staged, fmt.Sprintf("run-%d", i), now.Add(-age), 100<<10))
	}
	// A copy left by an interrupted Stage, old enough to go, and a
	// recent one, which may still be under way.
	for name, age := range map[string]time.Duration{".partial-old": 2 * time.Hour, ".partial-new": time.Minute} {
		p := filepath.Join(staged, name)
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
		mt := now.Add(-age)
		if err := os.Chtimes(p, mt, mt); err != nil {
			t.Fatal(err)
		}
	}
	list, err := writeback.ListStaged(staged)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for i, s := range list {
		order = append(order, filepath.Base(s.Dir))
		if s.Size < 100<<10 || s.Err != nil {
			t.Errorf("%s: size %d, err %v", s.Dir, s.Size, s.Err)
		}
		if i > 0 && s.Created().Before(list[i-1].Created()) {
			t.Errorf("not oldest first: %v", order)
		}
	}
	if len(list) != 6 {
		t.Fatalf("ListStaged: %v", order)
	}
	// Caps: 4 entries, then bytes for 2.
	dropped, err := writeback.PruneStaged(staged, 4, 0)
	if err != nil || len(dropped) != 2 || dropped[0] != list[0].Dir || dropped[1] != list[1].Dir {
		t.Fatalf("PruneStaged(4 entries) = %q, %v; want the two oldest", dropped, err)
	}
	dropped, err = writeback.PruneStaged(staged, 0, 2*(100<<10)+64<<10)
	if err != nil || len(dropped) != 2 || dropped[0] != list[2].Dir {
		t.Fatalf("PruneStaged(bytes) = %q, %v; want the next two oldest", dropped, err)
	}
	// The newest stays, even alone over the cap.
	dropped, err = writeback.PruneStaged(staged, 1, 1)
	if err != nil || len(dropped) != 1 {
		t.Fatalf("PruneStaged(1 entry, 1 byte) = %q, %v", dropped, err)
	}
	left, _ := writeback.ListStaged(staged)
	if len(left) != 1 || left[0].Dir != list[5].Dir {
		t.Errorf("left %v, want the newest, %s", left, list[5].Dir)
	}
	for name, want := range map[string]bool{".partial-old": false, ".partial-new": true} {
		if _, err := os.Lstat(filepath.Join(staged, name)); (err == nil) != want {
			t.Errorf("%s exists: %v, want %v", name, err == nil, want)
		}
	}
}

func TestListStagedUnreadableRecord(t *testing.T) {
	t.Parallel()
	staged := t.TempDir()
	bad := filepath.Join(staged, "bad")
	if err := os.Mkdir(bad, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bad, writeback.PendingFile), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	list, err := writeback.ListStaged(staged)
	if err != nil || len(list) != 1 || list[0].Err == nil || list[0].Created().IsZero() {
		t.Fatalf("ListStaged = %+v, %v; want one entry with an error and a time", list, err)
	}
	if list, err := writeback.ListStaged(filepath.Join(staged, "missing")); err != nil || len(list) != 0 {
		t.Errorf("ListStaged(missing) = %v, %v", list, err)
	}
}

func TestDiscard(t *testing.T) {
	t.Parallel()
	staged := t.TempDir()
	dir := stagedSet(t, staged, "run-0", time.Now(), 10)
	notStaged := t.TempDir()
	if err := os.WriteFile(filepath.Join(notStaged, "precious"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := writeback.Discard(notStaged); err == nil {
		t.Error("Discard of a directory without a record succeeded")
	}
	if _, err := os.Stat(filepath.Join(notStaged, "precious")); err != nil {
		t.Errorf("Discard removed something it should not have: %v", err)
	}
	if err := writeback.Discard(dir); err != nil {
		t.Fatalf("Discard: %v", err)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("staged directory after Discard: %v", err)
	}
}

// TestStageThenCommitAcrossFilesystems is the failed write-back path of a
// desktop: images on a tmpfs, staged onto disk, recovered from there.
func TestStageThenCommitAcrossFilesystems(t *testing.T) {
	t.Parallel()
	f := newFixture(t, commitLayers)
	tmpfs := mountTmpfs(t, "256m")
	src := filepath.Join(tmpfs, "dirs", "0")
	if err := os.MkdirAll(src, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, img := range []string{f.lowerImg, f.upperImg} {
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, filepath.Base(img)), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := writeback.SavePending(src, writeback.Pending{Host: f.host, Lower: "lower.img", Upper: "upper.img"}); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "staged", "x-0")
	if _, err := writeback.Stage(src, dst); err != nil {
		t.Fatalf("Stage: %v", err)
	}
	p, err := writeback.LoadPending(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := writeback.Commit(context.Background(), p); err != nil {
		t.Fatalf("Commit of the staged copy: %v", err)
	}
	checkTree(t, f.host, commitWant)
}
