package bench

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm"
)

// Snapshot restore, side by side with a cold boot of the same machine and
// with gVisor's `runsc do` (Debian's runsc), alternating, medians:
//
//	(snap a) restored exec -- true            <= 0.15x a cold exec --no-snapshot -- true
//	(snap b) restored exec -- true            <= 1.00x runsc do true
//	(snap c) (a) and (b) with one ro and one rw --add-dir
//	(snap d) QEMU's private memory while a command runs, cold and restored
//	         (beyond the RAM file the restored ones share)   <= 40 MiB restored
//
// Each bootstraps a cache of its own (the user's kernel, this tree's
// agent), so the snapshot is fresh and belongs to the mvmctl measured.

// snapEnv bootstraps a cache for the benchmark (its snapshot is then
// fresh) and returns the environment of its runs: that cache, and run and
// state directories of its own.
func snapEnv(b *testing.B) []string {
	b.Helper()
	d := b.TempDir()
	cache := filepath.Join(d, "cache")
	cmd := exec.Command(*mvmctl, "bootstrap", "--kernel", defaultImage(b).Kernel)
	cmd.Env = append(os.Environ(), "MVM_CACHE_DIR="+cache)
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("bootstrap: %v\n%s", err, out)
	}
	return append(os.Environ(), "MVM_CACHE_DIR="+cache, "MVM_RUN_DIR="+filepath.Join(d, "run"), "MVM_STATE_DIR="+filepath.Join(d, "state"))
}

// stepRE reads a step's time from the -v breakdown.
var stepRE = regexp.MustCompile(`(?:: |, |; )(take from pool|start vm|agent ready|mount|exec \S+|stop vm|shut down guest|write back|prepare disks|total) (\d+)ms`)

// vRun is one mvmctl -v run: its wall time and the breakdown's steps.
type vRun struct {
	wall     time.Duration
	steps    map[string]time.Duration
	restored bool
	line     string
}

func runV(b *testing.B, env []string, args ...string) vRun {
	b.Helper()
	cmd := exec.Command(*mvmctl, append([]string{"-v", "exec"}, args...)...)
	cmd.Env = env
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	r := vRun{wall: time.Since(start), steps: map[string]time.Duration{}}
	if err != nil {
		b.Fatalf("mvmctl exec %q: %v\n%s", args, err, stderr.String())
	}
	for _, l := range strings.Split(stderr.String(), "\n") {
		if strings.HasPrefix(l, "mvmctl: ") && strings.Contains(l, "; total ") {
			r.line = l
		}
	}
	for _, m := range stepRE.FindAllStringSubmatch(r.line, -1) {
		ms, _ := strconv.Atoi(m[2])
		step := m[1]
		if strings.HasPrefix(step, "exec ") {
			step = "exec"
		}
		r.steps[step] = time.Duration(ms) * time.Millisecond
	}
	r.restored = strings.Contains(r.line, "(restored from snapshot ")
	return r
}

// runscArgs runs `true` under gVisor; as root runsc needs no network
// (it cannot set one up in the root network namespace).
func runscArgs(b *testing.B) []string {
	b.Helper()
	if _, err := exec.LookPath("runsc"); err != nil {
		b.Fatal("runsc is needed for the baseline (apt-get install runsc)")
	}
	args := []string{"--network=none"}
	if os.Geteuid() != 0 {
		args = append(args, "--rootless")
	}
	return append(args, "do", "true")
}

func timeCmd(b *testing.B, name string, args ...string) time.Duration {
	b.Helper()
	start := time.Now()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		b.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return time.Since(start)
}

func walls(rs []vRun) []time.Duration {
	var ds []time.Duration
	for _, r := range rs {
		ds = append(ds, r.wall)
	}
	return ds
}

// stepMedians formats the median of each step of the runs.
func stepMedians(rs []vRun, steps ...string) string {
	var parts []string
	for _, s := range steps {
		var ds []time.Duration
		for _, r := range rs {
			if d, ok := r.steps[s]; ok {
				ds = append(ds, d)
			}
		}
		if len(ds) > 0 {
			parts = append(parts, fmt.Sprintf("%s %s", s, median(ds)))
		}
	}
	return strings.Join(parts, ", ")
}

// compareRestore runs exec args restored, cold (--no-snapshot) and runsc
// do true, alternating, and prints medians and ratios.
func compareRestore(b *testing.B, label string, args []string) {
	env := snapEnv(b)
	runsc := runscArgs(b)
	// One of each first: page cache, the snapshot's pages, runsc's.
	runV(b, env, args...)
	timeCmd(b, "runsc", runsc...)
	var restored, cold []vRun
	var gvisor []time.Duration
	for i := 0; i < *rounds; i++ {
		r := runV(b, env, args...)
		if !r.restored {
			b.Fatalf("not restored: %s", r.line)
		}
		restored = append(restored, r)
		c := runV(b, env, append([]string{"--no-snapshot"}, args...)...)
		if c.restored {
			b.Fatalf("restored with --no-snapshot: %s", c.line)
		}
		cold = append(cold, c)
		gvisor = append(gvisor, timeCmd(b, "runsc", runsc...))
	}
	mr, mc, mg := median(walls(restored)), median(walls(cold)), median(gvisor)
	fmt.Printf("(snap %s) %d rounds: restored median %s (min %s), cold %s (min %s): %.3fx (target <= 0.15x); runsc do true %s (min %s): %.2fx (target <= 1.00x)\n",
		label, *rounds, mr.Round(time.Millisecond), slices.Min(walls(restored)).Round(time.Millisecond),
		mc.Round(time.Millisecond), slices.Min(walls(cold)).Round(time.Millisecond), float64(mr)/float64(mc),
		mg.Round(time.Millisecond), slices.Min(gvisor).Round(time.Millisecond), float64(mr)/float64(mg))
	steps := []string{"prepare disks", "start vm", "agent ready", "mount", "exec", "shut down guest", "stop vm", "write back", "total"}
	fmt.Printf("    restored, medians of -v steps: %s\n", stepMedians(restored, steps...))
	fmt.Printf("    cold, medians of -v steps:     %s\n", stepMedians(cold, steps...))
	fmt.Printf("    a restored run: %s\n", restored[len(restored)/2].line)
	b.ReportMetric(float64(mr.Milliseconds()), "ms/restored")
	b.ReportMetric(float64(mc.Milliseconds()), "ms/cold")
	b.ReportMetric(float64(mg.Milliseconds()), "ms/runsc")
	b.ReportMetric(float64(mr)/float64(mc), "x-cold")
	b.ReportMetric(float64(mr)/float64(mg), "x-runsc")
}

// BenchmarkSnapshotExec is (snap a) and (snap b).
func BenchmarkSnapshotExec(b *testing.B) {
	compareRestore(b, "a/b", []string{"--", "true"})
}

// BenchmarkSnapshotExecAddDir is (snap c): one read-only directory of
// 100 files (1 MB) and one read-write directory of 10, which every run
// turns into images, mounts, and (the read-write one) writes back.
func BenchmarkSnapshotExecAddDir(b *testing.B) {
	src, out := b.TempDir(), b.TempDir()
	data := make([]byte, 10<<10)
	for i := 0; i < 100; i++ {
		if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("f%03d", i)), data, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < 10; i++ {
		if err := os.WriteFile(filepath.Join(out, fmt.Sprintf("f%03d", i)), data[:100], 0o644); err != nil {
			b.Fatal(err)
		}
	}
	compareRestore(b, "c", []string{"-d", src + ":/src:ro", "-d", out + ":/out:rw", "--", "true"})
}

// mapping is one mapping of /proc/PID/smaps, in KiB.
type mapping struct {
	path                          string
	size, rss, anon, shared, priv int64
}

func smaps(b *testing.B, pid int) []mapping {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	var ms []mapping
	sc := bufio.NewScanner(f)
	header := regexp.MustCompile(`^[0-9a-f]+-[0-9a-f]+ `)
	for sc.Scan() {
		line := sc.Text()
		if header.MatchString(line) {
			fields := strings.Fields(line)
			m := mapping{}
			if len(fields) >= 6 {
				m.path = fields[5]
			}
			ms = append(ms, m)
			continue
		}
		if len(ms) == 0 {
			continue
		}
		m := &ms[len(ms)-1]
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "Size:":
			m.size = n
		case "Rss:":
			m.rss = n
		case "Anonymous:":
			m.anon = n
		case "Shared_Clean:", "Shared_Dirty:":
			m.shared += n
		case "Private_Clean:", "Private_Dirty:":
			m.priv += n
		}
	}
	return ms
}

// vmMemory is what one VM's QEMU holds, in KiB: guestPrivate is guest RAM
// that is this VM's alone (copied on write from the RAM file, or, booted,
// every page the guest touched); guestShared the RAM file's page cache it
// maps (shared with every other restore of the snapshot); own QEMU's
// anonymous memory besides (heap, translated code, stacks); files the
// rest (QEMU's binary and libraries, shared by every QEMU).
type vmMemory struct {
	guestPrivate, guestShared, own, files int64
}

func (m vmMemory) private() int64 { return m.guestPrivate + m.own }

func measureVM(b *testing.B, env []string, args ...string) (vmMemory, bool) {
	b.Helper()
	var runDir string
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "MVM_RUN_DIR="); ok {
			runDir = v
		}
	}
	cmd := exec.Command(*mvmctl, append(append([]string{"-v", "exec"}, args...), "--", "sh", "-c", "echo ready; read x")...)
	cmd.Env = env
	stdin, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		b.Fatalf("got %q: %s", line, stderr.String())
	}
	time.Sleep(500 * time.Millisecond)
	var vm vmMemory
	for _, m := range smaps(b, findVMM(b, runDir)) {
		switch {
		case strings.HasSuffix(m.path, "/ram"):
			// Private_Clean pages of the file are page cache no other
			// process maps yet: shared memory all the same.
			vm.guestPrivate += m.anon
			vm.guestShared += m.rss - m.anon
		case m.path == "" && m.size<<10 == mvm.DefaultMemory:
			vm.guestPrivate += m.anon
		case m.path == "" || strings.HasPrefix(m.path, "["):
			vm.own += m.anon
		default:
			vm.files += m.rss
			vm.own += m.anon
		}
	}
	_, _ = io.WriteString(stdin, "done\n")
	stdin.Close()
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		b.Fatalf("mvmctl: %v\n%s", err, stderr.String())
	}
	return vm, strings.Contains(stderr.String(), "(restored from snapshot ")
}

// BenchmarkSnapshotMemory is (snap d): QEMU's memory while a command runs,
// cold against restored; medians of three each.
func BenchmarkSnapshotMemory(b *testing.B) {
	env := snapEnv(b)
	var cold, restored []vmMemory
	for i := 0; i < 3; i++ {
		r, ok := measureVM(b, env)
		if !ok {
			b.Fatal("not restored")
		}
		restored = append(restored, r)
		c, ok := measureVM(b, env, "--no-snapshot")
		if ok {
			b.Fatal("restored with --no-snapshot")
		}
		cold = append(cold, c)
	}
	med := func(vs []vmMemory, f func(vmMemory) int64) float64 {
		var xs []float64
		for _, v := range vs {
			xs = append(xs, float64(f(v)))
		}
		return medianF(xs) / 1024
	}
	for _, s := range []struct {
		name string
		vs   []vmMemory
	}{{"cold", cold}, {"restored", restored}} {
		fmt.Printf("(snap d) %s, %d MiB guest: private %.1f MiB (guest RAM of its own %.1f MiB, QEMU's own %.1f MiB); shared: the RAM file's page cache %.1f MiB, QEMU's files %.1f MiB\n",
			s.name, mvm.DefaultMemory>>20, med(s.vs, vmMemory.private), med(s.vs, func(v vmMemory) int64 { return v.guestPrivate }),
			med(s.vs, func(v vmMemory) int64 { return v.own }), med(s.vs, func(v vmMemory) int64 { return v.guestShared }),
			med(s.vs, func(v vmMemory) int64 { return v.files }))
	}
	p := med(restored, vmMemory.private)
	fmt.Printf("    restored private memory %.1f MiB (target <= 40 MiB), cold %.1f MiB\n", p, med(cold, vmMemory.private))
	b.ReportMetric(p, "MiB-private-restored")
	b.ReportMetric(med(cold, vmMemory.private), "MiB-private-cold")
}
