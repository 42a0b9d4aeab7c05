package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/xdg"
)

// BenchmarkHealColdRun is issue "stays fast"'s bound: a cold run that
// leaves a snapshot behind (it starts the healer after its output) is
// not slower than one told --no-snapshot. Rounds alternate in a cache of
// their own; each waits for the healer it started, and removes the
// snapshot it made, before the next measurement.
func BenchmarkHealColdRun(b *testing.B) {
	shared, err := xdg.CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	cache := filepath.Join(b.TempDir(), "cache")
	if err := os.MkdirAll(filepath.Join(cache, "images"), 0o755); err != nil {
		b.Fatal(err)
	}
	manifest, err := os.ReadFile(filepath.Join(shared, "images", "default.json"))
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cache, "images", "default.json"), manifest, 0o644); err != nil {
		b.Fatal(err)
	}
	env := append(os.Environ(), "MVM_CACHE_DIR="+cache, "MVM_NO_AUTO_SNAPSHOT=", "MVM_JAILER="+filepath.Join(filepath.Dir(*mvmctl), "mvm-jailer"))
	store := filepath.Join(cache, "snapshots")
	run := func(args ...string) time.Duration {
		cmd := exec.Command(*mvmctl, append([]string{"exec"}, args...)...)
		cmd.Env = env
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("mvmctl exec %v: %v\n%s", args, err, out)
		}
		return time.Since(start)
	}
	healers := func() bool {
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			if c, err := os.ReadFile(p); err == nil && bytes.Contains(c, []byte("snapshot-heal")) && bytes.Contains(c, []byte(cache)) {
				if st, err := os.ReadFile(filepath.Join(filepath.Dir(p), "stat")); err == nil && !bytes.Contains(st, []byte(") Z ")) {
					return true
				}
			}
		}
		return false
	}
	var healing, off []time.Duration
	for i := 0; i < *rounds; i++ {
		healing = append(healing, run("--cpus", "1", "--", "true"))
		deadline := time.Now().Add(2 * time.Minute)
		for healers() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		recs, _ := filepath.Glob(filepath.Join(store, "*", "snapshot.json"))
		if len(recs) != 1 {
			b.Fatalf("round %d: %d snapshots after the healing run", i, len(recs))
		}
		if err := os.RemoveAll(filepath.Dir(recs[0])); err != nil {
			b.Fatal(err)
		}
		off = append(off, run("--cpus", "1", "--no-snapshot", "--", "true"))
	}
	var took []string
	if f, err := os.Open(filepath.Join(store, "heal.log")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if _, t, ok := strings.Cut(sc.Text(), ") in "); ok {
				took = append(took, t)
			}
		}
		f.Close()
	}
	mh, mo := median(healing), median(off)
	fmt.Printf("(heal) cold exec --cpus 1 -- true, %d rounds: leaving a snapshot median %s (min %s); --no-snapshot %s (min %s): %.3fx (target <= 1.0x); the healer's own boot and save: %s\n",
		*rounds, mh.Round(time.Millisecond), slices.Min(healing).Round(time.Millisecond), mo.Round(time.Millisecond), slices.Min(off).Round(time.Millisecond),
		float64(mh)/float64(mo), strings.Join(took, " "))
	b.ReportMetric(float64(mh)/float64(mo), "x-no-snapshot")
}
