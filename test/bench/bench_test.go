// Package bench measures mvm against bare baselines, side by side in one
// run, and prints the ratios. Run with `make bench` (it needs the default
// image: `make bootstrap`). Targets:
//
//	(a) mvmctl exec -- true   <= 1.10x a bare QEMU boot of the same kernel
//	                             and initramfs whose init reboots at once
//	(b) stdout through exec   >= 0.80x the raw virtio-serial channel's
//	                             throughput in the same VM
//	(c) host memory of QEMU + mvmctl beyond guest RAM (reported)
package bench

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/xdg"
)

var (
	mvmctl = flag.String("mvmctl", "../../bin/mvmctl", "mvmctl binary")
	rounds = flag.Int("rounds", 10, "measurements per side in (a)")
)

// Runs here leave no snapshots behind by themselves (a heal in the
// background would load the CPUs the next measurement uses); the heal's
// own benchmark turns it on for its runs.
func init() { os.Setenv("MVM_NO_AUTO_SNAPSHOT", "1") }

func defaultImage(b *testing.B) image.Image {
	b.Helper()
	cache, err := xdg.CacheDir()
	if err != nil {
		b.Fatal(err)
	}
	img, err := image.Store{Root: cache}.Load(image.DefaultName)
	if err != nil {
		b.Fatal(err)
	}
	return img
}

func accelChoice(b *testing.B) accel.Mode {
	c, err := accel.Host{}.Resolve(accel.Auto)
	if err != nil {
		b.Fatal(err)
	}
	return c.Kind
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// bareArgs is a QEMU command line for the same VM mvmctl boots: machine,
// accelerator, memory, vCPUs, kernel, initramfs, kernel arguments and
// devices (the virtio-serial port, backed by nothing), but whose init is
// busybox rebooting at once (the guest's way to power off: reboot=t plus
// -no-reboot). What mvmctl takes beyond it is the cost of mvmctl and the
// agent. With withDevice false the VM has no virtio device at all, which
// also shows what probing the agent's port costs the kernel.
func bareArgs(img image.Image, a accel.Mode, console string, withDevice bool) []string {
	kargs := "console=ttyS0 quiet 8250.nr_uarts=1 reboot=t panic=-1 random.trust_cpu=on mitigations=off"
	cpu := "host"
	if a == accel.TCG {
		// mvm's own kernel and CPU under TCG (internal/backend/qemu).
		kargs += " tsc=reliable lapic_timer_hz=1000000000"
		cpu = qemu.TCGCPU
	}
	args := []string{
		"-M", "microvm,acpi=off", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", string(a), "-cpu", cpu, "-smp", strconv.Itoa(mvm.DefaultCPUs),
		"-m", strconv.Itoa(mvm.DefaultMemory>>20) + "M",
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", img.Kernel, "-initrd", img.Initrd,
		"-append", kargs + " rdinit=/bin/busybox -- reboot -f",
		"-chardev", "file,id=console,path=" + console, "-serial", "chardev:console",
	}
	if withDevice {
		args = append(args,
			"-device", "virtio-serial-device,id=vser0",
			"-chardev", "null,id=agent",
			"-device", "virtserialport,bus=vser0.0,chardev=agent,name=org.mvm.agent.0")
	}
	return args
}

// BenchmarkColdExec is (a).
func BenchmarkColdExec(b *testing.B) {
	img := defaultImage(b)
	a := accelChoice(b)
	qemuBin, err := qemu.FindBinary()
	if err != nil {
		b.Fatal(err)
	}
	console := filepath.Join(b.TempDir(), "console.log")
	var ours, bare, noDev []time.Duration
	boot := func(withDevice bool) time.Duration {
		start := time.Now()
		if out, err := exec.Command(qemuBin, bareArgs(img, a, console, withDevice)...).CombinedOutput(); err != nil {
			b.Fatalf("bare boot: %v\n%s", err, out)
		}
		return time.Since(start)
	}
	for i := 0; i < *rounds; i++ {
		bare = append(bare, boot(true))
		noDev = append(noDev, boot(false))

		start := time.Now()
		// Cold: a boot against a boot (snapshot restore is (snap a)).
		if out, err := exec.Command(*mvmctl, "exec", "--no-snapshot", "--", "true").CombinedOutput(); err != nil {
			b.Fatalf("mvmctl exec --no-snapshot -- true: %v\n%s", err, out)
		}
		ours = append(ours, time.Since(start))
	}
	mo, mb := median(ours), median(bare)
	ratio := float64(mo) / float64(mb)
	fmt.Printf("(a) cold exec, %s, %d rounds: mvmctl exec --no-snapshot -- true median %s (min %s); bare QEMU boot of the same VM median %s (min %s); ratio %.3fx (target <= 1.10x); bare boot without the virtio-serial device %s (ratio %.3fx)\n",
		a, *rounds, mo.Round(time.Millisecond), slices.Min(ours).Round(time.Millisecond), mb.Round(time.Millisecond), slices.Min(bare).Round(time.Millisecond), ratio,
		median(noDev).Round(time.Millisecond), float64(mo)/float64(median(noDev)))
	b.ReportMetric(float64(mo.Milliseconds()), "ms/exec")
	b.ReportMetric(float64(mb.Milliseconds()), "ms/bare")
	b.ReportMetric(ratio, "x-bare")
}

// countWriter counts bytes and remembers when the first and last arrived.
type countWriter struct {
	n           int64
	first, last time.Time
}

func (w *countWriter) Write(p []byte) (int, error) {
	now := time.Now()
	if w.n == 0 {
		w.first = now
	}
	w.n += int64(len(p))
	w.last = now
	return len(p), nil
}

func (w *countWriter) rate() float64 {
	return float64(w.n) / (1 << 20) / w.last.Sub(w.first).Seconds()
}

const benchPort = "org.mvm.bench.0"

// BenchmarkStdoutThroughput is (b): in one VM, the same guest command
// writes the same bytes to stdout through the agent protocol, and straight
// into a second virtio-serial port read raw by the host; rounds alternate
// and medians are compared. For reference it also measures the raw port
// fed through a pipe and cat, i.e. the cost of the one pipe every command's
// stdout needs.
func BenchmarkStdoutThroughput(b *testing.B) {
	const size = 128 << 20
	img := defaultImage(b)
	// As root the backend confines QEMU with mvm-jailer, which is beside
	// mvmctl, not beside this test binary.
	jailer, err := filepath.Abs(filepath.Join(filepath.Dir(*mvmctl), "mvm-jailer"))
	if err != nil {
		b.Fatal(err)
	}
	b.Setenv("MVM_JAILER", jailer)
	m, err := qemu.New(nil).Start(context.Background(), backend.Config{
		Name: "bench", RunDir: b.TempDir(), Kernel: img.Kernel, Initrd: img.Initrd,
		CPUs: mvm.DefaultCPUs, MemoryMiB: mvm.DefaultMemory >> 20, Accel: accelChoice(b),
		RawPorts: []string{benchPort},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Stop(context.Background())
	conn, err := m.DialAgent(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	c, err := agentclient.Dial(conn)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	run := func(argv []string, stdout io.Writer) {
		b.Helper()
		var stderr bytes.Buffer
		p, err := c.Exec(ctx, agentclient.ExecSpec{Argv: argv, Stdout: stdout, Stderr: &stderr})
		if err != nil {
			b.Fatal(err)
		}
		st, err := p.Wait(ctx)
		if err != nil || st.Code != 0 || st.StartFailure != nil {
			b.Fatalf("%q: %+v %v %s", argv, st, err, stderr.String())
		}
	}
	raw, _ := m.(backend.RawPorter).RawPort(benchPort)
	viaRaw := func(script string) float64 {
		var w countWriter
		done := make(chan error, 1)
		go func() {
			_, err := io.CopyN(&w, raw, size)
			done <- err
		}()
		run([]string{"sh", "-c", script}, io.Discard)
		if err := <-done; err != nil {
			b.Fatalf("raw port: %v after %d bytes", err, w.n)
		}
		return w.rate()
	}
	// dd with 64 KiB blocks: busybox head writes in small pieces and
	// would measure its own syscall rate under emulation, not the channel.
	gen := fmt.Sprintf("dd if=/dev/zero bs=65536 count=%d 2>/dev/null", size/65536)
	port := "/dev/virtio-ports/" + benchPort
	run([]string{"sh", "-c", "dd if=/dev/zero bs=65536 count=64 2>/dev/null"}, io.Discard) // warm-up

	var protoRates, rawRates, pipeRates []float64
	for i := 0; i < 3; i++ {
		var w countWriter
		run([]string{"sh", "-c", gen}, &w)
		if w.n != size {
			b.Fatalf("stdout moved %d bytes, want %d", w.n, size)
		}
		protoRates = append(protoRates, w.rate())
		rawRates = append(rawRates, viaRaw(gen+" > "+port))
		pipeRates = append(pipeRates, viaRaw(gen+" | cat > "+port))
	}
	p, r, pp := medianF(protoRates), medianF(rawRates), medianF(pipeRates)
	fmt.Printf("(b) stdout throughput, %d MiB x3 (medians): agent protocol %.0f MiB/s; raw virtio-serial port %.0f MiB/s; ratio %.2fx (target >= 0.80x); raw port behind a pipe and cat %.0f MiB/s (%.2fx)\n",
		size>>20, p, r, p/r, pp, pp/r)
	b.ReportMetric(p, "MiB/s-exec")
	b.ReportMetric(r, "MiB/s-raw")
	b.ReportMetric(p/r, "x-raw")

	var rtts []time.Duration
	for i := 0; i < 200; i++ {
		d, err := c.Ping(ctx)
		if err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, d)
	}
	fmt.Printf("    ping round trip: median %s, min %s (200 pings)\n", median(rtts), slices.Min(rtts))
}

func medianF(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkEndToEndStdout is (b) as a user sees it: bytes per second on
// mvmctl's own stdout, first byte to last.
func BenchmarkEndToEndStdout(b *testing.B) {
	const size = 256 << 20
	cmd := exec.Command(*mvmctl, "exec", "--", "dd", "if=/dev/zero", "bs=65536", "count="+strconv.Itoa(size/65536))
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var w countWriter
	if _, err := io.Copy(&w, out); err != nil {
		b.Fatal(err)
	}
	if err := cmd.Wait(); err != nil || w.n != size {
		b.Fatalf("%v, %d bytes", err, w.n)
	}
	fmt.Printf("    mvmctl exec stdout (pipe to the benchmark): %.0f MiB/s\n", w.rate())
	b.ReportMetric(w.rate(), "MiB/s")
}

// BenchmarkHostMemory is (c): QEMU's resident memory outside the guest RAM
// mapping, plus mvmctl's own, while a command runs.
func BenchmarkHostMemory(b *testing.B) {
	runDir := b.TempDir()
	cmd := exec.Command(*mvmctl, "exec", "--", "sh", "-c", "echo ready; sleep 30")
	cmd.Env = append(os.Environ(), "MVM_RUN_DIR="+runDir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		b.Fatalf("got %q", line)
	}
	time.Sleep(time.Second)
	qpid := findVMM(b, runDir)
	total, guest, private := qemuRSS(b, qpid, mvm.DefaultMemory)
	self := vmRSS(b, cmd.Process.Pid)
	fmt.Printf("(c) host memory with a %d MiB guest: QEMU RSS %.1f MiB, of which guest RAM %.1f MiB; QEMU beyond guest RAM %.1f MiB (%.1f MiB of it private to this VM, the rest shared page cache: QEMU's binary, kernel, initramfs); mvmctl %.1f MiB; total beyond guest RAM %.1f MiB\n",
		mvm.DefaultMemory>>20, mib(total), mib(guest), mib(total-guest), mib(private-guest), mib(self), mib(total-guest+self))
	b.ReportMetric(mib(total-guest+self), "MiB-overhead")
	b.ReportMetric(mib(private-guest+self), "MiB-private-overhead")
}

func mib(kb int64) float64 { return float64(kb) / 1024 }

func findVMM(b *testing.B, runDir string) int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if c, err := os.ReadFile(p); err == nil && bytes.Contains(c, []byte(runDir+"/")) {
			pid, _ := strconv.Atoi(strings.Split(p, "/")[2])
			return pid
		}
	}
	b.Fatal("VMM not found")
	return 0
}

// qemuRSS returns QEMU's total RSS, the RSS of the guest RAM mapping (the
// anonymous mapping of exactly the guest's size) and QEMU's private
// (unshared) resident memory, in KiB.
func qemuRSS(b *testing.B, pid int, guestBytes int64) (total, guest, private int64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var size int64
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		switch fields[0] {
		case "Size:":
			size, _ = strconv.ParseInt(fields[1], 10, 64)
		case "Rss:":
			rss, _ := strconv.ParseInt(fields[1], 10, 64)
			total += rss
			if size*1024 == guestBytes {
				guest += rss
			}
		case "Private_Clean:", "Private_Dirty:":
			n, _ := strconv.ParseInt(fields[1], 10, 64)
			private += n
		}
	}
	return total, guest, private
}

func vmRSS(b *testing.B, pid int) int64 {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return n
		}
	}
	return 0
}
