package agent

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// quickServer is a server whose drain grace is short enough for unit
// tests; the behaviour around it is the same as with the real one.
func quickServer(grace time.Duration) *Server {
	srv := NewServer(nil, "test", Options{})
	srv.drainGrace = grace
	return srv
}

// randomFile writes n random bytes to a file in a test directory.
func randomFile(t *testing.T, n int) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, data
}

// escape is a shell prelude that starts argv in a session of its own (out
// of the command's process group, holding its stdout and stderr), waits
// until it is there, and prints its pid on stderr.
func escape(argv string) string {
	return `p=$(mktemp -u); setsid sh -c 'echo $$ > "$1"; exec ` + argv + `' sh "$p" & ` +
		`while [ ! -s "$p" ]; do sleep 0.01; done; cat "$p" >&2; rm -f "$p"; `
}

// killLater kills the escaped process whose pid the command printed first
// on stderr, when the test ends.
func killLater(t *testing.T, stderr []byte) {
	t.Helper()
	line, _, _ := strings.Cut(string(stderr), "\n")
	pid, err := strconv.Atoi(line)
	if err != nil || pid <= 1 {
		t.Fatalf("no escapee pid on stderr: %q", stderr)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
}

// A host that does not read while the command writes and exits must still
// get every byte: the agent waits for it, however long past the drain
// grace. 1.5 MB fits the pipe plus the stream window, so the command exits
// while most of its output is still buffered in the agent's pipe.
func TestOutputKeptWhenHostReadsLate(t *testing.T) {
	const grace = 100 * time.Millisecond
	h := serve(t, quickServer(grace))
	path, want := randomFile(t, 1500000)
	_, rd := h.exec("cat", path)
	stall := 20 * grace
	time.Sleep(stall)
	r := collect(t, rd)
	if r.exited.Code != 0 || r.exited.Signal != 0 {
		t.Fatalf("exited %v, stderr %q", r.exited, r.stderr)
	}
	if !bytes.Equal(r.stdout, want) {
		t.Fatalf("got %d bytes of stdout, want the %d written (equal prefix: %v)",
			len(r.stdout), len(want), bytes.HasPrefix(want, r.stdout))
	}
	// The command must have ended during the stall, or this test did not
	// test the exit path.
	if d := r.duration(); d >= stall {
		t.Fatalf("command ran %s, not shorter than the %s stall: the case is not exercised", d, stall)
	}
}

// The same with a process that left the group and holds stdout open: the
// drain grace passes while the host does not read, and still nothing the
// command wrote is lost.
func TestOutputKeptWhenHostReadsLateWithEscapee(t *testing.T) {
	const grace = 100 * time.Millisecond
	h := serve(t, quickServer(grace))
	path, want := randomFile(t, 1500000)
	_, rd := h.exec("sh", "-c", escape("sleep 60")+`cat "$1"`, "sh", path)
	time.Sleep(10 * grace)
	r := collect(t, rd)
	killLater(t, r.stderr)
	if r.exited.Code != 0 || !bytes.Equal(r.stdout, want) {
		t.Fatalf("exited %v with %d bytes of stdout, want 0 and the %d written", r.exited, len(r.stdout), len(want))
	}
}

// A process that escaped the group and keeps stdout open must not keep the
// exec from ending; Exited comes about one drain grace after the command.
func TestEscapeeHoldingStdoutDoesNotHang(t *testing.T) {
	const grace = 200 * time.Millisecond
	h := serve(t, quickServer(grace))
	start := time.Now()
	_, rd := h.exec("sh", "-c", escape("sleep 60")+`echo done`)
	r := collect(t, rd)
	killLater(t, r.stderr)
	if string(r.stdout) != "done\n" || r.exited.Code != 0 {
		t.Fatalf("stdout %q, exited %v", r.stdout, r.exited)
	}
	if el := time.Since(start); el < grace || el > grace+5*time.Second {
		t.Fatalf("exec took %s, want about the %s grace", el, grace)
	}
}

// An escapee that writes without pause must not keep the agent reading
// forever after the grace: it takes what the pipe holds and stops.
func TestFloodingEscapeeDoesNotHang(t *testing.T) {
	const grace = 200 * time.Millisecond
	h := serve(t, quickServer(grace))
	start := time.Now()
	_, rd := h.exec("sh", "-c", escape("yes flood"))
	r := collect(t, rd)
	killLater(t, r.stderr)
	if r.exited.Code != 0 {
		t.Fatalf("exited %v", r.exited)
	}
	if el := time.Since(start); el > grace+10*time.Second {
		t.Fatalf("exec took %s with a flooding escapee", el)
	}
	if !bytes.HasPrefix(r.stdout, []byte("flood\n")) {
		t.Fatalf("stdout starts %q", r.stdout[:min(len(r.stdout), 20)])
	}
}

// Large output from a command that exits at once, many times over: every
// byte, in order, and Exited last.
func TestLargeOutputFastExit(t *testing.T) {
	h := serve(t, quickServer(drainGrace))
	for _, n := range []int{0, 1, 65535, 65536, 1 << 20, 1<<20 + 1, 1500000, 3 << 20} {
		path, want := randomFile(t, n)
		_, rd := h.exec("cat", path)
		r := collect(t, rd)
		if r.exited.Code != 0 || !bytes.Equal(r.stdout, want) {
			t.Fatalf("%d bytes: exited %v with %d bytes of stdout", n, r.exited, len(r.stdout))
		}
	}
}
