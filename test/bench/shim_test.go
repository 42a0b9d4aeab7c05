package bench

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/mvm-sh/mvm/internal/oci/ocitest"
)

// The containerd shim (docs/kubernetes.md), side by side with runc, the
// default runtime, in one containerd (Debian's 1.6) of the benchmark's
// own, alternating, medians:
//
//	(shim a) ctr run --rm IMAGE ID true, io.containerd.mvm.v2 vs runc
//	(shim b) time to the first byte of echo hi, both

func BenchmarkShimRun(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("the shim benchmark needs root (containerd)")
	}
	env := snapEnv(b)
	dir, err := os.MkdirTemp("", "ctdb-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "c.sock")
	cfg := fmt.Sprintf("version = 2\nroot = %q\nstate = %q\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = %q\n[ttrpc]\n  address = %q\n",
		filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc")
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	bin, _ := filepath.Abs(filepath.Dir(*mvmctl))
	ctd := exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	// The shims' healers on (bench_test.go turns them off for the
	// others): the first container leaves the snapshot the rest restore.
	ctd.Env = append(env, "PATH="+bin+":"+os.Getenv("PATH"), "MVM_DATA_DIR="+filepath.Join(dir, "data"), "MVM_JAILER="+filepath.Join(bin, "mvm-jailer"), "MVM_NO_AUTO_SNAPSHOT=")
	if err := ctd.Start(); err != nil {
		b.Fatalf("containerd is needed (apt-get install containerd): %v", err)
	}
	defer func() { _ = ctd.Process.Signal(syscall.SIGTERM); _ = ctd.Wait() }()
	ctr := func(args ...string) string {
		out, err := exec.Command("ctr", append([]string{"-a", sock}, args...)...).CombinedOutput()
		if err != nil {
			b.Fatalf("ctr %q: %v\n%s", args, err, out)
		}
		return string(out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for exec.Command("ctr", "-a", sock, "version").Run() != nil {
		if time.Now().After(deadline) {
			b.Fatal("containerd did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		b.Fatal(err)
	}
	layer := ocitest.Tar(ocitest.Dir("./", 0o755, 0, 0), ocitest.Dir("bin/", 0o755, 0, 0), ocitest.File("bin/busybox", string(bb), 0o755, 0, 0),
		ocitest.Symlink("bin/sh", "busybox"), ocitest.Symlink("bin/true", "busybox"), ocitest.Symlink("bin/echo", "busybox"),
		ocitest.Dir("tmp/", 0o1777, 0, 0))
	img := ocitest.Image(v1.Config{Env: []string{"PATH=/bin"}}, "amd64", ocitest.Layer(layer, compression.GZip))
	archive := filepath.Join(dir, "img.tar")
	const ref = "docker.io/library/mvmbench:1"
	if err := ocitest.WriteDockerArchive(archive, img, ref); err != nil {
		b.Fatal(err)
	}
	ctr("image", "import", archive)

	n := 0
	run := func(runtime string, args ...string) time.Duration {
		n++
		a := []string{"run", "--rm"}
		if runtime != "" {
			a = append(a, "--runtime", runtime)
		}
		start := time.Now()
		ctr(append(append(a, ref, fmt.Sprintf("b%d", n)), args...)...)
		return time.Since(start)
	}
	first := func(runtime string) time.Duration {
		n++
		a := []string{"-a", sock, "run", "--rm"}
		if runtime != "" {
			a = append(a, "--runtime", runtime)
		}
		cmd := exec.Command("ctr", append(a, ref, fmt.Sprintf("b%d", n), "echo", "hi")...)
		out, _ := cmd.StdoutPipe()
		start := time.Now()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		rd := bufio.NewReader(out)
		if _, err := rd.ReadByte(); err != nil {
			b.Fatalf("no output from %s: %v", runtime, err)
		}
		d := time.Since(start)
		_, _ = rd.ReadString(0)
		if err := cmd.Wait(); err != nil {
			b.Fatal(err)
		}
		return d
	}
	const mvmRT = "io.containerd.mvm.v2"
	// The first container of the image boots (its cache is new); its
	// delete leaves a healer making the snapshot of the image's root,
	// which every later container restores.
	cold := run(mvmRT, "true")
	var healLog string
	for _, kv := range env {
		if c, ok := strings.CutPrefix(kv, "MVM_CACHE_DIR="); ok {
			healLog = filepath.Join(c, "snapshots", "heal.log")
		}
	}
	deadline = time.Now().Add(2 * time.Minute)
	for {
		if l, _ := os.ReadFile(healLog); strings.Contains(string(l), "made ") {
			break
		}
		if time.Now().After(deadline) {
			l, _ := os.ReadFile(healLog)
			b.Fatalf("no snapshot of the image's root after the first container: %s", l)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second) // the healer's VM and its exit
	run("", "true")
	var shimT, runcT, shimF, runcF []time.Duration
	for i := 0; i < *rounds; i++ {
		shimT = append(shimT, run(mvmRT, "true"))
		runcT = append(runcT, run("", "true"))
		shimF = append(shimF, first(mvmRT))
		runcF = append(runcF, first(""))
	}
	ms, mr, fs, fr := median(shimT), median(runcT), median(shimF), median(runcF)
	fmt.Printf("(shim a) %d rounds: ctr run --rm true with io.containerd.mvm.v2 %s, with runc %s: %.2fx\n",
		*rounds, ms.Round(time.Millisecond), mr.Round(time.Millisecond), float64(ms)/float64(mr))
	fmt.Printf("(shim b) first byte of echo hi: mvm %s, runc %s: %.2fx\n", fs.Round(time.Millisecond), fr.Round(time.Millisecond), float64(fs)/float64(fr))
	fmt.Printf("(shim c) the image's first container (booted, no snapshot yet): %s, %.2fx the restored ones\n", cold.Round(time.Millisecond), float64(cold)/float64(ms))
	if left := strings.TrimSpace(ctr("container", "ls", "-q")); left != "" {
		b.Errorf("containers left: %s", left)
	}
	b.ReportMetric(float64(ms.Milliseconds()), "ms/shim")
	b.ReportMetric(float64(mr.Milliseconds()), "ms/runc")
	b.ReportMetric(float64(ms)/float64(mr), "x-runc")
}
