package mvm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/network"
	"github.com/mvm-sh/mvm/internal/procmem"
	"github.com/mvm-sh/mvm/internal/runstate"
	"github.com/mvm-sh/mvm/internal/snapshot"
)

// Tunables that are not configuration.
const (
	// bootTimeout bounds boot-to-hello. TCG boots in about a second on an
	// idle host; this only catches a guest that will never answer.
	bootTimeout = 60 * time.Second
	// mountTimeout bounds mounting the shared directories (tens of
	// milliseconds each, emulated): the keepalive does not run yet.
	mountTimeout = 30 * time.Second
	// stopTimeout bounds a polite VMM stop before it is killed.
	stopTimeout = 2 * time.Second
	// shutdownTimeout bounds the guest's own shutdown (sync, unmount)
	// when read-write directories need a clean filesystem.
	shutdownTimeout = 10 * time.Second
	// keptLogs is how many console logs of failed runs are kept; each is
	// at most backend.ConsoleLogLimit.
	keptLogs = 20
)

// keepaliveInterval and keepaliveTimeout are how often the agent is pinged
// while the sandbox runs, and how long an answer may take before the guest
// is declared dead (frozen, or stuck without its VMM noticing). Generous:
// an emulated guest under load is slow. Variables for tests.
var (
	keepaliveInterval = 2 * time.Second
	keepaliveTimeout  = 5 * time.Second
	// restoreTimeout bounds restore-to-hello: a restored agent answers in
	// a fraction of a second, well under a second even with eight
	// restores at once on two emulated cores. A guest that does not is
	// a bad snapshot, and the run boots instead.
	restoreTimeout = 20 * time.Second
)

// Sandbox is a running VM that commands can be run in, one after another
// or concurrently. It is safe for use by several goroutines.
type Sandbox struct {
	cfg  resolved
	img  image.Image
	name string
	log  *slog.Logger
	life *lifecycle

	run    *runstate.Run
	vmDir  string // the VMM's directory: the run's, or a snapshot's being made
	saving *snapshot.Saving
	nic    *backend.NIC // the network card, with Config.Network
	root   *rootPlan    // on a template
	dirs   []*dirPlan
	m      backend.Machine
	client *agentclient.Client
	hello  *agentclient.Hello

	failOnce sync.Once
	failed   chan struct{} // closed when the VM or its agent failed
	failErr  *VMError

	stopMonitor chan struct{}
	// keepalive settings, fixed at start
	pingEvery, pingTimeout time.Duration

	restored      bool              // the machine came from a snapshot
	rootMounted   bool              // ... whose guest had the template's root mounted
	upperCopied   bool              // the root's writable layer is a snapshot's copy, not empty
	snap          *snapshot.Checked // the snapshot it came from
	snapDiscarded bool              // this run discarded it
	healWanted    bool              // it booted for want of a snapshot its configuration could have (MissingSnapshot)
	savedDir      string            // the snapshot this sandbox saved (PrepareSnapshot)

	mu         sync.Mutex
	status     Status
	everFailed bool   // it failed at some point: its console log is kept
	abandon    bool   // skip the guest's graceful shutdown (Run after an interrupt)
	keepRun    bool   // the run directory holds the only copy of a guest's changes
	consoleLog string // where the console log was kept
	writeBacks []WriteBack

	closeOnce sync.Once
	closeErr  error

	act      activity // calls of Serve's clients, for IdleSince
	attached bool     // Attach made it: another process owns the VM
	pooled   bool     // a pool's VM: it serves one run, and is not paused
	taken    bool     // attached to a VM taken from a pool

	drives    []backend.Drive // the machine's, for a resume
	monPause  chan struct{}   // closed to stop this machine's monitor (Pause)
	monDone   chan struct{}   // closed when that monitor returned
	pausing   bool            // Pause is under way: no new calls
	pausedDir string          // the paused state, while paused
	pausedRAM bool            // what Pause said of the memory layout
	resuming  bool            // the hello is a resumed machine's (same boot)
	opMu      sync.Mutex      // one Pause, Resume or Detach at a time; Close waits
	clientSeq atomic.Uint64   // names Serve's clients, across every Serve
}

// helloReply is the agent's hello of the machine running now.
func (sb *Sandbox) helloReply() *agentclient.Hello {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.hello
}

// agentClient is the agent session of the machine running now (a resume
// makes a new one).
func (sb *Sandbox) agentClient() *agentclient.Client {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.client
}

// reclaim removes the leftovers of runs whose mvmctl died, keeping any
// read-write changes they hold.
func (sb *Sandbox) reclaim(context.Context) (undoFunc, error) {
	reclaimed, err := runstate.ReclaimSalvaging(sb.cfg.RunDir, sb.log, sb.salvage)
	if err != nil {
		sb.log.Warn("reclaiming leftovers of earlier runs", "err", err)
	} else if len(reclaimed) > 0 {
		sb.log.Debug("reclaimed leftovers of earlier runs", "runs", reclaimed)
	}
	return nil, nil
}

func (sb *Sandbox) prepareRun(context.Context) (undoFunc, error) {
	run, err := runstate.Create(sb.cfg.RunDir, sb.name)
	if err != nil {
		return nil, fmt.Errorf("prepare run: %w", err)
	}
	sb.run, sb.vmDir = run, run.Dir
	return sb.cleanUp, nil
}

// cleanUp removes the run directory, first keeping the console log of a
// run that failed.
func (sb *Sandbox) cleanUp(context.Context) error {
	sb.mu.Lock()
	keep := sb.everFailed
	sb.mu.Unlock()
	if keep {
		if p := sb.keepConsole(); p != "" {
			sb.mu.Lock()
			sb.consoleLog = p
			sb.mu.Unlock()
		}
	}
	sb.mu.Lock()
	keepRun := sb.keepRun
	sb.mu.Unlock()
	if keepRun {
		// The next run salvages it once this process has let go.
		sb.run.Release()
		return nil
	}
	if err := sb.run.Remove(); err != nil {
		sb.log.Warn("remove run directory", "err", err)
	}
	return nil
}

func (sb *Sandbox) boot(ctx context.Context) (undoFunc, error) {
	sb.log.Debug("booting", "config", sb.cfg.String(), "accel", sb.cfg.accel.Kind, "why", sb.cfg.accel.Reason)
	snap, unlock, why := sb.snapshot(ctx)
	if snap != nil {
		m, err := sb.restore(ctx, snap)
		unlock()
		switch {
		case err == nil:
			sb.life.annotate("restored from snapshot " + snap.Dir)
			snapshot.MarkUsed(snap.Dir)
			return sb.started(m), nil
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.Is(err, snapshot.ErrReplaced):
			// bootstrap replaced it meanwhile: the VMM may have the old
			// state and the new RAM. The new one is not to blame.
			why = "its snapshot was replaced while it restored"
		case errors.Is(err, snapshot.ErrWritten):
			sb.tampered(snap)
			why = "its snapshot was written while it restored"
		case errors.Is(err, backend.ErrSnapshotRejected):
			sb.discard(snap, "could not be restored", err)
			why = "its snapshot failed to restore"
		default:
			// Not the snapshot's fault (the host is short of something):
			// it stays for the next run.
			sb.log.Warn("could not restore the snapshot; booting instead", "snapshot", snap.Dir, "err", err)
			why = "its snapshot failed to restore (kept)"
		}
	}
	sb.life.annotate("cold boot: " + why)
	return sb.coldBoot(ctx)
}

// coldBoot boots the machine with the run's disks.
func (sb *Sandbox) coldBoot(ctx context.Context) (undoFunc, error) {
	if sb.upperCopied {
		// A restore that failed left a snapshot's layer there.
		if err := sb.prepareRoot(ctx); err != nil {
			return nil, &VMError{Op: "start vm", Err: err}
		}
		sb.upperCopied = false
	}
	var drives []backend.Drive
	if r := sb.root; r != nil {
		drives = append(drives,
			backend.Drive{Label: r.lowerLabel, Path: r.lower, ReadOnly: true},
			backend.Drive{Label: rootLabel, Path: r.upper})
	}
	for _, d := range sb.dirs {
		drives = append(drives, d.drives()...)
	}
	m, err := sb.cfg.backend.Start(ctx, sb.machineConfig(drives, nil))
	if err != nil {
		return nil, &VMError{Op: "start vm", Err: err}
	}
	sb.drives = drives
	return sb.started(m), nil
}

// discard warns that the snapshot failed and removes it, so that the next
// bootstrap or template snapshot rebuilds it rather than every run trying
// it again; the run boots. A snapshot that replaced the one checked
// meanwhile is left alone.
func (sb *Sandbox) discard(c *snapshot.Checked, what string, err error) {
	if sb.snapDiscarded {
		return
	}
	sb.snapDiscarded, sb.healWanted = true, true
	if !c.Discard() {
		sb.log.Warn("the snapshot "+what+"; booting instead (it was replaced meanwhile)", "snapshot", c.Dir, "err", err)
		return
	}
	sb.log.Warn("the snapshot "+what+"; booting instead (it is discarded: "+sb.snapshotFix()+" rebuilds it)", "snapshot", c.Dir, "err", err)
}

// tampered discards a snapshot whose RAM file or state was written in
// place while a run had it open, loudly: no VMM writes them, so one that
// did was likely taken over by its guest (QEMU before 8.2 opens the RAM
// file read-write), and every later restore would run what it wrote.
func (sb *Sandbox) tampered(c *snapshot.Checked) {
	if sb.snapDiscarded {
		return
	}
	sb.snapDiscarded, sb.healWanted = true, true
	c.Discard()
	sb.log.Error("the snapshot's RAM file or state was written while a run had it open; the snapshot is discarded ("+sb.snapshotFix()+" makes a new one; a VMM never writes it: report this)", "snapshot", c.Dir)
}

// started records a machine that runs, and returns its undo.
func (sb *Sandbox) started(m backend.Machine) undoFunc {
	sb.m = m
	if err := sb.run.RecordVMM(m.PID()); err != nil {
		sb.log.Warn("record vmm pid", "err", err)
	}
	return sb.stopVM
}

// stopVM ends the VMM, politely while stopTimeout allows.
func (sb *Sandbox) stopVM(ctx context.Context) error {
	stopCtx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	if err := sb.m.Stop(stopCtx); err != nil {
		sb.log.Warn("stop vm", "err", err)
	}
	sb.checkSnapshotIntact()
	return nil
}

// checkSnapshotIntact makes sure a restored run left its snapshot as it
// found it (see tampered); the file's change time shows any write.
func (sb *Sandbox) checkSnapshotIntact() {
	if c := sb.snap; sb.restored && c != nil && c.Change() == snapshot.Written {
		sb.tampered(c)
	}
}

// connect opens the agent session and waits for its hello, the guest's
// sign of life after boot. A restored guest that does not answer (it
// died, or hangs: a RAM file damaged on disk restores into a guest that
// crashes) makes the snapshot bad: it is discarded and the run boots.
func (sb *Sandbox) connect(ctx context.Context) (undoFunc, error) {
	undo, detail, err := sb.sayHello(ctx)
	if err == nil || !sb.restored || ctx.Err() != nil {
		sb.life.annotate(detail)
		return undo, err
	}
	if undo != nil {
		_ = undo(ctx)
	}
	_ = sb.stopVM(ctx)
	sb.discard(sb.snap, "restored into a guest that did not answer", err)
	sb.restored, sb.rootMounted, sb.snap, sb.client, sb.hello = false, false, nil, nil, nil
	if _, err := sb.coldBoot(ctx); err != nil {
		return nil, err
	}
	undo, detail, err = sb.sayHello(ctx)
	sb.life.annotate("cold boot after the restored guest failed: " + detail)
	return undo, err
}

// sayHello dials the agent and waits for its hello reply, at most bootTimeout
// after a boot and restoreTimeout after a restore. detail is what the
// timing breakdown says of it.
func (sb *Sandbox) sayHello(ctx context.Context) (undo undoFunc, detail string, err error) {
	conn, err := sb.m.DialAgent(ctx)
	if err != nil {
		return nil, "", &VMError{Op: "connect to guest agent", Err: err}
	}
	// A restored guest is a clone: its boot id is the snapshot's until
	// the hello renews it (the agent also reseeds its RNG and sets the
	// clock at every hello).
	client, err := agentclient.DialWithOptions(conn, agentclient.HelloOptions{RenewBootID: sb.restored && !sb.resuming})
	if err != nil {
		return nil, "", &VMError{Op: "connect to guest agent", Err: err}
	}
	sb.mu.Lock()
	sb.client = client
	sb.mu.Unlock()
	undo = func(context.Context) error { return sb.agentClient().Close() }

	limit := bootTimeout
	if sb.restored || sb.resuming {
		limit = restoreTimeout
	}
	hctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	helloErr := make(chan error, 1)
	go func() {
		h, err := client.Hello(hctx)
		sb.mu.Lock()
		sb.hello = h
		sb.mu.Unlock()
		helloErr <- err
	}()
	select {
	case err = <-helloErr:
	case <-sb.m.Done():
		cancel()
		<-helloErr
		return undo, "", &VMError{Op: "boot", Err: vmEnded(sb.m)}
	}
	switch {
	case err == nil && !sb.restored && !sb.resuming:
		// A restored guest's uptimes are the snapshot's boot.
		detail = fmt.Sprintf("guest kernel %s, agent init %s",
			ms(sb.hello.AgentStart), ms(sb.hello.GuestUptime-sb.hello.AgentStart))
	case err == nil:
	case ctx.Err() != nil:
		return undo, "", ctx.Err()
	case hctx.Err() != nil:
		return undo, "", &VMError{Op: "boot", Err: fmt.Errorf("the guest agent did not answer within %s", limit)}
	default:
		return undo, "", &VMError{Op: "connect to guest agent", Err: err}
	}
	return undo, detail, nil
}

// mount mounts the shared directories in the guest. Its undo is the
// guest's shutdown, which syncs and unmounts them.
func (sb *Sandbox) mount(ctx context.Context) (undoFunc, error) {
	mctx, cancel := context.WithTimeout(ctx, mountTimeout)
	defer cancel()
	if r := sb.root; r != nil && !sb.hello.Has(agentproto.CapRoot) {
		return nil, &VMError{Op: "mount", Err: fmt.Errorf("the guest agent (%s) cannot run commands in a template", sb.hello.AgentVersion)}
	}
	if sb.nic != nil && !sb.hello.Has(agentproto.CapNetwork) {
		return nil, &VMError{Op: "mount", Err: fmt.Errorf("the guest agent (%s) cannot configure a network", sb.hello.AgentVersion)}
	}
	call := func(ctx context.Context) error {
		if r := sb.root; r != nil && !sb.rootMounted {
			if err := sb.client.Root(ctx, agentclient.Root{Template: r.lowerLabel, Upper: rootLabel}); err != nil {
				return fmt.Errorf("template root: %w", err)
			}
		}
		if n := sb.nic; n != nil {
			// After the root: the agent writes the root's resolv.conf.
			nc := agentclient.Network{
				MAC: n.MAC, Address: netip.PrefixFrom(network.GuestIP, network.Subnet.Bits()),
				Gateway: network.Gateway, DNS: []netip.Addr{network.Gateway}, MTU: network.MTU,
			}
			if t := sb.cfg.TAP; t != nil {
				nc = agentclient.Network{MAC: n.MAC, Address: t.Address, Gateway: t.Gateway, DNS: t.DNS, MTU: t.MTU}
			}
			err := sb.client.Network(ctx, nc)
			if err != nil {
				return fmt.Errorf("network: %w", err)
			}
		}
		return mountAll(ctx, sb.client, sb.dirs)
	}
	if err := sb.guestCall(mctx, call); err != nil {
		if mctx.Err() == context.DeadlineExceeded && ctx.Err() == nil {
			err = &VMError{Op: "mount", Err: fmt.Errorf("the guest did not mount the shared directories within %s", mountTimeout)}
		}
		return sb.shutdownGuest, err
	}
	return sb.shutdownGuest, nil
}

// guestCall runs a call to the agent that must not outlive the VM.
func (sb *Sandbox) guestCall(ctx context.Context, call func(context.Context) error) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- call(cctx) }()
	select {
	case err := <-errc:
		if err != nil && ctx.Err() == nil {
			return &VMError{Op: "mount", Err: err}
		}
		return err
	case <-sb.m.Done():
		cancel()
		<-errc
		return &VMError{Op: "mount", Err: vmEnded(sb.m)}
	}
}

// shutdownGuest asks the guest to sync, unmount and power off, when there
// are read-write directories: the host then finds clean filesystems.
// Without them nothing in the guest is worth waiting for.
func (sb *Sandbox) shutdownGuest(ctx context.Context) error {
	sb.mu.Lock()
	abandon := sb.abandon
	sb.mu.Unlock()
	if abandon || !hasWritable(sb.dirs) {
		return nil
	}
	select {
	case <-sb.m.Done():
		return nil
	default:
	}
	sctx, cancel := context.WithTimeout(ctx, shutdownTimeout)
	defer cancel()
	if err := sb.agentClient().Shutdown(sctx); err != nil {
		sb.log.Debug("guest shutdown", "err", err)
		return nil
	}
	select {
	case <-sb.m.Done():
	case <-sctx.Done():
		sb.log.Warn("the guest did not power off in time; stopping it", "timeout", shutdownTimeout)
	}
	return nil
}

// monitor watches the VM and its agent while the sandbox is up: the
// VMM's end or the backend's word that the guest is gone, and the agent's
// answers to keepalive pings.
func (sb *Sandbox) monitor() {
	sb.monPause, sb.monDone = make(chan struct{}), make(chan struct{})
	pause, done := sb.monPause, sb.monDone
	go func() {
		defer close(done)
		sb.watch(pause)
	}()
}

// watch is monitor's loop, until Close or pause.
func (sb *Sandbox) watch(pause <-chan struct{}) {
	m, client := sb.m, sb.agentClient()
	pingFailed := make(chan error, 1)
	go func() {
		t := time.NewTicker(sb.pingEvery)
		defer t.Stop()
		for {
			select {
			case <-sb.stopMonitor:
				return
			case <-pause:
				return
			case <-m.Done():
				return
			case <-t.C:
			}
			pctx, cancel := context.WithTimeout(context.Background(), sb.pingTimeout)
			_, err := client.Ping(pctx)
			cancel()
			if err != nil {
				select {
				case <-sb.stopMonitor:
				case <-pause:
				default:
					pingFailed <- err
				}
				return
			}
		}
	}()
	select {
	case <-sb.stopMonitor:
	case <-pause:
	case <-m.Done():
		sb.fail(&VMError{Op: "run", Err: vmEnded(m)})
	case err := <-pingFailed:
		sb.fail(&VMError{Op: "run", Err: fmt.Errorf("the guest agent stopped answering (%w); the VM was torn down", err)})
	}
}

// fail marks the sandbox broken: every command waiting on it gets err.
func (sb *Sandbox) fail(err *VMError) {
	sb.failOnce.Do(func() {
		sb.log.Debug("sandbox failed", "err", err)
		sb.mu.Lock()
		sb.failErr = err
		sb.mu.Unlock()
		sb.setStatus(StatusFailed)
		close(sb.failed)
	})
}

// Err is why the sandbox failed (its VM died or its agent stopped
// answering), or nil while it is healthy.
func (sb *Sandbox) Err() error {
	select {
	case <-sb.failed:
		return sb.failErr
	default:
		return nil
	}
}

// vmEnded explains a machine that is gone.
func vmEnded(m backend.Machine) error {
	if err := m.Err(); err != nil {
		return err
	}
	return errors.New("the VM stopped (the guest powered off)")
}

// Close tears the sandbox down: commands still running are killed, the
// guest is shut down (so that read-write directories are consistent), the
// VM is stopped, what the guest changed in read-write directories is
// written back, and the run's files are removed. It returns one WriteBack
// per read-write directory; the error joins the *WriteBackError of every
// one that failed (their changes are kept, see WriteBackError.Kept).
//
// Cancelling ctx makes Close hurry: the VM is stopped at once and a
// write-back in progress is interrupted, its changes kept. Close is
// idempotent; later calls return the first call's results.
func (sb *Sandbox) Close(ctx context.Context) ([]WriteBack, error) {
	// Not in the middle of a pause or resume (their VMM would outlive
	// the teardown).
	sb.opMu.Lock()
	defer sb.opMu.Unlock()
	sb.closeOnce.Do(func() {
		sb.setStatus(StatusClosing)
		close(sb.stopMonitor)
		err := sb.life.unwind(ctx)
		sb.setStatus(StatusClosed)
		sb.mu.Lock()
		wbs := sb.writeBacks
		sb.mu.Unlock()
		var errs []error
		if err != nil {
			errs = append(errs, err)
		}
		for _, wb := range wbs {
			if wb.Err != nil {
				errs = append(errs, wb.Err)
			}
		}
		sb.closeErr = errors.Join(errs...)
		if sb.failErr != nil && sb.failErr.ConsoleLog == "" {
			sb.failErr.ConsoleLog = sb.consoleLogKept()
		}
	})
	return sb.writeBacks, sb.closeErr
}

// consoleLogKept is where the console log of a failed sandbox was kept,
// once it is closed.
func (sb *Sandbox) consoleLogKept() string {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.consoleLog
}

// remoteName names an attached sandbox's VM in errors: a pool's, or a
// sandbox another process serves.
func (sb *Sandbox) remoteName() string {
	if sb.taken {
		return "the VM " + sb.name + " of your pool (its pool ended, or the VM died)"
	}
	return "the sandbox " + sb.name
}

// privateMemory is the private resident memory of the sandbox's VMM, 0
// when it cannot be read.
func (sb *Sandbox) privateMemory() int64 {
	if sb.m == nil {
		return 0
	}
	n, err := procmem.PrivateTree(sb.m.PID())
	if err != nil {
		return 0
	}
	return n
}

// Timings returns how long each step of the sandbox's life took so far,
// commands included.
func (sb *Sandbox) Timings() []Timing { return sb.life.Timings() }

// Restored reports whether the sandbox's machine was restored from a
// snapshot by this process, not booted (or taken from the pool).
func (sb *Sandbox) Restored() bool {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.restored
}

// keepConsole moves the console log of a failed run to the state
// directory's logs/ and prunes old ones. It returns the kept path.
func (sb *Sandbox) keepConsole() string {
	dir := filepath.Join(sb.cfg.StateDir, "logs")
	kept, err := sb.run.Keep("console.log", dir, ".console.log")
	if err != nil {
		sb.log.Warn("keep console log", "err", err)
		return ""
	}
	if fi, err := os.Stat(sb.run.Path("vmm.log")); err == nil && fi.Size() > 0 {
		_, _ = sb.run.Keep("vmm.log", dir, ".vmm.log")
	}
	pruneLogs(dir, keptLogs)
	return kept
}

// pruneLogs keeps the newest n console logs (and their vmm logs).
func pruneLogs(dir string, n int) {
	entries, _ := os.ReadDir(dir)
	type kept struct {
		path string
		mod  time.Time
	}
	var logs []kept
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".console.log") {
			continue
		}
		if fi, err := e.Info(); err == nil {
			logs = append(logs, kept{filepath.Join(dir, e.Name()), fi.ModTime()})
		}
	}
	if len(logs) <= n {
		return
	}
	sort.Slice(logs, func(i, j int) bool { return logs[i].mod.After(logs[j].mod) })
	for _, old := range logs[n:] {
		os.Remove(old.path)
		os.Remove(strings.TrimSuffix(old.path, ".console.log") + ".vmm.log")
	}
}

// ms formats d in whole milliseconds, as the timing breakdown shows it.
func ms(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) + "ms" }

// Failed is closed when the sandbox fails (Err then says why): its VM
// died or its agent stopped answering, or, attached, the process serving
// it went away.
func (sb *Sandbox) Failed() <-chan struct{} { return sb.failed }
