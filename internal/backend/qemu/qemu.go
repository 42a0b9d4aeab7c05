// Package qemu runs machines with QEMU's microvm machine type: no PCI, no
// ACPI, virtio-mmio devices, a PVH kernel entry. The agent talks over a
// virtio-serial port whose host side is one end of a socketpair handed to
// QEMU as a file descriptor, so there is no socket path to create, poll for
// or clean up, and nothing to connect to before the VMM listens.
package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
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
	Log     *slog.Logger
}

// New returns a backend with the sandbox on.
func New(log *slog.Logger) *Backend {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{Sandbox: true, Log: log}
}

// Name implements backend.Backend.
func (b *Backend) Name() string { return "qemu" }

// Capabilities implements backend.Backend. Snapshots are possible with
// QEMU but not wired up yet, so they are not announced.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{ReadOnlyDrives: true}
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
		console: filepath.Join(cfg.RunDir, "console.log"),
		vmmLog:  filepath.Join(cfg.RunDir, "vmm.log"),
		done:    make(chan struct{}),
		raw:     make(map[string]net.Conn),
		log:     b.Log.With("vm", cfg.Name),
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
	var err error
	fail := func(err error) (backend.Machine, error) {
		m.closeConns()
		return nil, err
	}
	a := argsConfig{cfg: cfg, console: m.console, sandbox: b.Sandbox}
	if m.agent, a.agentFD, err = pair("agent"); err != nil {
		return fail(err)
	}
	var qmpConn net.Conn
	if qmpConn, a.qmpFD, err = pair("qmp"); err != nil {
		return fail(err)
	}
	m.qmp = qmp.New(qmpConn)
	for _, name := range cfg.RawPorts {
		c, fd, err := pair(name)
		if err != nil {
			return fail(err)
		}
		m.raw[name] = c
		a.rawFDs = append(a.rawFDs, fd)
	}
	args, err := buildArgs(a)
	if err != nil {
		return fail(err)
	}
	logFile, err := os.OpenFile(m.vmmLog, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fail(fmt.Errorf("create vmm log: %w", err))
	}
	defer logFile.Close()

	cmd := exec.Command(bin, args...)
	cmd.Stdin = nil // /dev/null: QEMU must never read the user's terminal
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.ExtraFiles = childEnds
	cmd.Dir = cfg.RunDir
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a Ctrl-C on the terminal reaches mvmctl, which
		// decides what the guest gets; QEMU would otherwise quit on SIGINT.
		Setpgid: true,
		// The VMM dies with the thread that started it; see startLocked.
		Pdeathsig: syscall.SIGKILL,
	}
	m.log.Debug("starting vmm", "path", bin, "args", args)
	if err := m.startLocked(cmd); err != nil {
		return fail(fmt.Errorf("start %s: %w", bin, err))
	}
	return m, nil
}

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
	cmd     *exec.Cmd
	console string
	vmmLog  string
	agent   net.Conn
	raw     map[string]net.Conn
	qmp     *qmp.Client
	log     *slog.Logger

	done    chan struct{}
	waitErr error // set before done is closed

	stopOnce sync.Once
	stopped  bool // Stop was called; set before the VMM is told to go
	mu       sync.Mutex
}

// startLocked starts the VMM from a goroutine pinned to its OS thread and
// keeps that goroutine (and thread) alive until the VMM exits. Pdeathsig
// fires when the thread that forked the child exits, not the process, so
// an unpinned start could see QEMU killed whenever the Go runtime retires
// that thread; pinned, it fires only when this whole process dies.
func (m *machine) startLocked(cmd *exec.Cmd) error {
	m.cmd = cmd
	started := make(chan error, 1)
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
		m.mu.Lock()
		stopped := m.stopped
		m.mu.Unlock()
		m.waitErr = m.exitError(err, stopped)
		m.closeConns()
		close(m.done)
	}()
	return <-started
}

// exitError explains how the VMM ended: nil for a clean exit (the guest
// powered off) or one we asked for, otherwise the exit status and the last
// lines QEMU printed.
func (m *machine) exitError(err error, stopped bool) error {
	if err == nil || stopped {
		return nil
	}
	msg := err.Error()
	if tail := lastLines(m.vmmLog, 5); tail != "" {
		msg += ": " + tail
	}
	return errors.New("vmm exited unexpectedly: " + msg)
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

func (m *machine) AgentConn() net.Conn { return m.agent }

func (m *machine) RawPort(name string) (net.Conn, bool) {
	c, ok := m.raw[name]
	return c, ok
}

func (m *machine) Done() <-chan struct{} { return m.done }

func (m *machine) ConsoleLog() string { return m.console }

func (m *machine) PID() int { return m.cmd.Process.Pid }

func (m *machine) Wait(ctx context.Context) error {
	select {
	case <-m.done:
		return m.waitErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stop asks QEMU to quit over QMP and, if it has not gone by the time ctx
// ends (or QMP fails), kills its process group.
func (m *machine) Stop(ctx context.Context) error {
	m.stopOnce.Do(func() {
		m.mu.Lock()
		m.stopped = true
		m.mu.Unlock()
		select {
		case <-m.done:
			return
		default:
		}
		if _, err := m.qmp.Execute(ctx, "quit", nil); err != nil {
			m.log.Debug("qmp quit failed; killing", "err", err)
			m.kill()
		}
		select {
		case <-m.done:
		case <-ctx.Done():
			m.kill()
			<-m.done
		}
	})
	<-m.done
	return nil
}

// kill ends the VMM at once, without asking.
func (m *machine) kill() {
	_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
}

func lastLines(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(bytes.ToValidUTF8(b, nil))), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
