// Package qmp is a minimal client for the QEMU Machine Protocol: it
// negotiates capabilities, runs commands and delivers the events QEMU
// sends. It is used to control a running VMM (quit now; query and migrate
// later) without signals, and to learn at once when the guest shuts down,
// stops, resets, panics or closes a virtio-serial port.
//
// QEMU is trusted more than the guest but still bounded: a line longer
// than MaxLine ends the connection, and events nobody reads are dropped
// oldest first rather than buffered without limit.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// MaxLine caps one message from QEMU. The largest replies of the commands
// this client is for are a few KiB; a schema dump is about 200 KiB.
const MaxLine = 1 << 20

// EventBuffer is how many undelivered events Events holds before dropping
// the oldest.
const EventBuffer = 64

// ErrLineTooLong ends a connection on which QEMU sent a line longer than
// MaxLine.
var ErrLineTooLong = errors.New("qmp: message longer than the line limit")

// ErrClosed reports that the connection to QEMU is gone (QEMU exited, or
// Close was called).
var ErrClosed = errors.New("qmp: connection closed")

// Client speaks QMP over one connection. Nothing happens until the first
// call of Start, Events or Execute: then one goroutine reads the greeting,
// negotiates capabilities and goes on reading replies and events for as
// long as the connection lasts. Commands may be issued from several
// goroutines; each waits only for its own reply.
type Client struct {
	conn net.Conn
	r    *bufio.Reader

	startOnce sync.Once
	ready     chan struct{} // closed when negotiation has finished
	readyErr  error         // set before ready is closed

	wlock chan struct{} // serialises writes to conn

	mu      sync.Mutex
	nextID  int64
	waiting map[int64]chan reply
	err     error // why the reader stopped; set before done is closed
	done    chan struct{}

	events  chan Event
	dropped atomic.Uint64
}

// Event is one asynchronous event from QEMU, such as SHUTDOWN, STOP,
// RESET, GUEST_PANICKED or VSERPORT_CHANGE (data {"id": CHARDEV, "open":
// BOOL}; a guest closing its end of a port, as its kernel does on
// power-off, sends one with open false).
type Event struct {
	Name string
	Data json.RawMessage
	// Time is QEMU's timestamp of the event.
	Time time.Time
}

// Error is an error reply from QEMU.
type Error struct {
	Class, Desc string
}

func (e *Error) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

type reply struct {
	ret json.RawMessage
	err error
}

// New wraps conn. It starts nothing, so creating a client costs nothing on
// the boot path.
func New(conn net.Conn) *Client {
	return &Client{
		conn:    conn,
		r:       bufio.NewReaderSize(conn, 64<<10),
		ready:   make(chan struct{}),
		wlock:   make(chan struct{}, 1),
		waiting: make(map[int64]chan reply),
		done:    make(chan struct{}),
		events:  make(chan Event, EventBuffer),
	}
}

// Start begins negotiation and event delivery in the background and
// returns at once. Events and Execute call it; calling it early (right
// after the VMM starts) takes the greeting's round trip off the first
// command's path.
func (c *Client) Start() {
	c.startOnce.Do(func() { go c.readLoop() })
}

// Events returns the channel events are delivered on, starting the client
// if needed. It holds up to EventBuffer events; when the reader falls
// behind the oldest are dropped (see Dropped). It is closed when the
// connection ends, which for a VMM means it exited.
func (c *Client) Events() <-chan Event {
	c.Start()
	return c.events
}

// Dropped is how many events were dropped because nobody read them.
func (c *Client) Dropped() uint64 { return c.dropped.Load() }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended (nil while it lasts); it wraps
// ErrClosed.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

type message struct {
	QMP       json.RawMessage `json:"QMP"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	ID *int64 `json:"id"`
}

// Execute runs one command and returns its "return" value. ctx bounds the
// whole call, negotiation included.
func (c *Client) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	return c.execute(ctx, command, args, nil)
}

// ExecuteWithFile is Execute with f's descriptor passed along (SCM_RIGHTS),
// as QMP's getfd and add-fd expect: that is how a VMM confined to a
// directory it cannot read is handed a file to migrate to or from.
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args any, f *os.File) (json.RawMessage, error) {
	defer runtime.KeepAlive(f)
	return c.execute(ctx, command, args, unix.UnixRights(int(f.Fd())))
}

func (c *Client) execute(ctx context.Context, command string, args any, oob []byte) (json.RawMessage, error) {
	c.Start()
	select {
	case <-c.ready:
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp handshake: %w", ctx.Err())
	}
	if c.readyErr != nil {
		return nil, fmt.Errorf("qmp handshake: %w", c.readyErr)
	}
	ret, err := c.call(ctx, command, args, oob)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	return ret, nil
}

// call sends a command, with oob as ancillary data when set, and waits
// for the reply with its id.
func (c *Client) call(ctx context.Context, command string, args any, oob []byte) (json.RawMessage, error) {
	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.nextID++
	id := c.nextID
	c.waiting[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.waiting, id)
		c.mu.Unlock()
	}()
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        int64  `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if err := c.write(ctx, append(b, '\n'), oob); err != nil {
		return nil, err
	}
	select {
	case r := <-ch:
		return r.ret, r.err
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.done:
		// A reply that came in just before the end still counts.
		select {
		case r := <-ch:
			return r.ret, r.err
		default:
		}
		return nil, c.Err()
	}
}

// write writes one line (with oob as ancillary data, on a unix socket),
// giving up when ctx ends.
func (c *Client) write(ctx context.Context, b, oob []byte) error {
	select {
	case c.wlock <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return c.Err()
	}
	defer func() { <-c.wlock }()
	dl, _ := ctx.Deadline()
	_ = c.conn.SetWriteDeadline(dl)
	var mu sync.Mutex
	writing := true
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		if writing {
			_ = c.conn.SetWriteDeadline(time.Unix(1, 0))
		}
		mu.Unlock()
	})
	var err error
	if oob != nil {
		uc, ok := c.conn.(*net.UnixConn)
		if !ok {
			err = errors.New("passing a file needs a unix socket")
		} else {
			_, _, err = uc.WriteMsgUnix(b, oob, nil)
		}
	} else {
		_, err = c.conn.Write(b)
	}
	stop()
	mu.Lock()
	writing = false
	mu.Unlock()
	_ = c.conn.SetWriteDeadline(time.Time{})
	if err != nil {
		// A line may be half written: nothing after it would parse.
		c.conn.Close()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	}
	return nil
}

func (c *Client) readLoop() {
	err := c.negotiate()
	c.readyErr = err
	close(c.ready)
	for err == nil {
		var m message
		if err = c.read(&m); err != nil {
			break
		}
		switch {
		case m.Event != "":
			c.deliver(m)
		case m.ID != nil:
			c.mu.Lock()
			ch := c.waiting[*m.ID]
			c.mu.Unlock()
			if ch == nil {
				continue // the caller gave up
			}
			if m.Error != nil {
				ch <- reply{err: &Error{Class: m.Error.Class, Desc: m.Error.Desc}}
			} else {
				ch <- reply{ret: m.Return}
			}
		}
	}
	c.conn.Close()
	if !errors.Is(err, ErrClosed) {
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.mu.Lock()
	c.err = err
	c.mu.Unlock()
	close(c.done)
	close(c.events)
}

// negotiate reads the greeting and enters command mode.
func (c *Client) negotiate() error {
	var m message
	if err := c.read(&m); err != nil {
		return err
	}
	if m.QMP == nil {
		return errors.New("qmp: no greeting")
	}
	// Written from the reader, before anyone else may write: the line is
	// tiny and QEMU reads its monitor, so this cannot block for long; the
	// deadline covers a VMM that is stopped by a debugger.
	_ = c.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := c.conn.Write([]byte(`{"execute":"qmp_capabilities","id":0}` + "\n"))
	_ = c.conn.SetWriteDeadline(time.Time{})
	if err != nil {
		return err
	}
	for {
		var m message
		if err := c.read(&m); err != nil {
			return err
		}
		switch {
		case m.Event != "":
			c.deliver(m)
		case m.ID != nil && *m.ID == 0:
			if m.Error != nil {
				return &Error{Class: m.Error.Class, Desc: m.Error.Desc}
			}
			return nil
		}
	}
}

// deliver hands an event on, dropping the oldest when nobody keeps up.
func (c *Client) deliver(m message) {
	ev := Event{Name: m.Event, Data: m.Data}
	if ts := m.Timestamp; ts != nil {
		ev.Time = time.Unix(ts.Seconds, ts.Microseconds*1000)
	}
	for {
		select {
		case c.events <- ev:
			return
		default:
		}
		select {
		case <-c.events:
			c.dropped.Add(1)
		default:
		}
	}
}

// read decodes the next line, which must be at most MaxLine long.
func (c *Client) read(m *message) error {
	line, err := c.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		long := append([]byte(nil), line...)
		for errors.Is(err, bufio.ErrBufferFull) {
			line, err = c.r.ReadSlice('\n')
			if len(long)+len(line) > MaxLine {
				return ErrLineTooLong
			}
			long = append(long, line...)
		}
		line = long
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(line, m); err != nil {
		return fmt.Errorf("qmp: decode %.200q: %w", line, err)
	}
	return nil
}
