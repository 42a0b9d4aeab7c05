package qemu

import (
	"fmt"
	"net"
	"path/filepath"
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

// tcgKernelArgs are added under TCG for mvm's own kernel. Without ACPI
// there is no PM timer or HPET, and calibrating the LAPIC timer against
// jiffies costs about a quarter of a second emulated; QEMU's APIC timer
// counts at a fixed 1 GHz (its APIC_BUS_CYCLE_NS), which
// lapic_timer_hz= (a patch mvm's kernel carries, see
// internal/kernel/patches) tells the kernel instead. The LAPIC timer is
// then a working one-shot clock event device and, with the TSC trusted
// (tsc=reliable: under TCG every vCPU reads the host's TSC, so they are in
// step, but the guest sees no invariant-TSC flag and would fall back to
// 10 ms jiffies), high-resolution timers work from the first command on:
// sleeps and timeouts of a millisecond take a millisecond, not ten. Under
// KVM the guest has kvm-clock and the TSC-deadline timer and needs none
// of this.
var tcgKernelArgs = []string{"tsc=reliable", "lapic_timer_hz=1000000000"}

// TCGCPU is the emulated CPU: every feature TCG has, less ERMS and FSRM.
// With ERMS the guest kernel copies and clears memory with "rep movsb" and
// "rep stosb", and Go's memmove takes the same path for large copies. TCG
// runs a rep string instruction one iteration at a time, so a byte-wise
// rep is eight times the iterations of the "rep movsq" the kernel uses
// without it: measured, a command's stdout through the agent went from
// 101 to 173-231 MiB/s and the raw port from 268 to 743-919 MiB/s, and a
// cold boot from 855 to 804 ms (docs/performance.md).
const TCGCPU = "max,-erms,-fsrm"

// tcgForeignKernelArgs are added under TCG for a kernel brought with
// --kernel, which cannot be told the APIC's rate: noapictimer keeps the
// PIT as the clock event device (timers have jiffy resolution) rather
// than spend the calibration's quarter second on every boot.
var tcgForeignKernelArgs = []string{"noapictimer"}

// argsConfig is everything the command line depends on; building it is a
// pure function so it can be checked against golden files.
type argsConfig struct {
	cfg       backend.Config
	agentFD   int   // connected socket for the agent port
	qmpFD     int   // connected socket for QMP
	consoleFD int   // connected socket for the serial console
	rawFDs    []int // one per cfg.RawPorts, same order
	nicFD     int   // the network card's socket, with cfg.NIC
	// driveFDs are, per drive, descriptors of its image: read-only, and
	// read-write unless the drive is read-only. QEMU takes its images from
	// these (an fdset) rather than by path: a chrooted VMM cannot open the
	// path, and QEMU reopens images when their permissions change (when a
	// migration ends, say), which it then does by duplicating one of them.
	driveFDs [][]int
	sandbox  bool // QEMU seccomp sandbox available
	// runAs ("uid:gid") and chroot confine the VMM once it has opened
	// its files (as root only).
	runAs, chroot string
	// ramReadOnly restores with the RAM file opened read-only (QEMU 8.2
	// and later: readonly=on,rom=off); see snapshotRAMReadOnly.
	ramReadOnly bool
	// tscKHz, when not zero, is the host TSC's rate, which under TCG is
	// the guest's (internal/hostclock): the guest kernel is told it
	// (tsc_early_khz=) rather than calibrate it against the emulated PIT,
	// which fails on a busy host and leaves the VM on 10 ms jiffies.
	tscKHz uint64
}

// Snapshot files in Snapshot.Dir.
const (
	snapshotRAM   = "ram"
	snapshotState = "state"
	// snapshotRAMReadOnly marks a snapshot saved by a QEMU that can map
	// a read-only RAM file copy-on-write (memory-backend-file's "rom"
	// property, QEMU 8.2): its restores then open the RAM file read-only,
	// so not even a VMM the guest took over can write it. Older QEMU
	// opens it read-write, whatever the mapping.
	snapshotRAMReadOnly = "ram-readonly"
)

// agentPortID is the agent port's device id, which QMP's VSERPORT_CHANGE
// events name.
const agentPortID = "agentport"

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
		accelArgs = []string{"-accel", "tcg", "-cpu", TCGCPU}
		if c.ForeignKernel {
			kargs = append(kargs, tcgForeignKernelArgs...)
		} else {
			kargs = append(kargs, tcgKernelArgs...)
			if a.tscKHz != 0 {
				kargs = append(kargs, "tsc_early_khz="+strconv.FormatUint(a.tscKHz, 10))
			}
		}
	default:
		return nil, fmt.Errorf("accelerator must be kvm or tcg, got %q", c.Accel)
	}
	for _, k := range c.KernelArgs {
		if strings.ContainsAny(k, " \t\n") {
			return nil, fmt.Errorf("kernel argument %q contains whitespace", k)
		}
	}
	kargs = append(kargs, c.KernelArgs...)

	machine := "microvm,acpi=off"
	var memArgs []string
	if sn := c.Snapshot; sn != nil && sn.Paused {
		// A paused machine's RAM is in its state: anonymous RAM of the
		// same layout (the RAM block's name is what the state names).
		if sn.PausedRAM0 {
			machine += ",memory-backend=ram0"
			memArgs = []string{"-object", "memory-backend-ram,id=ram0,size=" + strconv.FormatUint(c.MemoryMiB, 10) + "M"}
		}
		memArgs = append(memArgs, "-incoming", "defer")
	} else if sn != nil {
		// Guest RAM in a file: written through while booting a machine
		// to snapshot (share=on), mapped copy-on-write when restoring
		// (share=off), so the file never changes once saved. With
		// x-ignore-shared the migration stream then holds only device
		// state, a few dozen KB.
		share := "on"
		if sn.Restore {
			share = "off"
			if a.ramReadOnly {
				share += ",readonly=on,rom=off"
			}
		}
		machine += ",memory-backend=ram0"
		memArgs = []string{"-object", "memory-backend-file,id=ram0,size=" + strconv.FormatUint(c.MemoryMiB, 10) + "M" +
			",mem-path=" + qemuOptValue(filepath.Join(sn.Dir, snapshotRAM)) + ",share=" + share}
		if sn.Restore {
			// Device state arrives over QMP (migrate-incoming).
			memArgs = append(memArgs, "-incoming", "defer")
		}
	}
	args := []string{
		"-name", qemuOptValue(c.Name),
		// microvm: no PCI, no ACPI, no firmware tables to build or parse.
		"-M", machine,
		"-nodefaults", "-no-user-config", "-display", "none",
		// A guest reboot is how the guest powers off.
		"-no-reboot",
	}
	args = append(args, accelArgs...)
	args = append(args,
		"-smp", strconv.Itoa(c.CPUs),
		"-m", strconv.FormatUint(c.MemoryMiB, 10)+"M",
	)
	args = append(args, memArgs...)
	args = append(args,
		// Modern (virtio 1.0) MMIO transport: fewer exits than legacy.
		"-global", "virtio-mmio.force-legacy=false",
		"-kernel", c.Kernel,
		"-append", strings.Join(kargs, " "),
		"-chardev", "socket,id=console,fd="+strconv.Itoa(a.consoleFD),
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
		"-device", "virtserialport,bus=vser0.0,chardev=agent,id="+agentPortID+",name="+agentPortName,
	)
	for i, name := range c.RawPorts {
		id := "raw" + strconv.Itoa(i)
		args = append(args,
			"-chardev", "socket,id="+id+",fd="+strconv.Itoa(a.rawFDs[i]),
			"-device", "virtserialport,bus=vser0.0,chardev="+id+",name="+qemuOptValue(name),
		)
	}
	if n := c.NIC; n != nil {
		if _, err := net.ParseMAC(n.MAC); err != nil || len(n.MAC) != 17 {
			return nil, fmt.Errorf("network card: bad MAC %q", n.MAC)
		}
		netdev := "socket,id=net0,fd=" + strconv.Itoa(a.nicFD)
		if n.TAP {
			netdev = "tap,id=net0,fd=" + strconv.Itoa(a.nicFD)
		}
		args = append(args,
			"-netdev", netdev,
			"-device", "virtio-net-device,netdev=net0,mac="+n.MAC,
		)
	}
	if len(a.driveFDs) != len(c.Drives) {
		return nil, fmt.Errorf("%d drives but descriptors for %d", len(c.Drives), len(a.driveFDs))
	}
	for i, d := range c.Drives {
		if len(d.Label) > 20 || strings.ContainsAny(d.Label, ",= ") {
			return nil, fmt.Errorf("drive label %q: at most 20 characters, no ',', '=' or spaces", d.Label)
		}
		id := "drive" + strconv.Itoa(i)
		set := strconv.Itoa(i + 1)
		for _, fd := range a.driveFDs[i] {
			args = append(args, "-add-fd", "fd="+strconv.Itoa(fd)+",set="+set)
		}
		opts := "file=/dev/fdset/" + set + ",if=none,id=" + id + ",format=raw,cache=unsafe,discard=unmap"
		if d.ReadOnly {
			opts += ",readonly=on"
		}
		dev := "virtio-blk-device,drive=" + id
		if d.Label != "" {
			dev += ",serial=" + d.Label
		}
		args = append(args, "-drive", opts, "-device", dev)
	}
	if a.runAs != "" {
		args = append(args, "-runas", a.runAs)
	}
	if a.chroot != "" {
		args = append(args, "-chroot", a.chroot)
	}
	if a.sandbox {
		// QEMU's own seccomp filter: the VMM runs untrusted guests, so
		// take away what it never needs. Dropping to another uid is done
		// by QEMU itself after the filter is in place, so set*id calls
		// stay allowed then; once dropped they cannot regain anything.
		elevate := "deny"
		if a.runAs != "" {
			elevate = "allow"
		}
		args = append(args, "-sandbox", "on,obsolete=deny,elevateprivileges="+elevate+",spawn=deny,resourcecontrol=deny")
	}
	return args, nil
}

// qemuOptValue escapes a value for QEMU's comma-separated option syntax,
// where a literal comma is written twice.
func qemuOptValue(s string) string {
	return strings.ReplaceAll(s, ",", ",,")
}
