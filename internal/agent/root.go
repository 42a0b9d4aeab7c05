package agent

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// Where a Root call puts things, in the agent's namespace. The merged root
// is what commands are chrooted into; its layers live beside it, out of
// the commands' sight.
const (
	rootDir    = "/run/mvm/root"
	rootLayers = "/run/mvm/rootfs"
)

// errPrecondition marks a call the agent's state does not allow
// (answered with CODE_FAILED_PRECONDITION).
var errPrecondition = errors.New("not allowed now")

// rootMount is one filesystem the agent mounts inside a new root for the
// commands: what a normal Linux has at boot.
type rootMount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// rootMounts are the kernel filesystems of a command root. /dev is the
// kernel's devtmpfs (the one instance the agent's /dev shows too) with a
// devpts instance of its own, so ptys allocated for the root's commands
// live where they look for them. /tmp is the image's own, on the writable
// layer, as on a Debian system and in containers; /run is a tmpfs.
var rootMounts = []rootMount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	rootMount(cgroupMount),
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,gid=5,mode=0620,ptmxmode=0666"},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
}

// setRoot serves a Root call: the template drive read-only under an
// overlay whose upper layer is on the run's writable drive, mounted at
// rootDir with the kernel filesystems inside, the host name written into
// its /etc. On failure everything it mounted is undone, so the host may
// retry.
func (s *Server) setRoot(req *agentpb.Root) error { return s.setRootWait(req, driveWait) }

// setRootWait is setRoot waiting up to wait for the drives to appear.
func (s *Server) setRootWait(req *agentpb.Root, wait time.Duration) error {
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	if !s.root.isHost() {
		return fmt.Errorf("%w: a root is already set (%s)", errPrecondition, s.rootLabel)
	}
	if len(s.mounted) > 0 {
		return fmt.Errorf("%w: drives are already mounted; Root must come before Mount", errPrecondition)
	}
	lowerRef, upperRef := driveRef{label: req.LowerLabel}, driveRef{label: req.UpperLabel}
	if req.LowerLabel == "" || req.UpperLabel == "" {
		return fmt.Errorf("%w: a root needs lower_label and upper_label", errInvalidRequest)
	}
	if err := lowerRef.check(); err != nil {
		return err
	}
	if err := upperRef.check(); err != nil {
		return err
	}
	if req.LowerLabel == req.UpperLabel {
		return fmt.Errorf("%w: lower_label and upper_label are both %q", errInvalidRequest, req.LowerLabel)
	}
	if req.Hostname != "" {
		if err := checkHostname(req.Hostname); err != nil {
			return err
		}
	}
	lowerDev, err := s.drives.find(lowerRef, wait)
	if err != nil {
		return fmt.Errorf("template drive: %w", err)
	}
	upperDev, err := s.drives.find(upperRef, wait)
	if err != nil {
		return fmt.Errorf("writable layer drive: %w", err)
	}

	var done []string // mounted so far, undone on failure
	fail := func(err error) error {
		for i := len(done) - 1; i >= 0; i-- {
			if uerr := unix.Unmount(done[i], unix.MNT_DETACH); uerr != nil {
				s.log.Warn("undo root mount", "path", done[i], "err", uerr)
			}
		}
		return err
	}
	lower, rw := filepath.Join(rootLayers, "lower"), filepath.Join(rootLayers, "rw")
	if err := mountAt(lowerDev, lower, "ext4", unix.MS_RDONLY, ""); err != nil {
		return fail(fmt.Errorf("template drive %s: %w", lowerDev, err))
	}
	done = append(done, lower)
	if err := mountAt(upperDev, rw, "ext4", unix.MS_NOATIME, ""); err != nil {
		return fail(fmt.Errorf("writable layer drive %s: %w", upperDev, err))
	}
	done = append(done, rw)
	upper, work, err := prepareUpper(lower, rw)
	if err != nil {
		return fail(err)
	}
	// volatile: the writable layer is thrown away with the run, so
	// fsync and syncfs on the root need not wait for the disk (dpkg,
	// pip and sqlite call them a lot). The kernel's defaults otherwise
	// (no redirect_dir, no metacopy), as container runtimes use, but
	// xino=on: the layers are two filesystems, and without it a merged
	// directory's readdir gives other inode numbers (d_ino) than stat
	// gives (st_ino), which find, tar, rsync, git and CPython's os tests
	// see as a broken filesystem. xino keeps them equal and stable by
	// putting the layer's number in the inode number's high bits.
	opts := "lowerdir=" + escapeOverlay(lower) + ",upperdir=" + escapeOverlay(upper) + ",workdir=" + escapeOverlay(work) + ",volatile,xino=on"
	if err := mountAt("overlay", rootDir, "overlay", 0, opts); err != nil {
		return fail(err)
	}
	done = append(done, rootDir)
	r := &fsRoot{path: rootDir}
	for _, m := range rootMounts {
		if err := r.mountIn(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			if m.fstype == cgroupMount.fstype && (errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)) {
				// A --kernel kernel without cgroup2: the root goes on without it.
				s.log.Warn("root: no cgroup2", "err", err)
				continue
			}
			return fail(fmt.Errorf("root: %w", err))
		}
		done = append(done, filepath.Join(rootDir, m.target))
	}
	if err := s.prepareRootTree(r, req.Hostname); err != nil {
		return fail(err)
	}
	if s.hasBootID {
		if err := r.bindFile(bootIDFile, bootIDProc); err != nil {
			return fail(fmt.Errorf("root: %w", err))
		}
		done = append(done, filepath.Join(rootDir, bootIDProc))
		s.bootIDBound[rootDir] = true
	}
	s.root, s.rootLabel = r, req.LowerLabel
	s.mounted[lowerDev], s.mounted[upperDev] = true, true
	s.spawner = s.startSpawner()
	return nil
}

// startSpawner starts the spawner of the root at rootDir, first making
// the root's mounts shared so that the spawner's namespace follows them.
// Without one (a kernel that refuses either step) commands are chrooted
// as before: everything works but creating user namespaces.
func (s *Server) startSpawner() *spawner {
	if os.Getpid() == 1 && CmdlineHas("mvm.chroot") {
		// MVM_KERNEL_ARGS=mvm.chroot: the old way, to compare or to
		// step around a problem with the spawner.
		s.log.Info("root: commands are chrooted (mvm.chroot)")
		return nil
	}
	if err := unix.Mount("", rootDir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		s.log.Warn("root: commands are chrooted (no user namespaces)", "err", fmt.Errorf("make %s shared: %w", rootDir, err))
		return nil
	}
	sp, err := newSpawner(rootDir)
	if err != nil {
		s.log.Warn("root: commands are chrooted (no user namespaces)", "err", err)
		return nil
	}
	return sp
}

// prepareUpper creates the upper and work directories of an overlay on the
// mounted writable drive rw, the upper one with the attributes of the
// lower root (the merged root shows the upper root's).
func prepareUpper(lower, rw string) (upper, work string, err error) {
	upper, work = filepath.Join(rw, "upper"), filepath.Join(rw, "work")
	if err := unix.Mkdir(upper, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return "", "", fmt.Errorf("writable layer: %w", err)
	}
	if err := unix.Mkdir(work, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return "", "", fmt.Errorf("writable layer: %w", err)
	}
	if err := copyRootAttrs(lower, upper); err != nil {
		return "", "", fmt.Errorf("writable layer: %w", err)
	}
	return upper, work, nil
}

// prepareRootTree gives a new root what the image cannot know: a /run/lock
// and /tmp when missing, the host name in /etc/hostname and /etc/hosts, a
// fresh /etc/machine-id when the image has one (each run is its own
// machine). All of it is written into the overlay, never the template.
// The host name is set first, when hostname is given.
func (s *Server) prepareRootTree(r *fsRoot, hostname string) error {
	if err := r.mkdirMode("/run/lock", 0o1777); err != nil {
		return fmt.Errorf("root: /run/lock: %w", err)
	}
	if !r.exists("/tmp") {
		if err := r.mkdirMode("/tmp", 0o1777); err != nil {
			return fmt.Errorf("root: /tmp: %w", err)
		}
	}
	if hostname != "" {
		if err := unix.Sethostname([]byte(hostname)); err != nil {
			return fmt.Errorf("set host name: %w", err)
		}
	}
	writeIdentity(s.log, r, currentHostname())
	s.renewMachineID(r)
	return nil
}

// renewMachineID gives the root's /etc/machine-id, when the image has one,
// a new id: one per run, as one per boot on a real machine.
func (s *Server) renewMachineID(r *fsRoot) {
	if st, err := r.stat("/etc/machine-id"); err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := r.writeFile("/etc/machine-id", []byte(newMachineID()+"\n"), 0o444); err != nil {
			s.log.Warn("root: /etc/machine-id", "err", err)
		}
	}
}

// mkdirMode creates directory p inside the root (and its parents) and
// gives it mode exactly, whatever the umask.
func (r *fsRoot) mkdirMode(p string, mode uint32) error {
	fd, err := r.mkdirAll(p, mode&0o777)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	// fchmod does not work on O_PATH descriptors; chmod through the
	// descriptor's /proc name does.
	return unix.Chmod(fdPath(fd), mode)
}

// writeIdentity writes /etc/hostname and /etc/hosts inside r for
// hostname. Failures are logged, not returned: an image with an odd /etc
// still runs commands.
func writeIdentity(log *slog.Logger, r *fsRoot, hostname string) {
	if hostname == "" {
		return
	}
	if err := r.writeFile("/etc/hostname", []byte(hostname+"\n"), 0o644); err != nil {
		log.Warn("write /etc/hostname", "root", r.path, "err", err)
	}
	old, err := r.readFile("/etc/hosts", maxHostsSize)
	if err != nil && !errors.Is(err, unix.ENOENT) {
		log.Warn("read /etc/hosts", "root", r.path, "err", err)
		old = nil
	}
	if err := r.writeFile("/etc/hosts", hostsFile(old, hostname), 0o644); err != nil {
		log.Warn("write /etc/hosts", "root", r.path, "err", err)
	}
}

// maxHostsSize bounds the /etc/hosts the agent reads from an image.
const maxHostsSize = 1 << 20

// hostsFile is the /etc/hosts for hostname, keeping the lines of the
// image's own (old): localhost entries are added when missing, and the
// host name gets Debian's 127.0.1.1 line, which replaces any 127.0.1.1
// line the image had.
func hostsFile(old []byte, hostname string) []byte {
	var b bytes.Buffer
	hasV4, hasV6 := false, false
	var kept []string
	for _, line := range strings.Split(string(old), "\n") {
		fields := strings.Fields(strings.SplitN(line, "#", 2)[0])
		if len(fields) > 0 && fields[0] == "127.0.1.1" {
			continue
		}
		if len(fields) > 1 {
			for _, name := range fields[1:] {
				if name == "localhost" {
					hasV4 = hasV4 || fields[0] == "127.0.0.1"
					hasV6 = hasV6 || fields[0] == "::1"
				}
			}
		}
		kept = append(kept, line)
	}
	for len(kept) > 0 && kept[len(kept)-1] == "" {
		kept = kept[:len(kept)-1]
	}
	if !hasV4 {
		b.WriteString("127.0.0.1\tlocalhost\n")
	}
	if !hasV6 {
		b.WriteString("::1\tlocalhost ip6-localhost ip6-loopback\n")
	}
	for _, line := range kept {
		b.WriteString(line)
		b.WriteByte('\n')
	}
	b.WriteString("127.0.1.1\t" + hostname + "\n")
	return b.Bytes()
}

// newMachineID returns a random machine id: 32 lowercase hex digits, as
// systemd writes them.
func newMachineID() string {
	var b [16]byte
	// getrandom(2) directly: crypto/rand would add 200 KiB to the agent.
	_, _ = unix.Getrandom(b[:], 0)
	// Version 4 and the RFC 4122 variant, as systemd-machine-id-setup
	// makes them.
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return hex.EncodeToString(b[:])
}

// currentHostname is the kernel's host name.
func currentHostname() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Nodename[:])
}

// checkHostname accepts what sethostname(2) and resolvers both take: 1 to
// 64 bytes of letters, digits, '-' and '.', not starting with '-' or '.'.
func checkHostname(h string) error {
	if len(h) == 0 || len(h) > 64 {
		return fmt.Errorf("%w: host name %q must be 1 to 64 bytes", errInvalidRequest, h)
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || (i > 0 && (c == '-' || c == '.'))
		if !ok {
			return fmt.Errorf("%w: host name %q: only letters, digits, '-' and '.' (not first)", errInvalidRequest, h)
		}
	}
	return nil
}
