package agent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// dialHost opens a session to a listening agent, as a host would over
// vsock, and says hello.
func dialHost(t *testing.T, addr string) *testHost {
	t.Helper()
	c, err := net.Dial("unix", addr)
	if err != nil {
		t.Fatal(err)
	}
	h := &testHost{t: t, sess: mux.Client(c, agentproto.SessionConfig())}
	t.Cleanup(func() { h.sess.Close() })
	h.hello()
	return h
}

// Serve runs one independent session per connection: several hosts at
// once, each with its own hello and its own commands, and a session that
// ends kills its commands but leaves the others alone.
func TestServeSessionPerConnection(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(nil, "test", Options{})
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()

	hosts := make([]*testHost, 3)
	for i := range hosts {
		hosts[i] = dialHost(t, sock)
	}
	// A long command on the first session, which then goes away.
	_, longRd := hosts[0].exec("sleep", "100")
	longPid := waitStarted(t, longRd)

	var wg sync.WaitGroup
	for i, h := range hosts[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := strconv.Itoa(i + 1)
			_, rd := h.exec("sh", "-c", "echo session $0", n)
			r := collect(t, rd)
			if want := "session " + n + "\n"; string(r.stdout) != want || r.exited.Code != 0 {
				t.Errorf("session %d: stdout %q, exited %v", i+1, r.stdout, r.exited)
			}
		}()
	}
	wg.Wait()

	hosts[0].sess.Close()
	// Its command is killed; the other sessions still work.
	st, rd := hosts[1].call(&agentpb.Request{Call: &agentpb.Request_Ping{Ping: &agentpb.Ping{}}})
	var resp agentpb.Response
	if err := rd.Read(&resp); err != nil || resp.GetPong() == nil {
		t.Fatalf("ping on a remaining session: %v, %v", resp.Result, err)
	}
	st.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		srv.mu.Lock()
		n := len(srv.sessions)
		srv.mu.Unlock()
		gone := errors.Is(unix.Kill(longPid, 0), unix.ESRCH)
		if n == 2 && gone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after one host went away: %d sessions (want 2), its command gone: %v", n, gone)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Ending ctx ends Serve and every session it runs.
	cancel()
	select {
	case err := <-served:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve returned %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after ctx ended")
	}
}

// A listener that is closed ends Serve without an error; one that fails
// otherwise ends it with the error.
func TestServeListenerEnds(t *testing.T) {
	srv := NewServer(nil, "test", Options{})
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if err := srv.Serve(context.Background(), ln); err != nil {
		t.Fatalf("Serve on a closed listener: %v", err)
	}
	boom := errors.New("boom")
	if err := srv.Serve(context.Background(), failingListener{boom}); !errors.Is(err, boom) {
		t.Fatalf("Serve = %v, want %v", err, boom)
	}
}

type failingListener struct{ err error }

func (l failingListener) Accept() (net.Conn, error) { return nil, l.err }
func (failingListener) Close() error                { return nil }
func (failingListener) Addr() net.Addr              { return VsockAddr{} }

// Without vsock support (or without a vsock device) ListenVsock either
// fails cleanly or gives a listener that Close ends; it never hangs.
func TestListenVsockWithoutDevice(t *testing.T) {
	ln, err := ListenVsock(agentproto.VsockPort + 1000)
	if err != nil {
		if !errors.Is(err, unix.EAFNOSUPPORT) && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.EADDRINUSE) && !errors.Is(err, unix.ENODEV) {
			t.Fatalf("ListenVsock: %v", err)
		}
		t.Logf("no vsock here: %v", err)
		return
	}
	done := make(chan error, 1)
	go func() { _, err := ln.Accept(); done <- err }()
	time.Sleep(50 * time.Millisecond)
	ln.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept did not return after Close")
	}
}
