package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestShimPod drives containerd's CRI plugin as the kubelet does (its
// gRPC API; crictl is not packaged here): a pod sandbox on the runtime
// handler mvm and two containers in it. The pod is one VM: both
// containers see the same kernel boot id, each sees its own image's
// root, and one VMM runs for the pod. Exit codes, logs, ExecSync and
// container stats come back as from runc, and removing the pod leaves
// no VM, mount or template.
func TestShimPod(t *testing.T) {
	c := startContainerdWith(t, true)
	c.ns = "k8s.io"
	ref := c.importImage(t)
	c.importAs(t, "docker.io/library/mvmtest-pause:1", v1.Config{Env: []string{"PATH=/bin"}, Entrypoint: []string{"sleep", "2147483647"}})

	conn, err := grpc.NewClient("unix://"+c.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rt := cri.NewRuntimeServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	logs := filepath.Join(c.dir, "pods")
	podCfg := &cri.PodSandboxConfig{
		Metadata:     &cri.PodSandboxMetadata{Name: "pod1", Uid: "uid-pod1", Namespace: "default"},
		LogDirectory: logs,
		Linux: &cri.LinuxPodSandboxConfig{SecurityContext: &cri.LinuxSandboxSecurityContext{
			NamespaceOptions: &cri.NamespaceOption{Network: cri.NamespaceMode_NODE},
		}},
	}
	pod, err := rt.RunPodSandbox(ctx, &cri.RunPodSandboxRequest{Config: podCfg, RuntimeHandler: "mvm"})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	if n := len(c.vmms()); n != 1 {
		t.Fatalf("VMMs after RunPodSandbox: %d, want 1", n)
	}
	createMounted := func(name string, res *cri.LinuxContainerResources, mounts []*cri.Mount, cmd ...string) (string, error) {
		t.Helper()
		cfg := &cri.ContainerConfig{
			Mounts:   mounts,
			Metadata: &cri.ContainerMetadata{Name: name},
			Image:    &cri.ImageSpec{Image: ref},
			Command:  cmd,
			Envs:     []*cri.KeyValue{{Key: "WHO", Value: []byte(name)}},
			LogPath:  name + ".log",
		}
		if res != nil {
			cfg.Linux = &cri.LinuxContainerConfig{Resources: res}
		}
		r, err := rt.CreateContainer(ctx, &cri.CreateContainerRequest{PodSandboxId: pod.PodSandboxId, SandboxConfig: podCfg, Config: cfg})
		if err != nil {
			return "", fmt.Errorf("CreateContainer %s: %w", name, err)
		}
		if _, err := rt.StartContainer(ctx, &cri.StartContainerRequest{ContainerId: r.ContainerId}); err != nil {
			return r.ContainerId, fmt.Errorf("StartContainer %s: %w", name, err)
		}
		return r.ContainerId, nil
	}
	createWith := func(name string, res *cri.LinuxContainerResources, cmd ...string) string {
		t.Helper()
		id, err := createMounted(name, res, nil, cmd...)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	create := func(name string, cmd ...string) string {
		t.Helper()
		return createWith(name, nil, cmd...)
	}
	// The same boot id in both: one kernel. The marker of their image
	// and not the pause image's sleep-only root... which has one too, so
	// each also writes a file the other must not see.
	c1 := create("c1", "sh", "-c", `echo "hello from $WHO"; cat /proc/sys/kernel/random/boot_id; echo mine > /only-c1; setsid sleep 1001 & exec sleep 600`)
	c2 := create("c2", "sh", "-c", `echo "hello from $WHO"; cat /proc/sys/kernel/random/boot_id; cat /marker; test -e /only-c1 && echo "sees c1's root"; exit 3`)
	if n := len(c.vmms()); n != 1 {
		t.Fatalf("VMMs with two containers in the pod: %d, want 1", n)
	}
	var st *cri.ContainerStatusResponse
	if !waitFor(60*time.Second, func() bool {
		st, err = rt.ContainerStatus(ctx, &cri.ContainerStatusRequest{ContainerId: c2})
		return err == nil && st.Status.State == cri.ContainerState_CONTAINER_EXITED
	}) {
		t.Fatalf("c2 did not exit: %v %v", st, err)
	}
	if st.Status.ExitCode != 3 {
		t.Fatalf("c2's exit code: %d, want 3", st.Status.ExitCode)
	}
	logLines := func(name string) []string {
		b, _ := os.ReadFile(filepath.Join(logs, name+".log"))
		var out []string
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			// CRI log lines: time, stream, tag, then the line.
			if f := strings.SplitN(l, " ", 4); len(f) == 4 {
				out = append(out, f[1]+" "+f[3])
			}
		}
		return out
	}
	var l1 []string
	if !waitFor(30*time.Second, func() bool { l1 = logLines("c1"); return len(l1) >= 2 }) {
		t.Fatalf("c1's log: %q", l1)
	}
	l2 := logLines("c2")
	t.Logf("logs: c1 %q, c2 %q", l1, l2)
	host, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if len(l2) != 3 || l1[0] != "stdout hello from c1" || l2[0] != "stdout hello from c2" || l2[2] != "stdout shim" {
		t.Fatalf("logs: c1 %q, c2 %q", l1, l2)
	}
	if l1[1] != l2[1] || strings.Contains(l1[1], strings.TrimSpace(string(host))) {
		t.Fatalf("boot ids: c1 %q, c2 %q, the host %q: want one VM's, not the host's", l1[1], l2[1], host)
	}

	ex, err := rt.ExecSync(ctx, &cri.ExecSyncRequest{ContainerId: c1, Cmd: []string{"sh", "-c", "cat /only-c1; cat /proc/self/cgroup; echo oops >&2; exit 2"}, Timeout: 60})
	if err != nil {
		t.Fatalf("ExecSync: %v", err)
	}
	if ex.ExitCode != 2 || !strings.HasPrefix(string(ex.Stdout), "mine\n0::/ctr-") || string(ex.Stderr) != "oops\n" {
		t.Fatalf("ExecSync: exit %d, stdout %q, stderr %q", ex.ExitCode, ex.Stdout, ex.Stderr)
	}
	t.Logf("ExecSync: exit %d, stdout %q, stderr %q", ex.ExitCode, ex.Stdout, ex.Stderr)
	stats, err := rt.ContainerStats(ctx, &cri.ContainerStatsRequest{ContainerId: c1})
	if err != nil {
		t.Fatalf("ContainerStats: %v", err)
	}
	if m := stats.Stats.GetMemory(); m == nil || m.WorkingSetBytes.GetValue() == 0 {
		t.Fatalf("ContainerStats: %v", stats.Stats)
	}

	t.Logf("ContainerStats: %v", stats.Stats)
	if b, err := os.ReadFile(filepath.Join(c.dir, "containerd.log")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "rootfs copied") {
				t.Log(l)
			}
		}
	}
	// sh runs a command in a running container of the pod.
	sh := func(id, script string) string {
		t.Helper()
		ex, err := rt.ExecSync(ctx, &cri.ExecSyncRequest{ContainerId: id, Cmd: []string{"sh", "-c", script}, Timeout: 60})
		if err != nil || ex.ExitCode != 0 {
			t.Fatalf("ExecSync %q: %v %v", script, ex, err)
		}
		return string(ex.Stdout)
	}
	// The members' roots in the VM, as the pause process sees its root.
	roots := `ls -d /proc/[0-9]*/root/.mvm-ctr-* 2>/dev/null | sed 's|.*/||' | sort -u | wc -l`
	// The CRI deletes an exited container's task at once (the
	// container stays, EXITED): its files in the VM go with the task, so
	// a crash-looping container does not fill the VM's disk.
	var n string
	if !waitFor(30*time.Second, func() bool { n = strings.TrimSpace(sh(c1, roots)); return n == "1" }) {
		t.Fatalf("member roots in the VM once c2's task is deleted: %s, want 1 (c1's)", n)
	}
	if _, err := rt.RemoveContainer(ctx, &cri.RemoveContainerRequest{ContainerId: c2}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
	// Stopping c1 ends everything of it, its setsid daemon too, as a
	// container's PID namespace would on a node: a third container of
	// the pod sees none of it.
	// A container's own limits bound its cgroup in the pod's VM.
	c3 := createWith("c3", &cri.LinuxContainerResources{MemoryLimitInBytes: 96 << 20, CpuQuota: 50000, CpuPeriod: 100000}, "sleep", "600")
	if lim := sh(c3, `d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat $d/memory.max $d/cpu.max`); lim != "100663296\n50000 100000\n" {
		t.Fatalf("c3's cgroup limits: %q, want 96 MiB and 50000/100000", lim)
	}
	daemons := `for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < $f; echo; done 2>/dev/null | grep -c '^sleep 1001 $' || true`
	if n := strings.TrimSpace(sh(c3, daemons)); n != "1" {
		t.Fatalf("c1's daemon seen from c3 before the stop: %s, want 1", n)
	}
	if _, err := rt.StopContainer(ctx, &cri.StopContainerRequest{ContainerId: c1, Timeout: 5}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if n := strings.TrimSpace(sh(c3, daemons)); n != "0" {
		t.Fatalf("c1's daemon outlived c1: %s left", n)
	}
	if _, err := rt.StopContainer(ctx, &cri.StopContainerRequest{ContainerId: c3, Timeout: 5}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	// A container over its memory limit is OOM-killed in its cgroup,
	// and the CRI says so, while the pod goes on.
	c4 := createWith("c4", &cri.LinuxContainerResources{MemoryLimitInBytes: 64 << 20}, "sh", "-c", `x=$(head -c 200000000 /dev/zero | tr '\0' a); echo survived`)
	if !waitFor(60*time.Second, func() bool {
		st, err = rt.ContainerStatus(ctx, &cri.ContainerStatusRequest{ContainerId: c4})
		return err == nil && st.Status.State == cri.ContainerState_CONTAINER_EXITED
	}) {
		t.Fatalf("c4 did not exit: %v %v", st, err)
	}
	if st.Status.ExitCode != 137 || st.Status.Reason != "OOMKilled" {
		b, _ := os.ReadFile(filepath.Join(c.dir, "containerd.log"))
		t.Fatalf("c4: exit %d, reason %q; want 137, OOMKilled\n%s", st.Status.ExitCode, st.Status.Reason, grepLines(b, "OOM", "oom", "c4", "release"))
	}
	// Volumes: a read-only one is copied into the container's root as
	// it starts, owners kept, and so are the files the CRI writes for
	// it (with the node's network, the node's /etc/hosts and
	// resolv.conf); a writable one is refused, naming it, before
	// anything runs (what the container wrote there would not reach the
	// node).
	vol := filepath.Join(c.dir, "vol")
	if err := os.MkdirAll(filepath.Join(vol, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(vol, "sub", "greeting"), []byte("from the node\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(vol, "sub", "greeting"), 1000, 2000); err != nil {
		t.Fatal(err)
	}
	c5, err := createMounted("c5", nil, []*cri.Mount{{ContainerPath: "/etc/config", HostPath: vol, Readonly: true}}, "sleep", "600")
	if err != nil {
		t.Fatal(err)
	}
	if got := sh(c5, "cat /etc/config/sub/greeting; stat -c '%u:%g %a' /etc/config/sub/greeting"); got != "from the node\n1000:2000 640\n" {
		t.Fatalf("c5's read-only volume: %q", got)
	}
	for _, f := range []string{"/etc/hosts", "/etc/resolv.conf"} {
		want, _ := os.ReadFile(f)
		if got := sh(c5, "cat "+f); got != string(want) {
			t.Fatalf("c5's %s: %q, want the node's %q", f, got, want)
		}
	}
	if b, err := os.ReadFile(filepath.Join(c.dir, "containerd.log")); err == nil {
		t.Log(grepLines(b, "mounts copied"))
	}
	if _, err := rt.StopContainer(ctx, &cri.StopContainerRequest{ContainerId: c5, Timeout: 5}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	c6, err := createMounted("c6", nil, []*cri.Mount{{ContainerPath: "/data", HostPath: vol}}, "sleep", "600")
	if err == nil || !strings.Contains(err.Error(), "writable bind mount of "+vol+" at /data") {
		t.Fatalf("a writable volume in a pod: %v, want it refused", err)
	}
	t.Logf("a writable volume: %v", err)
	if c6 != "" {
		_, _ = rt.RemoveContainer(ctx, &cri.RemoveContainerRequest{ContainerId: c6})
	}
	for _, id := range []string{c1, c3, c4, c5} {
		if _, err := rt.RemoveContainer(ctx, &cri.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Fatalf("RemoveContainer: %v", err)
		}
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
	if ts, _ := filepath.Glob(filepath.Join(c.dir, "data", "templates", "*.json")); len(ts) != 0 {
		t.Errorf("templates left: %v", ts)
	}
}

// grepLines returns b's lines holding any of words.
func grepLines(b []byte, words ...string) string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, w := range words {
			if strings.Contains(l, w) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}
