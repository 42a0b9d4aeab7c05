package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/dirimage"
)

// makeTree writes the benchmark tree: 2000 files, about 50 MB, in 80
// directories.
func makeTree(b *testing.B, root string) {
	b.Helper()
	buf := make([]byte, 50<<20/2000)
	for i := 0; i < 2000; i++ {
		p := filepath.Join(root, fmt.Sprintf("d%02d", i%80), fmt.Sprintf("f%04d.bin", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			b.Fatal(err)
		}
		_, _ = rand.Read(buf)
		if err := os.WriteFile(p, buf, 0o644); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAddDirPrepare is (d): turning a 50 MB, 2000-file directory into
// the read-only image a run attaches, against `cp -a` of the same tree.
func BenchmarkAddDirPrepare(b *testing.B) {
	work := b.TempDir()
	src := filepath.Join(work, "src")
	makeTree(b, src)
	comparePrepare(b, work, src, 5, "(d) --add-dir image of 50 MB / 2000 files")
}

// BenchmarkAddDirPrepareFlat is (d) for one flat directory of 100 000
// small files, the case where `mkfs.ext4 -d` (e2fsprogs 1.47.0) was
// quadratic: about ten minutes.
func BenchmarkAddDirPrepareFlat(b *testing.B) {
	work := b.TempDir()
	src := filepath.Join(work, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 100000; i++ {
		if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("file%06d.txt", i)), []byte(fmt.Sprintf("hello %d\n", i)), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	comparePrepare(b, work, src, 3, "(d) --add-dir image of 100 000 small files in one directory")
}

// comparePrepare times dirimage.Build of src against `cp -a`, rounds
// times each, alternating, and prints and reports the ratio of medians.
func comparePrepare(b *testing.B, work, src string, rounds int, what string) {
	var ours, cp []time.Duration
	for i := 0; i < rounds; i++ {
		img := filepath.Join(work, "img")
		start := time.Now()
		if _, err := dirimage.Build(context.Background(), src, img, "bench"); err != nil {
			b.Fatal(err)
		}
		ours = append(ours, time.Since(start))
		os.Remove(img)

		dst := filepath.Join(work, "copy")
		start = time.Now()
		if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
			b.Fatalf("cp -a: %v %s", err, out)
		}
		cp = append(cp, time.Since(start))
		os.RemoveAll(dst)
	}
	mo, mc := median(ours), median(cp)
	fmt.Printf("%s: %s median (min %s); cp -a of the same tree %s (min %s); ratio %.2fx (target <= 1.5x)\n",
		what, mo.Round(time.Millisecond), slices.Min(ours).Round(time.Millisecond), mc.Round(time.Millisecond), slices.Min(cp).Round(time.Millisecond), float64(mo)/float64(mc))
	b.ReportMetric(float64(mo)/float64(mc), "x-cp")
}

// writeBackRE finds the write-back step in the -v timing breakdown.
var writeBackRE = regexp.MustCompile(`write back (\d+)ms`)

// BenchmarkAddDirWriteBack is (e): after a guest rewrote 10% of the files
// of the same tree in a read-write directory, the write-back mvmctl does
// (measured by mvmctl itself, -v) against `rsync -a --delete` bringing a
// copy of the original tree to the same state.
func BenchmarkAddDirWriteBack(b *testing.B) {
	if _, err := exec.LookPath("rsync"); err != nil {
		b.Fatal("rsync is needed for the baseline (apt-get install rsync)")
	}
	work := b.TempDir()
	orig := filepath.Join(work, "orig")
	makeTree(b, orig)
	// The guest's change: every tenth file rewritten (200 files, 5 MB).
	script := `i=0; for f in /w/d*/f*.bin; do if [ $((i % 10)) -eq 0 ]; then head -c 26214 /dev/urandom > "$f"; fi; i=$((i+1)); done`
	var ours, rs []time.Duration
	for i := 0; i < 3; i++ {
		host := filepath.Join(work, "host"+strconv.Itoa(i))
		if out, err := exec.Command("cp", "-a", orig, host).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v %s", err, out)
		}
		out, err := exec.Command(*mvmctl, "-v", "exec", "--timeout", "10m", "-d", host+":/w:rw", "--", "sh", "-c", script).CombinedOutput()
		if err != nil {
			b.Fatalf("mvmctl: %v\n%s", err, out)
		}
		m := writeBackRE.FindSubmatch(out)
		if m == nil {
			b.Fatalf("no write-back timing in %s", out)
		}
		ms, _ := strconv.Atoi(string(m[1]))
		ours = append(ours, time.Duration(ms)*time.Millisecond)

		// Baseline: rsync the guest's result onto a fresh copy of the
		// original, the way a copy-back tool would.
		target := filepath.Join(work, "target")
		if out, err := exec.Command("cp", "-a", orig, target).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v %s", err, out)
		}
		start := time.Now()
		if out, err := exec.Command("rsync", "-a", "--delete", host+"/", target+"/").CombinedOutput(); err != nil {
			b.Fatalf("rsync: %v %s", err, out)
		}
		rs = append(rs, time.Since(start))
		os.RemoveAll(target)
		os.RemoveAll(host)
	}
	mo, mr := median(ours), median(rs)
	fmt.Printf("(e) write-back after the guest rewrote 10%% of 2000 files: %s median (min %s); rsync -a --delete %s (min %s); ratio %.2fx (target <= 1.5x)\n",
		mo.Round(time.Millisecond), slices.Min(ours).Round(time.Millisecond), mr.Round(time.Millisecond), slices.Min(rs).Round(time.Millisecond), float64(mo)/float64(mr))
	b.ReportMetric(float64(mo)/float64(mr), "x-rsync")
}
