package mvm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func startFake(t *testing.T) (*Sandbox, *fakeMachine, Config) {
	t.Helper()
	b := newFakeBackend()
	cfg := fakeConfig(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sb, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	m := <-b.started
	t.Cleanup(func() { _, _ = sb.Close(context.Background()) })
	return sb, m, cfg
}

func TestExecResults(t *testing.T) {
	sb, _, _ := startFake(t)
	ctx := context.Background()
	tests := []struct {
		name             string
		cmd              Cmd
		wantCode         int
		wantSignal       syscall.Signal
		wantOut, wantErr string
		wantClass        error
	}{
		{name: "true", cmd: Cmd{Argv: []string{"true"}}},
		{name: "exit 3", cmd: Cmd{Argv: []string{"sh", "-c", "exit 3"}}, wantCode: 3},
		{name: "streams kept apart", cmd: Cmd{Argv: []string{"sh", "-c", "echo out; echo err >&2"}}, wantOut: "out\n", wantErr: "err\n"},
		{name: "env and dir", cmd: Cmd{Argv: []string{"sh", "-c", `echo "$A $B"; pwd`}, Env: []string{"A=1", "B=x y", "A=2"}, Dir: "/tmp"},
			wantOut: "2 x y\n/tmp\n"},
		{name: "stdin", cmd: Cmd{Argv: []string{"cat"}, Stdin: strings.NewReader("in\n")}, wantOut: "in\n"},
		{name: "killed", cmd: Cmd{Argv: []string{"sh", "-c", "kill -9 $$"}}, wantCode: -1, wantSignal: syscall.SIGKILL},
		{name: "timeout", cmd: Cmd{Argv: []string{"sleep", "30"}, Timeout: 200 * time.Millisecond},
			wantCode: -1, wantSignal: syscall.SIGTERM, wantClass: ErrTimeout},
		{name: "not found", cmd: Cmd{Argv: []string{"mvm-no-such-command"}}, wantCode: -1, wantClass: ErrCommandNotFound},
		{name: "not executable", cmd: Cmd{Argv: []string{"/etc/hostname"}}, wantCode: -1, wantClass: ErrNotExecutable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			tt.cmd.Stdout, tt.cmd.Stderr = &out, &errb
			st, err := sb.Exec(ctx, tt.cmd)
			switch {
			case tt.wantClass != nil && !errors.Is(err, tt.wantClass):
				t.Fatalf("err = %v, want %v", err, tt.wantClass)
			case tt.wantClass == nil && err != nil:
				t.Fatalf("err = %v", err)
			}
			if st.Code != tt.wantCode || st.Signal != tt.wantSignal {
				t.Errorf("status %+v, want code %d signal %v", st, tt.wantCode, tt.wantSignal)
			}
			if out.String() != tt.wantOut || errb.String() != tt.wantErr {
				t.Errorf("stdout %q stderr %q, want %q %q", out.String(), errb.String(), tt.wantOut, tt.wantErr)
			}
		})
	}
}

func TestBadRequestsBootNothing(t *testing.T) {
	b := newFakeBackend()
	base := fakeConfig(t, b)
	tests := []struct {
		name string
		cfg  func(Config) Config
	}{
		{"too many cpus", func(c Config) Config { c.CPUs = 65; return c }},
		{"too little memory", func(c Config) Config { c.Memory = 1 << 20; return c }},
		{"odd memory", func(c Config) Config { c.Memory = 100<<20 + 1; return c }},
		{"bad accel", func(c Config) Config { c.Accel = "xen"; return c }},
		{"kernel arg with a space", func(c Config) Config { c.KernelArgs = []string{"a b"}; return c }},
		{"missing dir", func(c Config) Config { c.Dirs = []Dir{{Host: "/nonexistent/mvm", Guest: "/x"}}; return c }},
		{"relative guest path", func(c Config) Config { c.Dirs = []Dir{{Host: t.TempDir(), Guest: "x"}}; return c }},
		{"reserved guest path", func(c Config) Config { c.Dirs = []Dir{{Host: t.TempDir(), Guest: "/proc"}}; return c }},
		{"missing kernel", func(c Config) Config { c.Kernel = "/nonexistent/vmlinux"; return c }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg(base)
			_, err := Start(context.Background(), cfg)
			var re *RequestError
			if !errors.Is(err, ErrInvalid) || !errors.As(err, &re) {
				t.Fatalf("err = %v, want a *RequestError", err)
			}
			select {
			case <-b.started:
				t.Fatal("a machine was started")
			default:
			}
			assertNoRunDirs(t, cfg)
		})
	}
	t.Run("not bootstrapped", func(t *testing.T) {
		cfg := base
		cfg.CacheDir = t.TempDir()
		if _, err := Start(context.Background(), cfg); !errors.Is(err, ErrNotBootstrapped) {
			t.Fatalf("err = %v, want ErrNotBootstrapped", err)
		}
	})
	t.Run("bad command", func(t *testing.T) {
		sb, _, _ := startFake(t)
		for _, c := range []Cmd{
			{},
			{Argv: []string{"a\x00b"}},
			{Argv: []string{"env"}, Env: []string{"1A=x"}},
			{Argv: []string{"env"}, Env: []string{"NOEQUALS"}},
			{Argv: []string{"env"}, Env: []string{"A=x\x00"}},
			{Argv: []string{"pwd"}, Dir: "relative"},
		} {
			if _, err := sb.Exec(context.Background(), c); !errors.Is(err, ErrInvalid) {
				t.Errorf("Exec(%+v) = %v, want ErrInvalid", c, err)
			}
		}
	})
}

// Several commands at once on one sandbox keep their bytes apart.
func TestConcurrentExec(t *testing.T) {
	sb, _, _ := startFake(t)
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			script := fmt.Sprintf(`head -c %d /dev/zero | tr '\0' '%c'`, 200000+i*1000, 'a'+i)
			st, err := sb.Exec(context.Background(), Cmd{Argv: []string{"sh", "-c", script}, Stdout: &out})
			want := bytes.Repeat([]byte{byte('a' + i)}, 200000+i*1000)
			switch {
			case err != nil || !st.Success():
				errs <- fmt.Errorf("exec %d: %v %v", i, st, err)
			case sha256.Sum256(out.Bytes()) != sha256.Sum256(want):
				errs <- fmt.Errorf("exec %d: %d bytes of output, not the %d expected", i, out.Len(), len(want))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// errWriter fails every write with err.
type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

func TestClosedStdoutGivesSIGPIPE(t *testing.T) {
	sb, _, _ := startFake(t)
	var st ExitStatus
	var err error
	within(t, 10*time.Second, "yes into a closed pipe", func() {
		st, err = sb.Exec(context.Background(), Cmd{Argv: []string{"yes"}, Stdout: errWriter{syscall.EPIPE}})
	})
	if err != nil || st.Signal != syscall.SIGPIPE {
		t.Fatalf("status %+v err %v, want death by SIGPIPE", st, err)
	}
}

func TestFailedOutputWriteStopsTheCommand(t *testing.T) {
	sb, _, _ := startFake(t)
	var err error
	within(t, 10*time.Second, "yes into a full disk", func() {
		_, err = sb.Exec(context.Background(), Cmd{Argv: []string{"yes"}, Stdout: errWriter{syscall.ENOSPC}})
	})
	var oe *OutputError
	if !errors.As(err, &oe) || oe.Stream != "stdout" || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("err = %v, want an *OutputError for stdout with ENOSPC", err)
	}
	// The sandbox is still usable.
	if st, err := sb.Exec(context.Background(), Cmd{Argv: []string{"true"}}); err != nil || !st.Success() {
		t.Fatalf("next exec: %v %v", st, err)
	}
}

func TestVMDeathMidRun(t *testing.T) {
	sb, m, cfg := startFake(t)
	p, err := sb.Start(context.Background(), Cmd{Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Started()
	m.crash()
	var werr error
	within(t, 2*time.Second, "noticing the VM's death", func() { _, werr = p.Wait() })
	var ve *VMError
	if !errors.As(werr, &ve) || !strings.Contains(werr.Error(), "signal: killed") {
		t.Fatalf("err = %v, want a *VMError with the VMM's exit", werr)
	}
	if _, err := sb.Exec(context.Background(), Cmd{Argv: []string{"true"}}); !errors.Is(err, ErrVM) {
		t.Errorf("exec on a dead sandbox: %v, want ErrVM", err)
	}
	if _, err := sb.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ve.ConsoleLog == "" {
		t.Fatalf("no console log kept")
	}
	if b, err := os.ReadFile(ve.ConsoleLog); err != nil || string(b) != "fake console\n" {
		t.Errorf("kept console log: %q %v", b, err)
	}
	assertNoRunDirs(t, cfg)
}

func TestFrozenGuestIsNoticed(t *testing.T) {
	defer setKeepalive(200*time.Millisecond, 500*time.Millisecond)()
	sb, m, _ := startFake(t)
	p, err := sb.Start(context.Background(), Cmd{Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Started()
	m.freeze()
	var werr error
	within(t, 3*time.Second, "noticing a frozen agent", func() { _, werr = p.Wait() })
	if !errors.Is(werr, ErrVM) || !strings.Contains(werr.Error(), "stopped answering") {
		t.Fatalf("err = %v, want a VMError saying the agent stopped answering", werr)
	}
	within(t, 5*time.Second, "closing a frozen sandbox", func() { _, _ = sb.Close(context.Background()) })
}

func setKeepalive(interval, timeout time.Duration) (restore func()) {
	oi, ot := keepaliveInterval, keepaliveTimeout
	keepaliveInterval, keepaliveTimeout = interval, timeout
	return func() { keepaliveInterval, keepaliveTimeout = oi, ot }
}

// A guest that does not enforce a timeout is given up on by the host.
func TestHostTimeoutBackstop(t *testing.T) {
	old := hostTimeoutSlack
	hostTimeoutSlack = 300 * time.Millisecond
	defer func() { hostTimeoutSlack = old }()
	sb, m, _ := startFake(t)
	p, err := sb.Start(context.Background(), Cmd{Argv: []string{"sleep", "30"}, Timeout: 5 * time.Second, KillGrace: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Started()
	// The guest stops doing anything, and the keepalive is slower than
	// the timeout: only the backstop can end the wait.
	m.freeze()
	start := time.Now()
	_, werr := p.Wait()
	if el := time.Since(start); el > 6*time.Second {
		t.Errorf("backstop after %s", el)
	}
	if !errors.Is(werr, ErrTimeout) || !errors.Is(werr, ErrVM) {
		t.Fatalf("err = %v, want ErrTimeout and ErrVM", werr)
	}
}

func TestCancelKillsCommand(t *testing.T) {
	sb, _, _ := startFake(t)
	ctx, cancel := context.WithCancel(context.Background())
	dir := t.TempDir()
	p, err := sb.Start(ctx, Cmd{Argv: []string{"sh", "-c", "echo $$ > " + dir + "/pid; exec sleep 30"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Started()
	time.Sleep(100 * time.Millisecond)
	cancel()
	var werr error
	within(t, time.Second, "Wait after cancel", func() { _, werr = p.Wait() })
	if !errors.Is(werr, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", werr)
	}
	b, _ := os.ReadFile(dir + "/pid")
	var pid int
	fmt.Sscanf(string(b), "%d", &pid)
	gone := false
	for i := 0; i < 100 && !gone; i++ {
		gone = syscall.Kill(pid, 0) != nil
		time.Sleep(20 * time.Millisecond)
	}
	if pid == 0 || !gone {
		t.Errorf("command (pid %d) still runs after its context was cancelled", pid)
	}
}

func TestCloseEndsRunningCommands(t *testing.T) {
	sb, _, cfg := startFake(t)
	p, err := sb.Start(context.Background(), Cmd{Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Started()
	within(t, 3*time.Second, "Close", func() { _, _ = sb.Close(context.Background()) })
	var werr error
	within(t, time.Second, "Wait after Close", func() { _, werr = p.Wait() })
	if !errors.Is(werr, ErrClosed) {
		t.Fatalf("err = %v, want ErrClosed", werr)
	}
	if _, err := sb.Exec(context.Background(), Cmd{Argv: []string{"true"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("exec after close: %v", err)
	}
	assertNoRunDirs(t, cfg)
	timings := sb.Timings()
	var names []string
	for _, tm := range timings {
		names = append(names, tm.Step)
	}
	// The command's own timing ends when it does, during teardown.
	steps := slices.DeleteFunc(slices.Clone(names), func(n string) bool { return n == "exec sleep" })
	got := strings.Join(steps, ",")
	want := "reclaim,prepare run,prepare disks,start vm,agent ready,mount,shut down guest,disconnect,stop vm,write back,clean up"
	if got != want || !slices.Contains(names, "exec sleep") {
		t.Errorf("steps %s\nwant  %s and exec sleep", strings.Join(names, ","), want)
	}
}

func sig(ch chan<- os.Signal, s syscall.Signal) { ch <- s }

func TestRunInterrupts(t *testing.T) {
	ready := func(dir string) string {
		return "echo ready > " + dir + "/ready"
	}
	waitReady := func(t *testing.T, dir string) {
		t.Helper()
		for i := 0; i < 500; i++ {
			if _, err := os.Stat(dir + "/ready"); err == nil {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatal("command never got ready")
	}
	t.Run("forwarded to the command", func(t *testing.T) {
		cfg := fakeConfig(t, newFakeBackend())
		dir := t.TempDir()
		sigs := make(chan os.Signal, 2)
		go func() { waitReady(t, dir); sig(sigs, syscall.SIGINT) }()
		res, err := Run(context.Background(), cfg, Cmd{Argv: []string{"sh", "-c", `trap 'echo got it; exit 7' INT; ` + ready(dir) + `; while :; do sleep 0.05; done`}},
			WithSignals(sigs))
		if err != nil || res.Code != 7 || res.Interrupted != 0 {
			t.Fatalf("result %+v err %v, want exit 7 from the command's own handler", res, err)
		}
		assertNoRunDirs(t, cfg)
	})
	t.Run("grace runs out", func(t *testing.T) {
		cfg := fakeConfig(t, newFakeBackend())
		dir := t.TempDir()
		sigs := make(chan os.Signal, 2)
		go func() { waitReady(t, dir); sig(sigs, syscall.SIGTERM) }()
		start := time.Now()
		res, err := Run(context.Background(), cfg, Cmd{Argv: []string{"sh", "-c", `trap '' TERM; ` + ready(dir) + `; sleep 30`}},
			WithSignals(sigs), WithInterruptGrace(300*time.Millisecond))
		if !errors.Is(err, ErrInterrupted) || res.Interrupted != syscall.SIGTERM {
			t.Fatalf("result %+v err %v, want an interrupted run", res, err)
		}
		if el := time.Since(start); el > 5*time.Second {
			t.Errorf("took %s", el)
		}
		assertNoRunDirs(t, cfg)
	})
	t.Run("second interrupt tears down at once", func(t *testing.T) {
		cfg := fakeConfig(t, newFakeBackend())
		dir := t.TempDir()
		sigs := make(chan os.Signal, 2)
		var second time.Time
		go func() {
			waitReady(t, dir)
			sig(sigs, syscall.SIGINT)
			time.Sleep(100 * time.Millisecond)
			second = time.Now()
			sig(sigs, syscall.SIGINT)
		}()
		res, err := Run(context.Background(), cfg, Cmd{Argv: []string{"sh", "-c", `trap '' INT; ` + ready(dir) + `; sleep 30`}},
			WithSignals(sigs))
		if el := time.Since(second); el > 2*time.Second {
			t.Errorf("run ended %s after the second interrupt, want under 2s", el)
		}
		if !errors.Is(err, ErrInterrupted) || res.Interrupted != syscall.SIGINT {
			t.Fatalf("result %+v err %v", res, err)
		}
	})
	t.Run("while starting", func(t *testing.T) {
		b := newFakeBackend()
		cfg := fakeConfig(t, b)
		sigs := make(chan os.Signal, 2)
		sigs <- syscall.SIGINT
		res, err := Run(context.Background(), cfg, Cmd{Argv: []string{"true"}}, WithSignals(sigs))
		if !errors.Is(err, ErrInterrupted) || res.Interrupted != syscall.SIGINT {
			t.Fatalf("result %+v err %v", res, err)
		}
		assertNoRunDirs(t, cfg)
	})
}
