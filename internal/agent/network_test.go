package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

func TestParseNetwork(t *testing.T) {
	ok := &agentpb.Network{Mac: "52:54:00:AB:cd:ef", Address: "10.0.2.15/24", Gateway: "10.0.2.2", Dns: []string{"10.0.2.2"}, Mtu: 1500}
	cfg, err := parseNetwork(ok)
	if err != nil || cfg.mac != "52:54:00:ab:cd:ef" || cfg.addr.String() != "10.0.2.15/24" || cfg.mtu != 1500 || len(cfg.dns) != 1 {
		t.Fatalf("parseNetwork(%v) = %+v, %v", ok, cfg, err)
	}
	bad := func(f func(n *agentpb.Network)) *agentpb.Network {
		n := &agentpb.Network{Mac: ok.Mac, Address: ok.Address, Gateway: ok.Gateway, Dns: ok.Dns, Mtu: ok.Mtu}
		f(n)
		return n
	}
	for _, tt := range []struct {
		name string
		req  *agentpb.Network
		says string
	}{
		{"short MAC", bad(func(n *agentpb.Network) { n.Mac = "52:54:00:ab:cd" }), "hardware address"},
		{"multicast MAC", bad(func(n *agentpb.Network) { n.Mac = "01:00:5e:00:00:01" }), "multicast"},
		{"IPv6", bad(func(n *agentpb.Network) { n.Address = "fd00::2/64" }), "IPv4"},
		{"no prefix", bad(func(n *agentpb.Network) { n.Address = "10.0.2.15" }), "address/prefix"},
		{"/32", bad(func(n *agentpb.Network) { n.Address = "10.0.2.15/32" }), "prefix length"},
		{"network address", bad(func(n *agentpb.Network) { n.Address = "10.0.2.0/24" }), "network or broadcast"},
		{"gateway outside", bad(func(n *agentpb.Network) { n.Gateway = "10.0.3.1" }), "not inside"},
		{"gateway is the guest", bad(func(n *agentpb.Network) { n.Gateway = "10.0.2.15" }), "own address"},
		{"five nameservers", bad(func(n *agentpb.Network) { n.Dns = []string{"1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4", "1.1.1.5"} }), "at most 4"},
		{"nameserver twice", bad(func(n *agentpb.Network) { n.Dns = []string{"1.1.1.1", "1.1.1.1"} }), "twice"},
		{"small MTU", bad(func(n *agentpb.Network) { n.Mtu = 100 }), "MTU"},
	} {
		_, err := parseNetwork(tt.req)
		if !errors.Is(err, errInvalidRequest) || !strings.Contains(err.Error(), tt.says) {
			t.Errorf("%s: %v, want an invalid request saying %q", tt.name, err, tt.says)
		}
	}
}

// TestReplaceFile: resolv.conf lands in the root as a regular file, over a
// symlink that pointed out of it (never written through), with /etc made
// when missing.
func TestReplaceFile(t *testing.T) {
	outside := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(outside, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name   string
		setup  func(root string)
		mayErr bool // a link that resolves to nothing inside the root
	}{
		{"no /etc", func(string) {}, false},
		{"a regular file", func(root string) {
			_ = os.MkdirAll(filepath.Join(root, "etc"), 0o755)
			_ = os.WriteFile(filepath.Join(root, "etc", "resolv.conf"), []byte("old"), 0o644)
		}, false},
		{"a symlink out of the root", func(root string) {
			_ = os.MkdirAll(filepath.Join(root, "etc"), 0o755)
			_ = os.Symlink(outside, filepath.Join(root, "etc", "resolv.conf"))
		}, false},
		{"/etc a symlink out of the root", func(root string) {
			_ = os.Symlink(filepath.Dir(outside), filepath.Join(root, "etc"))
		}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			tt.setup(root)
			r := &fsRoot{path: root}
			werr := writeResolvConf(r, []byte("nameserver 10.0.2.2\n"))
			if b, err := os.ReadFile(outside); err != nil || string(b) != "keep" {
				t.Fatalf("wrote outside the root: %q %v", b, err)
			}
			if ents, _ := os.ReadDir(filepath.Dir(outside)); len(ents) != 1 {
				t.Fatalf("made files outside the root: %v", ents)
			}
			if werr != nil {
				if !tt.mayErr {
					t.Fatal(werr)
				}
				return
			}
			b, err := r.readFile("/etc/resolv.conf", 1<<10)
			if err != nil || string(b) != "nameserver 10.0.2.2\n" {
				t.Errorf("resolv.conf in the root: %q %v", b, err)
			}
		})
	}
}
