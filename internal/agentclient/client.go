// Package agentclient is the host side of the agent protocol
// (api/agent/v1): it opens a session over the byte stream a backend
// provides and offers hello, ping, exec with streamed output, signal and
// shutdown.
//
// Dial does not wait for the guest: the hello is written at once and its
// answer awaited in the background, so a caller can queue its first exec
// right behind it and have both answered as soon as the agent starts. The
// agent answers the hello before it looks at any other stream, so a version
// mismatch still stops the exec from running.
package agentclient

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// Client is one session with a guest agent.
type Client struct {
	sess *mux.Session

	helloDone chan struct{}
	hello     *agentpb.HelloReply // set before helloDone closes
	helloErr  error
}

// ErrVersion reports that host and agent share no protocol version.
var ErrVersion = errors.New("agent protocol version mismatch")

// RemoteError is an Error response from the agent.
type RemoteError struct {
	Code    agentpb.Error_Code
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("agent: %s: %s", e.Code, e.Message)
}

// Dial starts a session on conn and sends the hello. It returns without
// waiting for the agent; Hello waits for the answer.
func Dial(conn net.Conn) (*Client, error) {
	sess := mux.Client(conn, agentproto.SessionConfig())
	c := &Client{sess: sess, helloDone: make(chan struct{})}
	st, err := sess.Open()
	if err != nil {
		sess.Close()
		return nil, fmt.Errorf("open hello stream: %w", agentproto.Classify(err))
	}
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	req := &agentpb.Request{Call: &agentpb.Request_Hello{Hello: &agentpb.Hello{
		MaxVersion:       agentproto.Version,
		MinVersion:       agentproto.MinVersion,
		HostTimeUnixNano: time.Now().UnixNano(),
		Entropy:          seed,
	}}}
	if err := agentproto.Write(st, req); err != nil {
		sess.Close()
		return nil, fmt.Errorf("send hello: %w", err)
	}
	go func() {
		defer close(c.helloDone)
		defer st.Close()
		var resp agentpb.Response
		if err := agentproto.NewReader(st).Read(&resp); err != nil {
			c.helloErr = fmt.Errorf("read hello reply: %w", err)
			return
		}
		switch r := resp.Result.(type) {
		case *agentpb.Response_Hello:
			c.hello = r.Hello
		case *agentpb.Response_Error:
			c.helloErr = fmt.Errorf("%w: %s", ErrVersion, r.Error.Message)
			if r.Error.Code != agentpb.Error_CODE_VERSION {
				c.helloErr = &RemoteError{Code: r.Error.Code, Message: r.Error.Message}
			}
		default:
			c.helloErr = fmt.Errorf("unexpected hello reply %T", resp.Result)
		}
	}()
	return c, nil
}

// Hello waits for the agent's answer to the hello.
func (c *Client) Hello(ctx context.Context) (*agentpb.HelloReply, error) {
	select {
	case <-c.helloDone:
		return c.hello, c.helloErr
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// HasCapability reports whether the agent announced cap. It waits for the
// hello (bounded by ctx).
func (c *Client) HasCapability(ctx context.Context, capability string) (bool, error) {
	h, err := c.Hello(ctx)
	if err != nil {
		return false, err
	}
	return slices.Contains(h.Capabilities, capability), nil
}

// Close ends the session; running execs on the agent are killed.
func (c *Client) Close() error { return c.sess.Close() }

// call runs a one-request, one-response call on a new stream.
func (c *Client) call(ctx context.Context, req *agentpb.Request) (*agentpb.Response, error) {
	st, err := c.sess.Open()
	if err != nil {
		return nil, agentproto.Classify(err)
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { _ = st.Reset() })
	defer stop()
	if err := agentproto.Write(st, req); err != nil {
		return nil, ctxErr(ctx, err)
	}
	var resp agentpb.Response
	if err := agentproto.NewReader(st).Read(&resp); err != nil {
		return nil, ctxErr(ctx, err)
	}
	if e := resp.GetError(); e != nil {
		return nil, &RemoteError{Code: e.Code, Message: e.Message}
	}
	return &resp, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// Ping measures one round trip through the agent.
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	_, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Ping{Ping: &agentpb.Ping{}}})
	return time.Since(start), err
}

// Shutdown asks the agent to sync, unmount and power the guest off. It
// returns when the agent has acknowledged; the VMM exits shortly after.
func (c *Client) Shutdown(ctx context.Context) error {
	_, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Shutdown{Shutdown: &agentpb.Shutdown{}}})
	if err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// signal sends sig to the process group of the exec named id.
func (c *Client) signal(ctx context.Context, id string, sig int) error {
	_, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Signal{Signal: &agentpb.Signal{ExecId: id, Signal: int32(sig)}}})
	return err
}

// Mount describes a guest mount of a VM drive (see agent.proto's Mount).
type Mount struct {
	// DeviceLabel is the drive's ext4 filesystem label; it wins over
	// DeviceSerial with agents that announce agentproto.CapMountLabel.
	// Older agents ignore it, so send DeviceSerial as well to them.
	DeviceLabel  string
	DeviceSerial string
	Target       string
	ReadOnly     bool
	// UpperLabel (or UpperSerial) makes Target an overlay whose changes
	// land on this drive.
	UpperLabel  string
	UpperSerial string
}

// Mount asks the agent to mount a drive and waits until it has.
func (c *Client) Mount(ctx context.Context, m Mount) error {
	_, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Mount{Mount: &agentpb.Mount{
		DeviceLabel:  m.DeviceLabel,
		DeviceSerial: m.DeviceSerial,
		Target:       m.Target,
		ReadOnly:     m.ReadOnly,
		UpperLabel:   m.UpperLabel,
		UpperSerial:  m.UpperSerial,
	}}})
	if err != nil {
		return fmt.Errorf("mount %s: %w", m.Target, err)
	}
	return nil
}
