package mux

import (
	"bufio"
	"fmt"
	"io"
	"sync"
)

// Stream is one bidirectional stream of a session. Read and Write may be
// used from different goroutines; several concurrent writers are
// serialised frame by frame.
type Stream struct {
	s  *Session
	id uint32

	mu          sync.Mutex
	recv        [][]byte // received, unread chunks
	recvWindow  uint32   // what the peer may still send
	unacked     uint32   // consumed but not yet granted back
	sendWindow  uint32   // what we may still send
	remoteFIN   bool
	localFIN    bool
	readClosed  bool // Close: further data is dropped
	err         error
	readable    chan struct{}
	writable    chan struct{}
	writeSerial sync.Mutex
}

// ID is the stream's id (odd: opened by the client).
func (st *Stream) ID() uint32 { return st.id }

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// receive reads a data frame's payload into the stream (called by the
// session's reader; never blocks on the stream's consumer).
func (st *Stream) receive(br *bufio.Reader, length uint32) error {
	buf := make([]byte, length)
	if _, err := io.ReadFull(br, buf); err != nil {
		return err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if length > st.recvWindow {
		return fmt.Errorf("%w: stream %d sent %d bytes into a window of %d", errProtocol, st.id, length, st.recvWindow)
	}
	st.recvWindow -= length
	if st.readClosed || st.err != nil {
		// Nobody will read it: grant the window straight back.
		st.unacked += length
		st.grantLocked()
		return nil
	}
	st.recv = append(st.recv, buf)
	notify(st.readable)
	return nil
}

// grantLocked returns consumed window to the peer once half of it is used,
// so window updates stay rare.
func (st *Stream) grantLocked() {
	if st.unacked < st.s.cfg.Window/2 && !(st.readClosed && st.unacked > 0) {
		return
	}
	delta := st.unacked
	st.unacked = 0
	st.recvWindow += delta
	go func() { _ = st.s.writeControl(typeWindowUpdate, 0, st.id, delta) }()
}

func (st *Stream) addSendWindow(n uint32) {
	st.mu.Lock()
	st.sendWindow += n
	st.mu.Unlock()
	notify(st.writable)
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
	}
	st.mu.Unlock()
	notify(st.readable)
	notify(st.writable)
}

// Read reads received data. It returns io.EOF once the peer has closed its
// side and everything it sent has been read.
func (st *Stream) Read(p []byte) (int, error) {
	for {
		st.mu.Lock()
		if len(st.recv) > 0 {
			n := 0
			for n < len(p) && len(st.recv) > 0 {
				c := copy(p[n:], st.recv[0])
				n += c
				if c == len(st.recv[0]) {
					st.recv[0] = nil
					st.recv = st.recv[1:]
				} else {
					st.recv[0] = st.recv[0][c:]
				}
			}
			st.unacked += uint32(n)
			st.grantLocked()
			st.mu.Unlock()
			return n, nil
		}
		if st.err != nil {
			err := st.err
			st.mu.Unlock()
			return 0, err
		}
		if st.remoteFIN {
			st.mu.Unlock()
			return 0, io.EOF
		}
		st.mu.Unlock()
		<-st.readable
	}
}

// reserve waits until n bytes (at least 1, at most n) of send window are
// free and takes them; with whole set, it waits for all n.
func (st *Stream) reserve(n uint32, whole bool) (uint32, error) {
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
		<-st.writable
	}
}

// Write sends p, in frames of at most 64 KiB, waiting for window as
// needed.
func (st *Stream) Write(p []byte) (int, error) {
	st.writeSerial.Lock()
	defer st.writeSerial.Unlock()
	frame := make([]byte, HeaderSize+min(len(p), maxFrame))
	written := 0
	for written < len(p) {
		got, err := st.reserve(uint32(min(len(p)-written, maxFrame)), false)
		if err != nil {
			return written, err
		}
		f := frame[:HeaderSize+int(got)]
		copy(f[HeaderSize:], p[written:written+int(got)])
		if err := st.writeFrameLocked(f); err != nil {
			return written, err
		}
		written += int(got)
	}
	return written, nil
}

// WriteFrame sends frame[HeaderSize:] as one data frame, writing the header
// into frame[:HeaderSize] itself: the payload is never copied. It waits
// until the whole payload fits the peer's window, so the payload must not
// exceed the 256 KiB initial window.
func (st *Stream) WriteFrame(frame []byte) error {
	n := len(frame) - HeaderSize
	if n <= 0 || n > initialWindow {
		return fmt.Errorf("mux: frame payload of %d bytes (want 1..%d)", n, initialWindow)
	}
	st.writeSerial.Lock()
	defer st.writeSerial.Unlock()
	if _, err := st.reserve(uint32(n), true); err != nil {
		return err
	}
	return st.writeFrameLocked(frame)
}

func (st *Stream) writeFrameLocked(frame []byte) error {
	st.s.wmu.Lock()
	defer st.s.wmu.Unlock()
	putHeader(frame, typeData, 0, st.id, uint32(len(frame)-HeaderSize))
	return st.s.writeLocked(frame)
}

// CloseWrite half-closes the stream: the peer reads end-of-file after the
// data sent so far. Reading goes on.
func (st *Stream) CloseWrite() error {
	st.writeSerial.Lock()
	defer st.writeSerial.Unlock()
	st.mu.Lock()
	if st.localFIN || st.err != nil {
		st.mu.Unlock()
		return nil
	}
	st.localFIN = true
	both := st.remoteFIN
	st.mu.Unlock()
	notify(st.writable)
	err := st.s.writeControl(typeWindowUpdate, flagFIN, st.id, 0)
	if both {
		st.s.forget(st.id)
	}
	return err
}

// Close half-closes the stream and stops reading: data still arriving is
// dropped (and its window granted back, so the peer never blocks on it).
func (st *Stream) Close() error {
	st.mu.Lock()
	st.readClosed = true
	st.unacked += sumLen(st.recv)
	st.recv = nil
	st.grantLocked()
	st.mu.Unlock()
	return st.CloseWrite()
}

// Reset aborts the stream in both directions and tells the peer.
func (st *Stream) Reset() error {
	st.fail(ErrStreamReset)
	st.s.forget(st.id)
	return st.s.writeControl(typeWindowUpdate, flagRST, st.id, 0)
}

func sumLen(bs [][]byte) uint32 {
	var n uint32
	for _, b := range bs {
		n += uint32(len(b))
	}
	return n
}
