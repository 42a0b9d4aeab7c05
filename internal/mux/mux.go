// Package mux multiplexes streams over one byte stream, speaking the yamux
// wire format (github.com/hashicorp/yamux, spec.md): 12-byte frame headers,
// SYN/ACK/FIN/RST flags, per-stream credit windows. Any yamux
// implementation can talk to it, so the agent protocol stays easy to speak
// from other languages.
//
// It exists because the guest side of a microVM channel is CPU-starved
// (under TCG every instruction is emulated) and the general-purpose yamux
// package spends per frame two write syscalls, a body copy, a goroutine
// hand-off and a timer. Here a data frame is one write from the caller's
// goroutine under the session's write lock, and WriteFrame lets a caller
// hand over a buffer with room for the header in front, so output read from
// a pipe reaches the channel without being copied in user space.
// docs/protocol.md has the measurements.
//
// The host runs the client side against a guest it does not trust, so the
// reading side treats every frame as hostile input: a length is checked
// against the receive window before a byte of payload is buffered, payloads
// are consumed in pieces no larger than the read buffer, every violation of
// the format ends the session at once, and nothing the peer sends makes the
// reader wait for a write: the frames it must answer with (ping ACKs,
// window updates, resets of refused streams) go through a bounded queue
// that one goroutine drains. A peer that makes that queue overflow (it
// pings or opens streams faster than it reads) is cut off. A client session
// refuses every stream the peer opens without keeping state for it.
package mux

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"time"
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

	knownFlags = flagSYN | flagACK | flagFIN | flagRST
)

// initialWindow is fixed by the yamux spec: each side may send this much on
// a new stream before it hears of a larger window.
const initialWindow = 256 << 10

// maxFrame caps the payload of one data frame written by Write.
const maxFrame = 64 << 10

// readBufferSize is the session reader's buffer, and so the largest piece
// of payload handled at once.
const readBufferSize = 256 << 10

// Bounds on what the peer can make this side owe it. A well-behaved peer
// reads what it is sent and never comes near them; one that does is
// flooding and is cut off.
const (
	// maxPendingPongs is how many ping ACKs may wait to be written.
	maxPendingPongs = 64
	// maxPendingResets is how many resets of refused streams may wait to
	// be written.
	maxPendingResets = 64
	// maxRefusedStreams is how many streams a client session refuses
	// before it gives up on the peer: a server never opens streams in
	// this protocol, so a peer that keeps doing so is not one.
	maxRefusedStreams = 16
)

// Errors.
var (
	// ErrSessionClosed: the session (or the byte stream under it) is gone.
	// Every error a stream returns after its session ended wraps it.
	ErrSessionClosed = errors.New("mux: session closed")
	// ErrProtocol: the peer violated the wire format or flooded the
	// session; the session was ended. Such errors also wrap
	// ErrSessionClosed.
	ErrProtocol = errors.New("mux: protocol error")
	// ErrStreamReset: the peer (or we) aborted the stream.
	ErrStreamReset = errors.New("mux: stream reset")
	// ErrWriteClosed: Write after CloseWrite.
	ErrWriteClosed = errors.New("mux: write on closed stream")
	// ErrReadClosed: Read after Close.
	ErrReadClosed = errors.New("mux: read on closed stream")
	// ErrNoAccept: Accept on a client session, which accepts no streams.
	ErrNoAccept = errors.New("mux: a client session accepts no streams")
)

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %w: %s", ErrSessionClosed, ErrProtocol, fmt.Sprintf(format, args...))
}

// Config tunes a session.
type Config struct {
	// Window is the receive window each stream grants its peer (at least
	// 256 KiB, the protocol's initial window). It bounds what the peer can
	// make this side buffer per stream. Default 1 MiB.
	Window uint32
	// AcceptBacklog bounds streams opened by the peer and not yet
	// accepted on a server session; more are reset. Default 64.
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

	// wlock is held (a token in the channel) by whoever writes a frame to
	// conn. A channel rather than a mutex so that waiting for it can be
	// abandoned (context, stream reset, session end).
	wlock  chan struct{}
	hdrBuf [HeaderSize]byte // used under wlock

	// inflight lets a cancelled writer abort its own conn.Write (see
	// writeLocked) without touching anyone else's.
	inflight struct {
		mu      sync.Mutex
		seq     uint64
		active  bool
		aborted bool
	}
	deadliner interface{ SetWriteDeadline(time.Time) error }

	ctl ctlQueue

	mu       sync.Mutex
	streams  map[uint32]*Stream
	nextID   uint32
	accept   chan *Stream
	refused  int
	pings    map[uint32]chan struct{}
	pingSeq  uint32
	closed   bool
	closeErr error
	done     chan struct{}
}

// Client starts the side that opens streams (odd ids). It never accepts
// one: every stream the peer opens is reset at once and leaves no state,
// and a peer that keeps opening them is cut off.
func Client(conn io.ReadWriteCloser, cfg Config) *Session { return newSession(conn, cfg, true) }

// Server starts the side that accepts streams.
func Server(conn io.ReadWriteCloser, cfg Config) *Session { return newSession(conn, cfg, false) }

func newSession(conn io.ReadWriteCloser, cfg Config, client bool) *Session {
	s := &Session{
		conn:    conn,
		cfg:     cfg.withDefaults(),
		client:  client,
		wlock:   make(chan struct{}, 1),
		streams: make(map[uint32]*Stream),
		pings:   make(map[uint32]chan struct{}),
		done:    make(chan struct{}),
	}
	s.deadliner, _ = conn.(interface{ SetWriteDeadline(time.Time) error })
	s.ctl.wake = make(chan struct{}, 1)
	if !client {
		s.accept = make(chan *Stream, s.cfg.AcceptBacklog)
		s.nextID = 2
	} else {
		s.nextID = 1
	}
	go s.readLoop()
	go s.controlLoop()
	return s
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is why the session ended (nil while it runs). It wraps
// ErrSessionClosed, and ErrProtocol when the peer broke the protocol.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeErr
}

// Close ends the session and every stream in it. Every blocked call
// (Open, Accept, Ping, a stream's Read or Write) returns promptly.
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
	s.pings = map[uint32]chan struct{}{}
	s.mu.Unlock()
	close(s.done)
	// Closing the connection unblocks a writer stuck in conn.Write and the
	// reader.
	s.conn.Close()
	for _, st := range streams {
		st.fail(err)
	}
}

// NumStreams is how many streams the session keeps state for.
func (s *Session) NumStreams() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.streams)
}

// Open starts a new stream; see OpenContext.
func (s *Session) Open() (*Stream, error) { return s.OpenContext(context.Background()) }

// OpenContext starts a new stream. The peer learns of it with the first
// frame, which is written before OpenContext returns; data may follow
// without waiting for its ACK. ctx bounds the wait for the connection.
func (s *Session) OpenContext(ctx context.Context) (*Stream, error) {
	s.mu.Lock()
	if s.closed {
		err := s.closeErr
		s.mu.Unlock()
		return nil, err
	}
	if s.nextID > math.MaxUint32-2 {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: stream ids exhausted", ErrSessionClosed)
	}
	id := s.nextID
	s.nextID += 2
	st := s.newStream(id)
	s.streams[id] = st
	s.mu.Unlock()
	if err := s.writeHeader(ctx, nil, typeWindowUpdate, flagSYN, id, s.cfg.Window-initialWindow); err != nil {
		s.forget(id)
		st.fail(err)
		return nil, err
	}
	return st, nil
}

// Accept waits for a stream opened by the peer.
func (s *Session) Accept() (*Stream, error) {
	if s.client {
		return nil, ErrNoAccept
	}
	select {
	case <-s.done:
		return nil, s.Err()
	default:
	}
	select {
	case st := <-s.accept:
		return st, nil
	case <-s.done:
		return nil, s.Err()
	}
}

// Ping sends a ping and waits for the peer's answer, returning the round
// trip time. The peer answers from its reader, so a successful ping shows
// that the peer reads and writes the connection, not that anything above
// the session is well. There are no automatic pings: when to ping and what
// a missed answer means (a paused VM does not answer) is the caller's
// policy.
func (s *Session) Ping(ctx context.Context) (time.Duration, error) {
	ch := make(chan struct{})
	s.mu.Lock()
	if s.closed {
		err := s.closeErr
		s.mu.Unlock()
		return 0, err
	}
	s.pingSeq++
	id := s.pingSeq
	s.pings[id] = ch
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.pings, id)
		s.mu.Unlock()
	}()
	start := time.Now()
	if err := s.writeHeader(ctx, nil, typePing, flagSYN, 0, id); err != nil {
		return 0, err
	}
	select {
	case <-ch:
		return time.Since(start), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-s.done:
		return 0, s.Err()
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
		dead:       make(chan struct{}),
		wser:       make(chan struct{}, 1),
	}
}

func putHeader(b []byte, typ uint8, flags uint16, id, length uint32) {
	b[0] = protoVersion
	b[1] = typ
	binary.BigEndian.PutUint16(b[2:4], flags)
	binary.BigEndian.PutUint32(b[4:8], id)
	binary.BigEndian.PutUint32(b[8:12], length)
}

// lock takes the right to write to the connection. It gives up when ctx
// ends, when st (if any) fails, or when the session ends.
func (s *Session) lock(ctx context.Context, st *Stream) error {
	select {
	case s.wlock <- struct{}{}:
		return nil
	default:
	}
	var dead <-chan struct{}
	if st != nil {
		dead = st.dead
	}
	select {
	case s.wlock <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-dead:
		return st.Err()
	case <-s.done:
		return s.Err()
	}
}

func (s *Session) unlock() { <-s.wlock }

// writeHeader writes a frame without payload.
func (s *Session) writeHeader(ctx context.Context, st *Stream, typ uint8, flags uint16, id, length uint32) error {
	if err := s.lock(ctx, st); err != nil {
		return err
	}
	defer s.unlock()
	putHeader(s.hdrBuf[:], typ, flags, id, length)
	return s.writeLocked(ctx, s.hdrBuf[:])
}

// writeLocked writes b whole, under wlock. When ctx ends during the write
// it is aborted through the connection's write deadline (where the
// connection has one): if nothing of b went out the session goes on and the
// context's error is returned; a frame cut in the middle, like any other
// failed write, ends the session, since the peer can no longer tell where
// frames begin.
func (s *Session) writeLocked(ctx context.Context, b []byte) error {
	select {
	case <-s.done:
		return s.Err()
	default:
	}
	var stop func() bool
	var seq uint64
	if ctx.Done() != nil && s.deadliner != nil {
		s.inflight.mu.Lock()
		s.inflight.seq++
		seq = s.inflight.seq
		s.inflight.active, s.inflight.aborted = true, false
		s.inflight.mu.Unlock()
		stop = context.AfterFunc(ctx, func() { s.abortWrite(seq) })
	}
	n, err := s.conn.Write(b)
	aborted := false
	if stop != nil {
		stop()
		s.inflight.mu.Lock()
		aborted = s.inflight.aborted
		s.inflight.active = false
		if aborted {
			_ = s.deadliner.SetWriteDeadline(time.Time{})
		}
		s.inflight.mu.Unlock()
	}
	if err == nil {
		return nil
	}
	if aborted && n == 0 && ctx.Err() != nil {
		return ctx.Err()
	}
	err = fmt.Errorf("%w: write: %w", ErrSessionClosed, err)
	s.shutdown(err)
	return s.Err()
}

// abortWrite makes the write numbered seq fail, if it is still going on.
func (s *Session) abortWrite(seq uint64) {
	s.inflight.mu.Lock()
	defer s.inflight.mu.Unlock()
	if s.inflight.active && s.inflight.seq == seq {
		s.inflight.aborted = true
		_ = s.deadliner.SetWriteDeadline(time.Unix(1, 0))
	}
}

// ctlQueue holds the frames the session owes the peer without a caller to
// write them: answers to pings, resets of streams it refused, and (per
// stream, coalesced) window updates, ACKs, FINs and RSTs. Whoever queues
// never waits; controlLoop writes them. Its size is bounded: pongs and
// resets by the limits above, stream entries by one per stream.
type ctlQueue struct {
	mu      sync.Mutex
	pongs   []uint32
	resets  []uint32
	streams []*Stream
	wake    chan struct{}
}

func (s *Session) wakeControl() {
	select {
	case s.ctl.wake <- struct{}{}:
	default:
	}
}

// queuePong queues the answer to a ping; false when the peer has let too
// many go unread.
func (s *Session) queuePong(opaque uint32) bool {
	s.ctl.mu.Lock()
	if len(s.ctl.pongs) >= maxPendingPongs {
		s.ctl.mu.Unlock()
		return false
	}
	s.ctl.pongs = append(s.ctl.pongs, opaque)
	s.ctl.mu.Unlock()
	s.wakeControl()
	return true
}

// queueReset queues an RST for a stream this side keeps no state for.
func (s *Session) queueReset(id uint32) bool {
	s.ctl.mu.Lock()
	if len(s.ctl.resets) >= maxPendingResets {
		s.ctl.mu.Unlock()
		return false
	}
	s.ctl.resets = append(s.ctl.resets, id)
	s.ctl.mu.Unlock()
	s.wakeControl()
	return true
}

// queueStream adds flags and a window grant to st's pending window update.
func (s *Session) queueStream(st *Stream, flags uint16, grant uint32) {
	s.ctl.mu.Lock()
	st.ctlFlags |= flags
	st.ctlGrant += grant
	if !st.ctlQueued {
		st.ctlQueued = true
		s.ctl.streams = append(s.ctl.streams, st)
	}
	s.ctl.mu.Unlock()
	s.wakeControl()
}

// takeControl appends the queued frames to buf and empties the queue.
func (s *Session) takeControl(buf []byte) []byte {
	var h [HeaderSize]byte
	s.ctl.mu.Lock()
	defer s.ctl.mu.Unlock()
	for _, p := range s.ctl.pongs {
		putHeader(h[:], typePing, flagACK, 0, p)
		buf = append(buf, h[:]...)
	}
	for _, id := range s.ctl.resets {
		putHeader(h[:], typeWindowUpdate, flagRST, id, 0)
		buf = append(buf, h[:]...)
	}
	for _, st := range s.ctl.streams {
		if st.ctlFlags != 0 || st.ctlGrant != 0 {
			putHeader(h[:], typeWindowUpdate, st.ctlFlags, st.id, st.ctlGrant)
			buf = append(buf, h[:]...)
		}
		st.ctlQueued, st.ctlFlags, st.ctlGrant = false, 0, 0
	}
	clear(s.ctl.streams)
	s.ctl.pongs, s.ctl.resets, s.ctl.streams = s.ctl.pongs[:0], s.ctl.resets[:0], s.ctl.streams[:0]
	return buf
}

// controlLoop writes queued control frames, all that are pending in one
// write.
func (s *Session) controlLoop() {
	var buf []byte
	for {
		select {
		case <-s.ctl.wake:
		case <-s.done:
			return
		}
		buf = s.takeControl(buf[:0])
		if len(buf) == 0 {
			continue
		}
		if err := s.lock(context.Background(), nil); err != nil {
			return
		}
		err := s.writeLocked(context.Background(), buf)
		s.unlock()
		if err != nil {
			return
		}
	}
}

func (s *Session) readLoop() {
	br := bufio.NewReaderSize(s.conn, readBufferSize)
	var hdr [HeaderSize]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			switch {
			case errors.Is(err, io.EOF):
				s.shutdown(ErrSessionClosed)
			case errors.Is(err, io.ErrUnexpectedEOF):
				s.shutdown(protoErr("connection ended inside a frame header"))
			default:
				s.shutdown(fmt.Errorf("%w: read: %w", ErrSessionClosed, err))
			}
			return
		}
		if err := s.handleFrame(br, hdr); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = protoErr("connection ended inside a frame")
			} else if !errors.Is(err, ErrSessionClosed) {
				err = fmt.Errorf("%w: read: %w", ErrSessionClosed, err)
			}
			s.shutdown(err)
			return
		}
	}
}

// handleFrame acts on one frame whose header is hdr, consuming its payload
// from br. Any error ends the session.
func (s *Session) handleFrame(br *bufio.Reader, hdr [HeaderSize]byte) error {
	if hdr[0] != protoVersion {
		return protoErr("frame version %d", hdr[0])
	}
	typ, flags := hdr[1], binary.BigEndian.Uint16(hdr[2:4])
	id, length := binary.BigEndian.Uint32(hdr[4:8]), binary.BigEndian.Uint32(hdr[8:12])
	if flags&^knownFlags != 0 {
		return protoErr("unknown flags %#x", flags)
	}
	switch typ {
	case typeData, typeWindowUpdate:
		return s.handleStream(br, typ, flags, id, length)
	case typePing:
		if id != 0 {
			return protoErr("ping on stream %d", id)
		}
		switch flags {
		case flagSYN:
			if !s.queuePong(length) {
				return protoErr("peer pings faster than it reads")
			}
		case flagACK:
			s.mu.Lock()
			if ch := s.pings[length]; ch != nil {
				close(ch)
				delete(s.pings, length)
			}
			s.mu.Unlock()
		default:
			return protoErr("ping with flags %#x", flags)
		}
		return nil
	case typeGoAway:
		if id != 0 {
			return protoErr("go-away on stream %d", id)
		}
		return fmt.Errorf("%w: peer went away (code %d)", ErrSessionClosed, length)
	default:
		return protoErr("frame type %d", typ)
	}
}

func (s *Session) handleStream(br *bufio.Reader, typ uint8, flags uint16, id, length uint32) error {
	if id == 0 {
		return protoErr("stream frame on id 0")
	}
	// Checked before anything else: no frame can carry more than a whole
	// window, whatever stream it names.
	if typ == typeData && length > s.cfg.Window {
		return protoErr("data frame of %d bytes on stream %d exceeds the %d byte window", length, id, s.cfg.Window)
	}
	s.mu.Lock()
	st := s.streams[id]
	if flags&flagSYN != 0 {
		switch {
		case st != nil:
			s.mu.Unlock()
			return protoErr("peer opened stream %d twice", id)
		case s.client == (id%2 == 1):
			s.mu.Unlock()
			return protoErr("peer opened stream %d with our parity", id)
		case s.closed:
			s.mu.Unlock()
			return s.Err()
		case s.client:
			s.refused++
			refused := s.refused
			s.mu.Unlock()
			if refused > maxRefusedStreams || !s.queueReset(id) {
				return protoErr("peer keeps opening streams (%d refused)", refused)
			}
			return discard(br, typ, length)
		}
		st = s.newStream(id)
		s.streams[id] = st
		s.mu.Unlock()
		select {
		case s.accept <- st:
			s.queueStream(st, flagACK, s.cfg.Window-initialWindow)
		default:
			s.forget(id)
			if !s.queueReset(id) {
				return protoErr("peer opens streams faster than they are accepted")
			}
			return discard(br, typ, length)
		}
	} else {
		s.mu.Unlock()
	}
	if st == nil {
		// A stream this side never had or already forgot (reset, or
		// closed both ways): its payload is skipped.
		return discard(br, typ, length)
	}
	if typ == typeData && length > 0 {
		if err := st.receive(br, length); err != nil {
			return err
		}
	}
	if typ == typeWindowUpdate && length > 0 {
		if err := st.addSendWindow(length); err != nil {
			return err
		}
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

// discard skips a data frame's payload (its length was checked against the
// window already); bufio discards in pieces of its buffer size.
func discard(br *bufio.Reader, typ uint8, length uint32) error {
	if typ != typeData || length == 0 {
		return nil
	}
	_, err := br.Discard(int(length))
	return err
}

func (s *Session) forget(id uint32) {
	s.mu.Lock()
	delete(s.streams, id)
	s.mu.Unlock()
}
