// Package backend defines what the orchestrator needs from a virtual machine
// monitor, and nothing more: start a machine from a kernel, an initramfs and
// some disks, reach the guest agent, learn when the machine is gone, stop
// it. Implementations live in sub-packages (qemu).
//
// Features only some VMMs have are optional interfaces that the caller
// finds by type assertion (RawPorter today; snapshots later), never methods
// every backend has to stub.
package backend

import (
	"context"
	"errors"
	"net"
	"os"

	"github.com/mvm-sh/mvm/internal/accel"
)

// Backend starts machines.
type Backend interface {
	// Start boots a machine. It returns once the VMM process runs; the
	// guest may still be booting. The machine's lifetime is not tied to
	// ctx: only Stop (or the death of this process) ends it, so a
	// cancelled start context cannot leave a half-owned VM.
	Start(ctx context.Context, cfg Config) (Machine, error)
}

// Config describes one machine.
type Config struct {
	// Name labels the machine in logs and the VMM's process title.
	Name string
	// RunDir is the run's private directory. The VMM runs with it as its
	// working directory (which is how a leftover VMM is recognised) and,
	// where the backend confines the VMM, as its root.
	RunDir string
	// ConsoleLog is where the guest's serial console ends up. Backends
	// keep only its tail (ConsoleLogLimit bytes): the guest writes it.
	ConsoleLog string
	// Kernel is an uncompressed vmlinux (PVH entry) or bzImage.
	Kernel string
	// Initrd is the initramfs; it is the guest's first root filesystem.
	Initrd string
	// ForeignKernel says Kernel lacks what mvm's own build carries (a
	// kernel brought with --kernel, or one of an older mvm): the backend
	// passes only arguments every kernel understands.
	ForeignKernel bool
	// KernelArgs are appended to the backend's own kernel command line.
	KernelArgs []string
	CPUs       int
	MemoryMiB  uint64
	Accel      accel.Mode // KVM or TCG
	// Drives are attached as virtio block devices in this order. The
	// guest finds them by their filesystem label, which every VMM
	// preserves, not by order or serial number, which not all can set.
	Drives []Drive
	// RawPorts are extra byte streams to the guest, reached through
	// RawPorter (benchmarks compare the agent protocol against one).
	RawPorts []string
	// NIC, when set, gives the machine a network card.
	NIC *NIC
	// Snapshot, with a backend that implements Snapshotter, either boots
	// a machine whose state can be saved (Save) or starts one from saved
	// state (Restore). Everything else in the Config must describe the
	// same machine as when the snapshot was taken (drive paths may
	// differ; their number, order and read-only flags may not).
	Snapshot *Snapshot
}

// NIC is a virtio network card whose frames travel on a stream socket:
// each as a 32-bit big-endian length and the frame (the framing of
// QEMU's socket network backend). The other end is the host's network
// stack (internal/network).
type NIC struct {
	// MAC is the card's address ("52:54:00:12:34:56").
	MAC string
	// Conn is the VMM's end of the socket. Start hands it to the VMM
	// and closes it here; the caller keeps the other end.
	Conn *os.File
	// TAP: Conn is a TAP device (the frames go to its network, not to a
	// socket's other end).
	TAP bool
}

// Snapshot names a snapshot's files: Dir holds the guest's RAM ("ram", a
// sparse file mapped by the VMM) and the device state ("state").
type Snapshot struct {
	Dir string
	// Restore starts from the saved state instead of booting. The RAM
	// file is then mapped copy-on-write: no run ever writes it, so any
	// number of runs can share one snapshot.
	Restore bool
	// Paused, with Restore, starts a machine that Pauser.Pause saved:
	// its RAM is in the state file (no RAM file), and PausedRAM0 says
	// what Pause reported of its memory layout.
	Paused     bool
	PausedRAM0 bool
	// BeforeResume, when set, is called once the saved state is loaded
	// and before the restored guest runs: an error stops the machine and
	// Start returns it (the caller checks there that the files the VMM
	// opened are the ones it meant, before a guest that may be made of
	// two snapshots touches the run's disks).
	BeforeResume func() error
}

// ErrSnapshotRejected marks a restore that failed because of the snapshot
// itself (the VMM refused its state, or died loading it), as opposed to
// the host (no VMM binary, out of descriptors): the caller may throw such
// a snapshot away.
var ErrSnapshotRejected = errors.New("the VMM rejected the snapshot")

// Snapshotter is implemented by backends that can save machines and start
// machines from saved state (Config.Snapshot).
type Snapshotter interface {
	// SnapshotKey identifies what a snapshot depends on in the VMM (its
	// binary and version): a snapshot is never restored under another
	// key.
	SnapshotKey(ctx context.Context) (string, error)
}

// SnapshotSaver is implemented by machines booted with Config.Snapshot
// set (not Restore): SaveSnapshot pauses the guest, writes its device
// state next to its RAM file, and stops the machine. The caller makes
// sure the guest is idle first (no stream open, nothing in flight).
type SnapshotSaver interface {
	SaveSnapshot(ctx context.Context) error
}

// Pauser is implemented by machines that can be paused to disk: Pause
// stops the guest, writes its whole state (RAM included) to dir's state
// file, and ends the VMM. The machine is resumed by starting one with the
// same Config (drives, memory, CPUs) and Snapshot{Dir: dir, Restore:
// true, Paused: true, PausedRAM0: ram0}. The caller makes sure the guest
// is idle first (no stream open, nothing in flight).
type Pauser interface {
	Pause(ctx context.Context, dir string) (ram0 bool, err error)
}

// ConsoleLogLimit bounds what is kept of the guest's console: its last
// bytes. A guest can write its serial port for as long as it runs.
const ConsoleLogLimit = 1 << 20

// Drive is a disk image attached to the guest.
type Drive struct {
	Path string
	// Label is the filesystem label the guest finds the drive by; a
	// backend that can name drives may also use it as their serial
	// number, which shows in the guest's /sys/block/*/serial.
	Label    string
	ReadOnly bool
}

// Machine is a started VM.
type Machine interface {
	// DialAgent returns the byte stream to the guest agent. A
	// virtio-serial channel exists from the start (what is written early
	// waits until the agent opens its end); a vsock one is dialled, with
	// retries, until ctx ends.
	DialAgent(ctx context.Context) (net.Conn, error)
	// Done is closed when the machine can no longer run the guest: the
	// VMM exited, or it reported that the guest powered off, halted,
	// panicked or closed the agent's channel.
	Done() <-chan struct{}
	// Err says why Done was closed: nil for an exit we asked for (Stop)
	// or a clean guest power-off, otherwise what happened. Valid after
	// Done.
	Err() error
	// Stop ends the VMM, by force once ctx ends, and waits for it to be
	// gone. It is safe to call more than once and after the VMM exited.
	Stop(ctx context.Context) error
	// PID is the VMM's process id, recorded so that a later run can kill
	// a VMM whose owner died.
	PID() int
}

// ConsoleTailer is implemented by machines that keep their guest's
// console: what it printed so far (the last ConsoleLogLimit bytes) and
// whether older bytes were dropped.
type ConsoleTailer interface {
	ConsoleTail() ([]byte, bool)
}

// RawPorter is implemented by machines that can expose Config.RawPorts.
type RawPorter interface {
	RawPort(name string) (net.Conn, bool)
}
