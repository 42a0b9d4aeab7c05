// Package devices is a VM's device budget. QEMU's microvm machine has
// eight virtio-mmio transports and every virtio device takes one: the
// agent's channel (one virtio-serial device, whatever ports it carries),
// each disk, and a network card. The number of shared directories a run
// may have, the drive slots a snapshot is taken with and the network
// card are all derived here, from that one number, so that adding a
// device cannot silently take a slot another feature counted on.
package devices

import "fmt"

// Transports is how many virtio devices a machine can have: QEMU's
// microvm creates eight virtio-mmio transports (Firecracker allows more,
// but no backend may count on it).
const Transports = 8

// What takes a transport.
const (
	// agentChannel is the virtio-serial device carrying the agent's port
	// (and any raw ports): always there.
	agentChannel = 1
	// templateDrives are a template's disk and the run's writable layer
	// over it.
	templateDrives = 2
	// nicDevices is the network card of a run with a network.
	nicDevices = 1
)

// SnapshotDirSlots is how many shared directories a run may have and still
// restore a snapshot: a snapshot is taken with a read-only and a writable
// drive slot per directory, on top of everything else a machine may have
// (the agent's channel, a network card, a template's two drives), so that
// one snapshot serves every run of its configuration.
const SnapshotDirSlots = (Transports - agentChannel - nicDevices - templateDrives) / 2

// Use is what one machine puts on its transports.
type Use struct {
	// Template: the root is a template's disk plus a writable layer.
	Template bool
	// Network: the machine has a network card.
	Network bool
	// Dirs has one entry per shared directory: true for a read-write one
	// (an image and a writable layer), false for a read-only one.
	Dirs []bool
}

// Drives is how many disks u attaches.
func (u Use) Drives() int {
	n := 0
	if u.Template {
		n += templateDrives
	}
	for _, rw := range u.Dirs {
		n += dirDrives(rw)
	}
	return n
}

func dirDrives(writable bool) int {
	if writable {
		return 2
	}
	return 1
}

// fixed is what u uses besides its shared directories.
func (u Use) fixed() int {
	n := agentChannel
	if u.Template {
		n += templateDrives
	}
	if u.Network {
		n += nicDevices
	}
	return n
}

// MaxDirDrives is how many drives u leaves for shared directories.
func (u Use) MaxDirDrives() int { return Transports - u.fixed() }

// Check reports whether u fits on the machine's transports; the error
// says what takes them.
func (u Use) Check() error {
	need, room := u.Drives(), Transports-agentChannel
	if u.Network {
		room -= nicDevices
	}
	if need <= room {
		return nil
	}
	rule := "a read-only directory takes one, a read-write one two"
	if u.Template {
		rule = "the template takes two, a read-only directory one, a read-write one two"
	}
	slots := fmt.Sprintf("its %d device slots, less one for the agent's channel", Transports)
	if u.Network {
		slots += " and one for the network card"
	}
	return fmt.Errorf("%d shared directories need %d drives; the VM has room for %d (%s): %s",
		len(u.Dirs), need, room, rule, slots)
}

// Snapshottable says whether a machine of u can be restored from a
// snapshot (its directories fit the snapshot's slots), and why not.
func (u Use) Snapshottable() (bool, string) {
	if u.Network {
		return false, "a network card (snapshots are taken without one)"
	}
	if len(u.Dirs) > SnapshotDirSlots {
		return false, fmt.Sprintf("more than %d shared directories", SnapshotDirSlots)
	}
	return true, ""
}

// MaxDrives is how many disks a machine without a network card can have.
const MaxDrives = Transports - agentChannel
