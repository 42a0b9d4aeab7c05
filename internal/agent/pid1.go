package agent

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// mount is one filesystem the guest's init sets up.
type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// earlyMounts are what the agent needs before it can find its port and
// read the kernel command line; InitSystem mounts them before it returns.
// The root is the initramfs (already a writable tmpfs), so /tmp and /run
// need no mount of their own.
var earlyMounts = []mount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
}

// lateMounts are only needed by commands; they are set up while the agent
// already talks to the host.
var lateMounts = []mount{
	cgroupMount,
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
}

// devLinks are the /dev entries that udev or systemd would create; many
// programs (bash process substitution, "cat /dev/stdin") need them.
var devLinks = [][2]string{
	{"/proc/self/fd", "/dev/fd"},
	{"/proc/self/fd/0", "/dev/stdin"},
	{"/proc/self/fd/1", "/dev/stdout"},
	{"/proc/self/fd/2", "/dev/stderr"},
}

// InitSystem does what the guest's init must do: mount the kernel
// filesystems, create the usual /dev links and the /dev/virtio-ports names,
// and bring up loopback. It returns once the agent can find its port; the
// rest goes on in the background, overlapping the first round trip with
// the host, and the returned channel closes when it is done (commands wait
// for it). Failures are logged and the boot goes on: a missing /dev/shm
// should not cost the user the VM.
func InitSystem(log *slog.Logger) <-chan struct{} {
	mountAll(log, earlyMounts)
	ready := make(chan struct{})
	go func() {
		defer close(ready)
		mountAll(log, lateMounts)
		enableControllers(log)
		finishInit(log)
	}()
	return ready
}

func mountAll(log *slog.Logger, mounts []mount) {
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			log.Warn("mkdir", "path", m.target, "err", err)
			continue
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			log.Warn("mount", "target", m.target, "fstype", m.fstype, "err", err)
		}
	}
}

func finishInit(log *slog.Logger) {
	for _, l := range devLinks {
		if err := os.Symlink(l[0], l[1]); err != nil && !errors.Is(err, os.ErrExist) {
			log.Warn("symlink", "path", l[1], "err", err)
		}
	}
	if err := linkVirtioPorts(); err != nil {
		log.Warn("virtio port links", "err", err)
	}
	if err := loopbackUp(); err != nil {
		log.Warn("loopback", "err", err)
	}
}

// linkVirtioPorts creates /dev/virtio-ports/NAME -> ../vportNpM for every
// named virtio-serial port, as udev does on a full distribution.
func linkVirtioPorts() error {
	ports, err := virtioPorts()
	if err != nil {
		return err
	}
	if len(ports) == 0 {
		return nil
	}
	if err := os.MkdirAll("/dev/virtio-ports", 0o755); err != nil {
		return err
	}
	for name, dev := range ports {
		link := filepath.Join("/dev/virtio-ports", name)
		if err := os.Symlink("../"+dev, link); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	return nil
}

// virtioPorts maps port names to device names (vport0p1) from sysfs.
func virtioPorts() (map[string]string, error) {
	const dir = "/sys/class/virtio-ports"
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	ports := make(map[string]string, len(entries))
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "name"))
		if err != nil {
			continue
		}
		if name := strings.TrimSpace(string(b)); name != "" {
			ports[name] = e.Name()
		}
	}
	return ports, nil
}

// OpenPort opens the virtio-serial port called name for reading and
// writing. The port appears when the virtio driver has probed it, which can
// trail the start of init by a few milliseconds, so OpenPort waits up to
// timeout for it.
func OpenPort(name string, timeout time.Duration) (*os.File, error) {
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		ports, err := virtioPorts()
		if err != nil {
			return nil, err
		}
		if dev, ok := ports[name]; ok {
			f, err := os.OpenFile("/dev/"+dev, os.O_RDWR, 0)
			if err != nil {
				return nil, fmt.Errorf("open virtio port %q: %w", name, err)
			}
			return f, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("virtio port %q not found in /sys/class/virtio-ports", name)
		}
		time.Sleep(delay)
	}
}

// loopbackUp sets IFF_UP on lo, so programs that talk to localhost work in a
// VM without any other network.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// ApplyHello sets the guest clock from the host's, credits the host's
// random bytes to the guest's entropy pool and makes the kernel reseed its
// random number generator from it. Both matter most after a snapshot
// restore, where the clock is stale and every clone would otherwise share
// one random state: crediting entropy alone changes what the kernel will
// mix in at its next scheduled reseed (up to a minute later), while
// RNDRESEEDCRNG makes the very next read of /dev/urandom or getrandom
// come from the new state.
//
// Failures are logged and returned: a hello goes on without them, a
// refresh (which a pool relies on before it hands a VM out) fails.
func ApplyHello(log *slog.Logger, h *agentpb.Hello) error {
	var errs []error
	if ns := h.GetHostTimeUnixNano(); ns > 0 {
		tv := unix.NsecToTimeval(ns)
		if err := unix.Settimeofday(&tv); err != nil {
			log.Warn("set clock", "err", err)
			errs = append(errs, fmt.Errorf("set clock: %w", err))
		}
	}
	if seed := h.GetEntropy(); len(seed) > 0 {
		if err := addEntropy(seed); err != nil {
			log.Warn("add entropy", "err", err)
			errs = append(errs, fmt.Errorf("add entropy: %w", err))
		}
	}
	return errors.Join(errs...)
}

// addEntropy feeds seed to the kernel with RNDADDENTROPY, which (unlike a
// plain write to /dev/urandom) also credits it, then forces a reseed of
// the kernel's CRNG with RNDRESEEDCRNG.
func addEntropy(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := randPoolInfo(seed)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// randPoolInfo lays seed out as RNDADDENTROPY's argument, struct
// rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, with
// every bit credited.
func randPoolInfo(seed []byte) []byte {
	buf := make([]byte, 8+len(seed)+3)
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(seed)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(seed)))
	copy(buf[8:], seed)
	return buf
}

// powerSignals ask init to end the system: busybox's halt, poweroff and
// reboot (without -f) send SIGUSR1, SIGUSR2 and SIGTERM to PID 1; SIGPWR
// is sysvinit's power-failure signal; the kernel sends SIGINT for
// ctrl-alt-del once init has taken that over (CAD off).
var powerSignals = []os.Signal{unix.SIGUSR1, unix.SIGUSR2, unix.SIGTERM, unix.SIGPWR, unix.SIGINT}

// HandlePowerSignals makes `poweroff`, `halt` and `reboot` in the guest
// end the VM: on the first power signal it calls shutdown, which should
// end the commands and call PowerOff. All three end the VM, since a
// throwaway VM has nothing to reboot into. Only the guest's init may call
// it: it also switches ctrl-alt-del from an immediate kernel restart
// (which would skip the sync and unmount) to a SIGINT for init.
func HandlePowerSignals(log *slog.Logger, shutdown func()) {
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
		log.Warn("ctrl-alt-del to init", "err", err)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, powerSignals...)
	go func() {
		sig := <-sigs
		log.Info("shutting down on request from the guest", "signal", sig)
		shutdown()
	}()
}

// powerOffOnce makes PowerOff run once: a shutdown call from the host and
// a poweroff in the guest may race.
var powerOffOnce sync.Once

// PowerOff ends the guest: every other process is killed, filesystems are
// synced and unmounted (so host-side readers of a disk image see a clean
// filesystem), then the kernel is told to reboot. The VMM runs with
// -no-reboot and the kernel with reboot=t, so that reboot ends the VMM
// process at once; a real power-off would need ACPI, which the guest
// kernel leaves out for boot speed. It never returns; a second caller
// waits for the first to end the VM.
func PowerOff(log *slog.Logger) {
	powerOffOnce.Do(func() { powerOff(log) })
	select {}
}

func powerOff(log *slog.Logger) {
	closeForks()
	_ = unix.Kill(-1, unix.SIGKILL)
	// A killed process holds its mount namespace until it has exited,
	// and a command root's filesystems with it, whatever the agent
	// unmounts: wait for them, then end the spawners' namespaces, so
	// that unmounting really closes every filesystem.
	waitOthersExited(time.Second)
	stopSpawners()
	unix.Sync()
	unmountAll(log, time.Second)
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err != nil {
		log.Error("reboot", "err", err)
	}
}

// unmountAll unmounts everything the agent mounted for the host and for
// commands (drives, overlays, a command root and the kernel filesystems
// inside it), innermost first, so that host-side readers of a disk image
// see a clean filesystem. The processes just killed may hold a mount busy
// for a moment while they exit: busy mounts are retried for up to wait.
// What still cannot be unmounted is remounted read-only, which flushes and
// marks a block filesystem clean, and detached.
func unmountAll(log *slog.Logger, wait time.Duration) {
	deadline := time.Now().Add(wait)
	for {
		left := agentMounts()
		if len(left) == 0 {
			return
		}
		progress := false
		for _, mnt := range left {
			if unix.Unmount(mnt, 0) == nil {
				progress = true
			}
		}
		if time.Now().After(deadline) {
			break
		}
		if !progress {
			time.Sleep(10 * time.Millisecond)
		}
	}
	for _, mnt := range agentMounts() {
		err := unix.Unmount(mnt, 0)
		if err == nil {
			continue
		}
		log.Warn("unmount", "path", mnt, "err", err)
		_ = unix.Mount("", mnt, "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
		_ = unix.Unmount(mnt, unix.MNT_DETACH)
	}
}

// agentMounts lists the mount points the agent made after its own early
// and late mounts, innermost (latest) first: /proc/self/mounts lists
// mounts in the order they were made.
func agentMounts() []string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil
	}
	defer f.Close()
	keep := map[string]bool{"/": true}
	for _, m := range earlyMounts {
		keep[m.target] = true
	}
	for _, m := range lateMounts {
		keep[m.target] = true
	}
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 {
			continue
		}
		if target := unescapeMount(fields[1]); !keep[target] {
			out = append(out, target)
		}
	}
	slices.Reverse(out)
	return out
}

// unescapeMount undoes the octal escapes (\040 for space...) of
// /proc/self/mounts.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// CmdlineHas reports whether the kernel command line has the bare word
// flag (or flag=...). The host uses mvm.* words to switch agent behaviour
// (mvm.debug) without a round trip.
func CmdlineHas(flag string) bool {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return false
	}
	for _, w := range strings.Fields(string(b)) {
		if w == flag || strings.HasPrefix(w, flag+"=") {
			return true
		}
	}
	return false
}

// waitOthersExited waits up to wait for every process but the agent to
// have exited (a zombie has: it holds no files and no namespace any more).
// Kernel threads are not counted.
func waitOthersExited(wait time.Duration) {
	deadline := time.Now().Add(wait)
	for othersAlive() && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
}

// othersAlive reports whether a process other than the agent is still
// running or exiting.
func othersAlive() bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone
		}
		if st, ok := procState(b); ok && st.alive() {
			return true
		}
	}
	return false
}

// procStat is what othersAlive needs of /proc/PID/stat.
type procStat struct {
	state byte
	flags uint64
}

// pfKthread is the kernel's PF_KTHREAD task flag.
const pfKthread = 0x00200000

func (p procStat) alive() bool { return p.state != 'Z' && p.state != 'X' && p.flags&pfKthread == 0 }

// procState parses /proc/PID/stat: the state is the field after the
// command name (which may hold spaces and parentheses, so the last ')'
// ends it), the flags the seventh after that.
func procState(b []byte) (procStat, bool) {
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 7 || len(f[0]) != 1 {
		return procStat{}, false
	}
	flags, err := strconv.ParseUint(f[6], 10, 64)
	if err != nil {
		return procStat{}, false
	}
	return procStat{state: f[0][0], flags: flags}, true
}
