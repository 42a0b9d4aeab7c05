package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// socketPair returns both ends of a unix socketpair, the kind of byte
// stream the QEMU backend gives the host.
func socketPair(t *testing.T) (host, guest net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	t.Cleanup(func() { conns[0].Close(); conns[1].Close() })
	return conns[0], conns[1]
}

// testHost is the host end of one session with an in-process agent whose
// commands are real processes of the test's machine.
type testHost struct {
	t    *testing.T
	sess *mux.Session
}

// serve starts srv on a fresh socketpair and says hello over it.
func serve(t *testing.T, srv *Server) *testHost {
	t.Helper()
	host, guest := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(ctx, guest) }()
	h := &testHost{t: t, sess: mux.Client(host, agentproto.SessionConfig())}
	t.Cleanup(func() {
		h.sess.Close()
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("ServeConn did not return after the session closed")
		}
	})
	h.hello()
	return h
}

func (h *testHost) hello() *agentpb.HelloReply {
	h.t.Helper()
	st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Hello{Hello: &agentpb.Hello{
		MinVersion: agentproto.MinVersion, MaxVersion: agentproto.Version,
	}}})
	defer st.Close()
	var resp agentpb.Response
	if err := rd.Read(&resp); err != nil {
		h.t.Fatalf("hello reply: %v", err)
	}
	if resp.GetHello() == nil {
		h.t.Fatalf("hello answered with %v", resp.Result)
	}
	return resp.GetHello()
}

// call opens a stream and writes req on it.
func (h *testHost) call(req *agentpb.Request) (*mux.Stream, *agentproto.Reader) {
	h.t.Helper()
	st, err := h.sess.Open()
	if err != nil {
		h.t.Fatalf("open stream: %v", err)
	}
	if err := agentproto.Write(st, req); err != nil {
		h.t.Fatalf("write request: %v", err)
	}
	return st, agentproto.NewReader(st)
}

// exec starts argv and returns the stream's reader; the host sends no
// stdin.
func (h *testHost) exec(argv ...string) (*mux.Stream, *agentproto.Reader) {
	h.t.Helper()
	st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Exec{Exec: &agentpb.Exec{Argv: argv}}})
	if err := st.CloseWrite(); err != nil {
		h.t.Fatal(err)
	}
	return st, rd
}

// execResult is everything an exec stream carried.
type execResult struct {
	stdout, stderr []byte
	exited         *agentpb.Exited
	// afterExited counts events that (wrongly) followed Exited.
	afterExited int
}

// collect reads an exec stream to its end.
func collect(t *testing.T, rd *agentproto.Reader) execResult {
	t.Helper()
	var r execResult
	for {
		var ev agentpb.ExecEvent
		err := rd.Read(&ev)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read event: %v", err)
		}
		if r.exited != nil {
			r.afterExited++
			continue
		}
		switch e := ev.Event.(type) {
		case *agentpb.ExecEvent_Output:
			switch e.Output.Fd {
			case agentpb.Output_FD_STDOUT:
				r.stdout = append(r.stdout, e.Output.Data...)
			case agentpb.Output_FD_STDERR:
				r.stderr = append(r.stderr, e.Output.Data...)
			default:
				t.Fatalf("output on fd %v", e.Output.Fd)
			}
		case *agentpb.ExecEvent_Exited:
			r.exited = e.Exited
		}
	}
	if r.exited == nil {
		t.Fatal("exec stream ended without Exited")
	}
	if r.afterExited > 0 {
		t.Fatalf("%d events after Exited", r.afterExited)
	}
	return r
}

func (r execResult) duration() time.Duration {
	return time.Duration(r.exited.DurationMicros) * time.Microsecond
}

func TestPingOnFreshSession(t *testing.T) {
	h := serve(t, NewServer(nil, "test", Options{}))
	st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Ping{Ping: &agentpb.Ping{Payload: []byte("x")}}})
	defer st.Close()
	var resp agentpb.Response
	if err := rd.Read(&resp); err != nil || !bytes.Equal(resp.GetPong().GetPayload(), []byte("x")) {
		t.Fatalf("pong = %v, %v", resp.Result, err)
	}
}

// runReaped runs argv to completion through the process's reaper and
// returns its combined output. Tests must not use os/exec once a Server
// exists: the reaper's wait4(-1) would collect the child before
// exec.Cmd.Wait could.
func runReaped(t testing.TB, argv ...string) ([]byte, error) {
	t.Helper()
	path, err := lookPath(hostRoot, argv[0], DefaultPath, "/", rootIdentity)
	if err != nil {
		return nil, err
	}
	out, err := os.CreateTemp(t.TempDir(), "out")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	_, status, err := processReaper().start(func() (int, error) {
		return syscall.ForkExec(path, argv, &syscall.ProcAttr{
			Env:   os.Environ(),
			Files: []uintptr{null.Fd(), out.Fd(), out.Fd()},
		})
	})
	if err != nil {
		return nil, err
	}
	ws := <-status
	b, _ := os.ReadFile(out.Name())
	if !ws.Exited() || ws.ExitStatus() != 0 {
		return b, fmt.Errorf("%s: %v", argv[0], ws)
	}
	return b, nil
}
