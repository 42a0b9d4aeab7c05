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
	sb.mu.Lock()
	status := sb.status
	if status == StatusRunning && !sb.pausing {
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
	if n := sb.act.inFlight(); n > 0 {
		return PauseStats{}, fmt.Errorf("pause %s: %w: %d commands or copies are running", sb.name, ErrBusy, n)
	}
	// The monitor's pings would be lost once the agent is quiesced.
	close(sb.monPause)
	<-sb.monDone
	resumeMonitor := func() {
		sb.monitor()
	}
	if err := sb.agentClient().QuiesceKeepingDrives(ctx); err != nil {
		resumeMonitor()
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
		return PauseStats{}, sb.pauseFailed(err)
	}
	_ = sb.agentClient().Close()
	var st PauseStats
	if fi, err := os.Stat(filepath.Join(dir, "state")); err == nil {
		st.StateBytes = diskUsage(fi)
	}
	sb.mu.Lock()
	sb.pausedDir, sb.pausedRAM, sb.pausing = dir, ram0, false
	sb.mu.Unlock()
	done = true
	sb.setStatus(StatusPaused)
	st.Duration = time.Since(start)
	sb.life.record("pause", start, fmt.Sprintf("%d MiB of state", st.StateBytes>>20))
	return st, nil
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
// where it was. A resume that fails keeps the paused state, so it can be
// tried again (a QEMU binary replaced meanwhile cannot load it: stop the
// sandbox, or put that QEMU back).
func (sb *Sandbox) Resume(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	if sb.attached {
		return sb.remoteResume(ctx)
	}
	sb.mu.Lock()
	status, dir, ram0 := sb.status, sb.pausedDir, sb.pausedRAM
	sb.mu.Unlock()
	if status != StatusPaused {
		return 0, fmt.Errorf("resume %s: the sandbox is %s, not paused", sb.name, status)
	}
	m, err := sb.cfg.backend.Start(ctx, sb.machineConfig(sb.drives, &backend.Snapshot{Dir: dir, Restore: true, Paused: true, PausedRAM0: ram0}))
	if err != nil {
		return 0, &VMError{Op: "resume", Err: fmt.Errorf("%w (the paused state is kept)", err)}
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
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
		_ = m.Stop(stopCtx)
		cancel()
		return 0, fmt.Errorf("resume %s: %w (the paused state is kept)", sb.name, err)
	}
	sb.mu.Lock()
	sb.pausedDir = ""
	sb.mu.Unlock()
	// Idle time counts from the resume.
	sb.act.mu.Lock()
	sb.act.last = time.Now()
	sb.act.mu.Unlock()
	os.RemoveAll(dir)
	sb.setStatus(StatusRunning)
	sb.monitor()
	sb.life.record("resume", start, "")
	return time.Since(start), nil
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
