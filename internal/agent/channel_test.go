package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// hostConn is the host's end of a connection that one host session can let
// go of without closing it, so that another session can follow on the same
// byte stream, as after a snapshot restore (where a new VMM carries the
// old connection's guest side on).
type hostConn struct {
	net.Conn
	mu   sync.Mutex // held while reading
	done atomic.Bool
}

func (c *hostConn) Read(p []byte) (int, error) {
	if c.done.Load() {
		return 0, io.EOF
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n, err := c.Conn.Read(p)
	if c.done.Load() {
		return n, io.EOF
	}
	return n, err
}

// Close detaches the session from the connection: its reader stops, the
// connection stays open.
func (c *hostConn) Close() error {
	c.done.Store(true)
	_ = c.Conn.SetReadDeadline(time.Unix(1, 0))
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.SetReadDeadline(time.Time{})
}

// snapshotServer is an agent that serves the snapshot calls (it owns the
// guest's filesystems and applies hellos), without touching the test
// machine: the hellos the tests send carry no host name or boot id.
func snapshotServer() *Server {
	return NewServer(nil, "test", Options{Mounts: true, OnHello: func(*agentpb.Hello) error { return nil }})
}

// serveRestartable starts srv on a fresh socketpair and returns the raw
// host end, for tests that run several host sessions on it.
func serveRestartable(t *testing.T, srv *Server) net.Conn {
	t.Helper()
	host, guest := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(ctx, guest) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("ServeConn did not return")
		}
	})
	return host
}

// newHostSession starts a host session on conn and says hello.
func newHostSession(t *testing.T, conn net.Conn) (*testHost, *hostConn) {
	t.Helper()
	hc := &hostConn{Conn: conn}
	h := &testHost{t: t, sess: mux.Client(hc, agentproto.SessionConfig())}
	t.Cleanup(func() { h.sess.Close() })
	h.hello()
	return h, hc
}

func (h *testHost) echo(word string) {
	h.t.Helper()
	_, rd := h.exec("echo", word)
	if r := collect(h.t, rd); string(r.stdout) != word+"\n" || r.exited.Code != 0 {
		h.t.Fatalf("echo %s: stdout %q, exited %v", word, r.stdout, r.exited)
	}
}

func (h *testHost) quiesce() *agentpb.Response {
	h.t.Helper()
	st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Quiesce{Quiesce: &agentpb.Quiesce{}}})
	defer st.Close()
	var resp agentpb.Response
	if err := rd.Read(&resp); err != nil {
		h.t.Fatalf("quiesce reply: %v", err)
	}
	return &resp
}

// After Quiesce the agent writes nothing more in that session, and a new
// host session on the same connection (a new hello) is served from
// scratch.
func TestNewSessionAfterQuiesce(t *testing.T) {
	conn := serveRestartable(t, snapshotServer())
	h1, hc1 := newHostSession(t, conn)
	h1.echo("before")
	if resp := h1.quiesce(); resp.GetQuiesce() == nil {
		t.Fatalf("quiesce answered %v", resp.Result)
	}
	// The old host session goes away without a word; its stream FINs
	// and window updates may still reach the agent, whose own frames
	// for it must not reach the next session.
	h1.sess.Close()
	_ = hc1.Close()
	_ = conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [64]byte
	if n, err := conn.Read(b[:]); n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the quiesced agent wrote %d bytes (%q), %v", n, b[:n], err)
	}
	_ = conn.SetReadDeadline(time.Time{})

	for i := range 3 {
		h, hc := newHostSession(t, conn)
		h.echo("after-" + strings.Repeat("x", i))
		h.sess.Close()
		_ = hc.Close()
	}
}

// A new session on a connection whose previous session still had a
// command running (a host that did not quiesce) ends the old session as
// any session end does: its command is killed.
func TestNewSessionEndsOldOne(t *testing.T) {
	srv := snapshotServer()
	conn := serveRestartable(t, srv)
	h1, hc1 := newHostSession(t, conn)
	_, rd := h1.exec("sleep", "100")
	pid := waitStarted(t, rd)
	if resp := h1.quiesce(); resp.GetError().GetCode() != agentpb.Error_CODE_FAILED_PRECONDITION {
		t.Errorf("quiesce with a command running: %v, want CODE_FAILED_PRECONDITION", resp.Result)
	}
	h1.sess.Close()
	_ = hc1.Close()

	h2, _ := newHostSession(t, conn)
	h2.echo("fresh")
	if !waitFor(5*time.Second, func() bool { return errors.Is(unix.Kill(pid, 0), unix.ESRCH) }) {
		t.Errorf("the old session's command %d still runs", pid)
	}
	srv.mu.Lock()
	n := len(srv.sessions)
	srv.mu.Unlock()
	if n != 1 {
		t.Errorf("%d sessions, want 1", n)
	}
}

// Hello fields an agent cannot apply refuse the session with
// CODE_INVALID_ARGUMENT.
func TestHelloIdentityChecked(t *testing.T) {
	for _, h := range []*agentpb.Hello{
		{Hostname: "no spaces"},
		{Hostname: strings.Repeat("x", 65)},
		{BootId: make([]byte, 15)},
	} {
		host, guest := socketPair(t)
		go func() { _ = snapshotServer().ServeConn(context.Background(), guest) }()
		th := &testHost{t: t, sess: mux.Client(host, agentproto.SessionConfig())}
		h.MinVersion, h.MaxVersion = agentproto.MinVersion, agentproto.Version
		st, rd := th.call(&agentpb.Request{Call: &agentpb.Request_Hello{Hello: h}})
		var resp agentpb.Response
		if err := rd.Read(&resp); err != nil || resp.GetError().GetCode() != agentpb.Error_CODE_INVALID_ARGUMENT {
			t.Errorf("hello %v: %v, %v; want CODE_INVALID_ARGUMENT", h, resp.Result, err)
		}
		st.Close()
		th.sess.Close()
	}
}

// The agent's frame reader: what opens a session, and frame sizes.
func TestFrameHeaders(t *testing.T) {
	hdr := func(typ byte, flags uint16, id, length uint32) []byte {
		b := make([]byte, mux.HeaderSize)
		b[1] = typ
		b[2], b[3] = byte(flags>>8), byte(flags)
		b[4], b[5], b[6], b[7] = byte(id>>24), byte(id>>16), byte(id>>8), byte(id)
		b[8], b[9], b[10], b[11] = byte(length>>24), byte(length>>16), byte(length>>8), byte(length)
		return b
	}
	for _, tc := range []struct {
		hdr   []byte
		opens bool
		size  int64
	}{
		{hdr(1, 1, 1, 768<<10), true, 12}, // window update SYN on stream 1: a hello's stream
		{hdr(0, 1, 1, 100), true, 112},    // data SYN on stream 1
		{hdr(0, 0, 1, 100), false, 112},   // data on stream 1
		{hdr(1, 1, 3, 0), false, 12},      // SYN on stream 3
		{hdr(1, 2, 1, 0), false, 12},      // ACK on stream 1
		{hdr(2, 1, 0, 7), false, 12},      // ping
		{hdr(0, 4, 5, 1<<31), false, 12 + 1<<31},
	} {
		if got := opensStream(tc.hdr, 1); got != tc.opens {
			t.Errorf("opensStream(% x) = %v", tc.hdr, got)
		}
		if got := frameSize(tc.hdr); got != tc.size {
			t.Errorf("frameSize(% x) = %d, want %d", tc.hdr, got, tc.size)
		}
	}
}

func TestFormatUUID(t *testing.T) {
	got := formatUUID([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	if want := "ffffffff-ffff-4fff-bfff-ffffffffffff"; got != want {
		t.Errorf("formatUUID = %q, want %q", got, want)
	}
	if got := formatUUID(make([]byte, 16)); got != "00000000-0000-4000-8000-000000000000" {
		t.Errorf("formatUUID(zeros) = %q", got)
	}
}

func TestRandPoolInfo(t *testing.T) {
	got := randPoolInfo([]byte{1, 2, 3, 4, 5})
	// entropy_count 40 bits, buf_size 5 bytes, little-endian on x86.
	want := []byte{40, 0, 0, 0, 5, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0}
	if string(got) != string(want) {
		t.Errorf("randPoolInfo = % x, want % x", got, want)
	}
}

func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}

// TestLateCloseSparesNextSession: the multiplexer of a session that has
// ended may still be closing its connection (it wakes Accept before it
// closes the conn) when the next session already reads. That late Close
// must not set the shared stream's read deadline under the next session,
// whose reads would then fail with a timeout: the next host's hello would
// never be answered.
func TestLateCloseSparesNextSession(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	ch := newChannel(struct {
		io.Reader
		io.Writer
		deadliner
	}{r, w, r})
	old := ch.session()
	old.finish(false)
	next := ch.session()
	old.Close() // late, from the old multiplexer's reader
	hdr := make([]byte, mux.HeaderSize)
	hdr[1], hdr[3], hdr[7] = 1, 1, 1 // a window update opening stream 1
	if _, err := w.Write(hdr); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := next.Read(buf)
	if err != nil || n != len(hdr) {
		t.Fatalf("the next session's read after a late Close of the previous one: %d bytes, %v", n, err)
	}
}
