package mux

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

// socketpair gives two connected unix stream sockets, the kind of byte
// stream the VMM hands over.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "sp")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c
	}
	t.Cleanup(func() { cs[0].Close(); cs[1].Close() })
	return cs[0], cs[1]
}

func pair(t *testing.T, cfg Config) (*Session, *Session) {
	a, b := socketpair(t)
	c, s := Client(a, cfg), Server(b, cfg)
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

func randBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// echo serves every accepted stream by copying it back, then closing.
func echo(s interface {
	Accept() (io.ReadWriteCloser, error)
}) {
	for {
		st, err := s.Accept()
		if err != nil {
			return
		}
		go func() {
			_, _ = io.Copy(st, st)
			st.Close()
		}()
	}
}

type ourAcceptor struct{ *Session }

func (a ourAcceptor) Accept() (io.ReadWriteCloser, error) { return a.Session.Accept() }

func TestEchoManyStreams(t *testing.T) {
	c, s := pair(t, Config{})
	go echo(ourAcceptor{s})
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := randBytes(t, 3<<20+i)
			st, err := c.Open()
			if err != nil {
				t.Error(err)
				return
			}
			go func() {
				_, _ = st.Write(data)
				_ = st.CloseWrite()
			}()
			got, err := io.ReadAll(st)
			if err != nil || !bytes.Equal(got, data) {
				t.Errorf("stream %d: %d bytes back (err %v), want %d identical", st.ID(), len(got), err, len(data))
			}
		}()
	}
	wg.Wait()
}

// A stream whose reader stalls must not stall the others: flow control
// stops its sender, not the connection.
func TestSlowReaderDoesNotBlockOthers(t *testing.T) {
	c, s := pair(t, Config{})
	stalled, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stalled.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	srvStalled, _ := s.Accept()
	blocked := make(chan error, 1)
	go func() {
		// Far more than the window: this write must block, not fail.
		_, err := srvStalled.Write(make([]byte, 8<<20))
		blocked <- err
	}()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-blocked:
		t.Fatalf("write past the window returned early: %v", err)
	default:
	}
	go echo(ourAcceptor{s})
	other, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	done := make(chan error, 1)
	go func() { _, err := io.ReadFull(other, buf); done <- err }()
	select {
	case err := <-done:
		if err != nil || string(buf) != "ping" {
			t.Fatalf("echo on another stream: %q %v", buf, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a stalled stream blocked the session")
	}
	// Draining the stalled stream lets its writer finish.
	go func() { _, _ = io.Copy(io.Discard, stalled) }()
	select {
	case err := <-blocked:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("writer did not resume after the reader drained")
	}
}

func TestHalfCloseAndReset(t *testing.T) {
	c, s := pair(t, Config{})
	st, _ := c.Open()
	_, _ = st.Write([]byte("req"))
	_ = st.CloseWrite()
	srv, _ := s.Accept()
	got, err := io.ReadAll(srv)
	if err != nil || string(got) != "req" {
		t.Fatalf("server read %q, %v", got, err)
	}
	// The server can still answer after the client's FIN.
	if _, err := srv.Write([]byte("resp")); err != nil {
		t.Fatal(err)
	}
	_ = srv.CloseWrite()
	got, err = io.ReadAll(st)
	if err != nil || string(got) != "resp" {
		t.Fatalf("client read %q, %v", got, err)
	}
	if _, err := st.Write([]byte("late")); !errors.Is(err, ErrWriteClosed) {
		t.Errorf("write after CloseWrite: %v", err)
	}

	st2, _ := c.Open()
	_, _ = st2.Write([]byte("x"))
	srv2, _ := s.Accept()
	_ = srv2.Reset()
	if _, err := io.ReadAll(st2); !errors.Is(err, ErrStreamReset) {
		t.Errorf("read of a reset stream: %v", err)
	}
}

func TestSessionCloseFailsStreams(t *testing.T) {
	c, s := pair(t, Config{})
	st, _ := c.Open()
	_, _ = st.Write([]byte("x"))
	_, _ = s.Accept()
	s.Close()
	if _, err := io.ReadAll(st); !errors.Is(err, ErrSessionClosed) {
		t.Errorf("read after the peer closed the session: %v", err)
	}
	if _, err := c.Open(); err != nil {
		// Open may succeed before the reader notices; it must fail after.
		t.Logf("open after close: %v", err)
	}
	<-c.Done()
	if _, err := c.Open(); !errors.Is(err, ErrSessionClosed) {
		t.Errorf("open on a closed session: %v", err)
	}
}

func TestWriteFrameZeroCopy(t *testing.T) {
	c, s := pair(t, Config{})
	st, _ := c.Open()
	payload := randBytes(t, 64<<10)
	frame := append(make([]byte, HeaderSize), payload...)
	if err := st.WriteFrame(frame); err != nil {
		t.Fatal(err)
	}
	_ = st.CloseWrite()
	srv, _ := s.Accept()
	got, err := io.ReadAll(srv)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("got %d bytes (%v)", len(got), err)
	}
	if err := st.WriteFrame(make([]byte, HeaderSize)); err == nil {
		t.Error("WriteFrame with an empty payload should fail")
	}
}

// The wire format is yamux's: our client against hashicorp/yamux's
// server, and its client against our server.
func TestInteropWithYamux(t *testing.T) {
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false
	cfg.LogOutput = io.Discard
	data := randBytes(t, 5<<20)

	t.Run("our client", func(t *testing.T) {
		a, b := socketpair(t)
		ys, err := yamux.Server(b, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer ys.Close()
		go func() {
			for {
				st, err := ys.AcceptStream()
				if err != nil {
					return
				}
				go func() { _, _ = io.Copy(st, st); st.Close() }()
			}
		}()
		c := Client(a, Config{})
		defer c.Close()
		roundTrip(t, c.Open, data)
		if _, err := c.Ping(context.Background()); err != nil {
			t.Errorf("our ping against a yamux session: %v", err)
		}
	})
	t.Run("their client", func(t *testing.T) {
		a, b := socketpair(t)
		s := Server(b, Config{})
		defer s.Close()
		go echo(ourAcceptor{s})
		yc, err := yamux.Client(a, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer yc.Close()
		roundTrip(t, func() (io.ReadWriteCloser, error) {
			st, err := yc.OpenStream()
			return halfCloser{st}, err
		}, data)
		if _, err := yc.Ping(); err != nil {
			t.Errorf("yamux ping against our session: %v", err)
		}
	})
}

type halfCloser struct{ *yamux.Stream }

// CloseWrite: yamux's Close is a half-close (FIN).
func (h halfCloser) CloseWrite() error { return h.Stream.Close() }

func roundTrip[S io.ReadWriteCloser](t *testing.T, open func() (S, error), data []byte) {
	t.Helper()
	st, err := open()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = io.Copy(st, bytes.NewReader(data))
		_ = any(st).(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(st)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("round trip: %d bytes back (err %v), want %d", len(got), err, len(data))
	}
}
