// Package qmp is a minimal client for the QEMU Machine Protocol: enough to
// negotiate capabilities and run commands one at a time. It is used to
// control a running VMM (quit now; query and migrate later) without
// signals.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client speaks QMP over one connection. Commands are serialised; events
// that arrive in between are dropped (nothing here needs them yet).
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
	id   int
	open bool
}

// Error is an error reply from QEMU.
type Error struct {
	Class, Desc string
}

func (e *Error) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// New wraps conn. The greeting and capability negotiation happen lazily on
// the first command, so creating a client costs nothing on the boot path.
func New(conn net.Conn) *Client {
	return &Client{conn: conn, r: bufio.NewReader(conn)}
}

type message struct {
	QMP    json.RawMessage `json:"QMP"`
	Event  string          `json:"event"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	ID *int `json:"id"`
}

// Execute runs one command and returns its "return" value.
func (c *Client) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	} else {
		_ = c.conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if !c.open {
		if err := c.negotiate(); err != nil {
			return nil, fmt.Errorf("qmp handshake: %w", c.ctxErr(ctx, err))
		}
		c.open = true
	}
	ret, err := c.call(command, args)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, c.ctxErr(ctx, err))
	}
	return ret, nil
}

func (c *Client) ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return errors.Join(ctx.Err(), err)
	}
	return err
}

func (c *Client) negotiate() error {
	for {
		var m message
		if err := c.read(&m); err != nil {
			return err
		}
		if m.QMP != nil {
			break
		}
	}
	_, err := c.call("qmp_capabilities", nil)
	return err
}

func (c *Client) call(command string, args any) (json.RawMessage, error) {
	c.id++
	id := c.id
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        int    `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	for {
		var m message
		if err := c.read(&m); err != nil {
			return nil, err
		}
		if m.Event != "" || m.ID == nil || *m.ID != id {
			continue
		}
		if m.Error != nil {
			return nil, &Error{Class: m.Error.Class, Desc: m.Error.Desc}
		}
		return m.Return, nil
	}
}

func (c *Client) read(m *message) error {
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		return err
	}
	if err := json.Unmarshal(line, m); err != nil {
		return fmt.Errorf("decode %q: %w", line, err)
	}
	return nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
