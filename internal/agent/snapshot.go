package agent

import (
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// What a VM restored from a snapshot must not share with its siblings is
// refreshed by the hello of each new session: the clock and the random
// number generator (ApplyHello), the host name and the boot id (here).
// The machine id comes with a root, new with each boot id when the root
// was set before the snapshot was saved (a template's).

// Where the boot id the host gave lives, and what it is bound over.
const (
	bootIDFile = "/run/mvm/boot_id"
	bootIDProc = "/proc/sys/kernel/random/boot_id"
)

// checkHelloIdentity validates the identity fields of a hello.
func checkHelloIdentity(hostname string, bootID []byte) error {
	if hostname != "" {
		if err := checkHostname(hostname); err != nil {
			return err
		}
	}
	if len(bootID) != 0 && len(bootID) != 16 {
		return fmt.Errorf("%w: boot_id has %d bytes, want 16", errInvalidRequest, len(bootID))
	}
	return nil
}

// applyIdentity sets the host name and the boot id a hello carries (either
// may be empty). The host name goes into the kernel and into the
// /etc/hostname and /etc/hosts of the agent's root and of the command
// root. Failures are logged: the session is more use than a host name.
func (s *Server) applyIdentity(hostname string, bootID []byte) {
	if hostname != "" {
		if err := unix.Sethostname([]byte(hostname)); err != nil {
			s.log.Warn("set host name", "err", err)
		} else {
			s.fsMu.Lock()
			root := s.root
			s.fsMu.Unlock()
			writeIdentity(s.log, hostRoot, hostname)
			if !root.isHost() {
				writeIdentity(s.log, root, hostname)
			}
		}
	}
	if len(bootID) == 16 {
		if err := s.setBootID(bootID); err != nil {
			s.log.Warn("set boot id", "err", err)
		}
	}
}

// refresh applies a Refresh: what a hello renews, in a running session.
func (s *Server) refresh(r *agentpb.Refresh) error {
	if err := checkHelloIdentity("", r.BootId); err != nil {
		return err
	}
	if len(r.Entropy) < 16 {
		// A refresh without a reseed would leave the clone's random
		// state its siblings share.
		return fmt.Errorf("%w: a refresh needs at least 16 bytes of entropy, got %d", errInvalidRequest, len(r.Entropy))
	}
	if err := s.opts.OnHello(&agentpb.Hello{HostTimeUnixNano: r.HostTimeUnixNano, Entropy: r.Entropy}); err != nil {
		return err
	}
	if len(r.BootId) == 16 {
		// Unlike a hello's, a refresh's boot id must take: a pool hands
		// the VM out only once it has.
		if err := s.setBootID(r.BootId); err != nil {
			return fmt.Errorf("set boot id: %w", err)
		}
	}
	return nil
}

// setBootID makes /proc/sys/kernel/random/boot_id read id, for the agent's
// root and the command root: the kernel's own is fixed at boot, and every
// clone of a snapshot would share it. A file holding the id is bound over
// the proc file (once per root; later ids rewrite the file in place). It
// costs a write and a mount call.
func (s *Server) setBootID(id []byte) error {
	if err := os.MkdirAll(filepath.Dir(bootIDFile), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(bootIDFile, []byte(formatUUID(id)+"\n"), 0o444); err != nil {
		return err
	}
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	s.hasBootID = true
	if !s.bootIDBound[hostRoot.path] {
		if err := hostRoot.bindFile(bootIDFile, bootIDProc); err != nil {
			return err
		}
		s.bootIDBound[hostRoot.path] = true
	}
	if !s.root.isHost() {
		// A root set before the snapshot was saved (a template's):
		// the clone's root needs its own machine id too.
		s.renewMachineID(s.root)
	}
	if !s.root.isHost() && !s.bootIDBound[s.root.path] {
		if err := s.root.bindFile(bootIDFile, bootIDProc); err != nil {
			return err
		}
		s.bootIDBound[s.root.path] = true
	}
	for dir := range s.subRoots {
		if !s.bootIDBound[dir] {
			if err := (&fsRoot{path: dir}).bindFile(bootIDFile, bootIDProc); err != nil {
				return err
			}
			s.bootIDBound[dir] = true
		}
	}
	return nil
}

// bindFile bind-mounts the agent's file src over the existing file target
// inside the root.
func (r *fsRoot) bindFile(src, target string) error {
	fd, err := r.open(target, unix.O_PATH, 0)
	if err != nil {
		return fmt.Errorf("bind over %s: %w", target, err)
	}
	defer unix.Close(fd)
	if err := unix.Mount(src, fdPath(fd), "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s over %s: %w", src, target, err)
	}
	return nil
}

// formatUUID formats 16 bytes as the kernel formats a boot id: a version 4
// UUID in lowercase.
func formatUUID(b []byte) string {
	var u [16]byte
	copy(u[:], b)
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// quiesceWait bounds how long Quiesce waits for execs that are ending.
const quiesceWait = 500 * time.Millisecond

// quiesce checks that the guest is in a state a snapshot can be taken of
// and restored into with other drives: no command running and no drive
// mounted. It syncs filesystems (nothing should be dirty, but a snapshot
// must not capture a write-back in progress).
func (s *Server) quiesce(keepDrives bool) error {
	// An exec whose Exited the host has just read may not have left the
	// count yet.
	if !s.waitExecs(quiesceWait) {
		s.mu.Lock()
		running := s.running
		s.mu.Unlock()
		return fmt.Errorf("%w: %d commands are running", errPrecondition, running)
	}
	s.fsMu.Lock()
	mounted := len(s.mounted)
	s.fsMu.Unlock()
	if mounted > 0 && !keepDrives {
		return fmt.Errorf("%w: %d drives are mounted; mount drives after the restore (they are swapped)", errPrecondition, mounted)
	}
	unix.Sync()
	return nil
}

// flushDrive drops what the kernel caches of a drive's blocks
// (BLKFLSBUF), so that reading it sees the image attached now: after a
// snapshot restore the VMM may back the same drive with another file.
// Errors are ignored: a device that cannot be flushed (not a block device
// in tests) has nothing cached.
func flushDrive(dev string) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return
	}
	defer f.Close()
	_ = unix.IoctlSetInt(int(f.Fd()), unix.BLKFLSBUF, 0)
}

// flushUnmounted flushes dev unless the agent has it mounted (its cache is
// then the filesystem's, and the drive cannot have been swapped). Called
// with fsMu held.
func (s *Server) flushUnmounted(dev string) {
	if !s.mounted[dev] {
		flushDrive(dev)
	}
}
