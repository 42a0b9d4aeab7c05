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
	"net/netip"
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
	hello     *Hello // set before helloDone closes
	helloErr  error
}

// Hello is what the agent said about itself when the session opened.
type Hello struct {
	// Version is the protocol version chosen for the session.
	Version uint32
	// AgentVersion is the agent's build, for diagnostics.
	AgentVersion string
	// Capabilities are the calls and features the agent serves.
	Capabilities []string
	// GuestUptime is the guest's uptime when the agent answered, and
	// AgentStart its uptime when the agent process started (what the
	// kernel's boot took).
	GuestUptime, AgentStart time.Duration
}

// Has reports whether the agent announced capability.
func (h *Hello) Has(capability string) bool { return slices.Contains(h.Capabilities, capability) }

// ErrVersion reports that host and agent share no protocol version.
var ErrVersion = errors.New("agent protocol version mismatch")

// RemoteError is an Error response from the agent: a call it refused or
// could not carry out.
type RemoteError struct {
	Code    string // the protocol's error code name, e.g. "CODE_NOT_FOUND"
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("agent: %s: %s", e.Code, e.Message)
}

func remoteError(e *agentpb.Error) *RemoteError {
	return &RemoteError{Code: e.Code.String(), Message: e.Message}
}

// HelloOptions are what a hello may carry besides the clock and fresh
// entropy, which every hello sends.
type HelloOptions struct {
	// Hostname sets the guest's host name (and the command root's
	// /etc/hostname and /etc/hosts). It needs
	// agentproto.CapHelloHostname; older agents ignore it.
	Hostname string
	// RenewBootID gives the guest a fresh random boot id, as commands
	// read it from /proc/sys/kernel/random/boot_id: what a VM restored
	// from a snapshot needs, since the kernel's is the snapshotted
	// boot's. It needs agentproto.CapSnapshot; older agents ignore it.
	RenewBootID bool
}

// Dial starts a session on conn and sends the hello. It returns without
// waiting for the agent; Hello waits for the answer.
func Dial(conn net.Conn) (*Client, error) { return DialWithOptions(conn, HelloOptions{}) }

// DialWithOptions is Dial with a hello that also carries opts. A VM
// restored from a snapshot is reached this way too: its agent takes the
// new hello as the start of a new session, whatever state the snapshotted
// session left.
func DialWithOptions(conn net.Conn, opts HelloOptions) (*Client, error) {
	sess := mux.Client(conn, agentproto.SessionConfig())
	c := &Client{sess: sess, helloDone: make(chan struct{})}
	st, err := sess.Open()
	if err != nil {
		sess.Close()
		return nil, fmt.Errorf("open hello stream: %w", agentproto.Classify(err))
	}
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	hello := &agentpb.Hello{
		MaxVersion:       agentproto.Version,
		MinVersion:       agentproto.MinVersion,
		HostTimeUnixNano: time.Now().UnixNano(),
		Entropy:          seed,
		Hostname:         opts.Hostname,
	}
	if opts.RenewBootID {
		hello.BootId = make([]byte, 16)
		_, _ = rand.Read(hello.BootId)
	}
	req := &agentpb.Request{Call: &agentpb.Request_Hello{Hello: hello}}
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
			h := r.Hello
			c.hello = &Hello{
				Version:      h.Version,
				AgentVersion: h.AgentVersion,
				Capabilities: h.Capabilities,
				GuestUptime:  time.Duration(h.GuestUptimeMicros) * time.Microsecond,
				AgentStart:   time.Duration(h.AgentStartUptimeMicros) * time.Microsecond,
			}
		case *agentpb.Response_Error:
			c.helloErr = fmt.Errorf("%w: %s", ErrVersion, r.Error.Message)
			if r.Error.Code != agentpb.Error_CODE_VERSION {
				c.helloErr = remoteError(r.Error)
			}
		default:
			c.helloErr = fmt.Errorf("unexpected hello reply %T", resp.Result)
		}
	}()
	return c, nil
}

// Hello waits for the agent's answer to the hello.
func (c *Client) Hello(ctx context.Context) (*Hello, error) {
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
	return h.Has(capability), nil
}

// Close ends the session; running execs on the agent are killed.
func (c *Client) Close() error { return c.sess.Close() }

// call runs a one-request, one-response call on a new stream.
func (c *Client) call(ctx context.Context, req *agentpb.Request) (*agentpb.Response, error) {
	st, err := c.sess.OpenContext(ctx)
	if err != nil {
		return nil, ctxErr(ctx, agentproto.Classify(err))
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { _ = st.Reset() })
	defer stop()
	if err := agentproto.WriteContext(ctx, st, req); err != nil {
		return nil, ctxErr(ctx, err)
	}
	var resp agentpb.Response
	if err := agentproto.NewReader(st).Read(&resp); err != nil {
		return nil, ctxErr(ctx, err)
	}
	if e := resp.GetError(); e != nil {
		return nil, remoteError(e)
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
// Drives are named by the label of the filesystem on them.
type Mount struct {
	Device   string
	Target   string
	ReadOnly bool
	// Upper makes Target an overlay whose changes land on this drive.
	Upper string
}

// Mount asks the agent to mount a drive and waits until it has.
func (c *Client) Mount(ctx context.Context, m Mount) error {
	_, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Mount{Mount: &agentpb.Mount{
		// The label is what agents with agentproto.CapMountLabel match;
		// older ones match the serial, which backends that can set one
		// make equal to the label.
		DeviceLabel:  m.Device,
		DeviceSerial: m.Device,
		Target:       m.Target,
		ReadOnly:     m.ReadOnly,
		UpperLabel:   m.Upper,
		UpperSerial:  m.Upper,
	}}})
	if err != nil {
		return fmt.Errorf("mount %s: %w", m.Target, err)
	}
	return nil
}

// Root describes a template root (see agent.proto's Root): the drives are
// named by the labels of the filesystems on them.
type Root struct {
	// Template is the label of the template's ext4 drive, attached
	// read-only.
	Template string
	// Upper is the label of the run's writable layer: an empty ext4
	// drive (mkfs.ext4 -L), another drive than the template's.
	Upper string
	// Hostname, when set, becomes the guest's host name and goes into
	// the root's /etc/hostname and /etc/hosts.
	Hostname string
}

// Root makes the template the root filesystem of every later command and
// waits until it is ready. It needs agentproto.CapRoot, and must come
// before any Mount (whose targets are then paths inside the root).
func (c *Client) Root(ctx context.Context, r Root) error {
	_, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Root{Root: &agentpb.Root{
		LowerLabel: r.Template,
		UpperLabel: r.Upper,
		Hostname:   r.Hostname,
	}}})
	if err != nil {
		return fmt.Errorf("root %s: %w", r.Template, err)
	}
	return nil
}

// Network configures the guest's network interface (see agent.proto's
// Network). It needs agentproto.CapNetwork.
type Network struct {
	// MAC is the interface to configure, found by its hardware address.
	MAC string
	// Address is the interface's address and prefix (10.0.2.15/24).
	Address netip.Prefix
	// Gateway is where the default route goes.
	Gateway netip.Addr
	// DNS are the nameservers written to resolv.conf (in the template's
	// root too, when one is set: set it first).
	DNS []netip.Addr
	// MTU is the interface's MTU; 0 keeps the device's.
	MTU int
}

// Network sets the guest's network up as n says.
func (c *Client) Network(ctx context.Context, n Network) error {
	req := &agentpb.Network{Mac: n.MAC, Address: n.Address.String(), Gateway: n.Gateway.String(), Mtu: uint32(n.MTU)}
	for _, d := range n.DNS {
		req.Dns = append(req.Dns, d.String())
	}
	if _, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Network{Network: req}}); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	return nil
}

// Quiesce prepares the guest for a snapshot: it fails while a command
// runs or once a drive is mounted, and when it returns the agent writes
// nothing more in this session, so the host may pause the VM and save it.
// The session is over for the host: the next one starts with a new hello
// (DialWithOptions) on the restored VM's connection. It needs
// agentproto.CapSnapshot.
func (c *Client) Quiesce(ctx context.Context) error { return c.quiesce(ctx, false) }

// QuiesceKeepingDrives is Quiesce for a machine that will be resumed with
// the same drives (a pause): mounted drives do not refuse it.
func (c *Client) QuiesceKeepingDrives(ctx context.Context) error { return c.quiesce(ctx, true) }

func (c *Client) quiesce(ctx context.Context, keepDrives bool) error {
	if _, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Quiesce{Quiesce: &agentpb.Quiesce{KeepDrives: keepDrives}}}); err != nil {
		return fmt.Errorf("quiesce: %w", err)
	}
	return nil
}
