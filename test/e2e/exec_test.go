package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestExitCodes(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		want       int
		wantStderr string
	}{
		{name: "success", args: []string{"true"}, want: 0},
		{name: "own code", args: []string{"sh", "-c", "exit 7"}, want: 7},
		{name: "killed by signal", args: []string{"sh", "-c", "kill -9 $$"}, want: 137},
		{name: "terminated by signal", args: []string{"sh", "-c", "kill -TERM $$"}, want: 143},
		{name: "not executable", args: []string{"/etc/passwd"}, want: 126, wantStderr: "/etc/passwd"},
		{name: "directory", args: []string{"/tmp"}, want: 126},
		{name: "not found", args: []string{"mvm-no-such-command"}, want: 127, wantStderr: "mvm-no-such-command"},
		{name: "not found by path", args: []string{"/bin/nope"}, want: 127},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.run(nil, append([]string{"exec", "--"}, tt.args...)...)
			if r.code != tt.want {
				t.Fatalf("got %s\nwant exit %d", r, tt.want)
			}
			if len(r.stdout) != 0 {
				t.Errorf("stdout should be empty: %s", r)
			}
			if !strings.Contains(string(r.stderr), tt.wantStderr) {
				t.Errorf("stderr should mention %q: %s", tt.wantStderr, r)
			}
			e.assertClean()
		})
	}
}

func TestUname(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "exec", "--", "uname", "-a")
	if r.code != 0 || !regexp.MustCompile(`^Linux \S+ 6\.\d+\.\d+\S* .*\n$`).Match(r.stdout) {
		t.Fatalf("uname -a: %s", r)
	}
	// mvmctl says nothing of its own without -v.
	if len(r.stderr) != 0 {
		t.Errorf("stderr should be empty without -v: %s", r)
	}
	e.assertClean()
}

func TestTimeout(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "exec", "--timeout", "2s", "--", "sh", "-c", "echo started; sleep 60; echo never")
	if r.code != 124 {
		t.Fatalf("got %s\nwant exit 124", r)
	}
	if string(r.stdout) != "started\n" {
		t.Errorf("stdout = %q, want only the output before the timeout", r.stdout)
	}
	if !strings.Contains(string(r.stderr), "timed out") {
		t.Errorf("stderr should say the command timed out: %s", r)
	}
	// Boot plus 2 s plus teardown; far from the 60 s sleep.
	if r.elapsed > 20*time.Second {
		t.Errorf("took %s; the timeout was not enforced promptly", r.elapsed)
	}
	e.assertClean()
}

func TestTimeoutKillsProcessGroup(t *testing.T) {
	e := newEnv(t)
	// A background child that ignores SIGTERM must die with the group.
	r := e.run(nil, "exec", "--timeout", "1", "--", "sh", "-c", "trap '' TERM; sleep 60 & sleep 60")
	if r.code != 124 {
		t.Fatalf("got %s\nwant exit 124", r)
	}
	e.assertClean()
}

func TestStdin(t *testing.T) {
	e := newEnv(t)
	r := e.run(strings.NewReader("hi\n"), "exec", "--", "sh", "-c", "cat; exit 3")
	if r.code != 3 || string(r.stdout) != "hi\n" {
		t.Fatalf("got %s\nwant stdout \"hi\\n\" and exit 3", r)
	}
}

func TestStdinLargeBinary(t *testing.T) {
	e := newEnv(t)
	in := make([]byte, 3<<20+123)
	if _, err := rand.Read(in); err != nil {
		t.Fatal(err)
	}
	r := e.run(bytes.NewReader(in), "exec", "--", "cat")
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	if !bytes.Equal(r.stdout, in) {
		t.Fatalf("stdout differs from stdin: got %d bytes (sha256 %x), sent %d (sha256 %x)",
			len(r.stdout), sha256.Sum256(r.stdout), len(in), sha256.Sum256(in))
	}
}

func TestStdinEOFWithoutInput(t *testing.T) {
	e := newEnv(t)
	// stdin is /dev/null: the command must see EOF at once, not hang.
	r := e.run(nil, "exec", "--", "sh", "-c", "wc -c")
	if r.code != 0 || strings.TrimSpace(string(r.stdout)) != "0" {
		t.Fatalf("got %s", r)
	}
}

func TestLargeOutputByteExact(t *testing.T) {
	e := newEnv(t)
	// The guest writes 32 MiB of random bytes to stdout and their sha256
	// to stderr; both must arrive intact and apart.
	r := e.run(nil, "exec", "--timeout", "5m", "--", "sh", "-c",
		"head -c 33554432 /dev/urandom > /tmp/data && sha256sum /tmp/data >&2 && cat /tmp/data")
	if r.code != 0 {
		t.Fatalf("got exit %d, stderr %q", r.code, r.stderr)
	}
	if len(r.stdout) != 32<<20 {
		t.Fatalf("stdout has %d bytes, want %d", len(r.stdout), 32<<20)
	}
	sum := sha256.Sum256(r.stdout)
	want := strings.Fields(string(r.stderr))
	if len(want) != 2 || want[0] != hex.EncodeToString(sum[:]) {
		t.Fatalf("sha256 of stdout %x, guest says %q", sum, r.stderr)
	}
}

func TestBinaryOutputAllBytes(t *testing.T) {
	e := newEnv(t)
	var script strings.Builder
	script.WriteString("printf '")
	for i := 0; i < 256; i++ {
		fmt.Fprintf(&script, `\%03o`, i)
	}
	script.WriteString("'")
	r := e.run(nil, "exec", "--", "sh", "-c", script.String())
	want := make([]byte, 256)
	for i := range want {
		want[i] = byte(i)
	}
	if r.code != 0 || !bytes.Equal(r.stdout, want) {
		t.Fatalf("got %s\nwant the 256 byte values in order", r)
	}
}

func TestStdoutStderrApart(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "exec", "--", "sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; done")
	if r.code != 0 || string(r.stdout) != "out1\nout2\nout3\n" || string(r.stderr) != "err1\nerr2\nerr3\n" {
		t.Fatalf("got %s", r)
	}
}

func TestStreaming(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--", "sh", "-c", "echo first; sleep 5; echo second")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(out)
	line, err := br.ReadString('\n')
	if err != nil || line != "first\n" {
		t.Fatalf("first line = %q, %v", line, err)
	}
	firstAt := time.Now()
	rest, _ := io.ReadAll(br)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("mvmctl: %v", err)
	}
	if string(rest) != "second\n" {
		t.Errorf("rest = %q", rest)
	}
	// The first line must have arrived while the guest was still sleeping.
	if gap := time.Since(firstAt); gap < 4*time.Second {
		t.Errorf("first line arrived only %s before the end; output is not streamed", gap)
	}
}

func TestArgvVerbatim(t *testing.T) {
	e := newEnv(t)
	args := []string{"a b", `"double"`, "'single'", "*", ";", "$(touch /tmp/pwned)", "", "x;y", "`id`", "back\\slash", "new\nline", "tab\there", "ünïcödé"}
	r := e.run(nil, append([]string{"exec", "--", "printf", `[%s]\n`}, args...)...)
	var want strings.Builder
	for _, a := range args {
		want.WriteString("[" + a + "]\n")
	}
	if r.code != 0 || string(r.stdout) != want.String() {
		t.Fatalf("got %s\nwant stdout %q", r, want.String())
	}
}

func TestEnvVerbatim(t *testing.T) {
	e := newEnv(t)
	vals := map[string]string{
		"SPACES": "  two  spaces  ",
		"QUOTES": `"double" 'single'`,
		"SUBST":  "$(touch /tmp/pwned) `id` $HOME",
		"EQ":     "a=b=c",
		"EMPTY":  "",
		"NL":     "line1\nline2",
	}
	args := []string{"exec"}
	names := []string{"SPACES", "QUOTES", "SUBST", "EQ", "EMPTY", "NL"}
	for _, k := range names {
		args = append(args, "-e", k+"="+vals[k])
	}
	script := `for k in SPACES QUOTES SUBST EQ EMPTY NL; do eval "printf '[%s]\n' \"\$$k\""; done; test -e /tmp/pwned && echo PWNED`
	r := e.run(nil, append(args, "--", "sh", "-c", script)...)
	var want strings.Builder
	for _, k := range names {
		want.WriteString("[" + vals[k] + "]\n")
	}
	if string(r.stdout) != want.String() {
		t.Fatalf("got %s\nwant stdout %q", r, want.String())
	}
}

func TestWorkdirAndDefaults(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "exec", "-w", "/srv/new dir", "--", "sh", "-c", `pwd; echo "$HOME"; echo "$PATH"`)
	want := "/srv/new dir\n/root\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
	if r.code != 0 || string(r.stdout) != want {
		t.Fatalf("got %s\nwant %q", r, want)
	}
}

func TestResources(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "exec", "--cpus", "3", "--memory", "300M", "--", "sh", "-c",
		`grep -c ^processor /proc/cpuinfo; awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo`)
	lines := strings.Fields(string(r.stdout))
	if r.code != 0 || len(lines) != 2 || lines[0] != "3" {
		t.Fatalf("got %s\nwant 3 CPUs", r)
	}
	// MemTotal is RAM minus what the kernel reserves: a little below 300.
	var mem int
	if _, err := fmt.Sscan(lines[1], &mem); err != nil || mem < 250 || mem > 300 {
		t.Errorf("MemTotal %s MiB, want about 300", lines[1])
	}
}

func TestBrokenPipe(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--", "yes")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	out.Close() // like `| head -1`
	err = cmd.Wait()
	if line != "y\n" {
		t.Errorf("first line %q", line)
	}
	// yes dies of SIGPIPE in the guest, as it would on the host.
	if code := cmd.ProcessState.ExitCode(); code != 141 {
		t.Errorf("exit %d (%v), want 141", code, err)
	}
	e.assertClean()
}

func TestBadInputFailsBeforeBoot(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "memory unit", args: []string{"exec", "--memory", "12X", "--", "true"}, want: `"12X"`},
		{name: "memory too small", args: []string{"exec", "--memory", "16M", "--", "true"}, want: "at least 64M"},
		{name: "timeout", args: []string{"exec", "--timeout", "-5", "--", "true"}, want: `"-5"`},
		{name: "timeout junk", args: []string{"exec", "--timeout", "soon", "--", "true"}, want: `"soon"`},
		{name: "env name", args: []string{"exec", "-e", "1BAD=x", "--", "true"}, want: `"1BAD"`},
		{name: "env injection", args: []string{"exec", "-e", "A;reboot=x", "--", "true"}, want: "must match"},
		{name: "accel", args: []string{"exec", "--accel", "xen", "--", "true"}, want: `"xen"`},
		{name: "cpus", args: []string{"exec", "--cpus", "0", "--", "true"}, want: "--cpus"},
		{name: "relative workdir", args: []string{"exec", "-w", "tmp", "--", "true"}, want: `"tmp"`},
		{name: "no command", args: []string{"exec"}, want: "no command given"},
		{name: "unknown flag", args: []string{"exec", "--bogus", "--", "true"}, want: "--bogus"},
		{name: "missing kernel", args: []string{"exec", "--kernel", "/nonexistent/vmlinux", "--", "true"}, want: "/nonexistent/vmlinux"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.run(nil, tt.args...)
			if r.code != 125 || !strings.Contains(string(r.stderr), tt.want) {
				t.Fatalf("got %s\nwant exit 125 and stderr naming %s", r, tt.want)
			}
			if r.elapsed > time.Second {
				t.Errorf("took %s; bad input must fail before any VM boots", r.elapsed)
			}
			if _, err := os.Stat(e.runDir); err == nil {
				t.Errorf("a run directory was created for bad input")
			}
		})
	}
}

func TestNotBootstrapped(t *testing.T) {
	e := newEnv(t)
	cmd := e.command(context.Background(), "exec", "--", "true")
	cmd.Env = append(cmd.Env, "MVM_CACHE_DIR="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 125 || !strings.Contains(string(out), "mvmctl bootstrap") {
		t.Fatalf("exit %d (%v), output %q: want 125 and the command to run", code, err, out)
	}
}

func TestVerboseTimings(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "-v", "exec", "--", "true")
	if r.code != 0 || !strings.Contains(string(r.stderr), "agent ready") || len(r.stdout) != 0 {
		t.Fatalf("got %s\nwant timings on stderr only", r)
	}
}

func TestInterruptForwarded(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--", "sh", "-c", `trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.1; done`)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(out)
	if line, _ := br.ReadString('\n'); line != "ready\n" {
		t.Fatalf("first line %q", line)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(br)
	_ = cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 42 || string(rest) != "got INT\n" {
		t.Fatalf("exit %d, rest %q: the command should have handled SIGINT and exited 42", code, rest)
	}
	e.assertClean()
}

// startReady starts a long guest command and waits until it prints ready.
func startReady(t *testing.T, e *env, script string) (*execCmd, *bufio.Reader) {
	t.Helper()
	return startReadyArgs(t, e, "--", "sh", "-c", script)
}

// startReadyArgs is startReady with mvmctl exec arguments.
func startReadyArgs(t *testing.T, e *env, args ...string) (*execCmd, *bufio.Reader) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	cmd := e.command(ctx, append([]string{"exec"}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(out)
	if line, _ := br.ReadString('\n'); line != "ready\n" {
		t.Fatalf("first line %q, stderr %q", line, stderr.String())
	}
	return &execCmd{Cmd: cmd, stderr: &stderr}, br
}

func TestInterruptIgnoredTearsDownAfterGrace(t *testing.T) {
	e := newEnv(t)
	c, br := startReady(t, e, `trap '' INT; echo ready; sleep 60`)
	start := time.Now()
	_ = c.Process.Signal(syscall.SIGINT)
	_, _ = io.ReadAll(br)
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 130 {
		t.Fatalf("exit %d, want 130; stderr %q", code, c.stderr)
	}
	if d := time.Since(start); d < 2*time.Second || d > 15*time.Second {
		t.Errorf("teardown after %s, want after the grace period of a few seconds", d)
	}
	e.assertClean()
}

func TestSecondInterruptTearsDownAtOnce(t *testing.T) {
	e := newEnv(t)
	c, br := startReady(t, e, `trap '' INT; echo ready; sleep 60`)
	start := time.Now()
	_ = c.Process.Signal(syscall.SIGINT)
	time.Sleep(200 * time.Millisecond)
	_ = c.Process.Signal(syscall.SIGINT)
	_, _ = io.ReadAll(br)
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 130 {
		t.Fatalf("exit %d, want 130; stderr %q", code, c.stderr)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Errorf("second Ctrl-C took %s to tear down", d)
	}
	e.assertClean()
}

func TestSIGTERMForwarded(t *testing.T) {
	e := newEnv(t)
	c, br := startReady(t, e, `echo ready; sleep 60`)
	_ = c.Process.Signal(syscall.SIGTERM)
	_, _ = io.ReadAll(br)
	_ = c.Wait()
	// sh and its sleep die of the forwarded SIGTERM: 128+15.
	if code := c.ProcessState.ExitCode(); code != 143 {
		t.Fatalf("exit %d, want 143; stderr %q", code, c.stderr)
	}
	e.assertClean()
}

func TestKill9ReclaimedByNextRun(t *testing.T) {
	e := newEnv(t)
	c, _ := startReady(t, e, `echo ready; sleep 60`)
	vmms := e.vmms()
	if len(vmms) != 1 {
		t.Fatalf("want one VMM for the run, found %v", vmms)
	}
	_ = c.Process.Kill()
	_ = c.Wait()
	// The VMM dies with mvmctl (parent-death signal)...
	if !waitFor(5*time.Second, func() bool { return len(e.vmms()) == 0 }) {
		t.Fatalf("VMM %v outlived a kill -9 of mvmctl", e.vmms())
	}
	// ...and its run directory is left for the next run to reclaim.
	entries, _ := os.ReadDir(e.runDir)
	if len(entries) != 1 {
		t.Fatalf("expected the killed run's directory, found %d entries", len(entries))
	}
	if r := e.run(nil, "exec", "--", "true"); r.code != 0 {
		t.Fatalf("next run: %s", r)
	}
	e.assertClean()
}

func TestVMMKilledMidRun(t *testing.T) {
	e := newEnv(t)
	c, _ := startReady(t, e, `echo ready; sleep 60`)
	vmms := e.vmms()
	if len(vmms) != 1 {
		t.Fatalf("want one VMM, found %v", vmms)
	}
	if err := syscall.Kill(vmms[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 125 {
		t.Fatalf("exit %d, want 125; stderr %q", code, c.stderr)
	}
	msg := c.stderr.String()
	logRE := regexp.MustCompile(`console log: (\S+\.console\.log)`)
	m := logRE.FindStringSubmatch(msg)
	if m == nil {
		t.Fatalf("stderr %q should name the kept console log", msg)
	}
	if _, err := os.Stat(m[1]); err != nil {
		t.Errorf("kept console log: %v", err)
	}
	if !strings.HasPrefix(m[1], filepath.Join(e.state, "logs")) {
		t.Errorf("console log %s is not under the state dir", m[1])
	}
	e.assertClean()
}
