package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The tests in this file boot a guest whose /init attacks the host through
// the agent's port (testdata/hostile-agent) or floods it as any command
// may, and check what the host does about it: mvmctl exits 125 with one
// line in bounded time, stays under maxHostRSS, and leaves nothing behind.

// maxHostRSS is the most mvmctl itself may hold, whatever the guest does.
const maxHostRSS = 64 << 20

// hostileExitBound is how long mvmctl may take, boot included, to notice a
// guest breaking the protocol and to tear the VM down. Measured: 1-2 s
// under TCG; the bound leaves room for a loaded machine.
const hostileExitBound = 15 * time.Second

// hostileCache builds the hostile agent and bootstraps an image cache with
// it as the guest's /init, reusing the suite's kernel.
func hostileCache(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "hostile-agent")
	build := exec.Command("go", "build", "-o", bin, "./testdata/hostile-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the hostile agent: %v\n%s", err, out)
	}
	kernel, err := userKernel()
	if err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(dir, "cache")
	boot := exec.Command(mvmctl, "bootstrap", "--no-snapshot", "--kernel", kernel)
	boot.Env = append(os.Environ(), "MVM_AGENT="+bin, "MVM_CACHE_DIR="+cache)
	if out, err := boot.CombinedOutput(); err != nil {
		t.Fatalf("bootstrap with the hostile agent: %v\n%s", err, out)
	}
	return cache
}

// measured is a result with mvmctl's peak resident memory.
type measured struct {
	result
	peakRSS int64 // bytes
}

func (m measured) peakKiB() int64 { return m.peakRSS >> 10 }

// runMeasured runs mvmctl with extra environment, sampling its peak RSS
// (VmHWM) until it exits. The child's rusage cannot be used: its maxrss
// includes QEMU's, which mvmctl waits for. VmHWM only grows, so the last
// sample before the exit holds every earlier peak.
func (e *env) runMeasured(ctx context.Context, stdout io.Writer, extraEnv []string, args ...string) measured {
	e.t.Helper()
	cmd := exec.CommandContext(ctx, mvmctl, args...)
	cmd.Env = append(e.environ(), extraEnv...)
	cmd.WaitDelay = 5 * time.Second
	var out, errb bytes.Buffer
	if stdout == nil {
		stdout = &out
	}
	cmd.Stdout, cmd.Stderr = stdout, &errb
	start := time.Now()
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var peak int64
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var err error
wait:
	for {
		if hwm := vmHWM(cmd.Process.Pid); hwm > peak {
			peak = hwm
		}
		select {
		case err = <-exited:
			break wait
		case <-tick.C:
		}
	}
	r := result{stdout: out.Bytes(), stderr: errb.Bytes(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("run mvmctl %q: %v", args, err)
	}
	return measured{result: r, peakRSS: peak}
}

// vmHWM is a process's peak resident set in bytes, 0 once it is gone.
func vmHWM(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// assertOneLine checks that stderr is one line from mvmctl containing want.
func assertOneLine(t *testing.T, stderr []byte, want string) {
	t.Helper()
	s := string(stderr)
	if !strings.HasPrefix(s, "mvmctl: ") || strings.Count(s, "\n") != 1 || !strings.HasSuffix(s, "\n") {
		t.Errorf("stderr is not one mvmctl line: %q", s)
	}
	if !strings.Contains(s, want) {
		t.Errorf("stderr %q does not say %q", s, want)
	}
}

// TestHostileGuest boots guests that break the protocol in each way a
// hostile guest can reach the host's reader: mvmctl must end the session,
// tear the VM down and exit 125 with one line, in bounded time and memory.
func TestHostileGuest(t *testing.T) {
	cache := hostileCache(t)
	for _, mode := range []string{
		"huge-frame",   // a 4 GiB frame header, then garbage
		"garbage",      // random bytes
		"ping-flood",   // pings, never reading the answers
		"open-streams", // streams opened from the guest side
	} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			r := e.runMeasured(ctx, nil, []string{"MVM_CACHE_DIR=" + cache, "MVM_KERNEL_ARGS=mvm.hostile=" + mode},
				"exec", "--", "true")
			t.Logf("exit %d after %s, peak RSS %.1f MiB: %s", r.code, r.elapsed.Round(time.Millisecond), float64(r.peakRSS)/(1<<20), bytes.TrimSpace(r.stderr))
			if r.code != 125 {
				t.Errorf("exit %d, want 125\n%s", r.code, r)
			}
			assertOneLine(t, r.stderr, "protocol error")
			if r.elapsed > hostileExitBound {
				t.Errorf("took %s, bound %s", r.elapsed, hostileExitBound)
			}
			if r.peakRSS == 0 || r.peakRSS > maxHostRSS {
				t.Errorf("peak RSS %d bytes, limit %d", r.peakRSS, maxHostRSS)
			}
			e.assertClean()
		})
	}
}

// TestHostileGuestFrozenAgent: the agent answers the hello, reports the
// command started, and never reads or writes again (a frozen or halted
// guest). Nothing but a liveness check on the host can notice; the run
// uses --timeout 0 so that the command's own timeout does not end it.
// The host's keepalive (a ping every 2 s, 5 s to answer) is what ends
// it.
func TestHostileGuestFrozenAgent(t *testing.T) {
	cache := hostileCache(t)
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), hostileExitBound+30*time.Second)
	defer cancel()
	r := e.runMeasured(ctx, nil, []string{"MVM_CACHE_DIR=" + cache, "MVM_KERNEL_ARGS=mvm.hostile=frozen"},
		"exec", "--timeout", "0", "--", "sleep", "1000")
	t.Logf("exit %d after %s, peak RSS %.1f MiB: %s", r.code, r.elapsed.Round(time.Millisecond), float64(r.peakRSS)/(1<<20), bytes.TrimSpace(r.stderr))
	if ctx.Err() != nil {
		t.Fatalf("mvmctl still running after %s with a frozen agent; killed", hostileExitBound+30*time.Second)
	}
	if r.code != 125 {
		t.Errorf("exit %d, want 125\n%s", r.code, r)
	}
	assertOneLine(t, r.stderr, "")
	if r.elapsed > hostileExitBound {
		t.Errorf("took %s, bound %s", r.elapsed, hostileExitBound)
	}
	if r.peakRSS > maxHostRSS {
		t.Errorf("peak RSS %d bytes, limit %d", r.peakRSS, maxHostRSS)
	}
	e.assertClean()
}

// slowWriter takes a chunk, then pauses: a host reader slower than the
// guest.
type slowWriter struct {
	n     int64
	pause time.Duration
}

func (w *slowWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	time.Sleep(w.pause)
	return len(p), nil
}

// TestOutputFloodIntoSlowReader: a command writes far more than the
// protocol's windows while mvmctl's stdout drains slowly. Flow control
// must hold the guest back; mvmctl's memory stays bounded and every byte
// arrives.
func TestOutputFloodIntoSlowReader(t *testing.T) {
	e := newEnv(t)
	const size = 32 << 20 // 32 windows' worth
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// About 16 MiB/s at most (64 KiB per write from the pipe, then 4 ms).
	w := &slowWriter{pause: 4 * time.Millisecond}
	r := e.runMeasured(ctx, w, nil, "exec", "--", "dd", "if=/dev/zero", "bs=65536", "count="+strconv.Itoa(size/65536))
	t.Logf("exit %d after %s, %d bytes, peak RSS %.1f MiB", r.code, r.elapsed.Round(time.Millisecond), w.n, float64(r.peakRSS)/(1<<20))
	if r.code != 0 || w.n != size {
		t.Fatalf("got %d bytes, want %d\n%s", w.n, size, r)
	}
	if r.peakRSS == 0 || r.peakRSS > maxHostRSS {
		t.Errorf("peak RSS %d bytes, limit %d", r.peakRSS, maxHostRSS)
	}
	e.assertClean()
}
