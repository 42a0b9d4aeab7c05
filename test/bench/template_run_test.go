package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// templateRunEnv is a private cache (the default image bootstrapped from
// the user's kernel, with its snapshot), a template store holding the
// Debian bookworm + python3 template "py" (snapshotted, as `template
// create` does), and run and state directories: both sides of the
// comparison boot the same kernel and initramfs from the same disk.
func templateRunEnv(b *testing.B) []string {
	b.Helper()
	work := b.TempDir()
	debian := os.Getenv("MVM_DEBIAN_CACHE")
	if debian == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			b.Fatal(err)
		}
		// Shared with the unit and e2e tests: a bootstrap is downloaded
		// once.
		debian = filepath.Join(d, "mvm-test", "debian")
	}
	env := append(os.Environ(),
		"MVM_CACHE_DIR="+filepath.Join(work, "cache"), "MVM_DATA_DIR="+filepath.Join(work, "data"),
		"MVM_RUN_DIR="+filepath.Join(work, "run"), "MVM_STATE_DIR="+filepath.Join(work, "state"),
		"MVM_DEBIAN_CACHE="+debian)
	for _, args := range [][]string{
		{"bootstrap", "--kernel", defaultImage(b).Kernel},
		{"template", "create", "py", "--from-debian", "bookworm", "--packages", "python3"},
	} {
		cmd := exec.Command(*mvmctl, args...)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("mvmctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return env
}

// BenchmarkTemplateExec is the templates issue's (a) and (c): `mvmctl
// exec --template py -- true` against `mvmctl exec -- true` on the
// default image, both booted (--no-snapshot) and both restored from their
// snapshots (target <= 1.10x); and `python3 -c pass` against `true` on
// the template, restored (what starting Python costs in the guest).
// Medians of alternating rounds.
func BenchmarkTemplateExec(b *testing.B) {
	env := templateRunEnv(b)
	run := func(args ...string) (time.Duration, string) {
		cmd := exec.Command(*mvmctl, args...)
		cmd.Env = env
		start := time.Now()
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("mvmctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return time.Since(start), string(out)
	}
	sides := []struct {
		name string
		args []string
		// boot is what -v must say: the comparison is meaningless if a
		// side that should restore boots.
		boot string
		ds   []time.Duration
	}{
		{"default, cold", []string{"exec", "--no-snapshot", "--", "true"}, "cold boot", nil},
		{"template, cold", []string{"exec", "--no-snapshot", "--template", "py", "--", "true"}, "cold boot", nil},
		{"default, restored", []string{"exec", "--", "true"}, "restored from snapshot", nil},
		{"template, restored", []string{"exec", "--template", "py", "--", "true"}, "restored from snapshot", nil},
		{"python3 -c pass, restored", []string{"exec", "--template", "py", "--", "python3", "-c", "pass"}, "restored from snapshot", nil},
	}
	for i := range sides {
		s := &sides[i]
		if _, out := run(append([]string{"-v"}, s.args...)...); !strings.Contains(out, s.boot) {
			b.Fatalf("%s: mvmctl -v %s does not say %q:\n%s", s.name, strings.Join(s.args, " "), s.boot, out)
		}
	}
	for range *rounds {
		for i := range sides {
			d, _ := run(sides[i].args...)
			sides[i].ds = append(sides[i].ds, d)
		}
	}
	med := func(i int) time.Duration { return median(sides[i].ds) }
	ms := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	cold, restored, python := float64(med(1))/float64(med(0)), float64(med(3))/float64(med(2)), float64(med(4))/float64(med(3))
	fmt.Printf("(a) exec --template (Debian bookworm + python3) -- true against exec -- true on the default image, %d rounds:"+
		" cold %s (min %s) against %s (min %s), ratio %.3fx; restored %s (min %s) against %s (min %s), ratio %.3fx (target <= 1.10x)\n",
		*rounds, ms(med(1)), ms(slices.Min(sides[1].ds)), ms(med(0)), ms(slices.Min(sides[0].ds)), cold,
		ms(med(3)), ms(slices.Min(sides[3].ds)), ms(med(2)), ms(slices.Min(sides[2].ds)), restored)
	fmt.Printf("(c) python3 -c pass on the Debian template, restored: %s (min %s) against true %s: ratio %.3fx, Python's start %s\n",
		ms(med(4)), ms(slices.Min(sides[4].ds)), ms(med(3)), python, ms(med(4)-med(3)))
	b.ReportMetric(cold, "x-cold")
	b.ReportMetric(restored, "x-restored")
	b.ReportMetric(float64((med(4) - med(3)).Milliseconds()), "ms-python")
}
