package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/backend"
)

// baseKernelArgs are the guest kernel arguments every machine gets.
//   - console=ttyS0 8250.nr_uarts=1: one UART, the log file.
//   - quiet: the serial console is slow; kernel chatter costs boot time.
//   - reboot=t panic=-1: a guest reboot (how the agent powers off) or a
//     panic ends the VMM at once, since it runs with -no-reboot.
//   - random.trust_cpu=on: RDRAND seeds the CRNG, so getrandom() never
//     blocks at boot.
//   - mitigations=off: the guest is a single-tenant throwaway; the VMM is
//     the boundary.
var baseKernelArgs = []string{
	"console=ttyS0", "quiet", "8250.nr_uarts=1", "reboot=t", "panic=-1",
	"random.trust_cpu=on", "mitigations=off",
}

// tcgKernelArgs are added under TCG only. Without ACPI there is no PM timer
// and the LAPIC timer would be calibrated against jiffies, which costs about
// a quarter of a second emulated; noapictimer keeps the PIT as the clock
// event device. Under KVM the calibration is free (kvmclock, TSC deadline).
var tcgKernelArgs = []string{"noapictimer"}

// argsConfig is everything the command line depends on; building it is a
// pure function so it can be checked against golden files.
type argsConfig struct {
	cfg      backend.Config
	console  string // console log path
	agentFD  int    // connected socket for the agent port
	qmpFD    int    // connected socket for QMP
	rawFDs   []int  // one per cfg.RawPorts, same order
	sandbox  bool   // QEMU seccomp sandbox available
	extraArg []string
}

// buildArgs returns QEMU's arguments (without argv[0]).
func buildArgs(a argsConfig) ([]string, error) {
	c := a.cfg
	if c.CPUs < 1 {
		return nil, fmt.Errorf("cpus must be at least 1, got %d", c.CPUs)
	}
	if c.MemoryMiB < 1 {
		return nil, fmt.Errorf("memory must be at least 1 MiB, got %d", c.MemoryMiB)
	}
	if len(a.rawFDs) != len(c.RawPorts) {
		return nil, fmt.Errorf("%d raw ports but %d descriptors", len(c.RawPorts), len(a.rawFDs))
	}
	kargs := append([]string(nil), baseKernelArgs...)
	var accelArgs []string
	switch c.Accel {
	case accel.KVM:
		accelArgs = []string{"-accel", "kvm", "-cpu", "host"}
	case accel.TCG:
		accelArgs = []string{"-accel", "tcg", "-cpu", "max"}
		kargs = append(kargs, tcgKernelArgs...)
	default:
		return nil, fmt.Errorf("accelerator must be kvm or tcg, got %q", c.Accel)
	}
	for _, k := range c.KernelArgs {
		if strings.ContainsAny(k, " \t\n") {
			return nil, fmt.Errorf("kernel argument %q contains whitespace", k)
		}
	}
	kargs = append(kargs, c.KernelArgs...)

	args := []string{
		"-name", qemuOptValue(c.Name),
		// microvm: no PCI, no ACPI, no firmware tables to build or parse.
		"-M", "microvm,acpi=off",
		"-nodefaults", "-no-user-config", "-display", "none",
		// A guest reboot is how the guest powers off.
		"-no-reboot",
	}
	args = append(args, accelArgs...)
	args = append(args,
		"-smp", strconv.Itoa(c.CPUs),
		"-m", strconv.FormatUint(c.MemoryMiB, 10)+"M",
		// Modern (virtio 1.0) MMIO transport: fewer exits than legacy.
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", c.Kernel,
		"-append", strings.Join(kargs, " "),
		"-chardev", "file,id=console,path="+qemuOptValue(a.console),
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,fd="+strconv.Itoa(a.qmpFD),
		"-mon", "chardev=qmp,mode=control",
	)
	if c.Initrd != "" {
		args = append(args, "-initrd", c.Initrd)
	}
	// One virtio-serial controller carries the agent port and any raw ports.
	args = append(args,
		"-device", "virtio-serial-device,id=vser0",
		"-chardev", "socket,id=agent,fd="+strconv.Itoa(a.agentFD),
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+agentPortName,
	)
	for i, name := range c.RawPorts {
		id := "raw" + strconv.Itoa(i)
		args = append(args,
			"-chardev", "socket,id="+id+",fd="+strconv.Itoa(a.rawFDs[i]),
			"-device", "virtserialport,bus=vser0.0,chardev="+id+",name="+qemuOptValue(name),
		)
	}
	for i, d := range c.Drives {
		if len(d.ID) > 20 || strings.ContainsAny(d.ID, ",= ") {
			return nil, fmt.Errorf("drive id %q: at most 20 characters, no ',', '=' or spaces", d.ID)
		}
		id := "drive" + strconv.Itoa(i)
		opts := "file=" + qemuOptValue(d.Path) + ",if=none,id=" + id + ",format=raw,cache=unsafe,discard=unmap"
		if d.ReadOnly {
			opts += ",readonly=on"
		}
		args = append(args,
			"-drive", opts,
			"-device", "virtio-blk-device,drive="+id+",serial="+d.ID,
		)
	}
	if a.sandbox {
		// QEMU's own seccomp filter: the VMM runs untrusted guests, so
		// take away what it never needs.
		args = append(args, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	}
	return append(args, a.extraArg...), nil
}

// qemuOptValue escapes a value for QEMU's comma-separated option syntax,
// where a literal comma is written twice.
func qemuOptValue(s string) string {
	return strings.ReplaceAll(s, ",", ",,")
}
