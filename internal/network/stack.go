package network

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	gvlog "gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Limits on what one guest can make the host hold. Each forwarded TCP
// connection is one host socket and at most two buffers of maxBuffer;
// each UDP flow one host socket.
const (
	// MaxConns is how many TCP connections (out and published in) may be
	// open at once; more are reset.
	MaxConns = 512
	// MaxPending is how many handshakes may be in progress (a SYN flood
	// beyond it is dropped by the stack).
	MaxPending = 128
	// MaxUDPFlows is how many UDP flows (a guest address and port to a
	// destination) may be open at once.
	MaxUDPFlows = 128
	// maxBuffer is the largest send or receive buffer of one connection.
	maxBuffer = 256 << 10
	// maxFrame bounds one frame from the guest: an Ethernet frame of the
	// MTU, with room for a VLAN tag. Anything larger ends the network.
	maxFrame = MTU + 14 + 4
	// dialTimeout bounds the host's connect for the guest.
	dialTimeout = 10 * time.Second
	// udpIdle ends a UDP flow (and a DNS exchange) nobody used for long.
	udpIdle = 60 * time.Second
)

const nicID = 1

// Publish is a guest TCP port the host listens for.
type Publish struct {
	Host      netip.AddrPort
	GuestPort uint16
}

// Config is a run's network.
type Config struct {
	Policy *Policy
	// GatewayMAC is the host side's Ethernet address.
	GatewayMAC net.HardwareAddr
	Publish    []Publish
	// Lookup resolves names for the guest (HostLookup when nil).
	Lookup LookupFunc
	Log    *slog.Logger
}

// Stack is a run's network, serving one guest on one connection.
type Stack struct {
	cfg    Config
	s      *stack.Stack
	ep     *channel.Endpoint
	conn   net.Conn
	dns    *resolver
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	conns, flows chan struct{} // semaphores
	listeners    []net.Listener

	closeOnce sync.Once
}

// Listen binds the published ports, so that a port already in use fails
// the run before anything boots. Serve then serves them.
func Listen(pubs []Publish) ([]net.Listener, error) {
	var ls []net.Listener
	for _, p := range pubs {
		l, err := net.Listen("tcp4", p.Host.String())
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("publish %s: %w", p.Host, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// Start serves the guest whose network device is at the other end of
// conn, with the published ports' listeners from Listen (taken over: Close
// closes them).
func Start(conn net.Conn, listeners []net.Listener, cfg Config) (*Stack, error) {
	if cfg.Lookup == nil {
		cfg.Lookup = HostLookup
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ctx, cancel := context.WithCancel(context.Background())
	st := &Stack{
		cfg: cfg, s: s, conn: conn, ctx: ctx, cancel: cancel, listeners: listeners,
		dns:   &resolver{p: cfg.Policy, lookup: cfg.Lookup, log: cfg.Log},
		conns: make(chan struct{}, MaxConns), flows: make(chan struct{}, MaxUDPFlows),
	}
	fail := func(what string, err tcpip.Error) (*Stack, error) {
		st.Close()
		return nil, fmt.Errorf("network: %s: %s", what, err)
	}
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 64 << 10, Max: maxBuffer}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); err != nil {
		return fail("tcp receive buffer", err)
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 64 << 10, Max: maxBuffer}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); err != nil {
		return fail("tcp send buffer", err)
	}
	st.ep = channel.New(512, MTU+14, tcpip.LinkAddress(cfg.GatewayMAC))
	if err := s.CreateNIC(nicID, ethernet.New(st.ep)); err != nil {
		return fail("nic", err)
	}
	addr := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddrFrom4(Gateway.As4()).WithPrefix()}
	addr.AddressWithPrefix.PrefixLen = Subnet.Bits()
	if err := s.AddProtocolAddress(nicID, addr, stack.AddressProperties{}); err != nil {
		return fail("address", err)
	}
	subnet, _ := tcpip.NewSubnet(tcpip.AddrFrom4(Subnet.Addr().As4()), tcpip.MaskFromBytes(net.CIDRMask(Subnet.Bits(), 32)))
	s.SetRouteTable([]tcpip.Route{{Destination: subnet, NIC: nicID}})
	// Every destination the guest names arrives here, to be decided.
	if err := s.SetPromiscuousMode(nicID, true); err != nil {
		return fail("promiscuous", err)
	}
	if err := s.SetSpoofing(nicID, true); err != nil {
		return fail("spoofing", err)
	}
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcp.NewForwarder(s, 0, MaxPending, st.forwardTCP).HandlePacket)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udp.NewForwarder(s, st.forwardUDP).HandlePacket)

	dnsConn, derr := gonet.DialUDP(s, &tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(Gateway.As4()), Port: 53}, nil, ipv4.ProtocolNumber)
	if derr != nil {
		st.Close()
		return nil, fmt.Errorf("network: dns: %w", derr)
	}
	st.wg.Add(3)
	go st.serveDNSOverUDP(dnsConn)
	go st.readFrames()
	go st.writeFrames()
	for i, l := range listeners {
		st.wg.Add(1)
		go st.servePublished(l, cfg.Publish[i])
	}
	return st, nil
}

// Close ends the network: every connection, listener and goroutine.
func (st *Stack) Close() error {
	st.closeOnce.Do(func() {
		st.cancel()
		for _, l := range st.listeners {
			l.Close()
		}
		st.conn.Close()
		if st.ep != nil {
			st.ep.Close()
		}
		st.s.Close()
		st.wg.Wait()
		st.s.Wait()
	})
	return nil
}

// readFrames takes the guest's frames off the socket: QEMU's socket
// network backend sends each as a 32-bit big-endian length and the
// frame. A frame too large or too small ends the network (only the
// guest's own), never the host.
func (st *Stack) readFrames() {
	defer st.wg.Done()
	defer st.cancel()
	if err := pumpIn(st.conn, st.ep); err != nil {
		st.cfg.Log.Warn("network: the guest broke the network card's framing; its network is closed", "err", err)
	}
}

// writeFrames sends the stack's frames to the guest.
func (st *Stack) writeFrames() {
	defer st.wg.Done()
	defer st.cancel()
	_ = pumpOut(st.ctx, st.conn, st.ep)
}

// errFrame is a frame of a size no Ethernet frame of the MTU has.
var errFrame = errors.New("bad frame size")

// pumpIn delivers the frames read from conn to ep until conn ends; it
// returns errFrame for a frame of a bad size.
func pumpIn(conn net.Conn, ep *channel.Endpoint) error {
	// Buffered: a burst of small frames (ACKs of a download) is one read.
	r := bufio.NewReaderSize(conn, 64<<10)
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n < 14 || n > maxFrame {
			return fmt.Errorf("%w: %d bytes", errFrame, n)
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(r, frame); err != nil {
			return nil
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
		ep.InjectInbound(0, pkt)
		pkt.DecRef()
	}
}

// pumpOut writes ep's outbound frames to conn until ctx ends or a write
// fails (a guest that stops reading its card stalls it 10 s at most).
func pumpOut(ctx context.Context, conn net.Conn, ep *channel.Endpoint) error {
	out := make([]byte, 0, 4+maxFrame)
	for {
		pkt := ep.ReadContext(ctx)
		if pkt == nil {
			return ctx.Err()
		}
		out = binary.BigEndian.AppendUint32(out[:0], 0)
		for _, b := range pkt.AsSlices() {
			out = append(out, b...)
		}
		pkt.DecRef()
		binary.BigEndian.PutUint32(out, uint32(len(out)-4))
		_ = conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write(out); err != nil {
			return err
		}
	}
}

func toAddrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip.Unmap(), port)
}

// acquire takes a slot of sem, or reports false when all are taken.
func acquire(sem chan struct{}) bool {
	select {
	case sem <- struct{}{}:
		return true
	default:
		return false
	}
}

// forwardTCP decides a connection the guest opens and, when allowed,
// dials it from the host first: the guest's handshake completes only
// once the host's has, so a refused destination is a refused connection
// in the guest too (a reset).
func (st *Stack) forwardTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := toAddrPort(id.LocalAddress, id.LocalPort)
	if dst == netip.AddrPortFrom(Gateway, 53) {
		// No host socket, but memory and a goroutine: counted too.
		if !acquire(st.conns) {
			r.Complete(true)
			return
		}
		if !st.acceptTCP(r, func(c net.Conn) { defer func() { <-st.conns }(); st.serveDNSOverTCP(c) }) {
			<-st.conns
		}
		return
	}
	v := st.cfg.Policy.Decide(dst)
	if !v.Allow {
		st.cfg.Log.Info("network: connection refused", "dst", dst.String(), "proto", "tcp", "why", v.Why)
		r.Complete(true)
		return
	}
	if !acquire(st.conns) {
		st.cfg.Log.Warn("network: too many connections; refusing more", "dst", dst.String(), "max", MaxConns)
		r.Complete(true)
		return
	}
	d := net.Dialer{Timeout: dialTimeout}
	out, err := d.DialContext(st.ctx, "tcp4", v.Dial.String())
	if err != nil {
		<-st.conns
		st.cfg.Log.Info("network: connection failed on the host", "dst", dst.String(), "err", err)
		r.Complete(true)
		return
	}
	ok := st.acceptTCP(r, func(in net.Conn) {
		defer func() { <-st.conns }()
		// The network's end closes the host's side too: a remote that
		// never closes must not hold the run's teardown.
		stop := context.AfterFunc(st.ctx, func() { out.Close() })
		defer stop()
		splice(in, out)
	})
	if !ok {
		<-st.conns
		out.Close()
	}
}

// acceptTCP completes the guest's handshake and runs serve on the
// connection in a goroutine of the stack's.
func (st *Stack) acceptTCP(r *tcp.ForwarderRequest, serve func(net.Conn)) bool {
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		return false
	}
	r.Complete(false)
	c := gonet.NewTCPConn(&wq, ep)
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		stop := context.AfterFunc(st.ctx, func() { c.Close() })
		defer stop()
		serve(c)
	}()
	return true
}

// splice copies both ways until both are done, passing half-closes on.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

// serveDNSOverTCP answers DNS messages, each after its 16-bit length.
func (st *Stack) serveDNSOverTCP(c net.Conn) {
	defer c.Close()
	var hdr [2]byte
	buf := make([]byte, 65535)
	for {
		c.SetReadDeadline(time.Now().Add(udpIdle))
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint16(hdr[:])
		if _, err := io.ReadFull(c, buf[:n]); err != nil {
			return
		}
		resp := st.dns.answer(st.ctx, buf[:n], 65535)
		if resp == nil {
			return
		}
		if _, err := c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(resp)))); err != nil {
			return
		}
		if _, err := c.Write(resp); err != nil {
			return
		}
	}
}

// forwardUDP serves the DNS at the gateway and relays allowed flows.
func (st *Stack) forwardUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := toAddrPort(id.LocalAddress, id.LocalPort)
	v := st.cfg.Policy.Decide(dst)
	if !v.Allow {
		st.cfg.Log.Info("network: datagram refused", "dst", dst.String(), "proto", "udp", "why", v.Why)
		return true // dropped
	}
	if !acquire(st.flows) {
		st.cfg.Log.Warn("network: too many UDP flows; dropping", "dst", dst.String(), "max", MaxUDPFlows)
		return true
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		<-st.flows
		return true
	}
	in := gonet.NewUDPConn(&wq, ep)
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		defer func() { <-st.flows }()
		defer in.Close()
		stop := context.AfterFunc(st.ctx, func() { in.Close() })
		defer stop()
		st.relayUDP(in, v.Dial)
	}()
	return true
}

// maxDNSInFlight bounds the queries being answered at once (each may
// wait for the host's resolver); more are dropped, as a busy server
// would, and the guest asks again.
const maxDNSInFlight = 32

// serveDNSOverUDP answers the queries sent to the gateway's port 53, from
// any guest port, until the network closes.
func (st *Stack) serveDNSOverUDP(c *gonet.UDPConn) {
	defer st.wg.Done()
	stop := context.AfterFunc(st.ctx, func() { c.Close() })
	defer stop()
	inflight := make(chan struct{}, maxDNSInFlight)
	for {
		buf := make([]byte, 65535)
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		if !acquire(inflight) {
			continue
		}
		st.wg.Add(1)
		go func() {
			defer st.wg.Done()
			defer func() { <-inflight }()
			if resp := st.dns.answer(st.ctx, buf[:n], 512); resp != nil {
				_, _ = c.WriteTo(resp, from)
			}
		}()
	}
}

// relayUDP relays one flow until it is idle for udpIdle.
func (st *Stack) relayUDP(in *gonet.UDPConn, to netip.AddrPort) {
	out, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		return
	}
	defer out.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			out.SetReadDeadline(time.Now().Add(udpIdle))
			n, err := out.Read(buf)
			if err != nil {
				in.Close()
				return
			}
			if _, err := in.Write(buf[:n]); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 65535)
	for {
		in.SetReadDeadline(time.Now().Add(udpIdle))
		n, err := in.Read(buf)
		if err != nil {
			break
		}
		if _, err := out.Write(buf[:n]); err != nil {
			break
		}
	}
	out.Close()
	<-done
}

// servePublished accepts connections to a published port and connects
// each to the guest's port.
func (st *Stack) servePublished(l net.Listener, p Publish) {
	defer st.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				st.cfg.Log.Warn("network: published port stopped", "port", p.Host.String(), "err", err)
			}
			return
		}
		if !acquire(st.conns) {
			c.Close()
			continue
		}
		st.wg.Add(1)
		go func() {
			defer st.wg.Done()
			defer func() { <-st.conns }()
			ctx, cancel := context.WithTimeout(st.ctx, dialTimeout)
			in, err := gonet.DialContextTCP(ctx, st.s, tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(GuestIP.As4()), Port: p.GuestPort}, ipv4.ProtocolNumber)
			cancel()
			if err != nil {
				st.cfg.Log.Info("network: the guest refused a published connection", "port", p.GuestPort, "err", err)
				c.Close()
				return
			}
			stop := context.AfterFunc(st.ctx, func() { c.Close(); in.Close() })
			defer stop()
			splice(c, in)
		}()
	}
}

// quiet keeps gVisor's own log (it writes to stderr by default, which is
// the user's terminal) out of the way: what matters is logged here.
type quiet struct{}

func (quiet) Emit(int, gvlog.Level, time.Time, string, ...any) {}

func init() { gvlog.SetTarget(quiet{}) }
