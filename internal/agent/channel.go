package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/mux"
)

// A channel is the byte stream under the agent's sessions: the
// virtio-serial port, or one accepted vsock connection. Sessions follow
// each other on it:
//
//   - A session ends when the stream ends (EOF: the host closed its end).
//     On a virtio-serial port that is not the end of the channel: the host
//     can connect again (after a snapshot restore, with a new VMM), and the
//     agent waits for that without polling (waitHost).
//   - A session also ends when the host starts a new one on the same
//     stream without closing it: the first frame of every session opens
//     stream 1 (the hello), which a session never opens twice, so a frame
//     that opens stream 1 again is the first frame of the next session.
//     That is what a host restored from a snapshot sends, into an agent
//     whose session state dates from before the snapshot.
//
// To find that frame boundary the channel parses the yamux frame headers
// on their way to the session's multiplexer and hands it at most one
// frame at a time; the bytes of the next session stay buffered here.
type channel struct {
	rw io.ReadWriter
	// dl interrupts blocked reads and writes when a session ends; nil
	// when the stream has no deadlines (then reads end when data comes).
	dl deadliner
	// waitHost, for a stream the host can reconnect (virtio-serial),
	// waits after an EOF until the host is there again and hands over
	// bytes it read while checking. Nil: EOF ends the channel.
	waitHost func(ctx context.Context, stash func([]byte)) error

	rmu  sync.Mutex // held by the session reading
	buf  []byte
	r, w int
	rerr error // the stream's last read error (io.EOF once the host closed)
}

type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// channelBuffer is what the channel reads ahead. The session's own reader
// buffers as much again.
const channelBuffer = 256 << 10

func newChannel(rw io.ReadWriter) *channel {
	ch := &channel{rw: rw, buf: make([]byte, channelBuffer)}
	if dl, ok := rw.(deadliner); ok {
		ch.dl = dl
	}
	return ch
}

func (ch *channel) buffered() int { return ch.w - ch.r }

// fill reads once from the stream into the buffer.
func (ch *channel) fill() error {
	if ch.r == ch.w {
		ch.r, ch.w = 0, 0
	} else if ch.w == len(ch.buf) {
		ch.w = copy(ch.buf, ch.buf[ch.r:ch.w])
		ch.r = 0
	}
	n, err := ch.rw.Read(ch.buf[ch.w:])
	ch.w += n
	if n > 0 || err == nil {
		return nil
	}
	ch.noteErr(err)
	return err
}

// noteErr records a read error of the stream, unless it is the deadline a
// session's end set to wake its reader.
func (ch *channel) noteErr(err error) {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		ch.rerr = err
	}
}

func (ch *channel) stash(b []byte) {
	if ch.r == ch.w {
		ch.r, ch.w = 0, 0
	}
	if len(ch.buf)-ch.w < len(b) {
		ch.w = copy(ch.buf, ch.buf[ch.r:ch.w])
		ch.r = 0
		if len(ch.buf)-ch.w < len(b) {
			ch.buf = append(ch.buf[:ch.w], make([]byte, len(b))...)
		}
	}
	ch.w += copy(ch.buf[ch.w:], b)
}

// session returns the view of the channel the next session reads and
// writes.
func (ch *channel) session() *sessionConn { return &sessionConn{ch: ch} }

// sessionConn is one session's view of the channel: the frames up to
// (not including) the first frame of the next session.
type sessionConn struct {
	ch *channel

	mu       sync.Mutex
	ended    bool // no more reads or writes: the session is over
	restart  bool // it ended because the host began a new session
	quiet    bool // writes are dropped: the session was quiesced
	released bool // finish is done: the stream's deadlines are the next session's
	inflight sync.WaitGroup

	// Reader state, guarded by ch.rmu.
	started bool  // the session's first frame went by
	left    int64 // bytes of the current frame not yet handed over
}

var errSessionOver = errors.New("session is over")

func (c *sessionConn) isEnded() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ended
}

// Read hands the session's multiplexer the channel's bytes, never more than
// the rest of the current frame, and io.EOF at the first frame of the next
// session.
func (c *sessionConn) Read(p []byte) (int, error) {
	ch := c.ch
	ch.rmu.Lock()
	defer ch.rmu.Unlock()
	for {
		if c.isEnded() {
			return 0, io.EOF
		}
		if c.left == 0 && ch.buffered() >= mux.HeaderSize {
			hdr := ch.buf[ch.r : ch.r+mux.HeaderSize]
			if opensStream(hdr, 1) {
				if c.started {
					c.mu.Lock()
					c.ended, c.restart = true, true
					c.mu.Unlock()
					return 0, io.EOF
				}
				c.started = true
			}
			c.left = frameSize(hdr)
		}
		switch {
		case c.left > 0 && ch.buffered() > 0:
			n := copy(p, ch.buf[ch.r:ch.r+int(min(int64(ch.buffered()), c.left))])
			ch.r += n
			c.left -= int64(n)
			return n, nil
		case c.left > 0 && len(p) > 0:
			// The middle of a frame with nothing buffered: read it
			// straight into p, sparing a copy of bulk stdin.
			n, err := ch.rw.Read(p[:min(int64(len(p)), c.left)])
			c.left -= int64(n)
			if n > 0 {
				return n, nil
			}
			if err != nil {
				ch.noteErr(err)
				return 0, c.readErr(err)
			}
		default:
			if err := ch.fill(); err != nil {
				if c.left == 0 && ch.buffered() > 0 {
					// A truncated header: hand it over; the
					// multiplexer reports the broken frame.
					c.left = int64(ch.buffered())
					continue
				}
				return 0, c.readErr(err)
			}
		}
	}
}

// readErr is what a failed stream read means to the session: EOF once the
// session was ended (a deadline woke the read), the error otherwise.
func (c *sessionConn) readErr(err error) error {
	if c.isEnded() || errors.Is(err, io.EOF) {
		return io.EOF
	}
	return err
}

// Write writes one frame (the multiplexer writes whole frames) unless the
// session is over or quiesced.
func (c *sessionConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	switch {
	case c.ended:
		c.mu.Unlock()
		return 0, errSessionOver
	case c.quiet:
		c.mu.Unlock()
		return len(p), nil
	}
	c.inflight.Add(1)
	c.mu.Unlock()
	defer c.inflight.Done()
	return c.ch.rw.Write(p)
}

// Close is called by the multiplexer when the session ends: it stops
// further reads and writes and wakes a blocked read. The stream itself
// stays open for the next session. The multiplexer may call it after the
// session was finished (its reader closes the connection after it woke
// Accept), when the next session may already be reading: the deadline is
// then left alone, under the same lock finish clears it with.
func (c *sessionConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ended = true
	if dl := c.ch.dl; dl != nil && !c.released {
		_ = dl.SetReadDeadline(pastDeadline)
	}
	return nil
}

// setQuiet makes every later write vanish: after a Quiesce reply nothing
// of this session may reach the host, whose next session (after a
// snapshot restore) would otherwise read it.
func (c *sessionConn) setQuiet() {
	c.mu.Lock()
	c.quiet = true
	c.mu.Unlock()
}

// finish waits until the session has let go of the channel: no read and
// no write of it in progress. Writes still blocked are cancelled when
// cancelWrites (the host went away: they could only block, and must not
// complete into the next host's stream); otherwise they complete, whole.
func (c *sessionConn) finish(cancelWrites bool) {
	_ = c.Close()
	dl := c.ch.dl
	if cancelWrites && dl != nil {
		_ = dl.SetWriteDeadline(pastDeadline)
	}
	c.inflight.Wait()
	// Taking the reader's lock waits for a read in progress to return.
	c.ch.rmu.Lock()
	c.ch.rmu.Unlock()

	c.mu.Lock()
	defer c.mu.Unlock()
	c.released = true
	if dl != nil {
		_ = dl.SetReadDeadline(time.Time{})
		_ = dl.SetWriteDeadline(time.Time{})
	}
}

// opensStream reports whether the frame header hdr opens stream id: a data
// or window update frame with the SYN flag.
func opensStream(hdr []byte, id uint32) bool {
	const typeData, typeWindowUpdate, flagSYN = 0, 1, 1
	typ, flags := hdr[1], binary.BigEndian.Uint16(hdr[2:4])
	return (typ == typeData || typ == typeWindowUpdate) && flags&flagSYN != 0 && binary.BigEndian.Uint32(hdr[4:8]) == id
}

// frameSize is the size of the frame hdr starts: the header, plus the
// payload of a data frame (the length of the other frame types is a value,
// not a payload).
func frameSize(hdr []byte) int64 {
	n := int64(mux.HeaderSize)
	if hdr[1] == 0 {
		n += int64(binary.BigEndian.Uint32(hdr[8:12]))
	}
	return n
}

// serveChannel runs sessions on ch until the channel ends (the host closed
// a stream that cannot reconnect, or it failed) or ctx ends.
func (s *Server) serveChannel(ctx context.Context, ch *channel) error {
	for {
		sc := ch.session()
		err := s.serveSession(ctx, sc)
		sc.mu.Lock()
		restart := sc.restart
		sc.mu.Unlock()
		sc.finish(!restart)
		hostGone := errors.Is(ch.rerr, io.EOF)
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case restart:
			s.log.Debug("the host started a new session", "previous", err)
			continue
		case hostGone && ch.waitHost != nil:
			s.log.Debug("the host disconnected; waiting for it", "session", err)
			ch.rerr = nil
			ch.rmu.Lock()
			werr := ch.waitHost(ctx, ch.stash)
			ch.rmu.Unlock()
			if werr != nil {
				return werr
			}
			continue
		case hostGone:
			return err
		case ch.rerr != nil:
			return ch.rerr
		case ch.waitHost == nil:
			return err
		}
		// The session failed on the host's bytes (a refused hello, a
		// broken frame) but the port is still connected: whatever the
		// host sends next is read as a new session.
		s.log.Debug("session failed", "err", err)
	}
}

// ServePort serves sessions on the virtio-serial port f for as long as the
// guest runs: when the host disconnects the agent waits for it to connect
// again (as it does for a VMM restored from a snapshot) without closing
// the port, which the host would see as the guest going away. It returns
// when ctx ends or the port fails (it was unplugged).
func (s *Server) ServePort(ctx context.Context, f *os.File) error {
	ch := newChannel(f)
	wait, err := portWaiter(f)
	if err != nil {
		return err
	}
	ch.waitHost = wait
	return s.serveChannel(ctx, ch)
}

// hostRecheck bounds how long waiting for the host relies on the driver's
// wake-up alone.
const hostRecheck = 2 * time.Second

// portWaiter returns the function that waits for the host end of a
// virtio-serial port to be connected. While it is not, the port reads
// end-of-file at once and is never writable (the guest driver blocks
// writes); when the host connects the driver wakes the port's waiters,
// so waiting for writability through the runtime's poller sleeps until
// then. A non-blocking read tells the two states apart: end-of-file (not
// connected), EAGAIN (connected, nothing sent yet) or data (kept). It also
// looks every hostRecheck, so that a wake-up the driver failed to
// deliver delays the next session by seconds, not forever. On a
// stream that is always writable and at end-of-file (not a virtio port:
// a closed socket in tests), the checks back off to 100 ms apart.
func portWaiter(f *os.File) (func(ctx context.Context, stash func([]byte)) error, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, stash func([]byte)) error {
		stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(pastDeadline) })
		defer stop()
		var buf [4096]byte
		var rerr error
		misses := 0
		check := func(fd uintptr) bool {
			for {
				n, err := unix.Read(int(fd), buf[:])
				switch {
				case n > 0:
					stash(buf[:n])
					return true
				case errors.Is(err, unix.EAGAIN):
					return true
				case errors.Is(err, unix.EINTR):
					continue
				case err != nil:
					rerr = err
					return true
				}
				// End-of-file: the host is not connected.
				if misses++; misses > 8 {
					time.Sleep(min(time.Millisecond<<min(misses-8, 7), 100*time.Millisecond))
				}
				return false
			}
		}
		var werr error
		for {
			// The wake-up is the driver's; should one ever be missed,
			// the port is looked at again a little later rather than
			// never (a wake-up every two seconds costs nothing
			// measurable).
			_ = f.SetWriteDeadline(time.Now().Add(hostRecheck))
			werr = rc.Write(check)
			if !errors.Is(werr, os.ErrDeadlineExceeded) || ctx.Err() != nil {
				break
			}
		}
		_ = f.SetWriteDeadline(time.Time{})
		if werr != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return werr
		}
		if rerr != nil {
			return os.NewSyscallError("read", rerr)
		}
		return nil
	}, nil
}
