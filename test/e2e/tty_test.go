package e2e

import (
	"bytes"
	"io"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
)

// screen collects what a terminal shows.
type screen struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *screen) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *screen) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// terminal is an interactive command on a guest terminal.
type terminal struct {
	t      *testing.T
	p      *agentclient.Process
	in     *io.PipeWriter
	screen *screen
	g      *guest
}

func (g *guest) terminal(rows, cols uint16, argv ...string) *terminal {
	g.t.Helper()
	r, w := io.Pipe()
	term := &terminal{t: g.t, in: w, screen: &screen{}, g: g}
	p, err := g.c.Exec(g.ctx(), agentclient.ExecSpec{
		Argv: argv, Stdin: r, Stdout: term.screen, Stderr: term.screen,
		Env: []agentclient.EnvVar{{Name: "PS1", Value: "$ "}, {Name: "TERM", Value: "vt100"}},
		TTY: &agentclient.TTY{Rows: rows, Cols: cols},
	})
	if err != nil {
		g.t.Fatal(err)
	}
	term.p = p
	g.t.Cleanup(func() { w.Close() })
	return term
}

func (term *terminal) typeIn(s string) {
	term.t.Helper()
	if _, err := term.in.Write([]byte(s)); err != nil {
		term.t.Fatal(err)
	}
}

// waitFor waits until the screen matches re, and returns it.
func (term *terminal) waitFor(re string) string {
	term.t.Helper()
	r := regexp.MustCompile(re)
	if !waitFor(time.Minute, func() bool { return r.MatchString(term.screen.String()) }) {
		term.t.Fatalf("the terminal never showed %q; it shows %q", re, term.screen.String())
	}
	return term.screen.String()
}

// TestTTY runs an interactive busybox shell on a guest terminal, in the
// initramfs and in a template's root: the size set before the start and a
// resize show in stty, Ctrl-C interrupts the foreground job and the shell
// survives, tty names a /dev/pts terminal of that root, and the shell's
// exit status is the command's.
func TestTTY(t *testing.T) {
	tmpl := ext4Image(t, templateTree(t, t.TempDir()), "tmpl-0", 64<<20)
	upper := ext4Image(t, "", "root-rw", 64<<20)
	g := bootGuest(t,
		backend.Drive{Path: tmpl, Label: "tmpl-0", ReadOnly: true},
		backend.Drive{Path: upper, Label: "root-rw"},
	)
	if ok, err := g.c.HasCapability(g.ctx(), agentproto.CapExecTTY); err != nil || !ok {
		t.Fatalf("capability %s: %v, %v", agentproto.CapExecTTY, ok, err)
	}
	for _, inRoot := range []bool{false, true} {
		if inRoot {
			if err := g.c.Root(g.ctx(), agentclient.Root{Template: "tmpl-0", Upper: "root-rw"}); err != nil {
				t.Fatal(err)
			}
		}
		term := g.terminal(24, 80, "sh", "-i")
		term.waitFor(`\$ (\x1b\[6n)?$`)
		term.typeIn("stty size; tty; echo $TERM\r")
		out := term.waitFor(`vt100\r\n`)
		if !strings.Contains(out, "24 80\r\n") {
			t.Errorf("root %v: initial size: %q", inRoot, out)
		}
		if !regexp.MustCompile(`\r\n/dev/pts/[0-9]+\r\n`).MatchString(out) {
			t.Errorf("root %v: tty: %q", inRoot, out)
		}
		if err := term.p.Resize(g.ctx(), 40, 120); err != nil {
			t.Fatal(err)
		}
		term.typeIn("stty size\r")
		term.waitFor(`40 120\r\n`)

		term.typeIn("sleep 100\r")
		time.Sleep(500 * time.Millisecond)
		start := time.Now()
		term.typeIn("\x03")
		term.typeIn("echo alive-$((6*7))\r")
		term.waitFor(`alive-42\r\n`)
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("root %v: Ctrl-C took %s to interrupt sleep", inRoot, d)
		}
		term.typeIn("exit 3\r")
		st, err := term.p.Wait(g.ctx())
		if err != nil || st.Code != 3 {
			t.Errorf("root %v: exit 3 gave %+v, %v; the terminal shows %q", inRoot, st, err, term.screen.String())
		}
	}
	// Without input, -t alone: the command still has a terminal.
	r := g.exec(agentclient.ExecSpec{Argv: []string{"sh", "-c", "test -t 0 && test -t 1 && echo yes; printf 'x\\ny'"}, TTY: &agentclient.TTY{Rows: 5, Cols: 5}})
	if r.stdout != "yes\r\nx\r\ny" || r.stderr != "" || r.st.Code != 0 {
		t.Errorf("tty without stdin:\n%s", r)
	}
}
