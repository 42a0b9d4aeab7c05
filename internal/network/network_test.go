package network

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

func TestDecide(t *testing.T) {
	ap := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	tests := []struct {
		name  string
		rules Rules
		dst   string
		allow bool
		dial  string
		why   string
	}{
		{"open: a public address", Rules{}, "93.184.216.34:443", true, "93.184.216.34:443", ""},
		{"open: the host's loopback at the gateway", Rules{}, "10.0.2.2:8080", false, "", "host's own services"},
		{"open: metadata", Rules{}, "169.254.169.254:80", false, "", "link-local"},
		{"open: the LAN", Rules{}, "192.168.1.1:80", false, "", "private"},
		{"open: RFC 1918 10/8", Rules{}, "10.1.2.3:80", false, "", "private"},
		{"open: CGNAT", Rules{}, "100.64.0.1:80", false, "", "carrier-grade"},
		{"open: the VM's own network", Rules{}, "10.0.2.3:80", false, "", "own network"},
		{"open: multicast", Rules{}, "224.0.0.1:80", false, "", "multicast"},
		{"loopback port allowed", Rules{HostLoopback: []uint16{8080}}, "10.0.2.2:8080", true, "127.0.0.1:8080", ""},
		{"loopback other port", Rules{HostLoopback: []uint16{8080}}, "10.0.2.2:8081", false, "", "host's own services"},
		{"CIDR allows the LAN", Rules{AllowCIDRs: []string{"192.168.1.0/24"}}, "192.168.1.7:22", true, "192.168.1.7:22", ""},
		{"CIDR with a port", Rules{AllowCIDRs: []string{"192.0.2.0/24:5432"}}, "192.0.2.9:5433", false, "", "not an allowed destination"},
		{"allow-list: unresolved address", Rules{AllowHosts: []string{"example.com"}}, "93.184.216.34:443", false, "", "not an allowed destination"},
		{"static host is explicit", Rules{AllowHosts: []string{"other.test"}, Hosts: []string{"web.test:192.168.7.7"}}, "192.168.7.7:8000", true, "192.168.7.7:8000", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Compile(tt.rules)
			if err != nil {
				t.Fatal(err)
			}
			v := p.Decide(ap(tt.dst))
			if v.Allow != tt.allow || (tt.allow && v.Dial.String() != tt.dial) || !strings.Contains(v.Why, tt.why) {
				t.Errorf("Decide(%s) = %+v, want allow=%v dial=%s why~%q", tt.dst, v, tt.allow, tt.dial, tt.why)
			}
		})
	}
}

func TestCompileRejects(t *testing.T) {
	tests := []struct {
		rules Rules
		field string
		says  string
	}{
		{Rules{AllowHosts: []string{"exa mple.com"}}, "AllowHosts", "not a host name"},
		{Rules{AllowHosts: []string{"ok.com", "-bad.com"}}, "AllowHosts", "not a host name"},
		{Rules{AllowHosts: []string{"example.com:0"}}, "AllowHosts", "1-65535"},
		{Rules{AllowHosts: []string{"example.com:http"}}, "AllowHosts", "1-65535"},
		{Rules{AllowHosts: []string{"1.2.3.4"}}, "AllowHosts", "1.2.3.4/32"},
		{Rules{AllowHosts: []string{strings.Repeat("a", 64) + ".com"}}, "AllowHosts", "not a host name"},
		{Rules{AllowCIDRs: []string{"10.1.2.0/33"}}, "AllowCIDRs", "not a CIDR"},
		{Rules{AllowCIDRs: []string{"10.1.2.3"}}, "AllowCIDRs", "10.1.2.3/32"},
		{Rules{AllowCIDRs: []string{"2001:db8::/32"}}, "AllowCIDRs", "IPv4"},
		{Rules{AllowCIDRs: []string{"10.0.0.0/8:99999"}}, "AllowCIDRs", "1-65535"},
		{Rules{HostLoopback: []uint16{0}}, "HostLoopback", "port"},
		{Rules{Hosts: []string{"web.test"}}, "Hosts", "NAME:IPv4"},
		{Rules{Hosts: []string{"web.test:::1"}}, "Hosts", "IPv4"},
		{Rules{Hosts: []string{"bad name:1.2.3.4"}}, "Hosts", "host name"},
	}
	for _, tt := range tests {
		_, err := Compile(tt.rules)
		var re *RuleError
		if !errors.As(err, &re) || re.Field != tt.field || !strings.Contains(err.Error(), tt.says) || !errors.Is(err, ErrInvalid) {
			t.Errorf("Compile(%+v) = %v, want a %s error saying %q", tt.rules, err, tt.field, tt.says)
		}
	}
}

func TestDNS(t *testing.T) {
	lookups := 0
	lookup := func(_ context.Context, host string) ([]netip.Addr, error) {
		lookups++
		switch host {
		case "pypi.org", "files.pythonhosted.org":
			return []netip.Addr{netip.MustParseAddr("151.101.0.223"), netip.MustParseAddr("2a04:4e42::223")}, nil
		case "rebind.example.com":
			return []netip.Addr{netip.MustParseAddr("192.168.1.1")}, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	p, err := Compile(Rules{AllowHosts: []string{"pypi.org:443", "*.pythonhosted.org", "rebind.example.com", "gone.example.com"}, Hosts: []string{"web.test:127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	r := &resolver{p: p, lookup: lookup, log: slog.New(slog.DiscardHandler)}
	ask := func(name string, qtype uint16) *dns.Msg {
		q := new(dns.Msg)
		q.SetQuestion(dns.Fqdn(name), qtype)
		b, _ := q.Pack()
		resp := r.answer(context.Background(), b, 512)
		if resp == nil {
			t.Fatalf("%s: no answer", name)
		}
		var m dns.Msg
		if err := m.Unpack(resp); err != nil || m.Id != q.Id || !m.Response {
			t.Fatalf("%s: bad answer %v %v", name, m, err)
		}
		return &m
	}
	addrs := func(m *dns.Msg) []string {
		var out []string
		for _, rr := range m.Answer {
			out = append(out, rr.(*dns.A).A.String())
		}
		return out
	}
	if m := ask("PyPI.org", dns.TypeA); m.Rcode != dns.RcodeSuccess || strings.Join(addrs(m), ",") != "151.101.0.223" {
		t.Errorf("pypi.org A: %v", m)
	}
	if v := p.Decide(netip.MustParseAddrPort("151.101.0.223:443")); !v.Allow {
		t.Errorf("resolved address on the allowed port refused: %s", v.Why)
	}
	if v := p.Decide(netip.MustParseAddrPort("151.101.0.223:80")); v.Allow {
		t.Error("resolved address allowed on a port no rule gives")
	}
	if m := ask("files.pythonhosted.org", dns.TypeA); len(m.Answer) != 1 {
		t.Errorf("wildcard: %v", m)
	}
	if m := ask("pythonhosted.org", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("the wildcard's own domain: %v, want NXDOMAIN", m)
	}
	n := lookups
	if m := ask("evil.com", dns.TypeA); m.Rcode != dns.RcodeNameError || lookups != n {
		t.Errorf("denied name: rcode %d after %d host lookups; want NXDOMAIN and none", m.Rcode, lookups-n)
	}
	if m := ask("pypi.org", dns.TypeAAAA); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 0 {
		t.Errorf("AAAA: %v, want no data", m)
	}
	if m := ask("gone.example.com", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("a name that does not exist: %v", m)
	}
	if m := ask("web.test", dns.TypeA); strings.Join(addrs(m), ",") != "127.0.0.1" {
		t.Errorf("static host: %v", m)
	}
	if m := ask(HostName, dns.TypeA); strings.Join(addrs(m), ",") != Gateway.String() {
		t.Errorf("%s: %v", HostName, m)
	}
	// An allowed name that resolves to a private address (DNS
	// rebinding) resolves, but reaches nothing.
	ask("rebind.example.com", dns.TypeA)
	if v := p.Decide(netip.MustParseAddrPort("192.168.1.1:80")); v.Allow {
		t.Error("an allowed name rebinding to the LAN reached it")
	}
	for _, junk := range [][]byte{nil, {1}, bytes.Repeat([]byte{0xff}, 600)} {
		if r.answer(context.Background(), junk, 512) != nil {
			t.Errorf("answered junk %x", junk)
		}
	}
}

// FuzzDNS: whatever the guest sends its DNS server, the host answers with
// a well-formed message or not at all, and never panics.
func FuzzDNS(f *testing.F) {
	q := new(dns.Msg)
	q.SetQuestion("pypi.org.", dns.TypeA)
	b, _ := q.Pack()
	f.Add(b)
	q.SetEdns0(4096, false)
	b, _ = q.Pack()
	f.Add(b)
	p, _ := Compile(Rules{AllowHosts: []string{"pypi.org"}})
	r := &resolver{p: p, log: slog.New(slog.DiscardHandler), lookup: func(context.Context, string) ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("151.101.0.223")}, nil
	}}
	f.Fuzz(func(t *testing.T, query []byte) {
		resp := r.answer(context.Background(), query, 512)
		if resp == nil {
			return
		}
		var m dns.Msg
		if err := m.Unpack(resp); err != nil || !m.Response {
			t.Fatalf("answer does not parse: %v", err)
		}
		if len(resp) > 4096 {
			t.Fatalf("answer of %d bytes", len(resp))
		}
	})
}

// guest is a second netstack playing the VM, on the other end of the
// network card's socket.
type guest struct {
	s *stack.Stack
}

func newGuest(t *testing.T, conn net.Conn) *guest {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ep := channel.New(512, MTU+14, "\x52\x54\x00\x12\x34\x56")
	if err := s.CreateNIC(1, ethernet.New(ep)); err != nil {
		t.Fatal(err)
	}
	addr := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(GuestIP.As4()), PrefixLen: 24}}
	if err := s.AddProtocolAddress(1, addr, stack.AddressProperties{}); err != nil {
		t.Fatal(err)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4(Gateway.As4()), NIC: 1}})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _ = pumpIn(conn, ep) }()
	go func() { _ = pumpOut(ctx, conn, ep) }()
	t.Cleanup(func() { cancel(); conn.Close(); s.Close() })
	return &guest{s: s}
}

func (g *guest) dial(ctx context.Context, dst string) (net.Conn, error) {
	ap := netip.MustParseAddrPort(dst)
	return gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(ap.Addr().As4()), Port: ap.Port()}, ipv4.ProtocolNumber)
}

func (g *guest) lookup(t *testing.T, name string) *dns.Msg {
	t.Helper()
	c, err := gonet.DialUDP(g.s, nil, &tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(Gateway.As4()), Port: 53}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	b, _ := q.Pack()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("dns %s: %v", name, err)
	}
	var m dns.Msg
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	return &m
}

// TestStack: a guest stack on the other end of the card's socket gets
// DNS, reaches what is allowed byte-exact, is refused the rest, and the
// host reaches the guest's published port.
func TestStack(t *testing.T) {
	// A server on the host's loopback, which the guest reaches as
	// web.test only because the rules say so.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = c.Write(payload)
			}()
		}
	}()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	p, err := Compile(Rules{AllowHosts: []string{"web.test"}, Hosts: []string{"web.test:192.0.2.1"}, HostLoopback: []uint16{port}})
	if err != nil {
		t.Fatal(err)
	}
	pub := []Publish{{Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 8000}}
	ls, err := Listen(pub)
	if err != nil {
		t.Fatal(err)
	}
	hostEnd, guestEnd := socketPair(t)
	st, err := Start(hostEnd, ls, Config{Policy: p, GatewayMAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}, Publish: pub, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	g := newGuest(t, guestEnd)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if m := g.lookup(t, "web.test"); len(m.Answer) != 1 || m.Answer[0].(*dns.A).A.String() != "192.0.2.1" {
		t.Fatalf("web.test: %v", m)
	}
	if m := g.lookup(t, "evil.com"); m.Rcode != dns.RcodeNameError {
		t.Errorf("evil.com: rcode %d, want NXDOMAIN", m.Rcode)
	}
	// DNS over TCP, as resolvers fall back to for large answers.
	tc, err := g.dial(ctx, "10.0.2.2:53")
	if err != nil {
		t.Fatalf("dns over tcp: %v", err)
	}
	dc := &dns.Conn{Conn: tc}
	q := new(dns.Msg)
	q.SetQuestion("web.test.", dns.TypeA)
	if err := dc.WriteMsg(q); err != nil {
		t.Fatal(err)
	}
	if m, err := dc.ReadMsg(); err != nil || len(m.Answer) != 1 || m.Answer[0].(*dns.A).A.String() != "192.0.2.1" {
		t.Errorf("dns over tcp: %v %v", m, err)
	}
	tc.Close()
	c, err := g.dial(ctx, "10.0.2.2:"+strconv.Itoa(int(port)))
	if err != nil {
		t.Fatalf("allowed connection: %v", err)
	}
	got, err := io.ReadAll(c)
	c.Close()
	if err != nil || sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Errorf("allowed connection: %d bytes (%v), want the %d sent", len(got), err, len(payload))
	}
	for _, dst := range []string{"10.0.2.2:" + strconv.Itoa(int(port)+1), "169.254.169.254:80", "93.184.216.34:80"} {
		if c, err := g.dial(ctx, dst); err == nil {
			c.Close()
			t.Errorf("%s: connected, want refused", dst)
		} else if !strings.Contains(err.Error(), "refused") {
			t.Errorf("%s: %v, want connection refused", dst, err)
		}
	}

	// The published port: a server in the guest, a client on the host.
	gl, err := gonet.ListenTCP(g.s, tcpip.FullAddress{NIC: 1, Port: 8000}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer gl.Close()
	go func() {
		c, err := gl.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	hc, err := net.Dial("tcp4", ls[0].Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	if _, err := hc.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	_ = hc.SetReadDeadline(time.Now().Add(10 * time.Second))
	echo := make([]byte, 4)
	if _, err := io.ReadFull(hc, echo); err != nil || string(echo) != "ping" {
		t.Errorf("published port: %q %v", echo, err)
	}
}

// TestStackBadFrame: a guest that breaks the framing loses its network,
// and the host goes on.
func TestStackBadFrame(t *testing.T) {
	hostEnd, guestEnd := socketPair(t)
	p, _ := Compile(Rules{})
	st, err := Start(hostEnd, nil, Config{Policy: p, GatewayMAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := guestEnd.Write([]byte{0xff, 0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-st.ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a frame of 4 GiB was not refused")
	}
}

func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		done <- c
	}()
	a, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-done
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}
