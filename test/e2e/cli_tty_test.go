package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hostPTY is a pseudo-terminal on the host, standing in for the user's
// terminal: mvmctl gets the slave as its controlling terminal and stdio,
// the test types into and reads from the master.
type hostPTY struct {
	master, slave *os.File

	mu  sync.Mutex
	out bytes.Buffer
}

func openHostPTY(t *testing.T, rows, cols uint16) *hostPTY {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd := int(m.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := &hostPTY{master: m, slave: s}
	p.resize(t, rows, cols)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := m.Read(buf)
			p.mu.Lock()
			p.out.Write(buf[:n])
			p.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { m.Close(); s.Close() })
	return p
}

func (p *hostPTY) resize(t *testing.T, rows, cols uint16) {
	t.Helper()
	if err := unix.IoctlSetWinsize(int(p.slave.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		t.Fatal(err)
	}
}

func (p *hostPTY) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// expect waits until the output after from holds want, and returns the
// offset after it.
func (p *hostPTY) expect(t *testing.T, from int, want string) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		out := p.output()
		if i := strings.Index(out[from:], want); i >= 0 {
			return from + i + len(want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no %q in the terminal output after offset %d:\n%q", want, from, p.output()[from:])
	return 0
}

func (p *hostPTY) typeIn(t *testing.T, s string) {
	t.Helper()
	if _, err := p.master.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

// An interactive shell on a real terminal: prompt, size, resize, Ctrl-C
// reaching the foreground job and not the VM, the exit status, and the
// host terminal left as it was.
func TestCLITerminal(t *testing.T) {
	e := newEnv(t)
	terminalSession(t, e)
	e.assertClean()
}

func terminalSession(t *testing.T, e *env) {
	p := openHostPTY(t, 30, 100)
	before, err := unix.IoctlGetTermios(int(p.slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, mvmctl, "exec", "-it", "--timeout", "0", "--", "sh", "-i")
	cmd.Env = append(e.environ(), "TERM=vt100", "PS1=mvm$ ")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = p.slave, p.slave, p.slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()

	// PS1 is not passed to the guest, so the prompt is busybox's own.
	at := p.expect(t, 0, "# ")
	p.typeIn(t, "stty size; tty; echo $TERM\r")
	at = p.expect(t, at, "30 100\r\n/dev/pts/")
	at = p.expect(t, at, "vt100\r\n")

	p.resize(t, 40, 120)
	time.Sleep(300 * time.Millisecond)
	p.typeIn(t, "stty size\r")
	at = p.expect(t, at, "40 120\r\n")

	p.typeIn(t, "sleep 100\r")
	time.Sleep(time.Second)
	p.typeIn(t, "\x03")
	p.typeIn(t, "echo alive $?\r")
	at = p.expect(t, at, "alive 130\r\n")

	p.typeIn(t, "exit 3\r")
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("mvmctl did not exit; terminal:\n%q", p.output())
	}
	if code := cmd.ProcessState.ExitCode(); code != 3 {
		t.Fatalf("exit %d, want 3; terminal:\n%q", code, p.output())
	}
	after, err := unix.IoctlGetTermios(int(p.slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if *after != *before {
		t.Errorf("terminal modes changed by the run:\nbefore %+v\nafter  %+v", *before, *after)
	}
}

// -t without a terminal: -it with piped stdin is refused before boot;
// -t alone still gives the command a terminal.
func TestCLITerminalRules(t *testing.T) {
	e := newEnv(t)
	r := e.run(strings.NewReader("x\n"), "exec", "-it", "--", "true")
	if r.code != 125 || !strings.Contains(string(r.stderr), "the input device is not a TTY") || r.elapsed > 2*time.Second {
		t.Fatalf("-it with a pipe: got %s", r)
	}
	if entries, _ := os.ReadDir(e.runDir); len(entries) != 0 {
		t.Errorf("a run started")
	}
	r = e.run(nil, "exec", "-t", "--", "sh", "-c", `tty; stty size; echo err >&2; exit 3`)
	out := string(r.stdout)
	if r.code != 3 || !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "24 80\r\n") || !strings.Contains(out, "err\r\n") {
		t.Fatalf("-t alone: got %s", r)
	}
	if len(r.stderr) != 0 {
		t.Errorf("stderr %q: with -t everything comes on stdout", r.stderr)
	}
	e.assertClean()
}
