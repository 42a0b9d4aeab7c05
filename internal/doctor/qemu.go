package doctor

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/image"
)

// What mvm's QEMU command line uses (internal/backend/qemu): the machine,
// the devices, and the options that confine the VMM.
var (
	wantDevices = []string{"virtio-serial-device", "virtserialport", "virtio-blk-device"}
	// sandboxOpts are the seccomp options a run passes.
	sandboxOpts = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
)

// probeResult is the output of one QEMU invocation.
type probeResult struct {
	out string
	err error
}

// qemuFacts are QEMU's answers to the probes.
type qemuFacts struct {
	version  probeResult // -version
	machines probeResult // -M help
	microvm  probeResult // -M microvm,help
	devices  probeResult // -device help
	accels   probeResult // -accel help
	help     probeResult // -help
	sandbox  probeResult // an empty machine under -sandbox on, quit at once
	// dry is the default image loaded into mvm's machine with its CPUs
	// stopped, then quit; dryRan says whether it was tried.
	dry    probeResult
	dryRan bool
}

// probeOutputLimit bounds what is kept of a probe's output (-device help
// prints about 40 KiB).
const probeOutputLimit = 1 << 20

// runProbe runs QEMU with args, stdin as its input, bounded by timeout.
func runProbe(ctx context.Context, timeout time.Duration, bin, stdin string, args ...string) probeResult {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out boundedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	text := out.String()
	switch {
	case ctx.Err() == context.DeadlineExceeded:
		err = fmt.Errorf("no answer within %s", timeout)
	case err != nil:
		if last := lastLine(text); last != "" {
			err = fmt.Errorf("%w: %s", err, last)
		}
	}
	return probeResult{out: text, err: err}
}

type boundedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *boundedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if room := probeOutputLimit - w.b.Len(); room > 0 {
		w.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (w *boundedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// lastLine is the last non-empty line of s, made printable and short
// enough for a one-line finding.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	l := strings.TrimSpace(lines[len(lines)-1])
	l = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r <= 0x9f) {
			return -1
		}
		return r
	}, l)
	if len(l) > 200 {
		l = l[:200] + "..."
	}
	return l
}

// probeQEMU asks QEMU, concurrently, what it supports.
func probeQEMU(ctx context.Context, bin string, timeout time.Duration) qemuFacts {
	var q qemuFacts
	probes := []struct {
		dst   *probeResult
		stdin string
		args  []string
	}{
		{&q.version, "", []string{"-version"}},
		{&q.machines, "", []string{"-M", "help"}},
		{&q.microvm, "", []string{"-M", "microvm,help"}},
		{&q.devices, "", []string{"-device", "help"}},
		{&q.accels, "", []string{"-accel", "help"}},
		{&q.help, "", []string{"-help"}},
		// An empty machine under the same seccomp filter a run gets,
		// ended by the monitor's quit: QEMU built without seccomp, or a
		// kernel without it, fails here as a run would.
		{&q.sandbox, "quit\n", []string{"-M", "none", "-nodefaults", "-no-user-config", "-display", "none",
			"-sandbox", sandboxOpts, "-monitor", "stdio"}},
	}
	var wg sync.WaitGroup
	for _, p := range probes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			*p.dst = runProbe(ctx, timeout, bin, p.stdin, p.args...)
		}()
	}
	wg.Wait()
	return q
}

// dryStart loads img into the machine mvm boots (microvm, the agent's
// virtio-serial port, the accelerator a run would use) with its CPUs
// stopped, and quits: QEMU parses the kernel's PVH entry and loads the
// initramfs, and KVM creates a VM, without running a guest instruction.
func dryStart(ctx context.Context, bin string, timeout time.Duration, img image.Image, kind accel.Mode) probeResult {
	cpu := "max"
	if kind == accel.KVM {
		cpu = "host"
	}
	return runProbe(ctx, timeout, bin, "quit\n",
		"-M", "microvm,acpi=off", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-accel", string(kind), "-cpu", cpu, "-smp", "1", "-m", "256M",
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", "console=ttyS0",
		"-device", "virtio-serial-device,id=vser0",
		"-chardev", "null,id=agent",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=org.mvm.agent.0",
		"-S", "-monitor", "stdio")
}

var versionRE = regexp.MustCompile(`QEMU emulator version (\d+\.\d+(?:\.\d+)?)`)

func parseVersion(out string) string {
	if m := versionRE.FindStringSubmatch(out); m != nil {
		return m[1]
	}
	return ""
}

// firstWords returns the first word of every line of a help listing,
// skipping its header lines (those that end with ':').
func firstWords(out string) []string {
	var words []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasSuffix(l, ":") {
			continue
		}
		words = append(words, strings.Fields(l)[0])
	}
	return words
}

var deviceRE = regexp.MustCompile(`(?m)^name "([^"]+)"`)

func parseDevices(out string) []string {
	var names []string
	for _, m := range deviceRE.FindAllStringSubmatch(out, -1) {
		names = append(names, m[1])
	}
	return names
}

// hasOption reports whether QEMU's -help lists the option.
func hasOption(help, opt string) bool {
	sc := bufio.NewScanner(strings.NewReader(help))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 && f[0] == opt {
			return true
		}
	}
	return false
}

// installQEMU is the fix for a missing or unfit QEMU: Debian's, unless
// MVM_QEMU chose another.
func (h *Host) installQEMU() string {
	if h.QEMUFromEnv {
		return "unset MVM_QEMU"
	}
	return h.install("qemu-system-x86")
}

func checkQEMU(h *Host, f *facts) Result {
	r := Result{ID: "qemu"}
	if h.QEMU == "" {
		r.Status, r.Fix = Fail, h.installQEMU()
		r.Message = "qemu-system-x86_64 not found in PATH"
		if h.QEMUErr != nil {
			r.Message = h.QEMUErr.Error()
		}
		return r
	}
	v := f.qemu.version
	if v.err != nil {
		r.Status, r.Fix = Fail, h.installQEMU()
		r.Message = fmt.Sprintf("%s -version fails: %v", h.QEMU, v.err)
		return r
	}
	ver := parseVersion(v.out)
	if ver == "" {
		r.Status, r.Fix = Fail, h.installQEMU()
		r.Message = fmt.Sprintf("%s does not say it is QEMU (-version printed %q)", h.QEMU, lastLine(v.out))
		return r
	}
	r.Status, r.Message = OK, fmt.Sprintf("QEMU %s at %s", ver, h.QEMU)
	return r
}

// qemuRuns reports whether QEMU answered -version, which every other QEMU
// check needs.
func qemuRuns(h *Host, f *facts) bool {
	return h.QEMU != "" && f.qemu.version.err == nil && parseVersion(f.qemu.version.out) != ""
}

func checkQEMUFeatures(h *Host, f *facts) Result {
	r := Result{ID: "qemu-features"}
	if !qemuRuns(h, f) {
		r.Status, r.Message = Skip, "not checked: no working QEMU"
		return r
	}
	q := f.qemu
	var missing []string
	if q.machines.err != nil || !slices.Contains(firstWords(q.machines.out), "microvm") {
		missing = append(missing, "the microvm machine")
	} else if q.microvm.err != nil || !strings.Contains(q.microvm.out, "acpi=") {
		missing = append(missing, "microvm's acpi option")
	}
	devices := parseDevices(q.devices.out)
	for _, d := range wantDevices {
		if !slices.Contains(devices, d) {
			missing = append(missing, d)
		}
	}
	accels := firstWords(q.accels.out)
	if !slices.Contains(accels, "tcg") {
		missing = append(missing, "the tcg accelerator")
	}
	if f.accelErr == nil && f.accel.Kind == accel.KVM && !slices.Contains(accels, "kvm") {
		missing = append(missing, "the kvm accelerator")
	}
	if len(missing) > 0 {
		r.Status, r.Fix = Fail, h.installQEMU()
		r.Message = "this QEMU lacks what mvm uses: " + strings.Join(missing, ", ")
		return r
	}
	var have []string
	for _, a := range []string{"tcg", "kvm"} {
		if slices.Contains(accels, a) {
			have = append(have, a)
		}
	}
	r.Status = OK
	r.Message = "microvm machine, " + strings.Join(wantDevices, ", ") + "; accelerators: " + strings.Join(have, ", ")
	return r
}

func checkQEMUSandbox(h *Host, f *facts) Result {
	r := Result{ID: "qemu-sandbox"}
	switch {
	case !qemuRuns(h, f):
		r.Status, r.Message = Skip, "not checked: no working QEMU"
	case f.qemu.help.err == nil && !hasOption(f.qemu.help.out, "-sandbox"):
		r.Status, r.Fix = Fail, h.installQEMU()
		r.Message = "this QEMU was built without seccomp (no -sandbox option); mvm runs every VMM under it"
	case f.qemu.sandbox.err != nil:
		r.Status, r.Fix = Fail, h.installQEMU()
		r.Message = fmt.Sprintf("QEMU cannot start under its seccomp sandbox (-sandbox %s): %v", sandboxOpts, f.qemu.sandbox.err)
	default:
		r.Status, r.Message = OK, "QEMU starts under its seccomp sandbox"
	}
	return r
}

func checkQEMUConfine(h *Host, f *facts) Result {
	r := Result{ID: "qemu-confine"}
	switch {
	case h.Euid != 0:
		r.Status, r.Message = Skip, "not root: QEMU runs as you, and there is no other user to drop to"
	case !qemuRuns(h, f):
		r.Status, r.Message = Skip, "not checked: no working QEMU"
	case f.qemu.help.err != nil:
		r.Status, r.Message = Fail, fmt.Sprintf("%s -help fails: %v", h.QEMU, f.qemu.help.err)
	case !hasOption(f.qemu.help.out, "-runas") || !hasOption(f.qemu.help.out, "-chroot"):
		r.Status = Fail
		r.Message = "this QEMU has no -runas or -chroot, which mvm uses as root to drop the VMM to a per-run uid in a chroot; run mvmctl as a regular user, or use a QEMU that has them (7.2 is tested)"
	default:
		r.Status, r.Message = OK, "QEMU can drop to a per-run uid in a chroot (-runas, -chroot)"
	}
	return r
}

func checkJailer(h *Host, _ *facts) Result {
	r := Result{ID: "jailer"}
	if h.Euid != 0 {
		r.Status, r.Message = Skip, "not root: mvm-jailer confines QEMU only when mvm runs as root"
		return r
	}
	if h.JailerErr != nil {
		r.Status, r.Message, r.Fix = Fail, h.JailerErr.Error(), "make build"
		return r
	}
	fi, err := os.Stat(h.Jailer)
	switch {
	case err != nil:
		r.Status, r.Message, r.Fix = Fail, fmt.Sprintf("mvm-jailer: %v", err), "make build"
	case !fi.Mode().IsRegular() || fi.Mode().Perm()&0o100 == 0:
		r.Status, r.Message, r.Fix = Fail, fmt.Sprintf("mvm-jailer at %s is not an executable file", h.Jailer), "chmod 0755 "+h.Jailer
	case fi.Mode().Perm()&0o022 != 0:
		r.Status = Warn
		r.Message = fmt.Sprintf("mvm-jailer at %s (mode %04o) is writable by other users, and root runs it", h.Jailer, fi.Mode().Perm())
		r.Fix = "chmod go-w " + h.Jailer
	default:
		r.Status, r.Message = OK, "mvm-jailer at "+h.Jailer
	}
	return r
}
