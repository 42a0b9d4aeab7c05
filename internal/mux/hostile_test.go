package mux

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// The tests in this file play a hostile peer byte by byte against our
// client session, the host's side of the guest channel.

func frame(typ uint8, flags uint16, id, length uint32, payload []byte) []byte {
	b := make([]byte, HeaderSize, HeaderSize+len(payload))
	putHeader(b, typ, flags, id, length)
	return append(b, payload...)
}

type header struct {
	typ        uint8
	flags      uint16
	id, length uint32
}

// readHeader reads one frame from the raw side and skips its payload.
func readHeader(t *testing.T, c net.Conn) header {
	t.Helper()
	var b [HeaderSize]byte
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		t.Fatalf("read frame: %v", err)
	}
	h := header{b[1], binary.BigEndian.Uint16(b[2:4]), binary.BigEndian.Uint32(b[4:8]), binary.BigEndian.Uint32(b[8:12])}
	if h.typ == typeData {
		if _, err := io.CopyN(io.Discard, c, int64(h.length)); err != nil {
			t.Fatalf("read payload: %v", err)
		}
	}
	return h
}

// rawClient is a client session whose peer the test drives by hand.
func rawClient(t *testing.T) (*Session, net.Conn) {
	t.Helper()
	a, b := socketpair(t)
	c := Client(a, Config{})
	t.Cleanup(func() { c.Close() })
	return c, b
}

// waitEnd waits for the session to end and returns why.
func waitEnd(t *testing.T, s *Session, d time.Duration) error {
	t.Helper()
	select {
	case <-s.Done():
		return s.Err()
	case <-time.After(d):
		t.Fatalf("session still running after %s", d)
		return nil
	}
}

// heapGrowth runs f and reports how much the heap grew while it ran
// (after a GC, so it counts what is still held).
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

func totalAlloc() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc
}

// A frame header announcing 4 GiB, followed by endless garbage: the
// session ends at the header, without buffering the payload.
func TestHugeFrameHeaderEndsSessionWithoutAllocating(t *testing.T) {
	c, peer := rawClient(t)
	st, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	before := totalAlloc()
	go func() {
		_, _ = peer.Write(frame(typeData, 0, st.ID(), 0xffffffff, nil))
		junk := bytes.Repeat([]byte{0xa5}, 64<<10)
		for {
			if _, err := peer.Write(junk); err != nil {
				return
			}
		}
	}()
	go func() { _, _ = io.Copy(io.Discard, peer) }()
	err = waitEnd(t, c, 2*time.Second)
	if !errors.Is(err, ErrProtocol) || !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("session ended with %v, want a protocol error", err)
	}
	if grew := totalAlloc() - before; grew > 4<<20 {
		t.Errorf("allocated %d bytes for a frame it refused", grew)
	}
	if _, err := st.Read(make([]byte, 1)); !errors.Is(err, ErrProtocol) {
		t.Errorf("stream read after the violation: %v", err)
	}
}

// Every violation of the wire format ends the session with ErrProtocol at
// once.
func TestProtocolViolationsEndSession(t *testing.T) {
	const w = 1 << 20
	syn := func(id uint32) []byte { return frame(typeWindowUpdate, flagSYN, id, 0, nil) }
	cases := []struct {
		name   string
		server bool // drive a server session instead of a client
		frames [][]byte
	}{
		{"version", false, [][]byte{{1, typePing, 0, flagSYN, 0, 0, 0, 0, 0, 0, 0, 1}}},
		{"frame type", false, [][]byte{frame(4, 0, 0, 0, nil)}},
		{"unknown flag", false, [][]byte{frame(typeWindowUpdate, 0x10, 1, 0, nil)}},
		{"stream id 0", false, [][]byte{frame(typeData, 0, 0, 1, []byte{0})}},
		{"data beyond the window on an unknown stream", false, [][]byte{frame(typeData, 0, 99, w+1, nil)}},
		{"data beyond what is left of the window", false, [][]byte{
			frame(typeData, 0, 1, w/2+1, make([]byte, w/2+1)),
			frame(typeData, 0, 1, w/2, make([]byte, w/2)),
		}},
		{"data after FIN", false, [][]byte{
			frame(typeWindowUpdate, flagACK|flagFIN, 1, 0, nil),
			frame(typeData, 0, 1, 1, []byte{'x'}),
		}},
		{"window overflow", false, [][]byte{frame(typeWindowUpdate, 0, 1, 0xffffffff, nil)}},
		{"SYN with our parity", false, [][]byte{syn(5)}},
		{"SYN for an open stream", true, [][]byte{syn(1), syn(1)}},
		{"ping on a stream", false, [][]byte{frame(typePing, flagSYN, 3, 7, nil)}},
		{"ping without SYN or ACK", false, [][]byte{frame(typePing, 0, 0, 7, nil)}},
		{"ping with SYN and ACK", false, [][]byte{frame(typePing, flagSYN|flagACK, 0, 7, nil)}},
		{"go-away on a stream", false, [][]byte{frame(typeGoAway, 0, 1, 0, nil)}},
		{"truncated header", false, [][]byte{{0, typeData, 0}}},
		{"truncated payload", false, [][]byte{frame(typeData, 0, 1, 100, []byte("short"))}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, b := socketpair(t)
			var s *Session
			if tc.server {
				s = Server(a, Config{})
			} else {
				s = Client(a, Config{})
				if _, err := s.Open(); err != nil {
					t.Fatal(err)
				}
			}
			defer s.Close()
			go func() { _, _ = io.Copy(io.Discard, b) }()
			for _, f := range tc.frames {
				if _, err := b.Write(f); err != nil {
					break
				}
			}
			if tc.name == "truncated header" || tc.name == "truncated payload" {
				_ = b.(*net.UnixConn).CloseWrite()
			}
			if err := waitEnd(t, s, 2*time.Second); !errors.Is(err, ErrProtocol) {
				t.Fatalf("ended with %v, want ErrProtocol", err)
			}
		})
	}
}

// A go-away is an orderly end, not a violation.
func TestGoAwayEndsSession(t *testing.T) {
	c, peer := rawClient(t)
	_, _ = peer.Write(frame(typeGoAway, 0, 0, 0, nil))
	err := waitEnd(t, c, 2*time.Second)
	if !errors.Is(err, ErrSessionClosed) || errors.Is(err, ErrProtocol) {
		t.Fatalf("ended with %v", err)
	}
}

// Streams the peer opens are reset and leave no state; a peer that keeps
// opening them is cut off.
func TestClientRefusesInboundStreams(t *testing.T) {
	c, peer := rawClient(t)
	if _, err := c.Accept(); !errors.Is(err, ErrNoAccept) {
		t.Fatalf("Accept on a client: %v", err)
	}
	for i := 0; i < maxRefusedStreams; i++ {
		id := uint32(2 + 2*i)
		// A SYN with data: the payload is skipped.
		if _, err := peer.Write(frame(typeData, flagSYN, id, 3, []byte("abc"))); err != nil {
			t.Fatal(err)
		}
		h := readHeader(t, peer)
		if h.typ != typeWindowUpdate || h.flags != flagRST || h.id != id {
			t.Fatalf("answer to SYN %d: %+v, want RST", id, h)
		}
		if n := c.NumStreams(); n != 0 {
			t.Fatalf("client keeps state for %d refused streams", n)
		}
	}
	if _, err := peer.Write(frame(typeWindowUpdate, flagSYN, 1000, 0, nil)); err != nil {
		t.Fatal(err)
	}
	if err := waitEnd(t, c, 2*time.Second); !errors.Is(err, ErrProtocol) {
		t.Fatalf("ended with %v, want ErrProtocol", err)
	}
}

// A peer that floods pings and never reads cannot block our reader or our
// writers: it is cut off once the answers it does not read pile up, and
// meanwhile writers with a deadline return in time.
func TestPingFloodWithoutReading(t *testing.T) {
	c, peer := rawClient(t)
	go func() {
		var batch []byte
		for i := 0; i < 1024; i++ {
			batch = append(batch, frame(typePing, flagSYN, 0, uint32(i), nil)...)
		}
		for {
			if _, err := peer.Write(batch); err != nil {
				return
			}
		}
	}()
	start := time.Now()
	err := waitEnd(t, c, 5*time.Second)
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("ended with %v, want ErrProtocol", err)
	}
	t.Logf("cut off after %s", time.Since(start))
	// Everything blocked on the session returns at once now.
	done := make(chan error, 1)
	go func() { _, err := c.Open(); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrSessionClosed) {
			t.Errorf("Open after the flood: %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Open blocked on a dead session")
	}
}

// The reader goes on while the connection's write side is stuck: data for
// one stream arrives although a writer of another is blocked on a peer
// that does not read.
func TestReaderNeverWaitsForWriter(t *testing.T) {
	c, peer := rawClient(t)
	a, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	// Give a a huge window so that only the socket buffer stops it.
	if _, err := peer.Write(frame(typeWindowUpdate, flagACK, a.ID(), 64<<20, nil)); err != nil {
		t.Fatal(err)
	}
	writeDone := make(chan error, 1)
	go func() { _, err := a.Write(make([]byte, 32<<20)); writeDone <- err }()
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-writeDone:
		t.Fatalf("a 32 MiB write to a peer that does not read returned: %v", err)
	default:
	}
	// Pings (answered through the queue) and data both still flow in.
	for i := 0; i < 10; i++ {
		_, _ = peer.Write(frame(typePing, flagSYN, 0, uint32(i), nil))
	}
	if _, err := peer.Write(frame(typeData, flagACK, b.ID(), 5, []byte("hello"))); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	readDone := make(chan error, 1)
	go func() { _, err := io.ReadFull(b, got); readDone <- err }()
	select {
	case err := <-readDone:
		if err != nil || string(got) != "hello" {
			t.Fatalf("read %q, %v", got, err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the reader is blocked behind a stuck writer")
	}
	// A writer with a deadline gives up in time; the session survives,
	// since nothing of its frame went out.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.OpenContext(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("OpenContext behind a stuck writer: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("OpenContext took %s with a 100ms deadline", d)
	}
	if _, err := b.WriteContext(ctx, []byte("x")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WriteContext behind a stuck writer: %v", err)
	}
	if _, err := c.Ping(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping behind a stuck writer: %v", err)
	}
	select {
	case <-c.Done():
		t.Fatalf("session ended: %v", c.Err())
	default:
	}
	// Reset and CloseWrite never wait.
	for _, f := range []func() error{b.CloseWrite, b.Reset} {
		ret := make(chan struct{})
		go func() { _ = f(); close(ret) }()
		select {
		case <-ret:
		case <-time.After(time.Second):
			t.Fatal("CloseWrite/Reset blocked behind a stuck writer")
		}
	}
	// Close unblocks the stuck writer promptly.
	start = time.Now()
	c.Close()
	select {
	case err := <-writeDone:
		if !errors.Is(err, ErrSessionClosed) {
			t.Errorf("stuck write after Close: %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Close did not unblock a writer stuck on the connection")
	}
	t.Logf("Close unblocked the writer in %s", time.Since(start))
}

// A writer stuck in the middle of a frame and cancelled ends the session:
// the peer could not find the next frame boundary.
func TestCancelMidFrameEndsSession(t *testing.T) {
	c, _ := rawClient(t)
	a, _ := c.Open()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	// One frame larger than the socket's buffer (208 KiB by default): it
	// cannot go out whole to a peer that does not read.
	frame := make([]byte, HeaderSize+initialWindow)
	if err := a.WriteFrameContext(ctx, frame); err == nil {
		t.Fatal("a 256 KiB frame to a peer that does not read went out")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancelled write returned after %s", d)
	}
	if err := waitEnd(t, c, time.Second); !errors.Is(err, ErrSessionClosed) {
		t.Errorf("session after a cut frame: %v", err)
	}
}

// A writer waiting for window gives up with its context, and the session
// goes on.
func TestWriteContextWaitingForWindow(t *testing.T) {
	c, s := pair(t, Config{})
	st, _ := c.Open()
	_, _ = st.Write([]byte("x"))
	srv, err := s.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	// The server never reads: its window (1 MiB) stops the client.
	if _, err := st.WriteContext(ctx, make([]byte, 4<<20)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("write past the window: %v", err)
	}
	// Frame boundaries are intact: reading the stream and writing again
	// work.
	go func() { _, _ = io.Copy(io.Discard, srv) }()
	if _, err := st.Write(make([]byte, 2<<20)); err != nil {
		t.Fatalf("write after a cancelled one: %v", err)
	}
	if _, err := c.Ping(context.Background()); err != nil {
		t.Fatalf("ping after a cancelled write: %v", err)
	}
}

func TestPing(t *testing.T) {
	c, _ := pair(t, Config{})
	for i := 0; i < 100; i++ {
		d, err := c.Ping(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if d <= 0 || d > time.Second {
			t.Fatalf("round trip %s", d)
		}
	}
	// Concurrent pings each get their own answer.
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Ping(context.Background()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
}

// A peer that reads but does not answer pings: Ping ends with its
// context; a stray or forged ACK does not answer it.
func TestPingUnanswered(t *testing.T) {
	c, peer := rawClient(t)
	var mu sync.Mutex
	var seen []header
	go func() {
		for {
			var b [HeaderSize]byte
			if _, err := io.ReadFull(peer, b[:]); err != nil {
				return
			}
			mu.Lock()
			seen = append(seen, header{b[1], binary.BigEndian.Uint16(b[2:4]), binary.BigEndian.Uint32(b[4:8]), binary.BigEndian.Uint32(b[8:12])})
			mu.Unlock()
		}
	}()
	_, _ = peer.Write(frame(typePing, flagACK, 0, 12345, nil))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.Ping(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unanswered ping: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("unanswered ping returned after %s", d)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 1 || seen[0].typ != typePing || seen[0].flags != flagSYN {
		t.Errorf("frames sent: %+v, want one ping SYN", seen)
	}
	if c.NumStreams() != 0 {
		t.Errorf("%d streams", c.NumStreams())
	}
}

// A peer that fills a stream's window with one-byte frames cannot make the
// host hold more than a small multiple of the window.
func TestTinyFramesStayWithinWindow(t *testing.T) {
	c, peer := rawClient(t)
	st, _ := c.Open()
	go func() { _, _ = io.Copy(io.Discard, peer) }()
	base := heapInUse()
	const window = 1 << 20
	buf := make([]byte, 0, 4096*(HeaderSize+1))
	for sent := 0; sent < window; {
		buf = buf[:0]
		for i := 0; i < 4096 && sent < window; i++ {
			buf = append(buf, frame(typeData, 0, st.ID(), 1, []byte{byte(sent)})...)
			sent++
		}
		if _, err := peer.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	// One byte more than the window is a violation...
	// but first make sure all of it arrived.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st.mu.Lock()
		n := len(st.buf) - st.off
		st.mu.Unlock()
		if n == window {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d bytes arrived", n, window)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if grew := int64(heapInUse()) - int64(base); grew > 4*window {
		t.Errorf("a full window of one-byte frames holds %d bytes of heap", grew)
	}
	_, _ = peer.Write(frame(typeData, 0, st.ID(), 1, []byte{0}))
	if err := waitEnd(t, c, 2*time.Second); !errors.Is(err, ErrProtocol) {
		t.Fatalf("a byte past the window: %v", err)
	}
}

// A peer that floods a stream the host reads slowly is held to the window:
// the heap does not grow with what it sends, window updates do not pile
// up, and no goroutines are spawned for them.
func TestFloodIntoSlowReaderIsBounded(t *testing.T) {
	c, s := pair(t, Config{})
	st, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	_, _ = st.Write([]byte("go"))
	srv, err := s.Accept()
	if err != nil {
		t.Fatal(err)
	}
	const total = 256 << 20
	go func() {
		chunk := make([]byte, 128<<10)
		for sent := 0; sent < total; sent += len(chunk) {
			if _, err := srv.Write(chunk); err != nil {
				return
			}
		}
		_ = srv.CloseWrite()
	}()
	goroutines := runtime.NumGoroutine()
	base := heapInUse()
	var maxHeap uint64
	buf := make([]byte, 4096)
	got := 0
	for i := 0; ; i++ {
		n, err := st.Read(buf)
		got += n
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if i%2048 == 0 {
			// A slow reader: the writer fills the window meanwhile.
			time.Sleep(2 * time.Millisecond)
			maxHeap = max(maxHeap, heapInUse())
			if g := runtime.NumGoroutine(); g > goroutines+2 {
				t.Fatalf("%d goroutines, %d at the start", g, goroutines)
			}
		}
	}
	if got != total {
		t.Fatalf("read %d bytes, want %d", got, total)
	}
	if grew := int64(maxHeap) - int64(base); grew > 8<<20 {
		t.Errorf("heap grew by %d bytes while the peer flooded a slow reader", grew)
	}
	t.Logf("heap at most %d KiB above the start", (int64(maxHeap)-int64(base))>>10)
}

// Frames a correct peer may send around the end of a stream, or that name
// nothing, are skipped without ending the session.
func TestToleratedFrames(t *testing.T) {
	c, peer := rawClient(t)
	gone, _ := c.Open()
	live, _ := c.Open()
	_ = gone.Reset()
	go func() { _, _ = io.Copy(io.Discard, peer) }()
	for _, f := range [][]byte{
		frame(typeData, 0, gone.ID(), 4, []byte("late")), // in flight when we reset it
		frame(typeWindowUpdate, flagFIN, gone.ID(), 100, nil),
		frame(typeWindowUpdate, flagRST, 999, 0, nil),
		frame(typeData, 0, 777, 3, []byte("abc")), // a stream that never was
		frame(typePing, flagACK, 0, 424242, nil),  // a pong nobody asked for
		frame(typeData, 0, live.ID(), 0, nil),
		frame(typeData, flagACK, live.ID(), 2, []byte("ok")),
	} {
		if _, err := peer.Write(f); err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 2)
	if _, err := io.ReadFull(live, got); err != nil || string(got) != "ok" {
		t.Fatalf("read %q, %v", got, err)
	}
	select {
	case <-c.Done():
		t.Fatalf("session ended: %v", c.Err())
	default:
	}
	if n := c.NumStreams(); n != 1 {
		t.Errorf("%d streams kept, want 1", n)
	}
}
