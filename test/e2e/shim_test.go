package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/mvm-sh/mvm/internal/oci/ocitest"
)

// The tests here run a real containerd (Debian's 1.6, started with a
// config and directories of the test's own) with mvm's shim as the
// runtime io.containerd.mvm.v2, and drive it with ctr as a user does.

// ctrd is one test's containerd.
type ctrd struct {
	*env
	dir, sock string
	cmd       *exec.Cmd
	// ns is the containerd namespace images are imported into ("" is
	// ctr's default; the CRI's is k8s.io).
	ns string
}

// startContainerd starts containerd for the test; it is stopped, and
// the test's VMs, mounts and templates checked gone, at the end.
func startContainerd(t *testing.T) *ctrd {
	t.Helper()
	return startContainerdWith(t, false)
}

// startContainerdWith starts containerd, with its CRI plugin when cri is
// set: the runtime handler "mvm" is io.containerd.mvm.v2, the sandbox
// image docker.io/library/mvmtest-pause:1 (see importPause), and there is
// no CNI (pods share the host's network). The shims make no snapshots
// (their healers would outlive the test's checks) unless env, extra
// variables of containerd's (and so the shims'), turns it on.
func startContainerdWith(t *testing.T, cri bool, env ...string) *ctrd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root on the host: containerd mounts the containers' root filesystems")
	}
	bin, err := exec.LookPath("containerd")
	if err != nil {
		t.Fatalf("containerd is needed (apt-get install containerd): %v", err)
	}
	if _, err := exec.LookPath("ctr"); err != nil {
		t.Fatalf("ctr is needed (apt-get install containerd): %v", err)
	}
	shimBin := filepath.Join(filepath.Dir(mvmctl), "containerd-shim-mvm-v2")
	if _, err := os.Stat(shimBin); err != nil {
		t.Fatalf("the shim is not built: %v", err)
	}
	// Short: the socket's path must fit a unix address.
	dir, err := os.MkdirTemp("", "ctd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &ctrd{env: newEnv(t), dir: dir, sock: filepath.Join(dir, "c.sock")}
	plugins := `disabled_plugins = ["io.containerd.grpc.v1.cri"]`
	if cri {
		for _, d := range []string{"cni/bin", "cni/conf"} {
			if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		plugins = fmt.Sprintf(`[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/mvmtest-pause:1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "mvm"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.mvm]
    runtime_type = "io.containerd.mvm.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q`, filepath.Join(dir, "cni/bin"), filepath.Join(dir, "cni/conf"))
	}
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[ttrpc]
  address = %q
%s
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock, c.sock+".ttrpc", plugins)
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	c.cmd = exec.Command(bin, "--config", filepath.Join(dir, "config.toml"))
	c.cmd.Env = append(c.environ("MVM_DATA_DIR="+filepath.Join(dir, "data"), "MVM_NO_AUTO_SNAPSHOT=1"), "PATH="+filepath.Dir(shimBin)+":"+os.Getenv("PATH"))
	c.cmd.Env = append(c.cmd.Env, env...)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = c.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = c.cmd.Process.Kill()
			<-done
		}
		logf.Close()
		// Shims outlive containerd (a restart must not end its
		// containers); a test that failed half way leaves some. Their
		// VMs die with them, so what is left is reported, then ended.
		var shims []int
		waitFor(5*time.Second, func() bool { shims = pidsOf("containerd-shim-mvm-v2", "-address "+c.sock); return len(shims) == 0 })
		if len(shims) > 0 {
			t.Errorf("shims left running: %v", shims)
			for _, pid := range shims {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			waitFor(15*time.Second, func() bool { return len(c.vmms()) == 0 })
		}
		c.assertClean()
		if ms := c.mounts(); len(ms) > 0 {
			t.Errorf("mounts left under containerd's directories: %v", ms)
			for _, m := range ms {
				_ = syscall.Unmount(m, syscall.MNT_DETACH)
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			var keep []string
			for _, l := range strings.Split(string(b), "\n") {
				if !strings.Contains(l, "loading plugin") {
					keep = append(keep, l)
				}
			}
			t.Logf("containerd's log:\n%s", tail(strings.Join(keep, "\n")))
		}
		os.RemoveAll(dir)
	})
	if !waitFor(20*time.Second, func() bool { return c.ctr(nil, "version").code == 0 }) {
		t.Fatalf("containerd did not start: %s", c.ctr(nil, "version"))
	}
	return c
}

// ctr runs ctr against the test's containerd.
func (c *ctrd) ctr(stdin []byte, args ...string) result {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"-a", c.sock}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.Bytes(), stderr: errb.Bytes(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("ctr %q: %v", args, err)
	}
	return r
}

// mounts lists the mount points under containerd's directories.
func (c *ctrd) mounts() []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && strings.HasPrefix(f[4], c.dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// importImage imports the test image (busybox and accounts; see
// testImage) as docker.io/library/mvmtest:1, and the same running as the
// user app (1000:1000) as docker.io/library/mvmtest-app:1.
func (c *ctrd) importImage(t *testing.T) string {
	t.Helper()
	c.importAs(t, "docker.io/library/mvmtest-app:1", v1.Config{Env: []string{"PATH=/bin"}, User: "app", WorkingDir: "/home/app"})
	return c.importAs(t, "docker.io/library/mvmtest:1", v1.Config{Env: []string{"PATH=/bin", "FROM_IMAGE=yes"}})
}

func (c *ctrd) importAs(t *testing.T, ref string, cfg v1.Config) string {
	t.Helper()
	return c.importMarked(t, ref, cfg, "shim\n")
}

// importMarked imports the test image with marker as /marker.
func (c *ctrd) importMarked(t *testing.T, ref string, cfg v1.Config, marker string) string {
	t.Helper()
	// The test image's first layer and a marker (its second layer has
	// a hard link across layers, which containerd's unpacker refuses).
	base, err := busyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	img := ocitest.Image(cfg, "amd64",
		ocitest.Layer(base, compression.GZip), ocitest.Layer(ocitest.Tar(ocitest.File("marker", marker, 0o644, 0, 0)), compression.GZip))
	archive := filepath.Join(c.dir, "image.tar")
	if err := ocitest.WriteDockerArchive(archive, img, ref); err != nil {
		t.Fatal(err)
	}
	var nsArgs []string
	if c.ns != "" {
		nsArgs = []string{"-n", c.ns}
	}
	if r := c.ctr(nil, append(nsArgs, "image", "import", archive)...); r.code != 0 {
		t.Fatalf("ctr image import: %s", r)
	}
	return ref
}

// TestShimRun: ctr run with the mvm runtime runs the command in a
// microVM, with the spec's args, env, working directory and user, its
// stdout and stderr apart, and its exit code.
func TestShimRun(t *testing.T) {
	c := startContainerd(t)
	ref := c.importImage(t)
	r := c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", ref, "run1",
		"sh", "-c", `echo "out $FROM_IMAGE"; echo err >&2; uname -r; exit 3`)
	if r.code != 3 || !strings.HasPrefix(string(r.stdout), "out yes\n") || !strings.Contains(string(r.stdout), "-mvm") || string(r.stderr) != "err\n" {
		t.Fatalf("ctr run: %s", r)
	}
	host, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	if strings.Contains(string(r.stdout), strings.TrimSpace(string(host))) {
		t.Fatalf("the command ran on the host's kernel: %s", r)
	}
	r = c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", "--env", "GREETING=hello world", "--cwd", "/tmp",
		ref, "run2", "sh", "-c", `echo "$GREETING"; pwd; cat /marker`)
	if r.code != 0 || string(r.stdout) != "hello world\n/tmp\nshim\n" {
		t.Fatalf("ctr run with env and cwd: %s", r)
	}
	// stdin reaches the command, and its end is the command's EOF.
	r = c.ctr([]byte("from the host\n"), "run", "--rm", "--runtime", "io.containerd.mvm.v2", ref, "stdin", "sh", "-c", "cat; echo done")
	if r.code != 0 || string(r.stdout) != "from the host\ndone\n" {
		t.Fatalf("ctr run with stdin: %s", r)
	}
	// The image's user and working directory, as the spec has them.
	r = c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", "docker.io/library/mvmtest-app:1", "run3", "sh", "-c", "id -u; id -g; pwd")
	if r.code != 0 || string(r.stdout) != "1000\n1000\n/home/app\n" {
		t.Fatalf("ctr run of an image with a user: %s", r)
	}
	// The spec's CPU quota and memory limit are the VM's shape.
	r = c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", "--cpus", "1", "--memory-limit", "268435456",
		ref, "run4", "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
	var kb int
	fmt.Sscanf(strings.TrimPrefix(strings.SplitN(string(r.stdout), "\n", 2)[1], "MemTotal:"), "%d", &kb)
	if r.code != 0 || !strings.HasPrefix(string(r.stdout), "1\n") || kb > 256<<10 || kb < 160<<10 {
		t.Fatalf("ctr run --cpus 1 --memory-limit 256M: %s (MemTotal %d kB)", r, kb)
	}
	if r := c.ctr(nil, "container", "ls", "-q"); len(bytes.TrimSpace(r.stdout)) != 0 {
		t.Fatalf("containers left after --rm: %s", r)
	}
}

// TestShimTaskLifecycle: a detached task can be listed, exec'd into,
// killed and deleted, as with runc, and leaves nothing.
func TestShimTaskLifecycle(t *testing.T) {
	c := startContainerd(t)
	ref := c.importImage(t)
	if r := c.ctr(nil, "run", "-d", "--runtime", "io.containerd.mvm.v2", ref, "box", "sh", "-c", "echo started > /tmp/state; exec sleep 600"); r.code != 0 {
		t.Fatalf("ctr run -d: %s", r)
	}
	if !waitFor(30*time.Second, func() bool { return bytes.Contains(c.ctr(nil, "task", "ls").stdout, []byte("RUNNING")) }) {
		t.Fatalf("task ls: %s", c.ctr(nil, "task", "ls"))
	}
	if r := c.ctr(nil, "task", "ps", "box"); r.code != 0 || len(bytes.Fields(r.stdout)) < 2 {
		t.Fatalf("task ps: %s", r)
	}
	// An exec sees the init process's files: the same VM.
	r := c.ctr(nil, "task", "exec", "--exec-id", "e1", "box", "sh", "-c", "cat /tmp/state; exit 4")
	if r.code != 4 || string(r.stdout) != "started\n" {
		t.Fatalf("task exec: %s", r)
	}
	// Metrics come from the task's cgroup in the guest: its one process
	// (sleep), CPU time, and memory within the VM's 512 MiB.
	r = c.ctr(nil, "task", "metrics", "box")
	m := metricTable(r.stdout)
	t.Logf("ctr task metrics:\n%s", r.stdout)
	if r.code != 0 || m["pids.current"] != 1 || m["cpu.usage_usec"] == 0 || m["memory.usage"] == 0 || m["memory.usage_limit"] != 512<<20 {
		t.Fatalf("task metrics: %s (parsed %v)", r, m)
	}
	// An exec that spawns children is in the same cgroup while it runs.
	r = c.ctr(nil, "task", "exec", "--exec-id", "e2", "box", "sh", "-c", "cat /proc/self/cgroup; sleep 1 & sleep 1 & wait")
	if r.code != 0 || !strings.HasPrefix(string(r.stdout), "0::/ctr-") {
		t.Fatalf("the exec's cgroup: %s", r)
	}
	if r := c.ctr(nil, "task", "kill", "-s", "SIGKILL", "box"); r.code != 0 {
		t.Fatalf("task kill: %s", r)
	}
	if !waitFor(30*time.Second, func() bool { return bytes.Contains(c.ctr(nil, "task", "ls").stdout, []byte("STOPPED")) }) {
		t.Fatalf("after kill, task ls: %s", c.ctr(nil, "task", "ls"))
	}
	if r := c.ctr(nil, "task", "delete", "box"); r.code != 0 {
		t.Fatalf("task delete: %s", r)
	}
	if r := c.ctr(nil, "container", "delete", "box"); r.code != 0 {
		t.Fatalf("container delete: %s", r)
	}
	if !waitFor(10*time.Second, func() bool { return len(c.vmms()) == 0 }) {
		t.Fatalf("VMMs after delete: %v", c.vmms())
	}
	if ts, _ := filepath.Glob(filepath.Join(c.dir, "data", "templates", "*.json")); len(ts) != 0 {
		t.Errorf("templates left after delete: %v", ts)
	}
}

// TestShimMounts: a container's bind mounts reach it in the VM as runc's
// would on the node, the ways docs/kubernetes.md ("Mounts") gives: a
// read-only directory and file copied in, a writable directory shared and
// what the container changed in it written back into the node's directory
// at the task's delete; a mount the VM cannot have is refused before
// anything runs, and leaves nothing.
func TestShimMounts(t *testing.T) {
	c := startContainerd(t)
	ref := c.importImage(t)
	ro, rw := filepath.Join(c.dir, "ro"), filepath.Join(c.dir, "rw")
	for _, f := range []struct{ path, data string }{
		{filepath.Join(ro, "a"), "read-only\n"},
		{filepath.Join(c.dir, "app.conf"), "conf\n"},
		{filepath.Join(rw, "in"), "from the node\n"},
		{filepath.Join(rw, "gone"), "deleted in the VM\n"},
	} {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f.path, []byte(f.data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2",
		"--mount", "type=bind,src="+ro+",dst=/config,options=rbind:ro",
		"--mount", "type=bind,src="+filepath.Join(c.dir, "app.conf")+",dst=/etc/deep/app.conf,options=rbind:ro",
		"--mount", "type=bind,src="+rw+",dst=/work,options=rbind:rw",
		ref, "m1", "sh", "-c", "cat /config/a /etc/deep/app.conf /work/in; echo made > /work/out; rm /work/gone")
	if r.code != 0 || string(r.stdout) != "read-only\nconf\nfrom the node\n" {
		t.Fatalf("ctr run with mounts: %s", r)
	}
	if b, err := os.ReadFile(filepath.Join(rw, "out")); err != nil || string(b) != "made\n" {
		t.Fatalf("the writable mount's new file on the node: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(rw, "gone")); !os.IsNotExist(err) {
		t.Fatalf("the file the container deleted is still on the node: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(c.dir, "containerd.log")); err == nil {
		t.Log(grepLines(b, "mounts copied", "written back", "vm started"))
	}
	// A writable file mount cannot be shared: refused at the create,
	// naming it.
	r = c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2",
		"--mount", "type=bind,src="+filepath.Join(c.dir, "app.conf")+",dst=/etc/app.conf,options=rbind:rw", ref, "m2", "true")
	if r.code == 0 || !strings.Contains(string(r.stderr), "writable bind mount of the file") {
		t.Fatalf("ctr run with a writable file mount: %s", r)
	}
	_ = c.ctr(nil, "container", "delete", "m2")
	if !waitFor(10*time.Second, func() bool { return len(c.vmms()) == 0 && len(c.mounts()) == 0 }) {
		t.Fatalf("left: VMMs %v, mounts %v", c.vmms(), c.mounts())
	}
}

// metricTable parses ctr task metrics' table: "NAME  VALUE" lines.
func metricTable(out []byte) map[string]uint64 {
	m := map[string]uint64{}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 2 {
			var v uint64
			if _, err := fmt.Sscanf(f[1], "%d", &v); err == nil {
				m[f[0]] = v
			}
		}
	}
	return m
}

// TestShimOOM: a container that needs more memory than its limit (the
// VM's size) is killed by the guest's OOM killer, exits 137, and
// containerd gets the TaskOOM event, as from runc; a plain SIGKILL of
// the same task gives no such event.
func TestShimOOM(t *testing.T) {
	c := startContainerd(t)
	ref := c.importImage(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := exec.CommandContext(ctx, "ctr", "-a", c.sock, "events")
	var evs screen
	events.Stdout = &evs
	if err := events.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); _ = events.Wait() }()
	// A shell variable of 300 MB, grown as it reads, in a 128 MiB VM.
	r := c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", "--memory-limit", "134217728",
		ref, "hog", "sh", "-c", "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived ${#x}")
	if r.code != 137 {
		t.Fatalf("ctr run of a memory hog: %s, want exit 137", r)
	}
	if !waitFor(10*time.Second, func() bool { return strings.Contains(evs.String(), "/tasks/oom") }) {
		t.Fatalf("no /tasks/oom event; events:\n%s", evs.String())
	}
	before := strings.Count(evs.String(), "/tasks/oom")
	r = c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", "--memory-limit", "134217728",
		ref, "killed", "sh", "-c", "kill -9 $$")
	if r.code != 137 {
		t.Fatalf("ctr run of kill -9: %s, want exit 137", r)
	}
	if !waitFor(10*time.Second, func() bool {
		return strings.Contains(evs.String(), "/tasks/delete") && strings.Count(evs.String(), "/tasks/exit") >= 2
	}) {
		t.Fatalf("events:\n%s", evs.String())
	}
	if n := strings.Count(evs.String(), "/tasks/oom"); n != before {
		t.Fatalf("a plain SIGKILL was reported as an OOM kill; events:\n%s", evs.String())
	}
}

// TestShimTerminal: ctr run -t gives the command a terminal of the
// user's terminal's size (ctr resizes it once the task runs, through
// ResizePty), with the terminal's line discipline, and its exit code.
func TestShimTerminal(t *testing.T) {
	c := startContainerd(t)
	ref := c.importImage(t)
	p := openHostPTY(t, 30, 100)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Until the size ctr sets arrives (the task starts at 24x80).
	script := `for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do s=$(stty size); [ "$s" = "30 100" ] && break; sleep 0.25; done; echo "size $s"; tty; exit 5`
	cmd := exec.CommandContext(ctx, "ctr", "-a", c.sock, "run", "-t", "--rm", "--runtime", "io.containerd.mvm.v2", ref, "term", "sh", "-c", script)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = p.slave, p.slave, p.slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	// Byte for byte what runc's shim gives (ctr leaves the host
	// terminal's output processing on: the guest's \r\n gains a \r).
	p.expect(t, 0, "size 30 100\r\r\n/dev/pts/0\r\r\n")
	if code != 5 {
		t.Fatalf("ctr run -t: exit %d, want 5; terminal:\n%q", code, p.output())
	}
}

// TestShimKilled: a shim killed with SIGKILL takes its VM with it, and
// containerd's cleanup (the shim's delete) leaves no mount, template or
// run directory.
func TestShimKilled(t *testing.T) {
	c := startContainerd(t)
	ref := c.importImage(t)
	if r := c.ctr(nil, "run", "-d", "--runtime", "io.containerd.mvm.v2", ref, "victim", "sleep", "600"); r.code != 0 {
		t.Fatalf("ctr run -d: %s", r)
	}
	if !waitFor(30*time.Second, func() bool { return len(c.vmms()) == 1 }) {
		t.Fatalf("VMMs of the task: %v", c.vmms())
	}
	shims := pidsOf("containerd-shim-mvm-v2", "-id victim")
	if len(shims) != 1 {
		t.Fatalf("shim processes: %v", shims)
	}
	if err := syscall.Kill(shims[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !waitFor(15*time.Second, func() bool { return len(c.vmms()) == 0 }) {
		t.Fatalf("the VM outlived its shim: %v", c.vmms())
	}
	if !waitFor(30*time.Second, func() bool { return !bytes.Contains(c.ctr(nil, "task", "ls").stdout, []byte("RUNNING")) }) {
		t.Fatalf("task ls after the shim died: %s", c.ctr(nil, "task", "ls"))
	}
	_ = c.ctr(nil, "task", "delete", "victim")
	if r := c.ctr(nil, "container", "delete", "victim"); r.code != 0 {
		t.Fatalf("container delete: %s", r)
	}
	if ts, _ := filepath.Glob(filepath.Join(c.dir, "data", "templates", "*.json")); len(ts) != 0 {
		t.Errorf("templates left: %v", ts)
	}
	// The dead VM's run directory goes with containerd's cleanup of the
	// shim, once the VMM is gone.
	if !waitFor(15*time.Second, func() bool { d, _ := os.ReadDir(c.runDir); return len(d) == 0 }) {
		d, _ := os.ReadDir(c.runDir)
		t.Errorf("run directories after the cleanup: %v", d)
	}
}

// TestShimSnapshot: the first container of an image boots its VM and,
// once deleted, leaves a snapshot of the image's root (made by a healer
// that outlives the shim, from the cache: the container's mount is gone
// by then); the next container of the image restores it, with the same
// bytes and exit code, fresh (its own boot id), and nothing of the first
// container's writes in it.
func TestShimSnapshot(t *testing.T) {
	c := startContainerdWith(t, false, "MVM_NO_AUTO_SNAPSHOT=")
	// An image of its own: its root has no snapshot yet, whatever ran
	// before in this cache.
	ref := c.importMarked(t, "docker.io/library/mvmtest-snap:1", v1.Config{Env: []string{"PATH=/bin"}}, fmt.Sprintf("snap %d\n", time.Now().UnixNano()))
	logf := filepath.Join(c.dir, "containerd.log")
	script := `cat /proc/sys/kernel/random/boot_id; ls /tmp; echo left > /tmp/first; exit 7`
	first := c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", ref, "snap1", "sh", "-c", script)
	if first.code != 7 || len(bytes.Split(bytes.TrimSpace(first.stdout), []byte("\n"))) != 1 {
		t.Fatalf("first run: %s", first)
	}
	b, _ := os.ReadFile(logf)
	m := regexp.MustCompile(`container=snap1 digest=(sha256:[0-9a-f]{64})`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("the shim did not log the root's digest: %s", tail(string(b)))
	}
	healLog := filepath.Join(cacheDir, "snapshots", "heal.log")
	made := func() bool {
		b, _ := os.ReadFile(healLog)
		return bytes.Contains(b, []byte("(tree "+string(m[1])+", "))
	}
	// The healer boots and saves a VM under TCG: seconds. Its VM runs in
	// this test's run directory.
	if !waitFor(90*time.Second, func() bool { return made() && len(c.vmms()) == 0 }) {
		b, _ := os.ReadFile(healLog)
		t.Fatalf("no snapshot made after the first container (VMMs %v); heal log:\n%s", c.vmms(), tail(string(b)))
	}
	b, _ = os.ReadFile(logf)
	if !bytes.Contains(b, []byte(`container=snap1 how=booted`)) {
		t.Fatalf("the first container's VM did not boot: %s", tail(string(b)))
	}
	second := c.ctr(nil, "run", "--rm", "--runtime", "io.containerd.mvm.v2", ref, "snap2", "sh", "-c", script)
	if second.code != 7 || len(bytes.Split(bytes.TrimSpace(second.stdout), []byte("\n"))) != 1 {
		t.Fatalf("second run (the first's file must not be there): %s", second)
	}
	if bytes.Equal(first.stdout, second.stdout) {
		t.Fatalf("the restored VM has the first VM's boot id: %q", second.stdout)
	}
	b, _ = os.ReadFile(logf)
	if !bytes.Contains(b, []byte(`container=snap2 how=restored`)) {
		t.Fatalf("the second container's VM did not restore: %s", tail(string(b)))
	}
	t.Logf("first run %s (booted), second %s (restored)", first.elapsed.Round(time.Millisecond), second.elapsed.Round(time.Millisecond))
}

// pidsOf lists the processes whose command line has name and args.
func pidsOf(name, args string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		cl := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cl, name) && strings.Contains(cl, args+" ") {
			var pid int
			fmt.Sscanf(strings.TrimPrefix(p, "/proc/"), "%d", &pid)
			pids = append(pids, pid)
		}
	}
	return pids
}
