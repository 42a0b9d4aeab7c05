package agent

import (
	"bytes"
	"errors"
	"io"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// ttyExec is a command on a terminal of an in-process agent, run as a real
// process of the test machine: the test types into it and watches what
// the terminal shows.
type ttyExec struct {
	t  *testing.T
	h  *testHost
	id string
	st *mux.Stream

	mu     sync.Mutex
	out    bytes.Buffer
	stderr int // bytes that (wrongly) came on FD_STDERR
	exited *agentpb.Exited
	done   chan struct{}
}

var ttySeq int

func startTTY(t *testing.T, h *testHost, rows, cols uint32, argv ...string) *ttyExec {
	t.Helper()
	ttySeq++
	id := "tty-" + strconv.Itoa(ttySeq)
	st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Exec{Exec: &agentpb.Exec{
		Id:     id,
		Argv:   argv,
		Env:    []*agentpb.EnvVar{{Name: "PATH", Value: DefaultPath}, {Name: "PS1", Value: "$ "}, {Name: "HOME", Value: "/"}},
		Stdin:  true,
		Tty:    true,
		Window: &agentpb.WindowSize{Rows: rows, Cols: cols},
	}}})
	x := &ttyExec{t: t, h: h, id: id, st: st, done: make(chan struct{})}
	go func() {
		defer close(x.done)
		for {
			var ev agentpb.ExecEvent
			if err := rd.Read(&ev); err != nil {
				return
			}
			x.mu.Lock()
			switch e := ev.Event.(type) {
			case *agentpb.ExecEvent_Output:
				if e.Output.Fd == agentpb.Output_FD_STDOUT {
					x.out.Write(e.Output.Data)
				} else {
					x.stderr += len(e.Output.Data)
				}
			case *agentpb.ExecEvent_Exited:
				x.exited = e.Exited
			}
			x.mu.Unlock()
		}
	}()
	return x
}

func (x *ttyExec) output() string {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.out.String()
}

// waitOutput waits until the terminal has shown re.
func (x *ttyExec) waitOutput(re string) {
	x.t.Helper()
	r := regexp.MustCompile(re)
	if !waitFor(10*time.Second, func() bool { return r.MatchString(x.output()) }) {
		x.t.Fatalf("the terminal never showed %q; it shows %q", re, x.output())
	}
}

func (x *ttyExec) send(in *agentpb.ExecInput) {
	x.t.Helper()
	if err := agentproto.Write(x.st, in); err != nil {
		x.t.Fatal(err)
	}
}

func (x *ttyExec) typeIn(s string) {
	x.t.Helper()
	x.send(&agentpb.ExecInput{Input: &agentpb.ExecInput_Stdin{Stdin: &agentpb.Stdin{Data: []byte(s)}}})
}

func (x *ttyExec) resize(rows, cols uint32) {
	x.t.Helper()
	x.send(&agentpb.ExecInput{Input: &agentpb.ExecInput_Resize{Resize: &agentpb.WindowSize{Rows: rows, Cols: cols}}})
}

func (x *ttyExec) wait() *agentpb.Exited {
	x.t.Helper()
	select {
	case <-x.done:
	case <-time.After(20 * time.Second):
		x.t.Fatalf("the command did not end; the terminal shows %q", x.output())
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.exited == nil {
		x.t.Fatalf("no Exited; the terminal shows %q", x.out.String())
	}
	if x.stderr > 0 {
		x.t.Errorf("%d bytes came on stderr: a terminal has one output stream", x.stderr)
	}
	return x.exited
}

// The terminal is the command's stdin, stdout, stderr and controlling
// terminal, sized before the command starts, TERM defaults to xterm, and
// what the command writes arrives as the line discipline made it (ONLCR),
// unless the command changes the terminal's modes.
func TestTTYBasics(t *testing.T) {
	h := serve(t, NewServer(nil, "test", Options{}))
	x := startTTY(t, h, 24, 80, "sh", "-c",
		`stty size; tty; echo "$TERM"; test -t 0 && test -t 1 && test -t 2 && echo all-terminal; `+
			`echo to-stderr >&2; ps -o tty= -p $$ >/dev/null && echo ctty:$(ps -o tty= -p $$); `+
			`printf 'a\nb\n'; stty -opost; printf 'c\nd\n'`)
	if ex := x.wait(); ex.Code != 0 {
		t.Fatalf("exited %v; the terminal shows %q", ex, x.output())
	}
	out := x.output()
	for _, want := range []string{"24 80\r\n", "xterm\r\n", "all-terminal\r\n", "to-stderr\r\n", "a\r\nb\r\nc\nd\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("the terminal shows %q, without %q", out, want)
		}
	}
	m := regexp.MustCompile(`(/dev/pts/[0-9]+)\r\n`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("tty printed no /dev/pts path: %q", out)
	}
	if want := "ctty:" + strings.TrimPrefix(m[1], "/dev/") + "\r\n"; !strings.Contains(out, want) {
		t.Errorf("the terminal is not the controlling terminal: want %q in %q", want, out)
	}
}

// A resize reaches the terminal (stty size) and the foreground job
// (SIGWINCH); Ctrl-C typed as 0x03 interrupts the foreground job of an
// interactive shell, which survives; the shell's exit status is the
// command's; the stdin EOF does not hang the terminal up.
func TestTTYInteractiveShell(t *testing.T) {
	srv := NewServer(nil, "test", Options{})
	srv.drainGrace = 10 * time.Second // a job left holding the terminal would show as a long wait
	h := serve(t, srv)
	x := startTTY(t, h, 10, 40, "sh", "-i")
	x.waitOutput(`\$ $`)
	x.typeIn("stty size\r")
	x.waitOutput(`10 40\r\n`)
	x.resize(50, 132)
	x.typeIn("stty size\r")
	x.waitOutput(`50 132\r\n`)

	x.typeIn("trap 'echo got-winch' WINCH\r")
	x.waitOutput(`\$ $`)
	x.resize(51, 133)
	x.typeIn("\r")
	x.waitOutput(`got-winch`)

	x.typeIn("sleep 100; echo sleep-ended-$?\r")
	time.Sleep(300 * time.Millisecond)
	x.typeIn("\x03")
	x.waitOutput(`sleep-ended-130|\$ $`)
	x.typeIn("echo still-$((40+2))\r")
	x.waitOutput(`still-42\r\n`)

	// A background job in its own process group holds the terminal;
	// it must not keep the exec from ending.
	x.typeIn("sleep 100 &\r")
	x.waitOutput(`\$ $`)
	x.send(&agentpb.ExecInput{Input: &agentpb.ExecInput_Stdin{Stdin: &agentpb.Stdin{Eof: true}}})
	time.Sleep(200 * time.Millisecond)
	// Stdin's end did not hang the shell up: it still runs...
	select {
	case <-x.done:
		t.Fatalf("the shell ended at the end of stdin; the terminal shows %q", x.output())
	default:
	}
	// ...and input after it is not delivered.
	x.typeIn("echo after-eof\r")
	time.Sleep(200 * time.Millisecond)
	if strings.Contains(x.output(), "after-eof") {
		t.Errorf("input after the end of stdin reached the terminal")
	}
	x.resize(20, 20) // resizes still work
	x.signal(9)
	start := time.Now()
	ex := x.wait()
	if ex.Signal != 9 {
		t.Errorf("exited %v, want killed by SIGKILL", ex)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the exec took %s to end after the shell: the background job kept it", d)
	}
}

// signal sends sig to the command's process group with a Signal call.
func (x *ttyExec) signal(sig int32) {
	x.t.Helper()
	st, rd := x.h.call(&agentpb.Request{Call: &agentpb.Request_Signal{Signal: &agentpb.Signal{ExecId: x.id, Signal: sig}}})
	defer st.Close()
	var resp agentpb.Response
	if err := rd.Read(&resp); err != nil || resp.GetSignal() == nil {
		x.t.Fatalf("signal: %v, %v", resp.Result, err)
	}
}

func TestTTYExitStatus(t *testing.T) {
	h := serve(t, NewServer(nil, "test", Options{}))
	x := startTTY(t, h, 24, 80, "sh", "-i")
	x.waitOutput(`\$ $`)
	x.typeIn("exit 3\r")
	if ex := x.wait(); ex.Code != 3 {
		t.Errorf("exited %v, want code 3", ex)
	}
}

func TestTTYBadWindow(t *testing.T) {
	h := serve(t, NewServer(nil, "test", Options{}))
	st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Exec{Exec: &agentpb.Exec{
		Argv: []string{"true"}, Tty: true, Window: &agentpb.WindowSize{Rows: 70000, Cols: 80},
	}}})
	defer st.Close()
	var ev agentpb.ExecEvent
	if err := rd.Read(&ev); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if f := ev.GetExited().GetStartFailure(); f.GetReason() != agentpb.StartFailure_REASON_INVALID {
		t.Errorf("got %v, want REASON_INVALID", ev.Event)
	}
}

func TestStatSession(t *testing.T) {
	for _, tc := range []struct {
		stat string
		sid  int
		ok   bool
	}{
		{"1234 (sh) S 1 1234 1234 34816 1234 4194560", 1234, true},
		{"77 (a) b) (c) R 1 70 71 0", 71, true},
		{"77 (x y) Z 1 2", 0, false},
		{"garbage", 0, false},
	} {
		sid, ok := statSession([]byte(tc.stat))
		if sid != tc.sid || ok != tc.ok {
			t.Errorf("statSession(%q) = %d, %v; want %d, %v", tc.stat, sid, ok, tc.sid, tc.ok)
		}
	}
}
