package mvm

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/execreq"
	"github.com/mvm-sh/mvm/internal/network"
)

// Network is a sandbox's network card and what it may reach. Without one
// (Config.Network nil) the VM has no network device at all.
//
// The guest's connections go through a user-mode network stack in this
// process, which dials each allowed one itself: no TAP device, no root,
// nothing changed on the host. With no allow rule the guest reaches any
// public address; with AllowHosts or AllowCIDRs only those. Either way
// it never reaches the host's loopback, private or link-local networks
// (cloud metadata at 169.254.169.254 included) unless a rule names them:
// a CIDR, a HostLoopback port, a Hosts entry. See docs/network.md.
type Network struct {
	// AllowHosts are host names the guest may resolve and connect to:
	// "pypi.org", "*.pythonhosted.org" (names below it), optionally with
	// a port ("example.com:443"). Other names do not resolve (NXDOMAIN),
	// and a connection to an address the guest did not resolve through
	// an allowed name is refused.
	AllowHosts []string
	// AllowCIDRs are IPv4 networks the guest may connect to
	// ("10.1.2.0/24", "192.0.2.7/32:5432").
	AllowCIDRs []string
	// AllowHostLoopback are ports of the host's 127.0.0.1 the guest may
	// reach, at the gateway address 10.0.2.2 or as host.mvm.internal.
	AllowHostLoopback []uint16
	// Hosts are static DNS names, "name:IPv4" (docker's --add-host);
	// their addresses are reachable as if allowed by CIDR.
	Hosts []string
	// Publish are guest TCP ports the host listens on while the sandbox
	// runs.
	Publish []Port
}

// Port is a published guest port.
type Port struct {
	// HostIP is the host address to listen on: "" is 127.0.0.1 (the
	// host's own users only); "0.0.0.0" is every interface.
	HostIP   string
	HostPort uint16
	// GuestPort is the port a server in the guest listens on (on
	// 0.0.0.0 or the guest's address, 10.0.2.15).
	GuestPort uint16
}

// TAP is a network card on a TAP device of the caller's, and the
// guest's configuration on it. mvm's network policy does not apply: the
// guest reaches what the device's network reaches, as a container on
// that network would. The containerd shim makes one in a pod's network
// namespace, bridged to the pod's interface, so that the pod's VM has
// the pod's address (docs/kubernetes.md).
type TAP struct {
	// File is the open TAP device (/dev/net/tun attached with IFF_TAP
	// and IFF_NO_PI): the VMM gets a copy of it; the caller keeps and
	// closes its own.
	File *os.File
	// MAC is the guest card's address ("52:54:00:12:34:56").
	MAC string
	// Address is the guest's IPv4 address and prefix.
	Address netip.Prefix
	// Gateway is the default route's, inside Address's prefix.
	Gateway netip.Addr
	// DNS are nameservers for the guest's /etc/resolv.conf; none leaves
	// it as it is.
	DNS []netip.Addr
	// MTU is the card's, 576 to 65535; 0 keeps the device's.
	MTU int
}

// check checks t before anything boots.
func (t *TAP) check() error {
	switch {
	case t.File == nil:
		return invalid("TAP.File", "", "no TAP device")
	case !validMAC(t.MAC):
		return invalid("TAP.MAC", execreq.Quote(t.MAC), "not a unicast MAC address (six hex pairs and colons)")
	case !t.Address.IsValid() || !t.Address.Addr().Is4():
		return invalid("TAP.Address", t.Address.String(), "not an IPv4 address and prefix")
	case !t.Gateway.Is4() || !t.Address.Masked().Contains(t.Gateway):
		return invalid("TAP.Gateway", t.Gateway.String(), "not an IPv4 address in %s", t.Address.Masked())
	case len(t.DNS) > 4:
		return invalid("TAP.DNS", "", "at most 4 nameservers")
	case t.MTU != 0 && (t.MTU < 576 || t.MTU > 65535):
		return invalid("TAP.MTU", strconv.Itoa(t.MTU), "576 to 65535")
	}
	for _, d := range t.DNS {
		if !d.Is4() {
			return invalid("TAP.DNS", d.String(), "not an IPv4 address")
		}
	}
	return nil
}

// validMAC says whether m is a unicast MAC address as QEMU and the agent
// take it: six lower- or upper-case hex pairs separated by colons.
func validMAC(m string) bool {
	hw, err := net.ParseMAC(m)
	return err == nil && len(m) == 17 && len(hw) == 6 && hw[0]&1 == 0 && strings.Count(m, ":") == 5
}

// startTAP is the "network" step of a TAP card: the VMM gets its own
// descriptor of the caller's device.
func (sb *Sandbox) startTAP(context.Context) (undoFunc, error) {
	t := sb.cfg.TAP
	fd, err := unix.FcntlInt(t.File.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("network: the TAP device: %w", err)
	}
	f := os.NewFile(uintptr(fd), "tap")
	sb.nic = &backend.NIC{MAC: strings.ToLower(t.MAC), Conn: f, TAP: true}
	sb.life.annotate("a TAP device")
	return func(context.Context) error { return f.Close() }, nil
}

// resolvedNetwork is a checked Network.
type resolvedNetwork struct {
	policy  *network.Policy
	publish []network.Publish
}

// checkNetwork checks n before anything boots.
func checkNetwork(n *Network) (*resolvedNetwork, error) {
	p, err := network.Compile(network.Rules{AllowHosts: n.AllowHosts, AllowCIDRs: n.AllowCIDRs, HostLoopback: n.AllowHostLoopback, Hosts: n.Hosts})
	var re *network.RuleError
	if errors.As(err, &re) {
		field := map[string]string{"AllowHosts": "Network.AllowHosts", "AllowCIDRs": "Network.AllowCIDRs", "HostLoopback": "Network.AllowHostLoopback", "Hosts": "Network.Hosts"}[re.Field]
		return nil, &RequestError{Field: field + "[" + strconv.Itoa(re.Index) + "]", Value: execreq.Quote(re.Value), Err: re.Err}
	}
	if err != nil {
		return nil, &RequestError{Field: "Network", Err: err}
	}
	rn := &resolvedNetwork{policy: p}
	seen := map[netip.AddrPort]bool{}
	for i, pt := range n.Publish {
		field := "Network.Publish[" + strconv.Itoa(i) + "]"
		host := netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if pt.HostIP != "" {
			if host, err = netip.ParseAddr(pt.HostIP); err != nil || !host.Is4() {
				return nil, invalid(field, execreq.Quote(pt.HostIP), "not an IPv4 address to listen on")
			}
		}
		if pt.HostPort == 0 || pt.GuestPort == 0 {
			return nil, invalid(field, fmt.Sprintf("%d:%d", pt.HostPort, pt.GuestPort), "ports are 1-65535")
		}
		ap := netip.AddrPortFrom(host, pt.HostPort)
		if seen[ap] {
			return nil, invalid(field, ap.String(), "published twice")
		}
		seen[ap] = true
		rn.publish = append(rn.publish, network.Publish{Host: ap, GuestPort: pt.GuestPort})
	}
	return rn, nil
}

// startNetwork is the "network" step: the host's end of the network card
// (a user-mode stack serving one socket) and the published ports, bound
// now so that one in use fails before anything boots.
func (sb *Sandbox) startNetwork(context.Context) (undoFunc, error) {
	rn := sb.cfg.net
	ls, err := network.Listen(rn.publish)
	if err != nil {
		return nil, &RequestError{Field: "Network.Publish", Err: err}
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		for _, l := range ls {
			l.Close()
		}
		return nil, fmt.Errorf("network: %w", err)
	}
	for _, fd := range fds {
		// Room for bursts of frames either way.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20)
	}
	hostEnd := os.NewFile(uintptr(fds[0]), "network")
	vmEnd := os.NewFile(uintptr(fds[1]), "network-vm")
	conn, err := net.FileConn(hostEnd)
	hostEnd.Close()
	if err != nil {
		vmEnd.Close()
		for _, l := range ls {
			l.Close()
		}
		return nil, fmt.Errorf("network: %w", err)
	}
	st, err := network.Start(conn, ls, network.Config{Policy: rn.policy, GatewayMAC: randomMAC(), Publish: rn.publish, Log: sb.log})
	if err != nil {
		vmEnd.Close()
		conn.Close()
		for _, l := range ls {
			l.Close()
		}
		return nil, err
	}
	sb.nic = &backend.NIC{MAC: randomMAC().String(), Conn: vmEnd}
	if len(rn.publish) > 0 {
		sb.life.annotate(fmt.Sprintf("%d published ports", len(rn.publish)))
	}
	return func(context.Context) error {
		vmEnd.Close()
		return st.Close()
	}, nil
}

// randomMAC is a fresh locally administered unicast address in QEMU's
// 52:54:00 range.
func randomMAC() net.HardwareAddr {
	b := make([]byte, 6)
	_, _ = rand.Read(b[3:])
	b[0], b[1], b[2] = 0x52, 0x54, 0x00
	return b
}
