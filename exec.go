package mvm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"sync"
	"syscall"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/execreq"
)

// hostTimeoutSlack is how much longer than a command's timeout plus kill
// grace the host waits for the guest to report its end before it stops
// trusting the guest. A variable for tests.
var hostTimeoutSlack = 3 * time.Second

// signalTimeout bounds the forwarding of one signal to the guest.
const signalTimeout = 2 * time.Second

// ExitStatus is how a command ended.
type ExitStatus struct {
	// Code is the exit status of a command that exited, -1 otherwise.
	Code int
	// Signal is the signal that killed the command, or 0.
	Signal syscall.Signal
	// TimedOut: the command ran into Cmd.Timeout and was killed.
	TimedOut bool
	// Duration is the command's run time, measured in the guest.
	Duration time.Duration
}

// Success reports a command that exited with status 0.
func (s ExitStatus) Success() bool { return s.Code == 0 && s.Signal == 0 && !s.TimedOut }

func (s ExitStatus) String() string {
	switch {
	case s.TimedOut:
		return "timed out"
	case s.Signal != 0:
		return "killed by " + s.Signal.String()
	}
	return "exit status " + strconv.Itoa(s.Code)
}

// Process is a command started in a sandbox.
type Process struct {
	sb   *Sandbox
	cmd  Cmd
	ap   *agentclient.Process
	apOK chan struct{} // closed once ap is set: output callbacks can come first
	done chan struct{}

	status ExitStatus // set before done is closed
	err    error

	outErrOnce sync.Once
	outErr     chan error // the first failed write to Stdout/Stderr (not EPIPE)
}

// Exec runs cmd in the sandbox and waits for it to end. A command that ran
// returns its status with a nil error, whatever its exit code; see Start
// for the errors.
func (sb *Sandbox) Exec(ctx context.Context, cmd Cmd) (ExitStatus, error) {
	p, err := sb.Start(ctx, cmd)
	if err != nil {
		return ExitStatus{Code: -1}, err
	}
	return p.Wait()
}

// Start starts cmd in the sandbox and returns at once; its output flows to
// cmd's writers in the background. Cancelling ctx kills the command (its
// whole process group) and makes Wait return at once.
//
// Wait's error is nil for a command that ran to its end, whatever its
// exit code. Otherwise: a *StartError (ErrCommandNotFound,
// ErrNotExecutable), ErrTimeout (the status says how it was killed), an
// *OutputError, a *VMError when the sandbox failed, ErrClosed when it was
// closed, or ctx's error.
func (sb *Sandbox) Start(ctx context.Context, cmd Cmd) (*Process, error) {
	cmd, err := sb.withImageDefaults(cmd)
	if err != nil {
		return nil, err
	}
	if (len(cmd.Argv) == 0 && !(sb.taken && sb.cfg.onTemplate())) || (len(cmd.Argv) > 0 && cmd.Argv[0] == "") {
		// A pool's VM on a template gets the image's Entrypoint and
		// Cmd from the pool, which has the template.
		return nil, invalid("Cmd.Argv", "", "no command given")
	}
	env, err := cmd.check()
	if err != nil {
		return nil, err
	}
	if sb.closingOrClosed() {
		return nil, ErrClosed
	}
	if err := sb.Err(); err != nil {
		return nil, err
	}
	// Counted before the pause check, so that a Pause either sees it or
	// is seen by it.
	sb.act.begin()
	counted := true
	defer func() {
		if counted {
			sb.act.end()
		}
	}()
	if err := sb.paused(); err != nil {
		return nil, err
	}
	if cmd.KillGrace == 0 {
		cmd.KillGrace = DefaultKillGrace
	}
	p := &Process{sb: sb, cmd: cmd, apOK: make(chan struct{}), done: make(chan struct{}), outErr: make(chan error, 1)}
	if err := sb.needs(cmd); err != nil {
		return nil, err
	}
	spec := agentclient.ExecSpec{
		Argv:          cmd.Argv,
		Env:           env,
		User:          cmd.User,
		Cgroup:        cmd.Cgroup,
		Root:          cmd.Root,
		CgroupLimits:  cgroupLimits(cmd.CgroupLimits),
		Dir:           cmd.Dir,
		Stdin:         cmd.Stdin,
		Stdout:        cmd.Stdout,
		Stderr:        cmd.Stderr,
		Timeout:       cmd.Timeout,
		KillGrace:     cmd.KillGrace,
		OnOutputError: p.onOutputError,
	}
	if cmd.TTY != nil {
		spec.TTY = &agentclient.TTY{Rows: cmd.TTY.Rows, Cols: cmd.TTY.Cols}
	}
	start := time.Now()
	ap, err := sb.agentClient().Exec(ctx, spec)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if serr := sb.Err(); serr != nil {
			return nil, serr
		}
		return nil, &VMError{Op: "start command", Err: err}
	}
	p.ap = ap
	close(p.apOK)
	counted = false
	go func() {
		defer sb.act.end()
		p.wait(ctx, start)
	}()
	return p, nil
}

// PID is the command's process id in the guest, once it runs (0 before).
func (p *Process) PID() int { return p.ap.PID() }

// Started is closed when the command runs (or could not be started).
func (p *Process) Started() <-chan struct{} { return p.ap.Started() }

// Done is closed when Wait would return.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the command to end; see Sandbox.Start for its results.
func (p *Process) Wait() (ExitStatus, error) {
	<-p.done
	return p.status, p.err
}

// Signal sends sig to the command's process group in the guest. It gives
// up after ctx ends or a couple of seconds, whichever is first: a guest
// that does not answer must not hold the caller.
func (p *Process) Signal(ctx context.Context, sig syscall.Signal) error {
	sctx, cancel := context.WithTimeout(ctx, signalTimeout)
	defer cancel()
	<-p.apOK
	return p.ap.Signal(sctx, sig)
}

// Resize changes the size of the command's terminal (Cmd.TTY); the guest
// sends SIGWINCH to its foreground job. Without a terminal it does
// nothing.
func (p *Process) Resize(ctx context.Context, rows, cols uint16) error {
	if p.cmd.TTY == nil {
		return nil
	}
	if rows == 0 || cols == 0 {
		return invalid("Resize", fmt.Sprintf("%dx%d", rows, cols), "rows and columns of a terminal must be positive")
	}
	sctx, cancel := context.WithTimeout(ctx, signalTimeout)
	defer cancel()
	<-p.apOK
	return p.ap.Resize(sctx, rows, cols)
}

// needs checks that the guest's agent serves what cmd uses.
func (sb *Sandbox) needs(cmd Cmd) error {
	if cmd.TTY != nil && !sb.hello.Has(agentproto.CapExecTTY) {
		return invalid("Cmd.TTY", "", "the guest agent (%s) has no terminal support", sb.hello.AgentVersion)
	}
	if cmd.User != "" && !sb.hello.Has(agentproto.CapExecUser) {
		return invalid("Cmd.User", "", "the guest agent (%s) cannot run commands as another user", sb.hello.AgentVersion)
	}
	if cmd.Root != "" && !sb.hello.Has(agentproto.CapExecRoot) {
		return invalid("Cmd.Root", "", "the guest agent (%s) cannot run a command in another root", sb.hello.AgentVersion)
	}
	if cmd.Cgroup != "" && !sb.hello.Has(agentproto.CapCgroup) {
		return invalid("Cmd.Cgroup", "", "the guest agent (%s) has no cgroup support (a kernel without cgroup2?)", sb.hello.AgentVersion)
	}
	return nil
}

// CgroupStats are the counters of a guest cgroup (Cmd.Cgroup), as the
// guest's kernel reports them: the guest can make them say anything.
// What acts on them (a kubelet's eviction, say) acts on the guest's word
// about itself.
type CgroupStats struct {
	// CPU time in microseconds (cpu.stat), and the CPU limit's periods.
	CPUUsageMicros, CPUUserMicros, CPUSystemMicros uint64
	CPUPeriods, CPUThrottled, CPUThrottledMicros   uint64
	// Memory in bytes: in use (memory.current), its limit (memory.max;
	// 0 is none), swap, the page cache's share of it and its inactive
	// part (what a working set leaves out), and anonymous memory.
	Memory, MemoryLimit, Swap, MemoryFile uint64
	MemoryInactiveFile, MemoryAnon        uint64
	// Tasks (pids.current) and their limit (0 is none).
	Pids, PidsLimit uint64
	// OOMEvents counts the times the cgroup hit its memory limit, and
	// OOMKills its processes the OOM killer killed, for whatever reason.
	OOMEvents, OOMKills uint64
}

// CgroupStats reads the counters of the guest cgroup name.
func (sb *Sandbox) CgroupStats(ctx context.Context, name string) (CgroupStats, error) {
	if err := agentproto.CheckCgroupName(name); err != nil {
		return CgroupStats{}, invalid("CgroupStats", execreq.Quote(name), "%v", err)
	}
	if !sb.hello.Has(agentproto.CapCgroup) {
		return CgroupStats{}, invalid("CgroupStats", "", "the guest agent (%s) has no cgroup support", sb.hello.AgentVersion)
	}
	if err := sb.Err(); err != nil {
		return CgroupStats{}, err
	}
	r, err := sb.agentClient().CgroupStats(ctx, name)
	if err != nil {
		return CgroupStats{}, err
	}
	return CgroupStats{
		CPUUsageMicros: r.CpuUsageUsec, CPUUserMicros: r.CpuUserUsec, CPUSystemMicros: r.CpuSystemUsec,
		CPUPeriods: r.CpuNrPeriods, CPUThrottled: r.CpuNrThrottled, CPUThrottledMicros: r.CpuThrottledUsec,
		Memory: r.MemoryCurrent, MemoryLimit: r.MemoryMax, Swap: r.SwapCurrent, MemoryFile: r.MemoryFile,
		MemoryInactiveFile: r.MemoryInactiveFile, MemoryAnon: r.MemoryAnon,
		Pids: r.PidsCurrent, PidsLimit: r.PidsMax, OOMEvents: r.OomEvents, OOMKills: r.OomKills,
	}, nil
}

// onOutputError is called by the agent client when writing the command's
// output failed. A reader that went away (`| head`) gives the command
// what a closed pipe would: SIGPIPE. Anything else (a full disk, EIO)
// stops the command, since its output would be lost.
func (p *Process) onOutputError(s agentclient.Stream, err error) {
	if errors.Is(err, syscall.EPIPE) {
		go func() { _ = p.Signal(context.Background(), syscall.SIGPIPE) }()
		return
	}
	// "write /dev/stdout: ..." says nothing the stream name does not.
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	p.outErrOnce.Do(func() { p.outErr <- &OutputError{Stream: s.String(), Err: err} })
}

// wait follows the command to its end, the sandbox's failure, the host's
// backstop on the timeout, or ctx.
func (p *Process) wait(ctx context.Context, start time.Time) {
	defer close(p.done)
	defer p.sb.life.record("exec "+p.cmd.Argv[0], start, "")
	p.status = ExitStatus{Code: -1}
	var (
		started  = p.ap.Started()
		deadline <-chan time.Time
		outErr   error
	)
	for {
		select {
		case <-started:
			started = nil
			if p.cmd.Timeout > 0 {
				t := time.NewTimer(p.cmd.Timeout + p.cmd.KillGrace + hostTimeoutSlack)
				defer t.Stop()
				deadline = t.C
			}
		case <-p.ap.Done():
			p.finish(outErr)
			return
		case err := <-p.outErr:
			// Stop the command; its exit follows shortly.
			outErr = err
			go func() { _ = p.Signal(context.Background(), syscall.SIGKILL) }()
			t := time.NewTimer(signalTimeout)
			defer t.Stop()
			deadline = t.C
		case <-p.sb.failed:
			// Give an exit that raced the VM's end a moment to arrive.
			select {
			case <-p.ap.Done():
				p.finish(outErr)
			case <-time.After(100 * time.Millisecond):
				p.err = p.sb.failErr
			}
			return
		case <-deadline:
			if outErr != nil {
				p.err = outErr
				return
			}
			p.status.TimedOut = true
			err := &VMError{Op: "run", Err: fmt.Errorf("%w: the guest did not stop the command %s after its %s timeout",
				ErrTimeout, p.cmd.KillGrace+hostTimeoutSlack, p.cmd.Timeout)}
			p.sb.fail(err)
			p.err = err
			return
		case <-ctx.Done():
			go func() { _ = p.Signal(context.Background(), syscall.SIGKILL) }()
			p.err = ctx.Err()
			return
		}
	}
}

// finish turns the agent's report into the command's result.
func (p *Process) finish(outErr error) {
	st, err := p.ap.Wait(context.Background())
	if err != nil {
		if p.sb.closingOrClosed() {
			p.err = ErrClosed
			return
		}
		// The session broke under the command: the VM is most likely
		// gone, which the machine says a moment later.
		switch {
		case p.sb.attached:
			p.sb.fail(&VMError{Op: "run", Err: fmt.Errorf("the connection to %s broke (%w)", p.sb.remoteName(), err)})
		default:
			select {
			case <-p.sb.m.Done():
				p.sb.fail(&VMError{Op: "run", Err: vmEnded(p.sb.m)})
			case <-time.After(200 * time.Millisecond):
				p.sb.fail(&VMError{Op: "run", Err: err})
			}
		}
		p.err = p.sb.Err()
		return
	}
	if f := st.StartFailure; f != nil {
		se := &StartError{Argv0: p.cmd.Argv[0], Errno: f.Errno, Message: f.Message}
		switch f.Reason {
		case agentclient.StartNotFound:
			se.Err = ErrCommandNotFound
		case agentclient.StartNotExecutable:
			se.Err = ErrNotExecutable
		case agentclient.StartInvalid, agentclient.StartUser:
			se.Err = ErrInvalid
		}
		p.err = se
		return
	}
	p.status = ExitStatus{Code: st.Code, Signal: st.Signal, TimedOut: st.TimedOut, Duration: st.Duration}
	if st.Signal != 0 {
		p.status.Code = -1
	}
	switch {
	case outErr != nil:
		p.err = outErr
	case st.TimedOut:
		p.err = fmt.Errorf("%w after %s", ErrTimeout, p.cmd.Timeout)
	}
}

// Release ends what Cmd.Cgroup and Cmd.Root made for a container of the
// guest: every process of the cgroup is killed and the cgroup removed,
// then the root's kernel filesystems are unmounted and its tree removed.
// Either may be empty; what is already gone is not an error.
func (sb *Sandbox) Release(ctx context.Context, cgroup, root string) error {
	if cgroup != "" {
		if err := agentproto.CheckCgroupName(cgroup); err != nil {
			return invalid("Release", execreq.Quote(cgroup), "%v", err)
		}
	}
	if root != "" {
		if err := execreq.Dir(root); err != nil {
			return &RequestError{Field: "Release", Value: execreq.Quote(root), Err: err}
		}
	}
	if !sb.hello.Has(agentproto.CapRelease) {
		return invalid("Release", "", "the guest agent (%s) cannot release a container", sb.hello.AgentVersion)
	}
	if err := sb.Err(); err != nil {
		return err
	}
	return sb.agentClient().Release(ctx, cgroup, root)
}

func cgroupLimits(l *CgroupLimits) *agentpb.CgroupLimits {
	if l == nil {
		return nil
	}
	return &agentpb.CgroupLimits{
		MemoryMax: l.Memory, CpuQuotaMicros: uint64(l.CPUQuota.Microseconds()), CpuPeriodMicros: uint64(l.CPUPeriod.Microseconds()),
	}
}
