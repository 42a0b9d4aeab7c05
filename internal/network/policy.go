// Package network is a run's opt-in network: a user-mode TCP/IP stack
// (gVisor's netstack) in the host process, attached to the guest's
// virtio-net device through one socket, that dials every connection the
// guest opens itself, after a policy check, and answers the guest's DNS.
// Nothing on the host changes: no TAP device, no bridge, no firewall
// rules, no root. The guest reaches exactly what the policy allows, and
// the host's own services, its LAN and other VMs only when the user said
// so by address.
package network

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// The guest's network, the same for every run (as QEMU's user network
// has it): the guest is alone on a /24 with the host's stack at the
// gateway address, which is also its DNS server.
var (
	Subnet  = netip.MustParsePrefix("10.0.2.0/24")
	Gateway = netip.MustParseAddr("10.0.2.2")
	GuestIP = netip.MustParseAddr("10.0.2.15")
)

// HostName is the name under which the guest finds the host's loopback
// services that Rules.HostLoopback opens (as host.docker.internal).
const HostName = "host.mvm.internal"

// MTU is the guest interface's MTU. It is as large as one frame of QEMU's
// socket network backend allows (as passt and slirp4netns choose 65520):
// every frame costs the emulated guest an interrupt and a copy, and the
// host stack a dispatch, so fewer larger frames move more bytes. The
// guest never sees a real wire, so no path MTU is at stake.
const MTU = 65520

// Rules is what a run's network allows, as the user gave it.
type Rules struct {
	// AllowHosts are host names ("pypi.org", "*.pythonhosted.org"),
	// each with an optional port ("example.com:443"). A leading "*."
	// matches every name below the domain, not the domain itself.
	AllowHosts []string
	// AllowCIDRs are IPv4 networks ("10.1.2.0/24"), each with an
	// optional port ("192.0.2.7/32:5432"). They may name private
	// addresses: an explicit CIDR is the way to reach the LAN.
	AllowCIDRs []string
	// HostLoopback are ports of the host's 127.0.0.1 that the guest
	// reaches at the gateway address (and as HostName).
	HostLoopback []uint16
	// Hosts are static names, "name:IPv4" as docker's --add-host:
	// the DNS answers them, and connections to their addresses are
	// allowed as if by AllowCIDRs (the user wrote the address). A
	// loopback address here is the guest's own loopback, as in any VM:
	// the host's is HostName, with HostLoopback ports.
	Hosts []string
}

// Policy is a checked Rules, and what the DNS has answered under it.
type Policy struct {
	open     bool // no allow rule: any public destination
	hosts    []hostRule
	cidrs    []cidrRule
	loopback []uint16
	static   map[string]netip.Addr

	mu       sync.Mutex
	resolved map[netip.Addr][]uint16 // addresses answered for allowed names: their ports (0: any)
}

type hostRule struct {
	name     string // lower case; "*.example.com" for a wildcard
	wildcard bool
	port     uint16
}

type cidrRule struct {
	prefix netip.Prefix
	port   uint16
}

// MaxResolved bounds the addresses a run's DNS remembers as allowed: a
// guest that resolves without end cannot grow the host's memory.
const MaxResolved = 1 << 16

// ErrInvalid marks a rule that cannot be used.
var ErrInvalid = errors.New("invalid network rule")

// RuleError is a bad rule: Field is "AllowHosts", "AllowCIDRs",
// "HostLoopback" or "Hosts", Index its place there.
type RuleError struct {
	Field string
	Index int
	Value string
	Err   error
}

func (e *RuleError) Error() string   { return fmt.Sprintf("%q: %v", e.Value, e.Err) }
func (e *RuleError) Unwrap() []error { return []error{ErrInvalid, e.Err} }

// Compile checks r and makes its policy.
func Compile(r Rules) (*Policy, error) {
	p := &Policy{open: len(r.AllowHosts) == 0 && len(r.AllowCIDRs) == 0, static: map[string]netip.Addr{}, resolved: map[netip.Addr][]uint16{}}
	for i, h := range r.AllowHosts {
		rule, err := parseHostRule(h)
		if err != nil {
			return nil, &RuleError{"AllowHosts", i, h, err}
		}
		p.hosts = append(p.hosts, rule)
	}
	for i, c := range r.AllowCIDRs {
		rule, err := parseCIDRRule(c)
		if err != nil {
			return nil, &RuleError{"AllowCIDRs", i, c, err}
		}
		p.cidrs = append(p.cidrs, rule)
	}
	for i, port := range r.HostLoopback {
		if port == 0 {
			return nil, &RuleError{"HostLoopback", i, "0", errors.New("not a port (1-65535)")}
		}
		p.loopback = append(p.loopback, port)
	}
	for i, h := range r.Hosts {
		name, addr, ok := strings.Cut(h, ":")
		ip, err := netip.ParseAddr(addr)
		switch {
		case !ok:
			return nil, &RuleError{"Hosts", i, h, errors.New("want NAME:IPv4")}
		case checkHostName(name) != nil:
			return nil, &RuleError{"Hosts", i, h, checkHostName(name)}
		case err != nil || !ip.Is4():
			return nil, &RuleError{"Hosts", i, h, fmt.Errorf("%q is not an IPv4 address", addr)}
		}
		p.static[strings.ToLower(strings.TrimSuffix(name, "."))] = ip
	}
	return p, nil
}

func parseHostRule(s string) (hostRule, error) {
	var r hostRule
	name := s
	if h, port, ok := strings.Cut(s, ":"); ok {
		n, err := parsePort(port)
		if err != nil {
			return r, err
		}
		name, r.port = h, n
	}
	if rest, ok := strings.CutPrefix(name, "*."); ok {
		r.wildcard = true
		name = rest
	}
	if err := checkHostName(name); err != nil {
		return r, err
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return r, errors.New("an address, not a host name (use an allowed CIDR, e.g. " + name + "/32)")
	}
	r.name = strings.ToLower(strings.TrimSuffix(name, "."))
	return r, nil
}

func parseCIDRRule(s string) (cidrRule, error) {
	var r cidrRule
	pfx := s
	if i := strings.LastIndexByte(s, ':'); i >= 0 && !strings.Contains(s[:i], ":") {
		n, err := parsePort(s[i+1:])
		if err != nil {
			return r, err
		}
		pfx, r.port = s[:i], n
	}
	p, err := netip.ParsePrefix(pfx)
	if err != nil {
		if a, aerr := netip.ParseAddr(pfx); aerr == nil && a.Is4() {
			return r, fmt.Errorf("not a CIDR (for one address: %s/32)", pfx)
		}
		return r, errors.New("not a CIDR (e.g. 10.1.2.0/24)")
	}
	if !p.Addr().Is4() {
		return r, errors.New("only IPv4 is routed to the guest")
	}
	r.prefix = p.Masked()
	return r, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("port %q: want 1-65535", s)
	}
	return uint16(n), nil
}

// checkHostName checks a DNS name (RFC 1123 labels).
func checkHostName(name string) error {
	n := strings.TrimSuffix(name, ".")
	if n == "" || len(n) > 253 {
		return errors.New("not a host name")
	}
	for label := range strings.SplitSeq(n, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return errors.New("not a host name")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return errors.New("not a host name")
			}
		}
	}
	return nil
}

// Verdict is the policy's answer for one connection.
type Verdict struct {
	Allow bool
	// Dial is where the host connects for an allowed one (the host's
	// loopback for the gateway's ports).
	Dial netip.AddrPort
	// Why explains a refusal (for the log).
	Why string
}

// Decide says whether the guest may connect to dst.
func (p *Policy) Decide(dst netip.AddrPort) Verdict {
	a, port := dst.Addr(), dst.Port()
	if a == Gateway {
		if slices.Contains(p.loopback, port) {
			return Verdict{Allow: true, Dial: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port)}
		}
		return Verdict{Why: "the host's own services are not reachable (allow a port of its loopback explicitly)"}
	}
	if Subnet.Contains(a) {
		return Verdict{Why: "an address of the VM's own network"}
	}
	if !a.Is4() {
		return Verdict{Why: "not an IPv4 address"}
	}
	for _, c := range p.cidrs {
		if c.prefix.Contains(a) && (c.port == 0 || c.port == port) {
			return Verdict{Allow: true, Dial: dst}
		}
	}
	for _, ip := range p.static {
		if ip == a {
			return Verdict{Allow: true, Dial: dst}
		}
	}
	if why := special(a); why != "" {
		return Verdict{Why: why + " (allow it by CIDR to reach it)"}
	}
	if p.open {
		return Verdict{Allow: true, Dial: dst}
	}
	p.mu.Lock()
	ports, ok := p.resolved[a]
	p.mu.Unlock()
	if ok && (slices.Contains(ports, 0) || slices.Contains(ports, port)) {
		return Verdict{Allow: true, Dial: dst}
	}
	if ok {
		return Verdict{Why: fmt.Sprintf("port %d is not allowed for the names that resolve there", port)}
	}
	return Verdict{Why: "not an allowed destination (neither in an allowed CIDR nor resolved from an allowed name)"}
}

// special names the ranges a guest never reaches by default, or "".
func special(a netip.Addr) string {
	switch {
	case a.IsLoopback():
		return "a loopback address"
	case a.IsPrivate():
		return "a private address"
	case a.IsLinkLocalUnicast():
		return "a link-local address (cloud metadata lives there)"
	case a.IsMulticast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast():
		return "a multicast address"
	case a.IsUnspecified() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "not a destination"
	}
	b := a.As4()
	switch {
	case b[0] == 0:
		return "not a destination"
	case b[0] == 100 && b[1]&0xc0 == 64:
		return "a shared (carrier-grade NAT) address"
	case b[0] >= 240:
		return "a reserved address"
	case b[0] == 198 && b[1]&0xfe == 18:
		return "a benchmarking address"
	}
	return ""
}

// allowedPorts is the ports the rules allow for name (0 for any), and
// whether any rule allows it at all.
func (p *Policy) allowedPorts(name string) ([]uint16, bool) {
	if p.open {
		return []uint16{0}, true
	}
	var ports []uint16
	for _, r := range p.hosts {
		if r.matches(name) {
			ports = append(ports, r.port)
		}
	}
	return ports, len(ports) > 0
}

func (r hostRule) matches(name string) bool {
	if r.wildcard {
		return strings.HasSuffix(name, "."+r.name)
	}
	return name == r.name
}

// remember records that the DNS answered addrs for an allowed name, with
// the ports its rules allow. It reports false when the table is full.
func (p *Policy) remember(addrs []netip.Addr, ports []uint16) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range addrs {
		have, ok := p.resolved[a]
		if !ok && len(p.resolved) >= MaxResolved {
			return false
		}
		for _, port := range ports {
			if !slices.Contains(have, port) {
				have = append(have, port)
			}
		}
		p.resolved[a] = have
	}
	return true
}
