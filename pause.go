package mvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/runstate"
)

// ErrPaused is wrapped by the error of a call on a paused sandbox.
var ErrPaused = errors.New("sandbox paused")

// ErrBusy is wrapped by Pause's error while a command runs or a copy is
// in flight.
var ErrBusy = errors.New("sandbox busy")

// PauseStats says what a pause took.
type PauseStats struct {
	// StateBytes is what the saved RAM and device state take on disk
	// (the sandbox's disks are its own, paused or not).
	StateBytes int64
	Duration   time.Duration
}

// Pause saves the running sandbox to disk and ends its VMM: its RAM and
// device state go to a file in its run directory, its disks stay, and
// while it is paused it costs disk only (and the process that owns it).
// Resume brings it back exactly where it was: its processes, their open
// files, /tmp. Pause refuses (ErrBusy) while a command of the sandbox
// runs or a copy is in flight, and refuses a sandbox with a network
// (its connections could not survive). Commands and file calls on a
// paused sandbox fail with ErrPaused; Close on one writes its read-write
// directories back as they were when it was paused.
func (sb *Sandbox) Pause(ctx context.Context) (PauseStats, error) {
	start := time.Now()
	if sb.attached {
		return sb.remotePause(ctx)
	}
	if sb.pooled {
		return PauseStats{}, fmt.Errorf("pause %s: a VM taken from a pool serves one run and is not paused; start a sandbox of your own (Config.NoPool) to pause it", sb.name)
	}
	// One pause, resume or detach at a time; Close waits for it.
	if !sb.opMu.TryLock() {
		return PauseStats{}, fmt.Errorf("pause %s: %w: a pause or resume is under way", sb.name, ErrBusy)
	}
	defer sb.opMu.Unlock()
	sb.mu.Lock()
	status := sb.status
	if status == StatusRunning {
		sb.pausing = true
	}
	sb.mu.Unlock()
	switch {
	case status == StatusPaused:
		return PauseStats{}, fmt.Errorf("pause %s: %w already", sb.name, ErrPaused)
	case status != StatusRunning:
		return PauseStats{}, fmt.Errorf("pause %s: the sandbox is %s", sb.name, status)
	}
	done := false
	defer func() {
		if !done {
			sb.mu.Lock()
			sb.pausing = false
			sb.mu.Unlock()
		}
	}()
	if sb.nic != nil {
		return PauseStats{}, invalid("Network", "", "a sandbox with a network cannot be paused (its connections would not survive)")
	}
	p, ok := sb.m.(backend.Pauser)
	if !ok || !sb.hello.Has(agentproto.CapPause) {
		return PauseStats{}, fmt.Errorf("pause %s: this VM or its guest agent (%s) cannot be paused", sb.name, sb.hello.AgentVersion)
	}
	// A call that has just ended for its client may still be winding
	// down here (its streams closing after the client read the exit): a
	// moment's grace before calling the sandbox busy, so that `exec` then
	// `pause` in a script does not fail by chance.
	for deadline := time.Now().Add(2 * time.Second); sb.act.inFlight() > 0 && time.Now().Before(deadline) && ctx.Err() == nil; {
		time.Sleep(10 * time.Millisecond)
	}
	if n := sb.act.inFlight(); n > 0 {
		return PauseStats{}, fmt.Errorf("pause %s: %w: %d commands or copies are running", sb.name, ErrBusy, n)
	}
	// The monitor's pings would be lost once the agent is quiesced.
	close(sb.monPause)
	<-sb.monDone
	if err := sb.agentClient().QuiesceKeepingDrives(ctx); err != nil {
		sb.monitor()
		var re *agentclient.RemoteError
		if errors.As(err, &re) && re.Code == "CODE_FAILED_PRECONDITION" {
			return PauseStats{}, fmt.Errorf("pause %s: %w: %s", sb.name, ErrBusy, re.Message)
		}
		return PauseStats{}, fmt.Errorf("pause %s: %w", sb.name, err)
	}
	dir := sb.run.Path("paused")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return PauseStats{}, sb.pauseFailed(err)
	}
	ram0, err := p.Pause(ctx, dir)
	if err != nil {
		os.RemoveAll(dir)
		return PauseStats{}, sb.pauseFailed(err)
	}
	_ = sb.agentClient().Close()
	// The state refers to the disks as they are now: make them as
	// durable as it is before anyone relies on it.
	if err := syncDrives(sb.drives, dir); err != nil {
		os.RemoveAll(dir)
		return PauseStats{}, sb.pauseFailed(err)
	}
	var st PauseStats
	if fi, err := os.Stat(filepath.Join(dir, "state")); err == nil {
		st.StateBytes = diskUsage(fi)
	}
	sb.mu.Lock()
	sb.pausedDir, sb.pausedRAM, sb.pausing = dir, ram0, false
	sb.mu.Unlock()
	done = true
	// Written now, while this process holds the run's lock: if it dies
	// from here on, the run is a paused sandbox to resume, not a
	// leftover for reclaim.
	if err := sb.writeDetached(); err != nil {
		sb.log.Warn("record the paused state", "err", err)
	}
	sb.setStatus(StatusPaused)
	st.Duration = time.Since(start)
	sb.life.record("pause", start, fmt.Sprintf("%d MiB of state", st.StateBytes>>20))
	return st, nil
}

// syncDrives flushes the writable drives and the paused state's
// directory to disk (the VMM writes its images with cache=unsafe).
func syncDrives(drives []backend.Drive, dir string) error {
	for _, d := range drives {
		if d.ReadOnly || d.Path == "" {
			continue
		}
		f, err := os.OpenFile(d.Path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// pauseFailed fails a sandbox whose pause broke half-way: its agent is
// quiesced, so it cannot go on as it was.
func (sb *Sandbox) pauseFailed(err error) error {
	ve := &VMError{Op: "pause", Err: err}
	sb.fail(ve)
	return ve
}

// Resume starts a paused sandbox's VM again from its saved state, with
// its disks, and reconnects to its agent: every process in it goes on
// where it was. A resume whose VMM could not load the state (a QEMU
// binary replaced meanwhile) keeps the paused state for another try. One
// whose guest ran but did not answer has spent it (the disks moved on):
// the sandbox fails, and its Close writes its read-write directories
// back from the disks.
func (sb *Sandbox) Resume(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	if sb.attached {
		return sb.remoteResume(ctx)
	}
	if !sb.opMu.TryLock() {
		return 0, fmt.Errorf("resume %s: %w: a pause or resume is under way", sb.name, ErrBusy)
	}
	defer sb.opMu.Unlock()
	sb.mu.Lock()
	status, dir, ram0 := sb.status, sb.pausedDir, sb.pausedRAM
	sb.mu.Unlock()
	if status != StatusPaused {
		return 0, fmt.Errorf("resume %s: the sandbox is %s, not paused", sb.name, status)
	}
	// Until the guest answers, a death of this process must not leave a
	// record that offers the state for another resume.
	os.Remove(sb.run.Path(runstate.DetachedFile))
	if err := sb.startResumed(ctx, dir, ram0); err != nil {
		if errors.Is(err, errStateKept) {
			if werr := sb.writeDetached(); werr != nil {
				sb.log.Warn("record the paused state", "err", werr)
			}
			return 0, err
		}
		os.RemoveAll(dir)
		sb.mu.Lock()
		sb.pausedDir = ""
		sb.mu.Unlock()
		ve := &VMError{Op: "resume", Err: err}
		sb.fail(ve)
		return 0, ve
	}
	sb.mu.Lock()
	sb.pausedDir = ""
	sb.mu.Unlock()
	os.RemoveAll(dir)
	// Idle time counts from the resume.
	sb.act.mu.Lock()
	sb.act.last = time.Now()
	sb.act.mu.Unlock()
	sb.monitor()
	sb.setStatus(StatusRunning)
	sb.life.record("resume", start, "")
	return time.Since(start), nil
}

// errStateKept marks a resume that failed before the guest ran: the
// paused state is still good.
var errStateKept = errors.New("the paused state is kept")

// startResumed starts the VMM from the paused state in dir and says
// hello to its agent. An error wraps errStateKept when the guest never
// ran; otherwise the VMM is stopped and the state is spent.
func (sb *Sandbox) startResumed(ctx context.Context, dir string, ram0 bool) error {
	m, err := sb.cfg.backend.Start(ctx, sb.machineConfig(sb.drives, &backend.Snapshot{Dir: dir, Restore: true, Paused: true, PausedRAM0: ram0}))
	if err != nil {
		return fmt.Errorf("%w (%w)", err, errStateKept)
	}
	sb.mu.Lock()
	sb.m = m
	sb.mu.Unlock()
	if err := sb.run.RecordVMM(m.PID()); err != nil {
		sb.log.Warn("record vmm pid", "err", err)
	}
	sb.resuming = true
	_, _, err = sb.sayHello(ctx)
	sb.resuming = false
	if err != nil {
		if c := sb.agentClient(); c != nil {
			_ = c.Close()
		}
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
		_ = m.Stop(stopCtx)
		cancel()
		return fmt.Errorf("the resumed guest did not answer (%w); its saved state is spent", err)
	}
	return nil
}

// paused reports ErrPaused while the sandbox is paused or pausing.
func (sb *Sandbox) paused() error {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.status == StatusPaused || sb.pausing {
		return fmt.Errorf("%s: %w (resume it first)", sb.name, ErrPaused)
	}
	return nil
}

// diskUsage is the bytes fi takes on disk (its blocks, not its length:
// the state is sparse where the RAM was zero).
func diskUsage(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// remotePause asks the process that owns an attached sandbox to pause it.
func (sb *Sandbox) remotePause(ctx context.Context) (PauseStats, error) {
	bytes, d, err := sb.agentClient().Pause(ctx)
	if err != nil {
		return PauseStats{}, remoteSandboxError("pause", sb.name, err)
	}
	return PauseStats{StateBytes: bytes, Duration: d}, nil
}

func (sb *Sandbox) remoteResume(ctx context.Context) (time.Duration, error) {
	d, err := sb.agentClient().Resume(ctx)
	if err != nil {
		return 0, remoteSandboxError("resume", sb.name, err)
	}
	return d, nil
}

// remoteSandboxError gives an owner's refusal the SDK's typed errors.
func remoteSandboxError(op, name string, err error) error {
	var re *agentclient.RemoteError
	if errors.As(err, &re) {
		switch re.Code {
		case "CODE_FAILED_PRECONDITION":
			return fmt.Errorf("%s %s: %s: %w", op, name, re.Message, ErrBusy)
		case "CODE_INVALID_ARGUMENT":
			return fmt.Errorf("%s %s: %s: %w", op, name, re.Message, ErrInvalid)
		}
		return fmt.Errorf("%s %s: %s", op, name, re.Message)
	}
	return fmt.Errorf("%s %s: %w", op, name, err)
}
