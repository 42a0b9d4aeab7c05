package mux

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"sync"
)

// Stream is one bidirectional stream of a session. Read and Write may be
// used from different goroutines; several concurrent writers are
// serialised frame by frame.
type Stream struct {
	s  *Session
	id uint32

	mu         sync.Mutex
	buf        []byte // received data; buf[off:] is unread
	off        int
	recvWindow uint32 // what the peer may still send
	unacked    uint32 // consumed but not yet granted back
	sendWindow uint32 // what we may still send
	remoteFIN  bool
	localFIN   bool
	readClosed bool // Close: further data is dropped
	err        error
	readable   chan struct{}
	writable   chan struct{}
	dead       chan struct{} // closed when err is set
	wser       chan struct{} // held by the stream's current writer

	// Guarded by s.ctl.mu: the stream's pending window update.
	ctlQueued bool
	ctlFlags  uint16
	ctlGrant  uint32
}

// ID is the stream's id (odd: opened by the client).
func (st *Stream) ID() uint32 { return st.id }

// Err is why the stream failed (reset or session end), or nil.
func (st *Stream) Err() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.err
}

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// receive consumes a data frame's payload into the stream. It is called by
// the session's reader and never waits for the stream's consumer: the
// length is checked against the window before anything is buffered, so
// what a stream holds never exceeds the window it granted.
func (st *Stream) receive(br *bufio.Reader, length uint32) error {
	st.mu.Lock()
	switch {
	case st.remoteFIN:
		st.mu.Unlock()
		return protoErr("data on stream %d after its FIN", st.id)
	case length > st.recvWindow:
		w := st.recvWindow
		st.mu.Unlock()
		return protoErr("stream %d sent %d bytes into a window of %d", st.id, length, w)
	}
	st.recvWindow -= length
	st.mu.Unlock()
	for remaining := int(length); remaining > 0; {
		if br.Buffered() == 0 {
			if _, err := br.Peek(1); err != nil {
				return err
			}
		}
		piece, _ := br.Peek(min(remaining, br.Buffered()))
		st.mu.Lock()
		if st.readClosed || st.err != nil {
			// Nobody will read it: grant the window straight back.
			st.unacked += uint32(len(piece))
			st.grantLocked()
		} else {
			st.appendLocked(piece)
			notify(st.readable)
		}
		st.mu.Unlock()
		_, _ = br.Discard(len(piece))
		remaining -= len(piece)
	}
	return nil
}

// appendLocked buffers p, reusing the space already read when that makes
// room. The buffer holds at most a window of unread data (the peer can
// send no more), so once the read part is reclaimed p always fits in a
// window's capacity: the buffer grows by doubling but never past the
// window, however the peer cuts its frames, rather than to the double
// that append would pick.
func (st *Stream) appendLocked(p []byte) {
	if len(st.buf)+len(p) <= cap(st.buf) {
		st.buf = append(st.buf, p...)
		return
	}
	if st.off > 0 {
		n := copy(st.buf, st.buf[st.off:])
		st.buf, st.off = st.buf[:n], 0
		if len(st.buf)+len(p) <= cap(st.buf) {
			st.buf = append(st.buf, p...)
			return
		}
	}
	need := len(st.buf) + len(p)
	grown := make([]byte, len(st.buf), max(min(2*cap(st.buf), int(st.s.cfg.Window)), need))
	copy(grown, st.buf)
	st.buf = append(grown, p...)
}

// grantLocked returns consumed window to the peer once half of it is used,
// so window updates stay rare. The update goes out through the session's
// control queue, where it merges with any update not yet written.
func (st *Stream) grantLocked() {
	if st.unacked == 0 || st.remoteFIN || st.err != nil {
		return
	}
	if st.unacked < st.s.cfg.Window/2 && !st.readClosed {
		return
	}
	delta := st.unacked
	st.unacked = 0
	st.recvWindow += delta
	st.s.queueStream(st, 0, delta)
}

func (st *Stream) addSendWindow(n uint32) error {
	st.mu.Lock()
	if uint64(st.sendWindow)+uint64(n) > math.MaxUint32 {
		w := st.sendWindow
		st.mu.Unlock()
		return protoErr("window update of %d on stream %d overflows its window of %d", n, st.id, w)
	}
	st.sendWindow += n
	st.mu.Unlock()
	notify(st.writable)
	return nil
}

func (st *Stream) remoteClose() {
	st.mu.Lock()
	st.remoteFIN = true
	both := st.localFIN
	st.mu.Unlock()
	notify(st.readable)
	if both {
		st.s.forget(st.id)
	}
}

// fail ends the stream with err (reset or session end).
func (st *Stream) fail(err error) {
	st.mu.Lock()
	if st.err == nil {
		st.err = err
		close(st.dead)
	}
	st.mu.Unlock()
	notify(st.readable)
	notify(st.writable)
}

// Read reads received data. It returns io.EOF once the peer has closed its
// side and everything it sent has been read.
func (st *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		st.mu.Lock()
		if st.off < len(st.buf) {
			n := copy(p, st.buf[st.off:])
			st.off += n
			if st.off == len(st.buf) {
				st.buf, st.off = st.buf[:0], 0
			}
			st.unacked += uint32(n)
			st.grantLocked()
			st.mu.Unlock()
			return n, nil
		}
		switch {
		case st.err != nil:
			err := st.err
			st.buf = nil
			st.mu.Unlock()
			return 0, err
		case st.readClosed:
			st.mu.Unlock()
			return 0, ErrReadClosed
		case st.remoteFIN:
			st.buf = nil
			st.mu.Unlock()
			return 0, io.EOF
		}
		st.mu.Unlock()
		<-st.readable
	}
}

// acquire takes the stream's writer slot.
func (st *Stream) acquire(ctx context.Context) error {
	select {
	case st.wser <- struct{}{}:
		return nil
	default:
	}
	select {
	case st.wser <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-st.dead:
		return st.Err()
	}
}

func (st *Stream) release() { <-st.wser }

// reserve waits until n bytes (at least 1, at most n) of send window are
// free and takes them; with whole set, it waits for all n.
func (st *Stream) reserve(ctx context.Context, n uint32, whole bool) (uint32, error) {
	for {
		st.mu.Lock()
		switch {
		case st.err != nil:
			err := st.err
			st.mu.Unlock()
			return 0, err
		case st.localFIN:
			st.mu.Unlock()
			return 0, ErrWriteClosed
		case st.sendWindow >= n || (!whole && st.sendWindow > 0):
			got := min(n, st.sendWindow)
			st.sendWindow -= got
			st.mu.Unlock()
			return got, nil
		}
		st.mu.Unlock()
		select {
		case <-st.writable:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// unreserve gives back window taken for a frame that was not sent.
func (st *Stream) unreserve(n uint32) {
	st.mu.Lock()
	st.sendWindow += n
	st.mu.Unlock()
	notify(st.writable)
}

// Write sends p; see WriteContext.
func (st *Stream) Write(p []byte) (int, error) { return st.WriteContext(context.Background(), p) }

// WriteContext sends p, in frames of at most 64 KiB, waiting for window as
// needed. It gives up when ctx ends, the stream is reset or the session
// ends; ctx ending while a frame is half written ends the session.
func (st *Stream) WriteContext(ctx context.Context, p []byte) (int, error) {
	if err := st.acquire(ctx); err != nil {
		return 0, err
	}
	defer st.release()
	frame := make([]byte, HeaderSize+min(len(p), maxFrame))
	written := 0
	for written < len(p) {
		got, err := st.reserve(ctx, uint32(min(len(p)-written, maxFrame)), false)
		if err != nil {
			return written, err
		}
		f := frame[:HeaderSize+int(got)]
		copy(f[HeaderSize:], p[written:written+int(got)])
		if err := st.writeData(ctx, f); err != nil {
			st.unreserve(got)
			return written, err
		}
		written += int(got)
	}
	return written, nil
}

// WriteFrame sends frame[HeaderSize:]; see WriteFrameContext.
func (st *Stream) WriteFrame(frame []byte) error {
	return st.WriteFrameContext(context.Background(), frame)
}

// WriteFrameContext sends frame[HeaderSize:] as one data frame, writing
// the header into frame[:HeaderSize] itself: the payload is never copied
// and the frame goes out in one write. It waits until the whole payload
// fits the peer's window, so the payload must not exceed the 256 KiB
// initial window.
func (st *Stream) WriteFrameContext(ctx context.Context, frame []byte) error {
	n := len(frame) - HeaderSize
	if n <= 0 || n > initialWindow {
		return fmt.Errorf("mux: frame payload of %d bytes (want 1..%d)", n, initialWindow)
	}
	if err := st.acquire(ctx); err != nil {
		return err
	}
	defer st.release()
	if _, err := st.reserve(ctx, uint32(n), true); err != nil {
		return err
	}
	if err := st.writeData(ctx, frame); err != nil {
		st.unreserve(uint32(n))
		return err
	}
	return nil
}

func (st *Stream) writeData(ctx context.Context, frame []byte) error {
	if err := st.s.lock(ctx, st); err != nil {
		return err
	}
	defer st.s.unlock()
	putHeader(frame, typeData, 0, st.id, uint32(len(frame)-HeaderSize))
	return st.s.writeLocked(ctx, frame)
}

// CloseWrite half-closes the stream: the peer reads end-of-file after the
// data sent so far. Reading goes on. A Write still waiting for window
// fails with ErrWriteClosed; one in the middle of a frame is waited for.
// The FIN itself is queued, never waited for.
func (st *Stream) CloseWrite() error {
	st.mu.Lock()
	if st.localFIN || st.err != nil {
		st.mu.Unlock()
		return nil
	}
	st.localFIN = true
	st.mu.Unlock()
	notify(st.writable)
	// Frames already past reserve go out before the FIN.
	if err := st.acquire(context.Background()); err != nil {
		return nil
	}
	st.release()
	st.mu.Lock()
	both := st.remoteFIN
	failed := st.err != nil
	st.mu.Unlock()
	if !failed {
		st.s.queueStream(st, flagFIN, 0)
	}
	if both {
		st.s.forget(st.id)
	}
	return nil
}

// Close half-closes the stream and stops reading: data still arriving is
// dropped (and its window granted back, so the peer never blocks on it).
func (st *Stream) Close() error {
	st.mu.Lock()
	st.readClosed = true
	st.unacked += uint32(len(st.buf) - st.off)
	st.buf, st.off = nil, 0
	st.grantLocked()
	st.mu.Unlock()
	notify(st.readable)
	return st.CloseWrite()
}

// Reset aborts the stream in both directions and tells the peer. It never
// blocks: waiting readers and writers return ErrStreamReset, and the RST
// is queued.
func (st *Stream) Reset() error {
	st.mu.Lock()
	already := st.err != nil
	st.mu.Unlock()
	st.fail(ErrStreamReset)
	st.s.forget(st.id)
	if !already {
		st.s.queueStream(st, flagRST, 0)
	}
	return nil
}
