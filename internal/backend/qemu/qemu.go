// Package qemu runs machines with QEMU's microvm machine type: no PCI, no
// ACPI, virtio-mmio devices, a PVH kernel entry. Every channel to the VMM
// (the agent's virtio-serial port, QMP, the serial console) is one end of a
// socketpair handed to QEMU as a file descriptor, so there is no socket
// path to create, poll for or clean up, and nothing to connect to before
// the VMM listens.
//
// The VMM is treated as the guest's accomplice: it runs in its own process
// group with a parent-death signal, under QEMU's seccomp sandbox, and, when
// mvmctl runs as root, as an unprivileged per-run uid chrooted into the run
// directory, in namespaces of its own.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/helperbin"
	"github.com/mvm-sh/mvm/internal/hostclock"
	"github.com/mvm-sh/mvm/internal/qmp"
)

const agentPortName = agentproto.PortName

// Binary is the QEMU executable looked up in PATH, unless MVM_QEMU names
// another.
const Binary = "qemu-system-x86_64"

// Backend starts QEMU microvm machines.
type Backend struct {
	// Path is the QEMU binary; empty means Binary from PATH (or MVM_QEMU).
	Path string
	// Sandbox turns on QEMU's seccomp sandbox.
	Sandbox bool
	// Confine, when running as root, drops the VMM to an unprivileged
	// uid, chroots it into the run directory and gives it namespaces of
	// its own. Without root there is nothing to drop.
	Confine bool
	Log     *slog.Logger
}

// New returns a backend with the sandbox and confinement on.
func New(log *slog.Logger) *Backend {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{Sandbox: true, Confine: true, Log: log}
}

// FindBinary resolves the QEMU binary: MVM_QEMU, then PATH.
func FindBinary() (string, error) {
	if p := os.Getenv("MVM_QEMU"); p != "" {
		return p, nil
	}
	p, err := exec.LookPath(Binary)
	if err != nil {
		return "", fmt.Errorf("%s not found in PATH: %w", Binary, err)
	}
	return p, nil
}

// Start implements backend.Backend.
func (b *Backend) Start(ctx context.Context, cfg backend.Config) (backend.Machine, error) {
	bin := b.Path
	if bin == "" {
		var err error
		if bin, err = FindBinary(); err != nil {
			return nil, err
		}
	}
	m := &machine{
		consoleLog: cfg.ConsoleLog,
		console:    newTail(backend.ConsoleLogLimit),
		done:       make(chan struct{}),
		exited:     make(chan struct{}),
		raw:        make(map[string]net.Conn),
		log:        b.Log.With("vm", cfg.Name),
	}
	// Child ends become fds 3, 4, 5... in QEMU, in ExtraFiles order.
	var childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	pair := func(name string) (net.Conn, int, error) {
		host, child, err := socketpair(name)
		if err != nil {
			return nil, 0, err
		}
		childEnds = append(childEnds, child)
		return host, 2 + len(childEnds), nil
	}
	fail := func(err error) (backend.Machine, error) {
		m.closeConns()
		return nil, err
	}
	a := argsConfig{cfg: cfg, sandbox: b.Sandbox}
	if cfg.Accel == accel.TCG && !cfg.ForeignKernel && (cfg.Snapshot == nil || !cfg.Snapshot.Restore) {
		// Only a boot reads the command line: a restored guest has long
		// since parsed it, so a restore does not measure.
		k, err := hostclock.TSCKHz()
		if err != nil {
			m.log.Debug("the guest calibrates its TSC", "why", err)
		}
		a.tscKHz = k
	}
	var err error
	if m.agent, a.agentFD, err = pair("agent"); err != nil {
		return fail(err)
	}
	var qmpConn net.Conn
	if qmpConn, a.qmpFD, err = pair("qmp"); err != nil {
		return fail(err)
	}
	m.qmp = qmp.New(qmpConn)
	if m.consoleConn, a.consoleFD, err = pair("console"); err != nil {
		return fail(err)
	}
	for _, name := range cfg.RawPorts {
		c, fd, err := pair(name)
		if err != nil {
			return fail(err)
		}
		m.raw[name] = c
		a.rawFDs = append(a.rawFDs, fd)
	}
	if nic := cfg.NIC; nic != nil {
		// Ours to close once QEMU has it, like the other child ends.
		childEnds = append(childEnds, nic.Conn)
		a.nicFD = 2 + len(childEnds)
	}
	for _, d := range cfg.Drives {
		fds, err := openDrive(d, &childEnds)
		if err != nil {
			return fail(err)
		}
		a.driveFDs = append(a.driveFDs, fds)
	}
	incomingFD := -1
	if sn := cfg.Snapshot; sn != nil && sn.Restore {
		state, err := os.Open(filepath.Join(sn.Dir, snapshotState))
		if err != nil {
			return fail(fmt.Errorf("open snapshot: %w", err))
		}
		childEnds = append(childEnds, state)
		incomingFD = 2 + len(childEnds)
		_, err = os.Stat(filepath.Join(sn.Dir, snapshotRAMReadOnly))
		a.ramReadOnly = err == nil
	}
	m.snapshot, m.bin = cfg.Snapshot, bin
	var jailer string
	if b.Confine && os.Geteuid() == 0 {
		if jailer, err = FindJailer(); err != nil {
			return fail(err)
		}
		// QEMU drops to a per-run uid and chroots into the run directory
		// itself, once it has opened its files as root.
		id := vmmID()
		a.runAs = fmt.Sprintf("%d:%d", id, id)
		a.chroot = cfg.RunDir
	}
	args, err := buildArgs(a)
	if err != nil {
		return fail(err)
	}
	var vmmOut bytes.Buffer
	cmd := exec.Command(bin, args...)
	var cloneFlags uintptr
	if jailer != "" {
		// The jailer keeps the parent-death signal that QEMU's own uid
		// change would clear (see cmd/mvm-jailer), as the init of a PID
		// namespace the VMM cannot outlive. Network, IPC and UTS
		// namespaces of its own too: the VMM has no NIC and needs none
		// of the host's.
		argsR, err := jailerArgs(append([]string{bin}, args...))
		if err != nil {
			return fail(err)
		}
		defer argsR.Close()
		cmd = exec.Command(jailer, "--fds", strconv.Itoa(len(childEnds)), "--args-fd", strconv.Itoa(3+len(childEnds)))
		childEnds = append(childEnds, argsR)
		cloneFlags = syscall.CLONE_NEWPID | syscall.CLONE_NEWNET | syscall.CLONE_NEWIPC | syscall.CLONE_NEWUTS
	}
	cmd.Stdin = nil // /dev/null: QEMU must never read the user's terminal
	cmd.Stdout = &limitedBuffer{buf: &vmmOut, limit: 64 << 10}
	cmd.Stderr = cmd.Stdout
	cmd.ExtraFiles = childEnds
	cmd.Dir = cfg.RunDir
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a Ctrl-C on the terminal reaches mvmctl, which
		// decides what the guest gets; QEMU would otherwise quit on SIGINT.
		Setpgid: true,
		// The VMM dies with the thread that started it; see startLocked.
		Pdeathsig:  syscall.SIGKILL,
		Cloneflags: cloneFlags,
	}
	m.vmmOut = &vmmOut
	m.log.Debug("starting vmm", "path", bin, "args", args)
	if err := m.startLocked(cmd); err != nil {
		return fail(fmt.Errorf("start %s: %w", bin, err))
	}
	// The VMM has its copies; ours would keep its channels from ever
	// reaching end-of-file (the console reader waits for that).
	for _, f := range childEnds {
		f.Close()
	}
	childEnds = nil
	// Negotiate QMP in the background and watch its events, so that a
	// guest that halts without ending the VMM is noticed at once.
	m.qmp.Start()
	events := m.qmp.Events()
	if incomingFD >= 0 {
		if err := m.restore(ctx, incomingFD, events); err != nil {
			stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
			_ = m.Stop(stopCtx)
			cancel()
			return nil, err
		}
	}
	go m.watchEvents(events)
	return m, nil
}

// openDrive opens a drive's image for QEMU: read-only, and read-write too
// unless the drive is read-only. The files join the child's descriptors;
// their numbers there are returned.
func openDrive(d backend.Drive, childEnds *[]*os.File) ([]int, error) {
	flags := []int{os.O_RDONLY}
	if !d.ReadOnly {
		flags = append(flags, os.O_RDWR)
	}
	var fds []int
	for _, fl := range flags {
		f, err := os.OpenFile(d.Path, fl, 0)
		if err != nil {
			return nil, fmt.Errorf("open drive: %w", err)
		}
		*childEnds = append(*childEnds, f)
		fds = append(fds, 2+len(*childEnds))
	}
	return fds, nil
}

// FindJailer locates the mvm-jailer binary (see helperbin.Find for the
// order; MVM_JAILER overrides it).
func FindJailer() (string, error) {
	p, err := helperbin.Find("mvm-jailer", "MVM_JAILER")
	if err != nil {
		return "", fmt.Errorf("%w; it confines QEMU when mvm runs as root", err)
	}
	return p, nil
}

// jailerArgs returns a pipe whose read end yields args, each ended by a
// NUL byte, as mvm-jailer reads them. They fit in the pipe's buffer (64
// KiB; a command line is a few KiB), so writing them all before the
// jailer starts cannot block.
func jailerArgs(args []string) (*os.File, error) {
	var b bytes.Buffer
	for _, a := range args {
		b.WriteString(a)
		b.WriteByte(0)
	}
	if b.Len() > 60<<10 {
		return nil, fmt.Errorf("vmm command line of %d bytes is too long", b.Len())
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	_, err = w.Write(b.Bytes())
	w.Close()
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// vmmID picks the uid (and gid) a confined VMM runs as: a per-run id far
// above the ranges distributions hand to users and to subordinate id
// maps, so that two VMMs never share a uid and none shares one with a
// person.
func vmmID() uint32 {
	var b [4]byte
	_, _ = unix.Getrandom(b[:], 0)
	return vmmIDBase + (uint32(b[0])|uint32(b[1])<<8|uint32(b[2])<<16)%vmmIDRange
}

const (
	vmmIDBase  = 1 << 30
	vmmIDRange = 1 << 24
)

// socketpair returns a connected pair: the host end as a net.Conn, the
// other as a file for the child.
func socketpair(name string) (net.Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair for %s: %w", name, err)
	}
	hostFile := os.NewFile(uintptr(fds[0]), name+"-host")
	conn, err := net.FileConn(hostFile)
	hostFile.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("socketpair for %s: %w", name, err)
	}
	return conn, os.NewFile(uintptr(fds[1]), name+"-vmm"), nil
}

type machine struct {
	cmd         *exec.Cmd
	agent       net.Conn
	consoleConn net.Conn
	console     *tail
	consoleLog  string
	raw         map[string]net.Conn
	qmp         *qmp.Client
	vmmOut      *bytes.Buffer // QEMU's own stdout/stderr (bounded)
	log         *slog.Logger

	mu       sync.Mutex
	stopped  bool  // Stop was called
	guestErr error // why the guest is gone, when the VMM said so before exiting
	err      error // set before done is closed

	snapshot *backend.Snapshot
	bin      string // the QEMU binary

	doneOnce sync.Once
	done     chan struct{} // the guest can no longer run
	exited   chan struct{} // the VMM process is gone and the console saved
	stopOnce sync.Once
}

// startLocked starts the VMM from a goroutine pinned to its OS thread and
// keeps that goroutine (and thread) alive until the VMM exits. Pdeathsig
// fires when the thread that forked the child exits, not the process, so
// an unpinned start could see QEMU killed whenever the Go runtime retires
// that thread; pinned, it fires only when this whole process dies.
func (m *machine) startLocked(cmd *exec.Cmd) error {
	m.cmd = cmd
	started := make(chan error, 1)
	consoleDone := make(chan struct{})
	go func() {
		defer close(consoleDone)
		drainConsole(m.consoleConn, m.console)
	}()
	go func() {
		runtime.LockOSThread()
		// Never unlocked: when this goroutine returns the thread exits,
		// which is harmless because the VMM is gone by then.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		err := cmd.Wait()
		// The VMM's end of every channel is closed now; the console
		// reader sees end-of-file once it has everything.
		<-consoleDone
		if m.consoleLog != "" {
			if werr := writeConsoleLog(m.consoleLog, m.console); werr != nil {
				m.log.Warn("save console log", "err", werr)
			}
		}
		m.mu.Lock()
		if m.err == nil {
			m.err = m.exitError(err)
		}
		m.mu.Unlock()
		m.closeConns()
		m.markDone(nil)
		close(m.exited)
	}()
	if err := <-started; err != nil {
		m.consoleConn.Close()
		return err
	}
	return nil
}

// markDone closes Done once, recording why the guest is gone (the first
// reason wins).
func (m *machine) markDone(reason error) {
	m.mu.Lock()
	if reason != nil && m.guestErr == nil && !m.stopped {
		m.guestErr = reason
		m.err = reason
	}
	m.mu.Unlock()
	m.doneOnce.Do(func() { close(m.done) })
}

// exitError explains how the VMM ended: nil for a clean exit (the guest
// powered off) or one we asked for, otherwise the exit status and the last
// lines QEMU printed.
func (m *machine) exitError(err error) error {
	if m.guestErr != nil {
		return m.guestErr
	}
	if err == nil || m.stopped {
		return nil
	}
	msg := err.Error()
	if tail := lastLines(m.vmmOut.String(), 5); tail != "" {
		msg += ": " + tail
	}
	return errors.New("vmm exited unexpectedly: " + msg)
}

// watchEvents turns QMP events that mean "the guest is gone" into Done.
func (m *machine) watchEvents(events <-chan qmp.Event) {
	for ev := range events {
		if reason := guestGone(ev.Name, ev.Data); reason != nil {
			m.log.Debug("guest gone", "event", ev.Name, "reason", reason)
			m.markDone(reason)
			return
		}
	}
}

// ErrGuestHalted reports a guest that shut its devices down or stopped
// its CPUs without powering off through the agent.
var ErrGuestHalted = errors.New("the guest halted or powered off")

// ErrGuestPanicked reports a guest kernel panic.
var ErrGuestPanicked = errors.New("the guest kernel panicked")

// guestGone maps a QMP event to why the guest can no longer run, or nil.
// Watching for them means a guest that halted or powered off without
// ending the VMM (there is no ACPI: `poweroff -f` shuts devices down and
// stops the CPUs) is noticed at once instead of at a timeout.
func guestGone(name string, data json.RawMessage) error {
	switch name {
	case "GUEST_PANICKED":
		return ErrGuestPanicked
	case "VSERPORT_CHANGE":
		// The guest closed the agent's port: its kernel shut the device
		// down (halt, power-off) or the agent died.
		var d struct {
			ID   string `json:"id"`
			Open bool   `json:"open"`
		}
		if json.Unmarshal(data, &d) == nil && d.ID == agentPortID && !d.Open {
			return fmt.Errorf("%w: it closed the agent channel", ErrGuestHalted)
		}
	}
	return nil
}

func (m *machine) closeConns() {
	if m.agent != nil {
		m.agent.Close()
	}
	for _, c := range m.raw {
		c.Close()
	}
	if m.qmp != nil {
		m.qmp.Close()
	}
}

func (m *machine) DialAgent(ctx context.Context) (net.Conn, error) {
	select {
	case <-m.exited:
		return nil, fmt.Errorf("dial agent: %w", m.Err())
	default:
		return m.agent, nil
	}
}

func (m *machine) RawPort(name string) (net.Conn, bool) {
	c, ok := m.raw[name]
	return c, ok
}

func (m *machine) Done() <-chan struct{} { return m.done }

func (m *machine) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

func (m *machine) PID() int { return m.cmd.Process.Pid }

// Stop asks QEMU to quit over QMP and, if it has not gone by the time ctx
// ends (or QMP fails), kills its process group. It returns once the VMM
// process is gone and its console saved.
func (m *machine) Stop(ctx context.Context) error {
	m.stopOnce.Do(func() {
		m.mu.Lock()
		m.stopped = true
		m.mu.Unlock()
		select {
		case <-m.exited:
			return
		default:
		}
		if _, err := m.qmp.Execute(ctx, "quit", nil); err != nil {
			m.log.Debug("qmp quit failed; killing", "err", err)
			m.kill()
		}
		select {
		case <-m.exited:
		case <-ctx.Done():
			m.kill()
		}
	})
	<-m.exited
	return nil
}

// kill ends the VMM at once, without asking.
func (m *machine) kill() {
	_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(string(bytes.ToValidUTF8([]byte(s), nil))), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// limitedBuffer keeps the first limit bytes written to it and discards the
// rest: QEMU's own messages are few, but they may quote guest input.
type limitedBuffer struct {
	mu    sync.Mutex
	buf   *bytes.Buffer
	limit int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := l.limit - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// ConsoleTail is what the guest's console printed so far (its last
// backend.ConsoleLogLimit bytes), and whether older bytes were dropped.
func (m *machine) ConsoleTail() ([]byte, bool) { return m.console.Bytes() }
