package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// sysClassNet is where the kernel lists the network interfaces of the
// agent's network namespace, each with its hardware address.
const sysClassNet = "/sys/class/net"

// netWait bounds how long a Network call waits for its interface to show
// up: the NIC is attached before boot and probed before the agent starts,
// so only a slow probe makes it wait.
const netWait = 2 * time.Second

// maxNameservers is the most nameservers a Network call may give. The C
// libraries read only the first three (MAXNS); one more is room for a
// resolver that reads them all.
const maxNameservers = 4

// MTU bounds of a Network call: 576 is the smallest datagram every IPv4
// host must accept (RFC 791), 65535 the largest IPv4 datagram.
const (
	minMTU = 576
	maxMTU = 65535
)

// netConfig is a Network request the agent has checked: everything in it
// can be handed to the kernel as it is.
type netConfig struct {
	mac     string       // six lower-case hex pairs, as sysfs prints them
	addr    netip.Prefix // IPv4, the host part kept
	gateway netip.Addr   // IPv4, inside addr's prefix
	dns     []netip.Addr // IPv4, at most maxNameservers
	mtu     uint32       // 0: keep the device's
}

// parseNetwork checks a Network request. Every field is refused unless it
// is exactly what the agent can apply: a host is trusted, but a mistake
// in it must not become a half-configured guest.
func parseNetwork(req *agentpb.Network) (netConfig, error) {
	var cfg netConfig
	mac, err := parseMAC(req.Mac)
	if err != nil {
		return cfg, err
	}
	cfg.mac = mac
	addr, err := netip.ParsePrefix(req.Address)
	if err != nil {
		return cfg, fmt.Errorf("%w: address %q is not an address/prefix (10.0.2.15/24)", errInvalidRequest, req.Address)
	}
	if !addr.Addr().Is4() {
		return cfg, fmt.Errorf("%w: address %q: only IPv4 is served", errInvalidRequest, req.Address)
	}
	// A /32 leaves no room for a gateway; a /0 would put every address
	// on the link.
	if addr.Bits() < 1 || addr.Bits() > 31 {
		return cfg, fmt.Errorf("%w: address %q: the prefix length must be 1 to 31", errInvalidRequest, req.Address)
	}
	if err := checkHost(addr.Addr(), addr); err != nil {
		return cfg, fmt.Errorf("%w: address %q: %v", errInvalidRequest, req.Address, err)
	}
	cfg.addr = addr
	gw, err := netip.ParseAddr(req.Gateway)
	if err != nil || !gw.Is4() {
		return cfg, fmt.Errorf("%w: gateway %q is not an IPv4 address", errInvalidRequest, req.Gateway)
	}
	if !addr.Contains(gw) {
		return cfg, fmt.Errorf("%w: gateway %s is not inside %s", errInvalidRequest, gw, addr.Masked())
	}
	if gw == addr.Addr() {
		return cfg, fmt.Errorf("%w: gateway %s is the guest's own address", errInvalidRequest, gw)
	}
	if err := checkHost(gw, addr); err != nil {
		return cfg, fmt.Errorf("%w: gateway %s: %v", errInvalidRequest, gw, err)
	}
	cfg.gateway = gw
	if len(req.Dns) > maxNameservers {
		return cfg, fmt.Errorf("%w: %d nameservers, at most %d", errInvalidRequest, len(req.Dns), maxNameservers)
	}
	for _, s := range req.Dns {
		ns, err := netip.ParseAddr(s)
		if err != nil || !ns.Is4() {
			return cfg, fmt.Errorf("%w: nameserver %q is not an IPv4 address", errInvalidRequest, s)
		}
		if ns.IsUnspecified() || ns.IsMulticast() || ns == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return cfg, fmt.Errorf("%w: nameserver %s is not a unicast address", errInvalidRequest, ns)
		}
		if slices.Contains(cfg.dns, ns) {
			return cfg, fmt.Errorf("%w: nameserver %s is given twice", errInvalidRequest, ns)
		}
		cfg.dns = append(cfg.dns, ns)
	}
	if req.Mtu != 0 && (req.Mtu < minMTU || req.Mtu > maxMTU) {
		return cfg, fmt.Errorf("%w: MTU %d: 0 or %d to %d", errInvalidRequest, req.Mtu, minMTU, maxMTU)
	}
	cfg.mtu = req.Mtu
	return cfg, nil
}

// parseMAC accepts an Ethernet address the way sysfs prints one: six hex
// pairs separated by colons (upper case is taken as lower case). A
// multicast or all-zero address cannot be a NIC's.
func parseMAC(s string) (string, error) {
	bad := fmt.Errorf("%w: hardware address %q is not six hex pairs separated by colons", errInvalidRequest, s)
	if len(s) != 17 {
		return "", bad
	}
	s = strings.ToLower(s)
	var b [6]byte
	for i := range b {
		if i > 0 && s[3*i-1] != ':' {
			return "", bad
		}
		hi, ok1 := hexDigit(s[3*i])
		lo, ok2 := hexDigit(s[3*i+1])
		if !ok1 || !ok2 {
			return "", bad
		}
		b[i] = hi<<4 | lo
	}
	if b[0]&1 != 0 {
		return "", fmt.Errorf("%w: hardware address %s is a multicast address", errInvalidRequest, s)
	}
	if b == [6]byte{} {
		return "", fmt.Errorf("%w: hardware address %s is all zeros", errInvalidRequest, s)
	}
	return s, nil
}

func hexDigit(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	}
	return 0, false
}

// checkHost refuses what cannot be one host's address on the link of
// prefix p: a loopback, multicast, link-local or "this network" (0/8)
// address, and, on links of more than two addresses, the prefix's
// network and broadcast addresses.
func checkHost(a netip.Addr, p netip.Prefix) error {
	if !a.IsGlobalUnicast() || a.As4()[0] == 0 {
		return errors.New("not a unicast address a host can have")
	}
	if p.Bits() <= 30 {
		mask := ^uint32(0) << (32 - p.Bits())
		host := binary.BigEndian.Uint32(a.AsSlice()) &^ mask
		if host == 0 || host == ^mask {
			return fmt.Errorf("the network or broadcast address of %s", p.Masked())
		}
	}
	return nil
}

// configureNetwork serves a Network call: the link, its address and the
// default route first, then the nameservers into resolv.conf.
func (s *Server) configureNetwork(req *agentpb.Network) error {
	cfg, err := parseNetwork(req)
	if err != nil {
		return err
	}
	s.netMu.Lock()
	defer s.netMu.Unlock()
	if err := configureLink(cfg, sysClassNet, netWait); err != nil {
		return err
	}
	if len(cfg.dns) == 0 {
		return nil
	}
	return s.setNameservers(cfg.dns)
}

// setNameservers writes the resolv.conf for servers into the agent's own
// root and the template root, if one is set (the host sets the root
// first).
func (s *Server) setNameservers(servers []netip.Addr) error {
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	data := resolvConf(servers)
	roots := []*fsRoot{hostRoot}
	if s.root != nil && !s.root.isHost() {
		roots = append(roots, s.root)
	}
	for _, r := range roots {
		if err := writeResolvConf(r, data); err != nil {
			return err
		}
	}
	return nil
}

// replaceFile puts a regular file with data at p inside the root: written
// beside it under a temporary name, then renamed over whatever p was (a
// symlink is replaced, not followed). The parent directory is created
// inside the root when missing.
func (r *fsRoot) replaceFile(p string, data []byte, mode uint32) error {
	dir, name := filepath.Split(filepath.Clean(p))
	dfd, err := r.mkdirAll(dir, 0o755)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	tmp := "." + name + ".mvm-new"
	_ = unix.Unlinkat(dfd, tmp, 0)
	fd, err := unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, werr := f.Write(data)
	if err := f.Close(); werr == nil {
		werr = err
	}
	if werr == nil {
		werr = unix.Fchmodat(dfd, tmp, mode, 0)
	}
	if werr == nil {
		werr = unix.Renameat(dfd, tmp, dfd, name)
	}
	if werr != nil {
		_ = unix.Unlinkat(dfd, tmp, 0)
	}
	return werr
}

// writeResolvConf puts data at /etc/resolv.conf inside r (creating /etc
// when missing). An image's resolv.conf is often a symlink (to
// systemd-resolved's stub, or into /run): the link itself is replaced,
// never written through, so the file commands read is the agent's
// whatever the link pointed at.
func writeResolvConf(r *fsRoot, data []byte) error {
	if err := r.replaceFile("/etc/resolv.conf", data, 0o644); err != nil {
		return fmt.Errorf("write /etc/resolv.conf in %s: %w", r.path, err)
	}
	return nil
}

// resolvConf is the /etc/resolv.conf naming servers.
func resolvConf(servers []netip.Addr) []byte {
	var b strings.Builder
	b.WriteString("# Written by mvm from the host's network configuration.\n")
	for _, ns := range servers {
		b.WriteString("nameserver " + ns.String() + "\n")
	}
	return []byte(b.String())
}

// configureLink brings lo up, then gives the interface with cfg.mac (found
// under sysNet, waiting up to wait for it) its MTU and address, brings it
// up and routes the default route through cfg.gateway. Each step is
// idempotent, so a second call with the same configuration succeeds.
func configureLink(cfg netConfig, sysNet string, wait time.Duration) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	defer unix.Close(fd)
	if err := linkUp(fd, "lo"); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	name, err := findLink(sysNet, cfg.mac, wait)
	if err != nil {
		return err
	}
	if cfg.mtu != 0 {
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		ifr.SetUint32(cfg.mtu)
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFMTU, ifr); err != nil {
			return fmt.Errorf("%s: set MTU %d: %w", name, cfg.mtu, err)
		}
	}
	// SIOCSIFADDR gives the address its classful netmask; SIOCSIFNETMASK
	// then sets the prefix's. Both leave an equal setting alone.
	mask := netip.AddrFrom4([4]byte(netMask(cfg.addr.Bits())))
	for _, step := range []struct {
		req  uint
		addr netip.Addr
		what string
	}{
		{unix.SIOCSIFADDR, cfg.addr.Addr(), "address"},
		{unix.SIOCSIFNETMASK, mask, "netmask"},
	} {
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		if err := ifr.SetInet4Addr(step.addr.AsSlice()); err != nil {
			return err
		}
		if err := unix.IoctlIfreq(fd, step.req, ifr); err != nil {
			return fmt.Errorf("%s: set %s %s: %w", name, step.what, step.addr, err)
		}
	}
	if err := linkUp(fd, name); err != nil {
		return fmt.Errorf("bring %s up: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return fmt.Errorf("%s: interface index: %w", name, err)
	}
	index := int(ifr.Uint32())
	if err := addDefaultRoute(index, cfg.gateway); err != nil {
		return fmt.Errorf("default route via %s dev %s: %w", cfg.gateway, name, err)
	}
	return nil
}

// netMask is the IPv4 netmask of a prefix length.
func netMask(bits int) []byte {
	return binary.BigEndian.AppendUint32(nil, ^uint32(0)<<(32-bits))
}

// linkUp sets IFF_UP on the interface name (fd: any AF_INET socket),
// unless it is up already.
func linkUp(fd int, name string) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	if ifr.Uint16()&unix.IFF_UP != 0 {
		return nil
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// findLink returns the name of the one interface under sysNet whose
// hardware address is mac, waiting up to wait for it to appear. Two
// interfaces with the address (a VLAN or a bond on the NIC) are an error,
// not a guess.
func findLink(sysNet, mac string, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		links, err := listLinks(sysNet)
		if err != nil {
			return "", err
		}
		var names []string
		for _, l := range links {
			if l.mac == mac {
				names = append(names, l.name)
			}
		}
		switch {
		case len(names) == 1:
			return names[0], nil
		case len(names) > 1:
			return "", fmt.Errorf("%d interfaces (%s) have the hardware address %s", len(names), strings.Join(names, ", "), mac)
		}
		if !time.Now().Before(deadline) {
			var have []string
			for _, l := range links {
				have = append(have, l.name+" "+l.mac)
			}
			return "", fmt.Errorf("no interface with the hardware address %s after %s (the VM has: %s)", mac, wait, strings.Join(have, ", "))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// link is an interface as sysfs lists it.
type link struct{ name, mac string }

// listLinks lists the interfaces under sysNet with their hardware
// addresses; those without a readable one are left out.
func listLinks(sysNet string) ([]link, error) {
	entries, err := os.ReadDir(sysNet)
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var links []link
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sysNet, e.Name(), "address"))
		if err != nil {
			continue
		}
		links = append(links, link{name: e.Name(), mac: strings.ToLower(strings.TrimSpace(string(b)))})
	}
	return links, nil
}

// netlinkTimeout bounds each wait for the kernel's answer on the routing
// socket; the kernel answers at once, so reaching it means a bug.
const netlinkTimeout = 5 * time.Second

// addDefaultRoute adds the IPv4 default route via gw on the interface
// index to the main table. A default route that is already there via gw
// on that interface counts as added (a repeated call); one via another
// gateway is an error.
func addDefaultRoute(index int, gw netip.Addr) error {
	nl, err := dialNetlink()
	if err != nil {
		return err
	}
	defer unix.Close(nl)
	err = netlinkAck(nl, routeRequest(1, index, gw))
	if !errors.Is(err, unix.EEXIST) {
		return err
	}
	have, lerr := defaultRoutes(nl, 2)
	if lerr != nil {
		return fmt.Errorf("%w (and listing routes: %v)", err, lerr)
	}
	var other []string
	for _, r := range have {
		if r.gateway == gw && r.index == index {
			return nil
		}
		other = append(other, fmt.Sprintf("via %s on interface %d", r.gateway, r.index))
	}
	if len(other) == 0 {
		return err
	}
	return fmt.Errorf("a default route exists already (%s)", strings.Join(other, ", "))
}

// dialNetlink opens a routing socket whose reads time out.
func dialNetlink() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return -1, fmt.Errorf("routing socket: %w", err)
	}
	tv := unix.NsecToTimeval(netlinkTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("routing socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("routing socket: %w", err)
	}
	return fd, nil
}

// routeRequest is the RTM_NEWROUTE message (sequence number seq) that
// adds the IPv4 default route via gw on interface index to the main
// table, failing with EEXIST if there is one.
func routeRequest(seq uint32, index int, gw netip.Addr) []byte {
	rt := unix.RtMsg{
		Family:   unix.AF_INET,
		Table:    unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_BOOT,
		Scope:    unix.RT_SCOPE_UNIVERSE,
		Type:     unix.RTN_UNICAST,
	}
	body := appendRtMsg(nil, rt)
	body = appendAttr(body, unix.RTA_GATEWAY, gw.AsSlice())
	body = appendAttr(body, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(index)))
	return netlinkMessage(unix.RTM_NEWROUTE, unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL, seq, body)
}

// netlinkMessage frames body as one netlink message.
func netlinkMessage(typ, flags uint16, seq uint32, body []byte) []byte {
	b := binary.NativeEndian.AppendUint32(nil, uint32(unix.SizeofNlMsghdr+len(body)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // the kernel fills in the port id
	return append(b, body...)
}

func appendRtMsg(b []byte, rt unix.RtMsg) []byte {
	b = append(b, rt.Family, rt.Dst_len, rt.Src_len, rt.Tos, rt.Table, rt.Protocol, rt.Scope, rt.Type)
	return binary.NativeEndian.AppendUint32(b, rt.Flags)
}

// appendAttr appends one route attribute, padded to netlink's 4 bytes.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.SizeofRtAttr+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%unix.NLMSG_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

// netlinkAck sends req and returns the error the kernel's acknowledgement
// carries (nil for success).
func netlinkAck(nl int, req []byte) error {
	seq := binary.NativeEndian.Uint32(req[8:12])
	if err := unix.Sendto(nl, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("send to the routing socket: %w", err)
	}
	buf := make([]byte, 1<<16)
	for {
		msgs, err := readNetlink(nl, buf)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq || m.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			return ackError(m.Data)
		}
	}
}

// ackError is the errno of an NLMSG_ERROR message's payload.
func ackError(data []byte) error {
	if len(data) < 4 {
		return errors.New("short netlink acknowledgement")
	}
	if errno := -int32(binary.NativeEndian.Uint32(data)); errno != 0 {
		return unix.Errno(errno)
	}
	return nil
}

// readNetlink reads one datagram of netlink messages.
func readNetlink(nl int, buf []byte) ([]syscall.NetlinkMessage, error) {
	for {
		n, _, err := unix.Recvfrom(nl, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the routing socket: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("read the routing socket: %w", err)
		}
		return msgs, nil
	}
}

// route is the part of a route the agent compares.
type route struct {
	gateway netip.Addr
	index   int
}

// defaultRoutes lists the IPv4 default routes of the main table with a
// dump (sequence number seq).
func defaultRoutes(nl int, seq uint32) ([]route, error) {
	req := netlinkMessage(unix.RTM_GETROUTE, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, seq, appendRtMsg(nil, unix.RtMsg{Family: unix.AF_INET}))
	if err := unix.Sendto(nl, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("send to the routing socket: %w", err)
	}
	var routes []route
	buf := make([]byte, 1<<16)
	for {
		msgs, err := readNetlink(nl, buf)
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return routes, nil
			case unix.NLMSG_ERROR:
				if err := ackError(m.Data); err != nil {
					return nil, err
				}
			case unix.RTM_NEWROUTE:
				if r, ok := parseDefaultRoute(&m); ok {
					routes = append(routes, r)
				}
			}
		}
	}
}

// parseDefaultRoute reads an RTM_NEWROUTE message, and reports whether it
// is an IPv4 default route of the main table.
func parseDefaultRoute(m *syscall.NetlinkMessage) (route, bool) {
	var r route
	if len(m.Data) < unix.SizeofRtMsg {
		return r, false
	}
	family, dstLen, table := m.Data[0], m.Data[1], uint32(m.Data[4])
	attrs, err := syscall.ParseNetlinkRouteAttr(m)
	if err != nil || family != unix.AF_INET || dstLen != 0 {
		return r, false
	}
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.RTA_TABLE:
			if len(a.Value) >= 4 {
				table = binary.NativeEndian.Uint32(a.Value)
			}
		case unix.RTA_GATEWAY:
			if len(a.Value) == 4 {
				r.gateway = netip.AddrFrom4([4]byte(a.Value))
			}
		case unix.RTA_OIF:
			if len(a.Value) >= 4 {
				r.index = int(binary.NativeEndian.Uint32(a.Value))
			}
		}
	}
	return r, table == unix.RT_TABLE_MAIN
}
