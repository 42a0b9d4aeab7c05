package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestShimPodNetwork: a pod with a network of its own (not the node's)
// gets it from CNI, as with runc: containerd's CRI plugin calls CNI's
// bridge and host-local plugins (Debian's containernetworking-plugins)
// for the pod's network namespace, and the shim bridges that namespace
// to the VM's network card (docs/kubernetes.md, "Networking"). The guest
// has the pod's address; the node reaches a server in the pod at that
// address, and the pod reaches the node through the bridge.
func TestShimPodNetwork(t *testing.T) {
	const cniBin = "/usr/lib/cni"
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBin, p)); err != nil {
			t.Fatalf("CNI's plugins are needed (apt-get install containernetworking-plugins): %v", err)
		}
	}
	if _, err := exec.LookPath("tc"); err != nil {
		t.Fatalf("tc is needed (apt-get install iproute2): %v", err)
	}
	c := startContainerdWith(t, true)
	c.ns = "k8s.io"
	ref := c.importImage(t)
	c.importAs(t, "docker.io/library/mvmtest-pause:1", v1.Config{Env: []string{"PATH=/bin"}, Entrypoint: []string{"sleep", "2147483647"}})

	// A bridge of the test's own on a network no host route uses.
	const bridge, gateway = "mvmtest0", "10.250.77.1"
	if out, err := exec.Command("ip", "route", "get", gateway).CombinedOutput(); err == nil && !strings.Contains(string(out), "via") {
		t.Fatalf("%s is on a network of this host already: %s", gateway, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", bridge).Run() })
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if err := os.Symlink(filepath.Join(cniBin, p), filepath.Join(c.dir, "cni/bin", p)); err != nil {
			t.Fatal(err)
		}
	}
	conf := fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "mvmtest", "plugins": [{"type": "bridge", "bridge": %q,
  "isGateway": true, "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.77.0/24"}]],
  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": %q}}]}`, bridge, filepath.Join(c.dir, "cni/ipam"))
	if err := os.WriteFile(filepath.Join(c.dir, "cni/conf", "10-mvmtest.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}

	conn, err := grpc.NewClient("unix://"+c.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rt := cri.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// The CRI plugin picks the configuration up from its directory.
	if !waitFor(30*time.Second, func() bool {
		st, err := rt.Status(ctx, &cri.StatusRequest{})
		if err != nil {
			return false
		}
		for _, cond := range st.Status.Conditions {
			if cond.Type == cri.NetworkReady {
				return cond.Status
			}
		}
		return false
	}) {
		t.Fatal("the CRI's network did not become ready with the CNI configuration")
	}

	podCfg := &cri.PodSandboxConfig{
		Metadata:     &cri.PodSandboxMetadata{Name: "netpod", Uid: "uid-netpod", Namespace: "default"},
		LogDirectory: filepath.Join(c.dir, "pods"),
	}
	pod, err := rt.RunPodSandbox(ctx, &cri.RunPodSandboxRequest{Config: podCfg, RuntimeHandler: "mvm"})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	ps, err := rt.PodSandboxStatus(ctx, &cri.PodSandboxStatusRequest{PodSandboxId: pod.PodSandboxId})
	if err != nil || ps.Status.GetNetwork().GetIp() == "" {
		t.Fatalf("PodSandboxStatus: %v %v", ps, err)
	}
	podIP := ps.Status.Network.Ip
	t.Logf("the pod's address: %s", podIP)
	if n := len(c.vmms()); n != 1 {
		t.Fatalf("VMMs after RunPodSandbox: %d, want 1", n)
	}

	cfg := &cri.ContainerConfig{
		Metadata: &cri.ContainerMetadata{Name: "server"},
		Image:    &cri.ImageSpec{Image: ref},
		Command:  []string{"sh", "-c", `while true; do echo "from the pod" | nc -l -p 8080; done`},
		LogPath:  "server.log",
	}
	cr, err := rt.CreateContainer(ctx, &cri.CreateContainerRequest{PodSandboxId: pod.PodSandboxId, SandboxConfig: podCfg, Config: cfg})
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	if _, err := rt.StartContainer(ctx, &cri.StartContainerRequest{ContainerId: cr.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	sh := func(script string) string {
		t.Helper()
		ex, err := rt.ExecSync(ctx, &cri.ExecSyncRequest{ContainerId: cr.ContainerId, Cmd: []string{"sh", "-c", script}, Timeout: 60})
		if err != nil || ex.ExitCode != 0 {
			t.Fatalf("ExecSync %q: %v %v", script, ex, err)
		}
		return string(ex.Stdout)
	}
	// The guest's card has the pod's address and route, and the VM's
	// kernel is not the node's (the traffic goes through the VM).
	if got := sh(`ip -4 -o addr show | grep -v ' lo ' | grep -o 'inet [0-9./]*'; ip route | grep ^default`); !strings.Contains(got, "inet "+podIP+"/24") || !strings.Contains(got, "default via "+gateway) {
		t.Fatalf("the guest's network: %q, want %s/24 via %s", got, podIP, gateway)
	}

	// The node reaches the pod's server at the pod's address.
	var reply string
	if !waitFor(60*time.Second, func() bool {
		d, err := net.DialTimeout("tcp", net.JoinHostPort(podIP, "8080"), 2*time.Second)
		if err != nil {
			return false
		}
		defer d.Close()
		_ = d.SetDeadline(time.Now().Add(5 * time.Second))
		reply, _ = bufio.NewReader(d).ReadString('\n')
		return reply != ""
	}) || reply != "from the pod\n" {
		t.Fatalf("the pod's server at %s:8080: %q", podIP, reply)
	}

	// The pod reaches the node, from the pod's address.
	l, err := net.Listen("tcp", gateway+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		a, err := l.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer a.Close()
		_ = a.SetDeadline(time.Now().Add(30 * time.Second))
		line, _ := bufio.NewReader(a).ReadString('\n')
		got <- a.RemoteAddr().(*net.TCPAddr).IP.String() + " " + line
	}()
	port := l.Addr().(*net.TCPAddr).Port
	sh(fmt.Sprintf("echo hello node | nc %s %d", gateway, port))
	select {
	case g := <-got:
		if g != podIP+" hello node\n" {
			t.Fatalf("the node got %q, want it from %s", g, podIP)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the node got nothing from the pod")
	}

	if _, err := rt.StopContainer(ctx, &cri.StopContainerRequest{ContainerId: cr.ContainerId, Timeout: 5}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if _, err := rt.RemoveContainer(ctx, &cri.RemoveContainerRequest{ContainerId: cr.ContainerId}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
	if _, err := rt.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
		t.Fatalf("StopPodSandbox: %v", err)
	}
	if _, err := rt.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
		t.Fatalf("RemovePodSandbox: %v", err)
	}
	if !waitFor(15*time.Second, func() bool { return len(c.vmms()) == 0 }) {
		t.Fatalf("VMMs after RemovePodSandbox: %v", c.vmms())
	}
	// A shim killed with SIGKILL takes its VM and TAP with it; the
	// cleanup containerd runs (the shim's delete) removes the redirect
	// from the pod's interface.
	before := netnsList()
	pod2, err := rt.RunPodSandbox(ctx, &cri.RunPodSandboxRequest{Config: &cri.PodSandboxConfig{
		Metadata: &cri.PodSandboxMetadata{Name: "netpod2", Uid: "uid-netpod2", Namespace: "default"},
	}, RuntimeHandler: "mvm"})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	var ns string
	for _, n := range netnsList() {
		if !slices.Contains(before, n) {
			ns = "/var/run/netns/" + n
		}
	}
	qdiscs := func() string {
		out, _ := exec.Command("nsenter", "--net="+ns, "tc", "qdisc", "show", "dev", "eth0").CombinedOutput()
		return string(out)
	}
	if ns == "" || !strings.Contains(qdiscs(), "ingress") {
		t.Fatalf("the second pod's namespace %q: qdiscs %q", ns, qdiscs())
	}
	for _, pid := range pidsOf("containerd-shim-mvm-v2", "-address "+c.sock) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if !waitFor(30*time.Second, func() bool { return len(c.vmms()) == 0 && !strings.Contains(qdiscs(), "ingress") }) {
		t.Fatalf("after the shim's SIGKILL: VMMs %v, the pod's qdiscs %q", c.vmms(), qdiscs())
	}
	if _, err := rt.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: pod2.PodSandboxId}); err != nil {
		t.Fatalf("StopPodSandbox after the shim's SIGKILL: %v", err)
	}
	if _, err := rt.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: pod2.PodSandboxId}); err != nil {
		t.Fatalf("RemovePodSandbox after the shim's SIGKILL: %v", err)
	}
	// CNI's DEL took the pods' interfaces and addresses back.
	if out, _ := exec.Command("ip", "-o", "link", "show", "master", bridge).Output(); len(strings.TrimSpace(string(out))) != 0 {
		t.Errorf("interfaces left on the bridge: %s", out)
	}
}

// netnsList names the network namespaces under /var/run/netns, where the
// CRI makes the pods'.
func netnsList() []string {
	es, _ := os.ReadDir("/var/run/netns")
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}
