// Package runner is the exec orchestrator: it boots a throwaway machine,
// runs one command in it through the guest agent with output streamed as
// it arrives, and tears everything down, whatever happened. It owns the
// policy (timeouts, interrupts, what a failure leaves behind); the backend
// owns the VMM and the agent client owns the protocol.
package runner

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/adddir"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/runstate"
)

// Defaults a user gets without flags.
const (
	DefaultCPUs      = 2
	DefaultMemoryMiB = 512
	DefaultTimeout   = 60 * time.Second
)

// Tunables that are not user flags.
const (
	// bootTimeout bounds boot-to-hello. TCG boots in about a second on an
	// idle host; this only catches a guest that will never answer.
	bootTimeout = 60 * time.Second
	// interruptGrace is how long a forwarded Ctrl-C has to end the command
	// before the VM is torn down anyway.
	interruptGrace = 3 * time.Second
	// killGrace is the SIGTERM-to-SIGKILL grace at the guest timeout.
	killGrace = 2 * time.Second
	// hostTimeoutSlack is how much longer than the guest-enforced timeout
	// the host waits before it stops trusting the guest.
	hostTimeoutSlack = 10 * time.Second
	// stopTimeout bounds a polite VMM stop before it is killed.
	stopTimeout = 2 * time.Second
	// shutdownTimeout bounds the guest's own shutdown (sync, unmount) when
	// read-write directories need a clean filesystem.
	shutdownTimeout = 10 * time.Second
	// keptLogs is how many console logs of failed runs are kept.
	keptLogs = 20
)

// Request is one command to run in a fresh VM.
type Request struct {
	Argv []string
	Env  []agentclient.EnvVar
	Dir  string
	// Stdin is forwarded when non-nil; otherwise the command reads
	// /dev/null.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Timeout is enforced in the guest; 0 means none.
	Timeout   time.Duration
	CPUs      int
	MemoryMiB uint64
	Accel     accel.Mode
	Kernel    string
	Initrd    string
	// KernelArgs are extra guest kernel arguments.
	KernelArgs []string
	// Dirs are host directories shared with the guest (--add-dir).
	Dirs []adddir.Spec
	// Signals carries the user's interrupts (SIGINT, SIGTERM, SIGHUP):
	// the first is forwarded to the command, a second one, or the command
	// outliving interruptGrace, tears the VM down.
	Signals <-chan os.Signal
}

// Result is how a run ended.
type Result struct {
	// Completed is true when the command reported its exit; Status is
	// meaningful only then.
	Completed bool
	Status    agentclient.ExitStatus
	// Interrupted is the signal that made the runner tear the VM down
	// before the command ended (0 if it did not).
	Interrupted syscall.Signal
	// Timings of the run's phases, for -v.
	Timings Timings
	// Dirs reports the write-back of each read-write directory.
	Dirs []DirResult
}

// Timings are offsets from the start of Run.
type Timings struct {
	DirsReady, VMMStarted, AgentReady, CommandStarted, CommandExited, TornDown time.Duration
	// WriteBack is how long writing read-write directories back took.
	WriteBack time.Duration
	// GuestUptime is the guest's uptime at the agent's hello, and
	// AgentStart its uptime when the agent process started (what the
	// kernel's boot took).
	GuestUptime, AgentStart time.Duration
}

// Runner runs requests.
type Runner struct {
	Backend backend.Backend
	// RunRoot holds per-run directories.
	RunRoot string
	// LogDir keeps console logs of failed runs.
	LogDir string
	// StagedDir keeps the changes of read-write directories whose
	// write-back failed, for `mvmctl recover`.
	StagedDir string
	Log       *slog.Logger
}

// Error is a failure of mvmctl or the VM (not of the command). It carries
// the console log kept for diagnosis, if any.
type Error struct {
	Op         string
	Err        error
	ConsoleLog string
}

func (e *Error) Error() string {
	msg := e.Op + ": " + e.Err.Error()
	if e.ConsoleLog != "" {
		msg += " (guest console log: " + e.ConsoleLog + ")"
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// NewName returns a transient VM name, exec-<pid>-<nanos> in hex.
func NewName() string {
	return "exec-" + strconv.FormatInt(int64(os.Getpid()), 16) + "-" + strconv.FormatInt(time.Now().UnixNano()&0xffffffffff, 16)
}

// Run boots a VM, runs req in it and tears the VM down. A command that ran
// returns its status with a nil error, even a timeout; a run that failed
// on our side returns *Error.
func (r *Runner) Run(ctx context.Context, req Request) (res Result, err error) {
	log := r.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	since := func() time.Duration { return time.Since(start) }

	if reclaimed, err := runstate.ReclaimSalvaging(r.RunRoot, log, func(dir string) error { return r.salvage(dir, log) }); err != nil {
		log.Warn("reclaiming leftovers of earlier runs", "err", err)
	} else if len(reclaimed) > 0 {
		log.Debug("reclaimed leftovers of earlier runs", "runs", reclaimed)
	}

	name := NewName()
	log = log.With("vm", name)
	run, err := runstate.Create(r.RunRoot, name)
	if err != nil {
		return res, &Error{Op: "prepare run", Err: err}
	}
	keepLogs := false
	defer func() {
		if keepLogs {
			if p := r.keepConsole(run, log); p != "" {
				var re *Error
				if errors.As(err, &re) && re.ConsoleLog == "" {
					re.ConsoleLog = p
				}
			}
		}
		for _, d := range res.Dirs {
			if d.Kept != "" && strings.HasPrefix(d.Kept, run.Dir+string(filepath.Separator)) {
				// The only copy of a guest's changes: the next run
				// salvages it.
				return
			}
		}
		if rerr := run.Remove(); rerr != nil {
			log.Warn("remove run directory", "err", rerr)
		}
	}()
	fail := func(op string, e error) (Result, error) {
		keepLogs = true
		return res, &Error{Op: op, Err: e}
	}

	dirs, err := prepareDirs(ctx, run.Dir, req.Dirs)
	if err != nil {
		return res, &Error{Op: "prepare --add-dir", Err: err}
	}
	res.Timings.DirsReady = since()
	// From here on, whatever happens, the guest's changes to read-write
	// directories are written back (or kept, with a message).
	defer func() {
		wb := time.Now()
		res.Dirs = r.writeBack(ctx, dirs, name, log)
		if hasWritable(dirs) {
			res.Timings.WriteBack = time.Since(wb)
		}
	}()

	cfg := backend.Config{
		Name:       name,
		RunDir:     run.Dir,
		Kernel:     req.Kernel,
		Initrd:     req.Initrd,
		KernelArgs: req.KernelArgs,
		CPUs:       req.CPUs,
		MemoryMiB:  req.MemoryMiB,
		Accel:      req.Accel,
	}
	for _, d := range dirs {
		cfg.Drives = append(cfg.Drives, d.drives()...)
	}
	m, err := r.Backend.Start(ctx, cfg)
	if err != nil {
		return fail("start vm", err)
	}
	res.Timings.VMMStarted = since()
	if err := run.RecordVMM(m.PID()); err != nil {
		log.Warn("record vmm pid", "err", err)
	}
	client, err := agentclient.Dial(m.AgentConn())
	if err != nil {
		_ = m.Stop(context.WithoutCancel(ctx))
		return fail("connect to guest agent", err)
	}
	defer client.Close()
	defer func() {
		r.stopVM(ctx, m, client, dirs, log)
		res.Timings.TornDown = since()
	}()

	res, err = r.drive(ctx, req, m, client, dirs, res, since, log)
	if err != nil {
		keepLogs = true
	}
	return res, err
}

// drive runs the command in the booted VM and waits for its end, an
// interrupt, a timeout or the VM's death.
func (r *Runner) drive(ctx context.Context, req Request, m backend.Machine, client *agentclient.Client, dirs []*dirPlan,
	res Result, since func() time.Duration, log *slog.Logger) (Result, error) {
	fail := func(op string, e error) (Result, error) {
		return res, &Error{Op: op, Err: e}
	}
	var procRef atomic.Pointer[agentclient.Process]
	spec := agentclient.ExecSpec{
		Argv:      req.Argv,
		Env:       req.Env,
		Dir:       req.Dir,
		Stdin:     req.Stdin,
		Stdout:    req.Stdout,
		Stderr:    req.Stderr,
		Timeout:   req.Timeout,
		KillGrace: killGrace,
		OnOutputError: func(fd agentpb.Output_Fd, werr error) {
			// The reader of our stdout went away (`| head`): the command
			// gets what it would get from a closed pipe.
			if p := procRef.Load(); p != nil && errors.Is(werr, syscall.EPIPE) {
				go func() { _ = p.Signal(context.WithoutCancel(ctx), syscall.SIGPIPE) }()
			}
			log.Debug("output stream failed", "fd", fd, "err", werr)
		},
	}

	helloDone := make(chan struct{})
	go func() {
		defer close(helloDone)
		_, _ = client.Hello(ctx)
	}()
	// Mounts are queued right behind the hello; the command follows them
	// once they are in place. Without mounts it is queued behind the hello
	// at once: both are answered as soon as the agent starts, with no
	// round trip in between.
	mountsDone := make(chan error, 1)
	go func() { mountsDone <- mountAll(ctx, client, dirs) }()

	bootTimer := time.NewTimer(bootTimeout)
	defer bootTimer.Stop()
	var (
		proc         *agentclient.Process
		procDone     <-chan struct{}
		started      <-chan struct{}
		hostDeadline <-chan time.Time
		graceTimer   <-chan time.Time
	)
	helloCh := (<-chan struct{})(helloDone)
	mountsCh := (<-chan error)(mountsDone)
	for {
		select {
		case <-helloCh:
			helloCh = nil
			h, herr := client.Hello(ctx)
			if herr != nil {
				return fail("guest agent", herr)
			}
			res.Timings.AgentReady = since()
			res.Timings.GuestUptime = time.Duration(h.GuestUptimeMicros) * time.Microsecond
			res.Timings.AgentStart = time.Duration(h.AgentStartUptimeMicros) * time.Microsecond
		case merr := <-mountsCh:
			mountsCh = nil
			if merr != nil {
				return fail("mount --add-dir", merr)
			}
			var err error
			if proc, err = client.Exec(ctx, spec); err != nil {
				return fail("start command", err)
			}
			procRef.Store(proc)
			procDone, started = proc.Done(), proc.Started()
		case <-started:
			started = nil
			bootTimer.Stop()
			res.Timings.CommandStarted = since()
			log.Debug("command started", "pid", proc.PID())
			if req.Timeout > 0 {
				hostDeadline = time.After(req.Timeout + killGrace + hostTimeoutSlack)
			}
		case <-procDone:
			st, werr := proc.Wait(ctx)
			if werr != nil {
				select {
				case <-m.Done():
					return fail("vm", vmEnded(ctx, m))
				case <-time.After(100 * time.Millisecond):
				}
				return fail("guest agent", werr)
			}
			res.Status, res.Completed = st, true
			res.Timings.CommandExited = since()
			return res, nil
		case <-m.Done():
			// The VMM exited while the command had not reported an exit.
			// Output already received is flushed; give the stream a
			// moment to deliver an exit that raced the VMM's end.
			if proc != nil {
				select {
				case <-proc.Done():
					if st, werr := proc.Wait(ctx); werr == nil {
						res.Status, res.Completed = st, true
						res.Timings.CommandExited = since()
						return res, nil
					}
				case <-time.After(100 * time.Millisecond):
				}
			}
			return fail("vm", vmEnded(ctx, m))
		case <-bootTimer.C:
			return fail("boot", fmt.Errorf("the guest agent did not start the command within %s", bootTimeout))
		case <-hostDeadline:
			res.Status = agentclient.ExitStatus{TimedOut: true}
			return fail("timeout", fmt.Errorf("the guest did not stop the command %s after its %s timeout; the VM was torn down", killGrace+hostTimeoutSlack, req.Timeout))
		case sig := <-req.Signals:
			s, _ := sig.(syscall.Signal)
			if graceTimer != nil || proc == nil || started != nil {
				// Second interrupt, or one before the command runs.
				res.Interrupted = s
				return res, nil
			}
			log.Debug("forwarding signal", "signal", s)
			if serr := proc.Signal(ctx, s); serr != nil {
				log.Debug("forward signal", "err", serr)
			}
			graceTimer = time.After(interruptGrace)
			res.Interrupted = s
		case <-graceTimer:
			return res, nil
		case <-ctx.Done():
			return fail("run", ctx.Err())
		}
	}
}

// stopVM ends the VM. With read-write directories the guest is asked to
// shut down, so that it syncs and unmounts them and the host finds clean
// filesystems; otherwise (or if that does not work in time) the VMM is
// stopped outright, since nothing in the guest is worth waiting for.
func (r *Runner) stopVM(ctx context.Context, m backend.Machine, client *agentclient.Client, dirs []*dirPlan, log *slog.Logger) {
	base := context.WithoutCancel(ctx)
	if hasWritable(dirs) {
		select {
		case <-m.Done():
		default:
			sctx, cancel := context.WithTimeout(base, shutdownTimeout)
			if err := client.Shutdown(sctx); err != nil {
				log.Debug("guest shutdown", "err", err)
			} else if werr := m.Wait(sctx); werr != nil && sctx.Err() != nil {
				log.Warn("the guest did not power off in time; stopping it", "timeout", shutdownTimeout)
			}
			cancel()
		}
	}
	stopCtx, cancel := context.WithTimeout(base, stopTimeout)
	defer cancel()
	if err := m.Stop(stopCtx); err != nil {
		log.Warn("stop vm", "err", err)
	}
}

// vmEnded explains an unexpected VMM exit.
func vmEnded(ctx context.Context, m backend.Machine) error {
	if err := m.Wait(ctx); err != nil {
		return err
	}
	return errors.New("the VM stopped before the command finished (guest crash or power-off)")
}

// keepConsole moves the console and VMM logs of a failed run to LogDir and
// prunes old ones. It returns the kept console log's path.
func (r *Runner) keepConsole(run *runstate.Run, log *slog.Logger) string {
	if r.LogDir == "" {
		return ""
	}
	kept, err := run.Keep("console.log", r.LogDir, ".console.log")
	if err != nil {
		log.Warn("keep console log", "err", err)
		return ""
	}
	if fi, err := os.Stat(run.Path("vmm.log")); err == nil && fi.Size() > 0 {
		_, _ = run.Keep("vmm.log", r.LogDir, ".vmm.log")
	}
	pruneLogs(r.LogDir, keptLogs)
	return kept
}

// pruneLogs keeps the newest n console logs (and their vmm logs).
func pruneLogs(dir string, n int) {
	entries, _ := os.ReadDir(dir)
	var matches []string
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".console.log") {
			matches = append(matches, filepath.Join(dir, e.Name()))
		}
	}
	if len(matches) <= n {
		return
	}
	type f struct {
		path string
		mod  time.Time
	}
	var fs []f
	for _, m := range matches {
		if fi, err := os.Stat(m); err == nil {
			fs = append(fs, f{m, fi.ModTime()})
		}
	}
	sort.Slice(fs, func(i, j int) bool { return fs[i].mod.After(fs[j].mod) })
	for _, old := range fs[min(n, len(fs)):] {
		os.Remove(old.path)
		os.Remove(old.path[:len(old.path)-len(".console.log")] + ".vmm.log")
	}
}

// ExitCode maps a run's outcome to mvmctl's exit status, the contract
// documented in docs/exit-codes.md: the command's own code; 128+N for
// death by signal N; 124 for a timeout; 126 and 127 for a command that
// could not be run or found; 125 for everything that failed on our side.
func ExitCode(res Result, err error) int {
	if err != nil {
		var re *Error
		if errors.As(err, &re) && re.Op == "timeout" {
			return 124
		}
		return 125
	}
	if !res.Completed {
		if res.Interrupted != 0 {
			return 128 + int(res.Interrupted)
		}
		return 125
	}
	st := res.Status
	switch {
	case st.StartFailure != nil:
		switch st.StartFailure.Reason {
		case agentpb.StartFailure_REASON_NOT_FOUND:
			return 127
		case agentpb.StartFailure_REASON_NOT_EXECUTABLE:
			return 126
		}
		return 125
	case st.TimedOut:
		return 124
	case st.Signal != 0:
		return 128 + int(st.Signal)
	}
	return st.Code
}
