// Package mux multiplexes streams over one byte stream, speaking the yamux
// wire format (github.com/hashicorp/yamux, spec.md): 12-byte frame headers,
// SYN/ACK/FIN/RST flags, per-stream credit windows. Any yamux
// implementation can talk to it, so the agent protocol stays easy to speak
// from other languages.
//
// It exists because the guest side of a microVM channel is CPU-starved
// (under TCG every instruction is emulated) and the general-purpose yamux
// package spends per frame two write syscalls, a body copy, a goroutine
// hand-off and a timer. Here a frame is one write from the caller's
// goroutine under the session's write lock, and WriteFrame lets a caller
// hand over a buffer with room for the header in front, so output read from
// a pipe reaches the channel without being copied in user space.
// docs/protocol.md has the measurements.
package mux

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// HeaderSize is the size of a frame header, the room WriteFrame needs in
// front of its payload.
const HeaderSize = 12

// Frame types and flags of the yamux format.
const (
	protoVersion = 0

	typeData         = 0
	typeWindowUpdate = 1
	typePing         = 2
	typeGoAway       = 3

	flagSYN = 1
	flagACK = 2
	flagFIN = 4
	flagRST = 8
)

// initialWindow is fixed by the yamux spec: each side may send this much on
// a new stream before it hears of a larger window.
const initialWindow = 256 << 10

// maxFrame caps the payload of one data frame written by Write.
const maxFrame = 64 << 10

// Errors.
var (
	// ErrSessionClosed: the session (or the byte stream under it) is gone.
	ErrSessionClosed = errors.New("mux: session closed")
	// ErrStreamReset: the peer (or we) aborted the stream.
	ErrStreamReset = errors.New("mux: stream reset")
	// ErrWriteClosed: Write after CloseWrite.
	ErrWriteClosed = errors.New("mux: write on closed stream")
	// errProtocol wraps a peer's violation of the wire format.
	errProtocol = errors.New("mux: protocol error")
)

// Config tunes a session.
type Config struct {
	// Window is the receive window each stream grants its peer (at least
	// 256 KiB, the protocol's initial window). Default 1 MiB.
	Window uint32
	// AcceptBacklog bounds streams opened by the peer and not yet
	// accepted; more are reset. Default 64.
	AcceptBacklog int
}

func (c Config) withDefaults() Config {
	if c.Window < initialWindow {
		c.Window = 1 << 20
	}
	if c.AcceptBacklog <= 0 {
		c.AcceptBacklog = 64
	}
	return c
}

// Session is one end of a multiplexed connection.
type Session struct {
	conn   io.ReadWriteCloser
	cfg    Config
	client bool

	wmu    sync.Mutex // serialises frames onto conn
	hdrBuf [HeaderSize]byte

	mu       sync.Mutex
	streams  map[uint32]*Stream
	nextID   uint32
	accept   chan *Stream
	closed   bool
	closeErr error
	done     chan struct{}
}

// Client starts the side that opens streams (odd ids).
func Client(conn io.ReadWriteCloser, cfg Config) *Session { return newSession(conn, cfg, true) }

// Server starts the side that accepts streams.
func Server(conn io.ReadWriteCloser, cfg Config) *Session { return newSession(conn, cfg, false) }

func newSession(conn io.ReadWriteCloser, cfg Config, client bool) *Session {
	s := &Session{
		conn:    conn,
		cfg:     cfg.withDefaults(),
		client:  client,
		streams: make(map[uint32]*Stream),
		done:    make(chan struct{}),
	}
	s.accept = make(chan *Stream, s.cfg.AcceptBacklog)
	if client {
		s.nextID = 1
	} else {
		s.nextID = 2
	}
	go s.readLoop()
	return s
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is why the session ended (nil while it runs).
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeErr
}

// Close ends the session and every stream in it.
func (s *Session) Close() error {
	s.shutdown(ErrSessionClosed)
	return nil
}

func (s *Session) shutdown(err error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.closeErr = err
	streams := s.streams
	s.streams = map[uint32]*Stream{}
	s.mu.Unlock()
	s.conn.Close()
	for _, st := range streams {
		st.fail(err)
	}
	close(s.done)
}

// Open starts a new stream. The peer learns of it with the first frame,
// which is sent at once; data may follow without waiting for its ACK.
func (s *Session) Open() (*Stream, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrSessionClosed
	}
	id := s.nextID
	s.nextID += 2
	st := s.newStream(id)
	s.streams[id] = st
	s.mu.Unlock()
	if err := s.writeControl(typeWindowUpdate, flagSYN, id, s.cfg.Window-initialWindow); err != nil {
		return nil, err
	}
	return st, nil
}

// Accept waits for a stream opened by the peer.
func (s *Session) Accept() (*Stream, error) {
	select {
	case st := <-s.accept:
		return st, nil
	case <-s.done:
		return nil, s.Err()
	}
}

func (s *Session) newStream(id uint32) *Stream {
	return &Stream{
		s:          s,
		id:         id,
		sendWindow: initialWindow,
		recvWindow: s.cfg.Window,
		readable:   make(chan struct{}, 1),
		writable:   make(chan struct{}, 1),
	}
}

func putHeader(b []byte, typ uint8, flags uint16, id, length uint32) {
	b[0] = protoVersion
	b[1] = typ
	binary.BigEndian.PutUint16(b[2:4], flags)
	binary.BigEndian.PutUint32(b[4:8], id)
	binary.BigEndian.PutUint32(b[8:12], length)
}

// writeControl writes a frame without payload.
func (s *Session) writeControl(typ uint8, flags uint16, id, length uint32) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	putHeader(s.hdrBuf[:], typ, flags, id, length)
	return s.writeLocked(s.hdrBuf[:])
}

// writeLocked writes b whole; a failed write ends the session, since the
// peer can no longer tell where frames begin.
func (s *Session) writeLocked(b []byte) error {
	select {
	case <-s.done:
		return s.Err()
	default:
	}
	if _, err := s.conn.Write(b); err != nil {
		err = fmt.Errorf("%w: write: %w", ErrSessionClosed, err)
		s.shutdown(err)
		return err
	}
	return nil
}

func (s *Session) readLoop() {
	br := bufio.NewReaderSize(s.conn, 256<<10)
	hdr := make([]byte, HeaderSize)
	for {
		if _, err := io.ReadFull(br, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				s.shutdown(ErrSessionClosed)
			} else {
				s.shutdown(fmt.Errorf("%w: read: %w", ErrSessionClosed, err))
			}
			return
		}
		if hdr[0] != protoVersion {
			s.shutdown(fmt.Errorf("%w: frame version %d", errProtocol, hdr[0]))
			return
		}
		typ, flags := hdr[1], binary.BigEndian.Uint16(hdr[2:4])
		id, length := binary.BigEndian.Uint32(hdr[4:8]), binary.BigEndian.Uint32(hdr[8:12])
		var err error
		switch typ {
		case typeData, typeWindowUpdate:
			err = s.handleStream(br, typ, flags, id, length)
		case typePing:
			if flags&flagSYN != 0 {
				err = s.writeControl(typePing, flagACK, 0, length)
			}
		case typeGoAway:
			s.shutdown(ErrSessionClosed)
			return
		default:
			err = fmt.Errorf("%w: frame type %d", errProtocol, typ)
		}
		if err != nil {
			s.shutdown(err)
			return
		}
	}
}

func (s *Session) handleStream(br *bufio.Reader, typ uint8, flags uint16, id, length uint32) error {
	s.mu.Lock()
	st := s.streams[id]
	if st == nil && flags&flagSYN != 0 {
		if s.client == (id%2 == 1) || id == 0 {
			s.mu.Unlock()
			return fmt.Errorf("%w: peer opened stream %d with our parity", errProtocol, id)
		}
		st = s.newStream(id)
		s.streams[id] = st
		s.mu.Unlock()
		select {
		case s.accept <- st:
			if err := s.writeControl(typeWindowUpdate, flagACK, id, s.cfg.Window-initialWindow); err != nil {
				return err
			}
		default:
			s.forget(id)
			if err := s.writeControl(typeWindowUpdate, flagRST, id, 0); err != nil {
				return err
			}
			st = nil // refused: discard its payload below
		}
	} else {
		s.mu.Unlock()
	}

	if typ == typeData && length > 0 {
		if st == nil {
			// A stream we already forgot (reset, or closed both ways):
			// skip its payload.
			_, err := br.Discard(int(length))
			return err
		}
		if err := st.receive(br, length); err != nil {
			return err
		}
	}
	if st == nil {
		return nil
	}
	if typ == typeWindowUpdate && length > 0 {
		st.addSendWindow(length)
	}
	if flags&flagFIN != 0 {
		st.remoteClose()
	}
	if flags&flagRST != 0 {
		st.fail(ErrStreamReset)
		s.forget(id)
	}
	return nil
}

func (s *Session) forget(id uint32) {
	s.mu.Lock()
	delete(s.streams, id)
	s.mu.Unlock()
}
