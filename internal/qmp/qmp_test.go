package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "qmp")
		cs[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { cs[0].Close(); cs[1].Close() })
	return cs[0], cs[1]
}

// fakeQEMU is the monitor side of a connection, scripted by the test.
type fakeQEMU struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func newFake(t *testing.T) (*Client, *fakeQEMU) {
	a, b := socketpair(t)
	c := New(a)
	t.Cleanup(func() { c.Close() })
	return c, &fakeQEMU{t: t, conn: b, r: bufio.NewReader(b)}
}

func (f *fakeQEMU) send(line string) {
	if _, err := f.conn.Write([]byte(line + "\n")); err != nil {
		f.t.Errorf("fake qemu write: %v", err)
	}
}

// next reads one command; "" when the client has gone.
func (f *fakeQEMU) next() (string, int64) {
	_ = f.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := f.r.ReadBytes('\n')
	if err != nil {
		return "", -1
	}
	var req struct {
		Execute string `json:"execute"`
		ID      int64  `json:"id"`
	}
	if err := json.Unmarshal(line, &req); err != nil {
		f.t.Errorf("fake qemu got %q: %v", line, err)
	}
	return req.Execute, req.ID
}

func (f *fakeQEMU) greet() {
	f.send(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`)
	cmd, id := f.next()
	if cmd != "qmp_capabilities" {
		f.t.Errorf("first command %q, want qmp_capabilities", cmd)
	}
	f.send(fmt.Sprintf(`{"return": {}, "id": %d}`, id))
}

func event(name, data string) string {
	return fmt.Sprintf(`{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": %q, "data": %s}`, name, data)
}

func nextEvent(t *testing.T, c *Client, within time.Duration) Event {
	t.Helper()
	select {
	case ev, ok := <-c.Events():
		if !ok {
			t.Fatalf("events closed: %v", c.Err())
		}
		return ev
	case <-time.After(within):
		t.Fatalf("no event within %s", within)
		return Event{}
	}
}

// Events arrive with no command in flight, from the negotiation on.
func TestEventsWithoutCommand(t *testing.T) {
	c, f := newFake(t)
	c.Start()
	f.greet()
	f.send(event("VSERPORT_CHANGE", `{"open": false, "id": "agent"}`))
	f.send(event("SHUTDOWN", `{"guest": true, "reason": "guest-shutdown"}`))
	ev := nextEvent(t, c, time.Second)
	var port struct {
		ID   string `json:"id"`
		Open bool   `json:"open"`
	}
	if err := json.Unmarshal(ev.Data, &port); ev.Name != "VSERPORT_CHANGE" || err != nil || port.ID != "agent" || port.Open {
		t.Fatalf("event %+v (%s), %v", ev, ev.Data, err)
	}
	if !ev.Time.Equal(time.Unix(1700000000, 5000)) {
		t.Errorf("timestamp %v", ev.Time)
	}
	if ev := nextEvent(t, c, time.Second); ev.Name != "SHUTDOWN" {
		t.Fatalf("event %+v", ev)
	}
	// The VMM going away closes the channel.
	f.conn.Close()
	select {
	case _, ok := <-c.Events():
		if ok {
			t.Fatal("event after the connection ended")
		}
	case <-time.After(time.Second):
		t.Fatal("events not closed at the connection's end")
	}
	if !errors.Is(c.Err(), ErrClosed) {
		t.Errorf("Err = %v", c.Err())
	}
}

// Replies are matched by id, with events in between.
func TestExecute(t *testing.T) {
	c, f := newFake(t)
	go func() {
		f.greet()
		cmd, id := f.next()
		f.send(event("STOP", "{}"))
		f.send(`{"return": {}, "id": 999}`) // not ours
		if cmd == "query-status" {
			f.send(fmt.Sprintf(`{"return": {"status": "running", "running": true}, "id": %d}`, id))
		}
		_, id = f.next()
		f.send(fmt.Sprintf(`{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": %d}`, id))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ret, err := c.Execute(ctx, "query-status", nil)
	if err != nil || !strings.Contains(string(ret), `"running"`) {
		t.Fatalf("query-status: %s, %v", ret, err)
	}
	_, err = c.Execute(ctx, "nope", nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("error reply: %v", err)
	}
	if ev := nextEvent(t, c, time.Second); ev.Name != "STOP" {
		t.Errorf("event %+v", ev)
	}
}

// A command QEMU does not answer, or a greeting that never comes, ends
// with the caller's context.
func TestExecuteHonoursContext(t *testing.T) {
	t.Run("no greeting", func(t *testing.T) {
		c, _ := newFake(t)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if _, err := c.Execute(ctx, "quit", nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%v", err)
		}
	})
	t.Run("no reply", func(t *testing.T) {
		c, f := newFake(t)
		go f.greet()
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		if _, err := c.Execute(ctx, "quit", nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%v", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("returned after %s", d)
		}
	})
}

// A line over MaxLine ends the connection without buffering it.
func TestLineTooLong(t *testing.T) {
	c, f := newFake(t)
	c.Start()
	go func() {
		f.greet()
		junk := []byte(`{"event": "X", "data": "` + strings.Repeat("a", 64<<10))
		for {
			if _, err := f.conn.Write(junk); err != nil {
				return
			}
		}
	}()
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("an endless line did not end the connection")
	}
	if !errors.Is(c.Err(), ErrLineTooLong) {
		t.Fatalf("Err = %v", c.Err())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := c.Execute(ctx, "quit", nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Execute on a dead connection: %v", err)
	}
}

// Events nobody reads are dropped oldest first: the reader never blocks
// on them, and the latest (the one that says the guest is gone) is kept.
func TestEventOverflowKeepsNewest(t *testing.T) {
	c, f := newFake(t)
	c.Start()
	f.greet()
	for i := 0; i < 1000; i++ {
		f.send(event("RTC_CHANGE", fmt.Sprintf(`{"offset": %d}`, i)))
	}
	f.send(event("SHUTDOWN", "{}"))
	// Commands still work while events pile up.
	go func() {
		_, id := f.next()
		f.send(fmt.Sprintf(`{"return": {}, "id": %d}`, id))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Execute(ctx, "query-status", nil); err != nil {
		t.Fatal(err)
	}
	var last Event
	for len(c.Events()) > 0 {
		last = <-c.Events()
	}
	if last.Name != "SHUTDOWN" {
		t.Errorf("last event %q, want SHUTDOWN", last.Name)
	}
	if d := c.Dropped(); d < 1000+1-EventBuffer {
		t.Errorf("dropped %d", d)
	}
}

func TestNotAGreeting(t *testing.T) {
	c, f := newFake(t)
	go f.send(`{"return": {}}`)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Execute(ctx, "quit", nil); err == nil {
		t.Fatal("accepted a connection without a greeting")
	}
}
