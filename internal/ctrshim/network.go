package ctrshim

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm"
)

// A pod's network. The CRI gives a pod that does not use the node's
// network a network namespace of its own, which CNI has set up before the
// sandbox's task is created: an interface (a veth, most often) with the
// pod's address and a default route. The pod's VM gets that network the
// way Kata Containers' "tcfilter" model does: the shim makes a TAP device
// in the namespace, QEMU's network card sits on it, and two tc filters
// move every frame between the pod's interface and the TAP unchanged
// (what arrives on the interface goes to the VM, what the VM sends leaves
// through the interface). The guest's card has the interface's MAC
// address and the agent gives it the interface's address, route and MTU,
// so the rest of the cluster sees the pod's address and MAC, as with
// runc; the namespace's own stack sees no traffic. Nothing changes
// outside the pod's namespace.

// tapName is the TAP device the shim makes in a pod's network namespace.
const tapName = "mvm-tap0"

// netnsOf is the path of the network namespace the spec joins, "" when it
// joins none (the node's network) or asks for a fresh one (ctr run: only
// a loopback, which the VM has of its own).
func netnsOf(spec *specs.Spec) string {
	if spec.Linux == nil {
		return ""
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return ns.Path
		}
	}
	return ""
}

// podNet is a pod's network as the shim set it up.
type podNet struct {
	netns  string
	iface  string   // the pod's interface in netns
	tap    *os.File // the TAP device; the VMM has its own descriptor
	config *mvm.TAP
	// redirected: the pod's interface has the shim's ingress qdisc
	// (removed by close; one the shim did not add is left alone).
	redirected bool
}

// isHostNetns says whether the namespace at path is the shim's own (the
// node's): a spec may name it (ctr run --with-ns network:/proc/1/ns/net),
// and redirecting the node's interface into a VM would cut the node off.
func isHostNetns(path string) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Stat(path, &a); err != nil {
		return false, fmt.Errorf("the pod's network namespace: %w", err)
	}
	if err := unix.Stat("/proc/self/ns/net", &b); err != nil {
		return false, err
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// setUpPodNetwork bridges the pod's network namespace at netns to a new
// TAP device (see above). It returns nil, and no error, for a namespace
// with no IPv4 interface (CNI gave the pod none): the VM then has no
// network card, as the pod has no network.
func setUpPodNetwork(ctx context.Context, netns string) (*podNet, error) {
	if host, err := isHostNetns(netns); err != nil || host {
		return nil, err
	}
	pn, err := inNetns(netns, func() (*podNet, error) {
		iface, cfg, err := podInterface()
		if err != nil || iface == "" {
			return nil, err
		}
		tap, err := makeTAP(tapName, cfg.MTU)
		if err != nil {
			return nil, err
		}
		cfg.File = tap
		return &podNet{netns: netns, iface: iface, tap: tap, config: cfg}, nil
	})
	if err != nil || pn == nil {
		return nil, err
	}
	// Every frame, both ways, redirected as it arrives (ingress), before
	// the namespace's own stack sees it. The TAP's side first: until the
	// pod's interface redirects, the pod's traffic is as CNI left it.
	ctx = context.WithoutCancel(ctx)
	for i, args := range [][]string{
		{"qdisc", "add", "dev", tapName, "ingress"},
		{"filter", "add", "dev", tapName, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", pn.iface},
		{"qdisc", "add", "dev", pn.iface, "ingress"},
		{"filter", "add", "dev", pn.iface, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", tapName},
	} {
		if err := tc(ctx, netns, args...); err != nil {
			pn.close(ctx)
			return nil, err
		}
		if i == 2 {
			pn.redirected = true
		}
	}
	return pn, nil
}

// close undoes setUpPodNetwork: the TAP device goes with its last
// descriptor (the VMM's is gone once the VM is), and the pod's interface
// is left as CNI made it, for CNI to tear down.
func (pn *podNet) close(ctx context.Context) {
	pn.tap.Close()
	if pn.redirected {
		_ = tc(context.WithoutCancel(ctx), pn.netns, "qdisc", "del", "dev", pn.iface, "ingress")
	}
}

// cleanUpPodNetwork removes what a killed shim left in the pod's
// namespace: the ingress qdisc of the interface whose frames went to the
// shim's TAP (the TAP itself went with the shim's descriptors).
func cleanUpPodNetwork(ctx context.Context, netns string) error {
	if host, err := isHostNetns(netns); err != nil || host {
		return err
	}
	iface, err := inNetns(netns, func() (string, error) {
		name, _, err := podInterface()
		return name, err
	})
	if err != nil || iface == "" {
		return err
	}
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+netns, "tc", "filter", "show", "dev", iface, "ingress").Output()
	// The shim's filter redirects everything to its TAP, which tc shows
	// as "*" once the device is gone (with the dead shim's descriptors).
	f := string(out)
	if err != nil || !strings.Contains(f, "match 00000000/00000000 at 0") ||
		!(strings.Contains(f, "Redirect to device "+tapName+")") || strings.Contains(f, "Redirect to device *)")) {
		return nil // not the shim's
	}
	return tc(ctx, netns, "qdisc", "del", "dev", iface, "ingress")
}

// tc runs tc in the network namespace netns.
func tc(ctx context.Context, netns string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netns, "tc"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("tc %s in %s: %w: %s", strings.Join(args, " "), netns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// inNetns runs fn on an OS thread that joined the network namespace at
// path; the thread is thrown away afterwards (it is never unlocked, so
// the runtime ends it rather than let another goroutine run in the pod's
// namespace).
func inNetns[T any](path string, fn func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var zero T
		f, err := os.Open(path)
		if err != nil {
			ch <- result{zero, fmt.Errorf("the pod's network namespace: %w", err)}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{zero, fmt.Errorf("join the pod's network namespace %s: %w", path, err)}
			return
		}
		v, err := fn()
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}

// podInterface finds the pod's interface in the current thread's network
// namespace: the one up, not a loopback, with an IPv4 address. It
// returns its name and the guest's configuration on it (its MAC, address
// and MTU, and the default route's gateway); no name when there is none.
func podInterface() (string, *mvm.TAP, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return "", nil, fmt.Errorf("the pod's interfaces: %w", err)
	}
	gw, gwIface, err := defaultRoute()
	if err != nil {
		return "", nil, err
	}
	// The default route's interface first (a pod with more than one, as
	// Multus gives, has its primary network there).
	slices.SortStableFunc(ifs, func(a, b net.Interface) int {
		return cmpBool(b.Name == gwIface, a.Name == gwIface)
	})
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 || ifc.Flags&net.FlagUp == 0 || len(ifc.HardwareAddr) != 6 || ifc.Name == tapName {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return "", nil, fmt.Errorf("the addresses of %s: %w", ifc.Name, err)
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok || ipn.IP.To4() == nil {
				continue
			}
			ip, _ := netip.AddrFromSlice(ipn.IP.To4())
			ones, _ := ipn.Mask.Size()
			cfg := &mvm.TAP{MAC: ifc.HardwareAddr.String(), Address: netip.PrefixFrom(ip, ones), MTU: ifc.MTU}
			if gwIface != ifc.Name || !cfg.Address.Masked().Contains(gw) {
				return "", nil, fmt.Errorf("the pod's interface %s (%s) has no default route through a gateway on its network (the VM's network takes one)", ifc.Name, cfg.Address)
			}
			cfg.Gateway = gw
			return ifc.Name, cfg, nil
		}
	}
	return "", nil, nil
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// defaultRoute reads the current thread's namespace's IPv4 default route
// from /proc/thread-self/net/route (the process's /proc/net is the main
// thread's namespace).
func defaultRoute() (netip.Addr, string, error) {
	f, err := os.Open("/proc/thread-self/net/route")
	if err != nil {
		return netip.Addr{}, "", fmt.Errorf("the pod's routes: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Iface Destination Gateway Flags ..., hex in host order.
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 || fs[1] != "00000000" || fs[7] != "00000000" {
			continue
		}
		v, err := strconv.ParseUint(fs[2], 16, 32)
		if err != nil {
			continue
		}
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], uint32(v))
		return netip.AddrFrom4(b), fs[0], nil
	}
	if err := sc.Err(); err != nil {
		return netip.Addr{}, "", fmt.Errorf("the pod's routes: %w", err)
	}
	return netip.Addr{}, "", errors.New("the pod's network namespace has no IPv4 default route")
}

// makeTAP makes the TAP device name in the current thread's network
// namespace, up, with mtu (0: the kernel's), and returns its descriptor.
func makeTAP(name string, mtu int) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	tap := os.NewFile(uintptr(fd), "tap")
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		tap.Close()
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		tap.Close()
		return nil, fmt.Errorf("make the TAP device %s: %w", name, err)
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tap.Close()
		return nil, err
	}
	defer unix.Close(s)
	if mtu > 0 {
		ifr, _ := unix.NewIfreq(name)
		ifr.SetUint32(uint32(mtu))
		if err := unix.IoctlIfreq(s, unix.SIOCSIFMTU, ifr); err != nil {
			tap.Close()
			return nil, fmt.Errorf("the MTU of %s: %w", name, err)
		}
	}
	ifr, _ = unix.NewIfreq(name)
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		tap.Close()
		return nil, fmt.Errorf("the flags of %s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		tap.Close()
		return nil, fmt.Errorf("bring %s up: %w", name, err)
	}
	return tap, nil
}
