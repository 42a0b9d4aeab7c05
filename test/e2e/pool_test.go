package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests here start a pool (mvmctl pool start) in a test's env and run
// commands as a user does; runs in the same env take the pool's VMs. Each
// checks what the user sees, pooled and not.

// poolEnv is an env with a pool started in it.
type poolEnv struct {
	*env
}

// startPool starts a pool with args in a fresh env and waits for its VMs;
// the pool is stopped, and the env checked clean, when the test ends.
func startPool(t *testing.T, args ...string) *poolEnv {
	t.Helper()
	p := &poolEnv{newEnv(t)}
	r := p.run(nil, append([]string{"pool", "start", "--wait"}, args...)...)
	if r.code != 0 {
		t.Fatalf("pool start: %s\nlog: %s", r, p.poolLog())
	}
	t.Cleanup(func() {
		if r := p.run(nil, "pool", "stop"); r.code != 0 {
			t.Errorf("pool stop: %s", r)
		}
		p.assertClean()
	})
	return p
}

func (p *poolEnv) poolLog() string {
	b, _ := os.ReadFile(filepath.Join(p.state, "pool", "pool.log"))
	return tail(string(b))
}

type poolStatus struct {
	PID    int
	Shapes []struct {
		Description            string
		Size                   int
		Ready, Starting, Taken int
		Served, Missed         uint64
		PrivateBytes           int64
		Idle                   bool
		LastError              string
	}
}

func (p *poolEnv) status() poolStatus {
	p.t.Helper()
	r := p.run(nil, "pool", "status", "--json")
	var st poolStatus
	if r.code != 0 || json.Unmarshal(r.stdout, &st) != nil {
		p.t.Fatalf("pool status: %s", r)
	}
	return st
}

// served is how many VMs the pool's shapes handed out.
func (p *poolEnv) served() uint64 {
	var n uint64
	for _, s := range p.status().Shapes {
		n += s.Served
	}
	return n
}

// waitReady waits until every shape has its VMs ready again.
func (p *poolEnv) waitReady() {
	p.t.Helper()
	if !waitFor(time.Minute, func() bool {
		for _, s := range p.status().Shapes {
			if s.Ready < s.Size {
				return false
			}
		}
		return true
	}) {
		p.t.Fatalf("the pool did not refill: %+v\nlog: %s", p.status(), p.poolLog())
	}
}

// TestPoolSameAsUnpooled: what a run prints and exits with is the same
// whether it took a pool's VM or started its own.
func TestPoolSameAsUnpooled(t *testing.T) {
	p := startPool(t, "--size", "2")
	bin := make([]byte, 1<<20)
	rand.Read(bin)
	sum := sha256.Sum256(bin)
	tests := []struct {
		name  string
		stdin []byte
		args  []string
		code  int
	}{
		{"success", nil, []string{"true"}, 0},
		{"own code", nil, []string{"sh", "-c", "exit 7"}, 7},
		{"killed by signal", nil, []string{"sh", "-c", "kill -9 $$"}, 137},
		{"not executable", nil, []string{"/etc/passwd"}, 126},
		{"not found", nil, []string{"mvm-no-such-command"}, 127},
		{"stdout and stderr apart", nil, []string{"sh", "-c", "echo out; echo err >&2; echo out2"}, 0},
		{"stdin binary", bin, []string{"sha256sum"}, 0},
		{"large output", nil, []string{"sh", "-c", "head -c 4000000 /dev/zero | tr '\\0' x; echo"}, 0},
		{"env and workdir", nil, []string{"-e", "A=b c", "-w", "/tmp/w", "--", "sh", "-c", `echo "$A"; pwd`}, 0},
		{"timeout", nil, []string{"--timeout", "1s", "--", "sleep", "30"}, 124},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"exec"}, tt.args...)
			if tt.args[0] != "-e" && tt.args[0] != "--timeout" {
				args = append([]string{"exec", "--"}, tt.args...)
			}
			p.waitReady()
			before := p.served()
			pooled := p.run(bytes.NewReader(tt.stdin), args...)
			if got := p.served(); got != before+1 {
				t.Fatalf("the run did not take a pool VM (served %d -> %d): %s", before, got, pooled)
			}
			cmd := p.command(context.Background(), args...)
			cmd.Env = append(cmd.Env, "MVM_NO_POOL=1")
			var out, errb bytes.Buffer
			cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(tt.stdin), &out, &errb
			_ = cmd.Run()
			own := result{stdout: out.Bytes(), stderr: errb.Bytes(), code: cmd.ProcessState.ExitCode()}
			if pooled.code != tt.code || own.code != tt.code {
				t.Fatalf("exit codes: pooled %s\nown VM %s\nwant %d", pooled, own, tt.code)
			}
			if !bytes.Equal(pooled.stdout, own.stdout) || !bytes.Equal(pooled.stderr, own.stderr) {
				t.Fatalf("output differs:\npooled %s\nown VM %s", pooled, own)
			}
			if tt.name == "stdin binary" && !bytes.HasPrefix(pooled.stdout, []byte(fmt.Sprintf("%x", sum))) {
				t.Fatalf("sha256 of stdin: %s", pooled)
			}
		})
	}
}

// TestPoolInterrupt: Ctrl-C reaches a pooled run's command as it does an
// unpooled one's, and a second one tears the run down at once.
func TestPoolInterrupt(t *testing.T) {
	p := startPool(t, "--size", "1")
	for _, mode := range []string{"pooled", "own VM"} {
		t.Run(mode, func(t *testing.T) {
			p.waitReady()
			cmd := p.command(context.Background(), "exec", "--", "sh", "-c", `trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 1; done`)
			if mode == "own VM" {
				cmd.Env = append(cmd.Env, "MVM_NO_POOL=1")
			}
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			rd := bufio.NewReader(out)
			if l, _ := rd.ReadString('\n'); l != "ready\n" {
				t.Fatalf("first line %q", l)
			}
			_ = cmd.Process.Signal(syscall.SIGINT)
			rest, _ := rd.ReadString(0)
			_ = cmd.Wait()
			if rest != "got INT\n" || cmd.ProcessState.ExitCode() != 5 {
				t.Fatalf("after SIGINT: %q, exit %d", rest, cmd.ProcessState.ExitCode())
			}

			// A command that ignores the interrupt: the second one ends the run.
			cmd = p.command(context.Background(), "exec", "--", "sh", "-c", `trap '' INT; echo ready; sleep 60`)
			if mode == "own VM" {
				cmd.Env = append(cmd.Env, "MVM_NO_POOL=1")
			}
			out, _ = cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			rd = bufio.NewReader(out)
			if l, _ := rd.ReadString('\n'); l != "ready\n" {
				t.Fatalf("first line %q", l)
			}
			_ = cmd.Process.Signal(syscall.SIGINT)
			time.Sleep(200 * time.Millisecond)
			start := time.Now()
			_ = cmd.Process.Signal(syscall.SIGINT)
			_ = cmd.Wait()
			if code := cmd.ProcessState.ExitCode(); code != 130 || time.Since(start) > 3*time.Second {
				t.Fatalf("after a second SIGINT: exit %d after %s, want 130 within 3s", code, time.Since(start))
			}
		})
	}
}

// TestPoolTerminal: TestCLITerminal's session (prompt, size, resize,
// Ctrl-C to the foreground job, the exit status, the host terminal left
// as it was) on a pool's VM.
func TestPoolTerminal(t *testing.T) {
	p := startPool(t, "--size", "1")
	terminalSession(t, p.env)
	if n := p.served(); n != 1 {
		t.Fatalf("the session did not take the pool's VM (served %d)", n)
	}
}

// TestPoolConcurrentRunsFresh: two runs at once take two VMs, each with
// its own boot id and random bytes, and a clock set when it was handed
// out.
func TestPoolConcurrentRunsFresh(t *testing.T) {
	p := startPool(t, "--size", "2")
	// The VMs were restored a while before they are taken: their clock
	// must still be the host's at the run.
	time.Sleep(2 * time.Second)
	probe := []string{"exec", "--", "sh", "-c", "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"}
	var wg sync.WaitGroup
	res := make([]result, 2)
	for i := range res {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = p.run(nil, probe...)
		}()
	}
	wg.Wait()
	if n := p.served(); n != 2 {
		t.Fatalf("served %d VMs, want 2 (%s; %s)", n, res[0], res[1])
	}
	var lines [2][]string
	for i, r := range res {
		lines[i] = strings.Split(strings.TrimSpace(string(r.stdout)), "\n")
		if r.code != 0 || len(lines[i]) != 3 {
			t.Fatalf("run %d: %s", i, r)
		}
		var guest int64
		fmt.Sscan(lines[i][2], &guest)
		if d := time.Now().Unix() - guest; d < -1 || d > 3 {
			t.Errorf("run %d: guest clock %d, host %d", i, guest, time.Now().Unix())
		}
	}
	if lines[0][0] == lines[1][0] {
		t.Errorf("both runs had boot id %s", lines[0][0])
	}
	if lines[0][1] == lines[1][1] {
		t.Errorf("both runs read the same random bytes %s", lines[0][1])
	}
}

// TestPoolFallback: a run the pool has no VM for starts its own, as
// before, and -v says which path each run took.
func TestPoolFallback(t *testing.T) {
	p := startPool(t, "--size", "1")
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("shared\n"), 0o644)
	tests := []struct {
		name string
		args []string
		why  string
	}{
		{"pooled", []string{"exec", "--", "echo", "hi"}, "take from pool"},
		{"another shape", []string{"exec", "--cpus", "1", "--", "echo", "hi"}, "not taken: the pool keeps no VMs of this shape"},
		{"shared directory", []string{"exec", "-d", dir + ":/d", "--", "sh", "-c", "cat /d/f >/dev/null; echo hi"}, "not taken: shared directories"},
		{"no pool", []string{"exec", "--", "echo", "hi"}, "not taken: MVM_NO_POOL=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p.waitReady()
			cmd := p.command(context.Background(), append([]string{"-v"}, tt.args...)...)
			if tt.name == "no pool" {
				cmd.Env = append(cmd.Env, "MVM_NO_POOL=1")
			}
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			err := cmd.Run()
			if err != nil || out.String() != "hi\n" {
				t.Fatalf("%v: stdout %q stderr %s", err, out.String(), tail(errb.String()))
			}
			if !strings.Contains(errb.String(), tt.why) {
				t.Fatalf("-v should say %q: %s", tt.why, tail(errb.String()))
			}
		})
	}
}

// TestPoolTemplate: a pool of a template's shape serves runs on it.
func TestPoolTemplate(t *testing.T) {
	tree := templateTree(t, t.TempDir())
	data := filepath.Join(t.TempDir(), "data")
	t.Setenv("MVM_DATA_DIR", data)
	e := newEnv(t)
	if r := e.run(nil, "template", "create", "tiny", "--from-dir", tree); r.code != 0 {
		t.Fatalf("template create: %s", r)
	}
	p := &poolEnv{e}
	if r := p.run(nil, "pool", "start", "--wait", "--template", "tiny", "--cpus", "1", "--memory", "256M"); r.code != 0 {
		t.Fatalf("pool start: %s\n%s", r, p.poolLog())
	}
	defer func() {
		p.run(nil, "pool", "stop")
		p.assertClean()
	}()
	r := p.run(nil, "-v", "exec", "--template", "tiny", "--cpus", "1", "--memory", "256M", "--", "sh", "-c", "cat /etc/os-release; echo x > /root/new; cat /root/new")
	if r.code != 0 || string(r.stdout) != "NAME=mvm-test-template\nID=mvmtest\nx\n" || !bytes.Contains(r.stderr, []byte("take from pool")) {
		t.Fatalf("pooled template run: %s", r)
	}
	// The next VM is a fresh one: nothing of the last run is left.
	p.waitReady()
	r = p.run(nil, "exec", "--template", "tiny", "--cpus", "1", "--memory", "256M", "--", "ls", "/root")
	if r.code != 0 || len(r.stdout) != 0 || p.served() != 2 {
		t.Fatalf("second pooled run saw the first's file: %s (served %d)", r, p.served())
	}
}

// TestPoolKilled: a pool killed with SIGKILL leaves no VMM; the next run
// starts its own VM and its reclaim pass removes the pool's directories.
func TestPoolKilled(t *testing.T) {
	p := &poolEnv{newEnv(t)}
	if r := p.run(nil, "pool", "start", "--wait", "--size", "2"); r.code != 0 {
		t.Fatalf("pool start: %s", r)
	}
	st := p.status()
	if len(p.vmms()) != 2 {
		t.Fatalf("VMMs of a pool of 2: %v", p.vmms())
	}
	// A run on one of its VMs when it dies fails clearly.
	cmd := p.command(context.Background(), "exec", "--", "sh", "-c", "echo started; sleep 30; echo never")
	out, _ := cmd.StdoutPipe()
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(out)
	if l, _ := rd.ReadString('\n'); l != "started\n" {
		t.Fatalf("first line %q", l)
	}
	if err := syscall.Kill(st.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	rest, _ := rd.ReadString(0)
	_ = cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 125 || rest != "" || !strings.Contains(errb.String(), "of your pool (its pool ended, or the VM died)") {
		t.Fatalf("the run whose pool died: exit %d, stdout %q, stderr %q", code, rest, errb.String())
	}
	if !waitFor(10*time.Second, func() bool { return len(p.vmms()) == 0 }) {
		t.Fatalf("VMMs outlived their pool: %v", p.vmms())
	}
	r := p.run(nil, "-v", "exec", "--", "echo", "hi")
	if r.code != 0 || string(r.stdout) != "hi\n" || bytes.Contains(r.stderr, []byte("take from pool")) || bytes.Contains(r.stderr, []byte("not taken")) || !bytes.Contains(r.stderr, []byte("restored from snapshot")) {
		t.Fatalf("run after the pool died: %s", r)
	}
	p.assertClean()
	if r := p.run(nil, "pool", "status"); r.code != 0 || !bytes.Contains(r.stdout, []byte("no pool is running")) {
		t.Fatalf("pool status: %s", r)
	}
	// And a new pool starts where the dead one was.
	if r := p.run(nil, "pool", "start", "--wait"); r.code != 0 {
		t.Fatalf("pool start after a kill: %s", r)
	}
	if r := p.run(nil, "pool", "stop"); r.code != 0 {
		t.Fatalf("pool stop: %s", r)
	}
	p.assertClean()
}

// TestPoolStopLetsRunFinish: pool stop while a run uses a pool VM waits
// for the run, which ends as it would have.
func TestPoolStopLetsRunFinish(t *testing.T) {
	p := &poolEnv{newEnv(t)}
	if r := p.run(nil, "pool", "start", "--wait", "--size", "1"); r.code != 0 {
		t.Fatalf("pool start: %s", r)
	}
	cmd := p.command(context.Background(), "exec", "--", "sh", "-c", "echo started; sleep 2; echo done; exit 3")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(out)
	if l, _ := rd.ReadString('\n'); l != "started\n" {
		t.Fatalf("first line %q", l)
	}
	stopped := make(chan result, 1)
	go func() { stopped <- p.run(nil, "pool", "stop") }()
	rest, _ := rd.ReadString(0)
	_ = cmd.Wait()
	if rest != "done\n" || cmd.ProcessState.ExitCode() != 3 {
		t.Fatalf("the run during pool stop: %q, exit %d", rest, cmd.ProcessState.ExitCode())
	}
	select {
	case r := <-stopped:
		if r.code != 0 {
			t.Fatalf("pool stop: %s", r)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("pool stop did not return after the run ended")
	}
	p.assertClean()
}

// TestPoolIdleGivesBack: a shape without takes for the idle limit gives
// its VMs back; the next run misses, and the pool fills again.
func TestPoolIdleGivesBack(t *testing.T) {
	p := startPool(t, "--size", "1", "--idle", "2s")
	if !waitFor(20*time.Second, func() bool { s := p.status().Shapes[0]; return s.Idle && s.Ready == 0 }) {
		t.Fatalf("not idle after 2s without takes: %+v", p.status())
	}
	if !waitFor(10*time.Second, func() bool { return len(p.vmms()) == 0 }) {
		t.Fatalf("idle pool still has VMMs: %v", p.vmms())
	}
	r := p.run(nil, "-v", "exec", "--", "true")
	if r.code != 0 || !bytes.Contains(r.stderr, []byte("not taken: the pool has no VM of this shape ready")) {
		t.Fatalf("run on an idle pool: %s", r)
	}
	p.waitReady()
	if s := p.status().Shapes[0]; s.Idle || s.Missed != 1 || s.PrivateBytes <= 0 {
		t.Fatalf("after the miss: %+v", s)
	}
}

// TestPoolOtherUser: another user's runs never take this user's VMs, and
// another uid cannot reach the pool, even through a socket left open.
func TestPoolOtherUser(t *testing.T) {
	p := startPool(t, "--size", "1")
	// Another user has a state directory of their own: no pool there.
	other := newEnv(t)
	if r := other.run(nil, "-v", "exec", "--", "true"); r.code != 0 || bytes.Contains(r.stderr, []byte("take from pool")) {
		t.Fatalf("another user's run: %s", r)
	}
	if os.Geteuid() != 0 {
		return
	}
	for d := filepath.Dir(p.state); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	asNobody := func(args ...string) ([]byte, error) {
		cmd := exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", mvmctl}, args...)...)
		cmd.Env = p.environ()
		return cmd.CombinedOutput()
	}
	for _, args := range [][]string{{"pool", "status"}, {"pool", "stop"}} {
		if out, err := asNobody(args...); err == nil {
			t.Errorf("another user ran mvmctl %q: %s", args, out)
		}
	}
	// Even with the directory and the socket opened to all, the pool
	// refuses a peer of another uid.
	dir := filepath.Join(p.state, "pool")
	for _, d := range []string{p.state, dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(dir, "pool.sock"), 0o666); err != nil {
		t.Fatal(err)
	}
	if out, err := asNobody("pool", "status"); err == nil {
		t.Errorf("another uid read the pool's status through an open socket: %s", out)
	}
	if !waitFor(5*time.Second, func() bool { return strings.Contains(p.poolLog(), "refused a client") }) {
		t.Errorf("the pool did not log the refused peer: %s", p.poolLog())
	}
	if r := p.run(nil, "-v", "exec", "--", "true"); r.code != 0 || !bytes.Contains(r.stderr, []byte("take from pool")) {
		t.Fatalf("the owner's run after another uid's tries: %s", r)
	}
}

// runDirs lists the env's run directories (one per VM, the pool's too).
func (p *poolEnv) runDirs() []string {
	entries, _ := os.ReadDir(p.runDir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// TestPoolTakenVMDies: a run whose pool VM dies under it fails as an
// unpooled run whose VM died (exit 125, at once), and the pool goes on.
func TestPoolTakenVMDies(t *testing.T) {
	p := startPool(t, "--size", "1")
	before := p.runDirs()
	if len(before) != 1 {
		t.Fatalf("run directories of a pool of 1: %v", before)
	}
	c, _ := startReadyArgs(t, p.env, "--timeout", "0", "--", "sh", "-c", "echo ready; sleep 60")
	// Only the taken VM runs until the refill's delay is over.
	vmms := p.vmms()
	if len(vmms) != 1 {
		t.Fatalf("VMMs while the run is young: %v", vmms)
	}
	if err := syscall.Kill(vmms[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 125 || time.Since(start) > 10*time.Second {
		t.Fatalf("exit %d after %s, want 125 at once; stderr %q", code, time.Since(start), c.stderr)
	}
	p.waitReady()
	if r := p.run(nil, "exec", "--", "echo", "hi"); r.code != 0 || string(r.stdout) != "hi\n" {
		t.Fatalf("the next run: %s", r)
	}
}

// TestPoolClientKilled: a pooled run's mvmctl killed while its command
// does not read the stdin it was sent leaves no VM behind.
func TestPoolClientKilled(t *testing.T) {
	p := startPool(t, "--size", "1")
	taken := p.runDirs()
	if len(taken) != 1 {
		t.Fatalf("run directories of a pool of 1: %v", taken)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := p.command(ctx, "exec", "-i", "--timeout", "0", "--", "sh", "-c", "echo ready; sleep 600")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if l, _ := bufio.NewReader(out).ReadString('\n'); l != "ready\n" {
		t.Fatalf("first line %q", l)
	}
	// More than the guest's window: the host side blocks on it.
	go func() {
		chunk := make([]byte, 1<<20)
		for {
			if _, err := in.Write(chunk); err != nil {
				return
			}
		}
	}()
	time.Sleep(time.Second)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if !waitFor(15*time.Second, func() bool {
		for _, d := range p.runDirs() {
			if d == taken[0] {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("the VM %s outlived its killed run: %v", taken[0], p.runDirs())
	}
	p.waitReady()
}

// TestPoolUnresponsive: a pool that does not answer (stopped) costs a
// run about a second, after which it starts its own VM.
func TestPoolUnresponsive(t *testing.T) {
	p := startPool(t, "--size", "1")
	pid := p.status().PID
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(pid, syscall.SIGCONT)
	r := p.run(nil, "-v", "exec", "--", "echo", "hi")
	syscall.Kill(pid, syscall.SIGCONT)
	if r.code != 0 || string(r.stdout) != "hi\n" || !bytes.Contains(r.stderr, []byte("not taken: pool: context deadline exceeded")) {
		t.Fatalf("a run with a stopped pool: %s", r)
	}
	if r.elapsed > 5*time.Second {
		t.Errorf("a stopped pool cost the run %s", r.elapsed)
	}
}
