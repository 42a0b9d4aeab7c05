// Package backend defines what the exec orchestrator needs from a virtual
// machine monitor: start a machine from a kernel and initramfs, reach the
// guest agent, wait for the machine to end, stop it. Implementations live in
// sub-packages (qemu); optional features are announced in Capabilities and
// checked before use, never stubbed.
package backend

import (
	"context"
	"net"

	"github.com/mvm-sh/mvm/internal/accel"
)

// Capabilities says which optional features a backend offers.
type Capabilities struct {
	// Snapshots: the backend can save a running machine and restore it.
	Snapshots bool
	// VSock: the agent channel can be an AF_VSOCK socket (needs
	// /dev/vhost-vsock on the host); otherwise it is a virtio-serial port.
	VSock bool
	// ReadOnlyDrives: a drive can be attached so that the guest cannot
	// write it, enforced by the VMM.
	ReadOnlyDrives bool
}

// Backend starts machines.
type Backend interface {
	// Name identifies the backend in messages ("qemu").
	Name() string
	Capabilities() Capabilities
	// Start boots a machine. It returns once the VMM process runs and the
	// agent channel exists; the guest may still be booting. The machine's
	// lifetime is not tied to ctx: only Stop (or the death of this process)
	// ends it, so a cancelled start context cannot leave a half-owned VM.
	Start(ctx context.Context, cfg Config) (Machine, error)
}

// Config describes one machine.
type Config struct {
	// Name labels the machine in logs and the VMM's process title.
	Name string
	// RunDir is the run's private directory; the backend keeps its files
	// (console log, VMM log) there.
	RunDir string
	// Kernel is an uncompressed vmlinux (PVH entry) or bzImage.
	Kernel string
	// Initrd is the initramfs; it is the guest's root filesystem.
	Initrd string
	// KernelArgs are appended to the backend's own kernel command line.
	KernelArgs []string
	CPUs       int
	MemoryMiB  uint64
	Accel      accel.Mode // KVM or TCG
	// Drives are attached as virtio block devices in this order, so the
	// guest sees them as vda, vdb, ... and also by their serial.
	Drives []Drive
	// RawPorts are extra virtio-serial ports handed to the caller as plain
	// byte streams (benchmarks compare the agent protocol against one).
	RawPorts []string
}

// Drive is a disk image attached to the guest.
type Drive struct {
	// ID is the drive's serial number in the guest
	// (/sys/block/vdX/serial), at most 20 bytes.
	ID       string
	Path     string
	ReadOnly bool
}

// Machine is a started VM.
type Machine interface {
	// AgentConn is the byte stream to the guest agent. It is connected
	// before the guest boots; whatever is written early waits in the
	// channel until the agent opens its end.
	AgentConn() net.Conn
	// RawPort returns the stream of one of Config.RawPorts.
	RawPort(name string) (net.Conn, bool)
	// Wait blocks until the VMM process has exited (returning why) or ctx
	// ends (returning ctx.Err()).
	Wait(ctx context.Context) error
	// Done is closed when the VMM process has exited.
	Done() <-chan struct{}
	// Stop ends the VMM: politely while ctx allows, then by force. It is
	// safe to call more than once and after the VMM has exited.
	Stop(ctx context.Context) error
	// ConsoleLog is the file the guest's serial console is written to.
	ConsoleLog() string
	// PID is the VMM's process id.
	PID() int
}
