package mvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// Result is how a one-shot Run ended.
type Result struct {
	// ExitStatus is the command's, when it ran to its end.
	ExitStatus
	// Interrupted is the signal that made Run tear the VM down before the
	// command ended (see WithSignals), or 0.
	Interrupted syscall.Signal
	// WriteBacks reports every read-write directory. A failed write-back
	// never replaces the command's outcome: look here (or call
	// WriteBackErr) to learn of it.
	WriteBacks []WriteBack
	// Timings is the sandbox's step-by-step breakdown.
	Timings []Timing
	// MissingSnapshot, when set, is the machine configuration this run
	// had to boot for want of a snapshot (see Sandbox.MissingSnapshot):
	// HealSnapshot makes it, for the next run to restore.
	MissingSnapshot *Config
}

// WriteBackErr joins the errors of the write-backs that failed.
func (r Result) WriteBackErr() error {
	var errs []error
	for _, wb := range r.WriteBacks {
		if wb.Err != nil {
			errs = append(errs, wb.Err)
		}
	}
	return errors.Join(errs...)
}

// RunOption tunes Run.
type RunOption func(*runOptions)

type runOptions struct {
	signals       <-chan os.Signal
	grace         time.Duration
	teardownGrace time.Duration
	started       func(*Process)
}

// DefaultInterruptGrace is how long a command has, after its first
// forwarded interrupt, to end by itself.
const DefaultInterruptGrace = 3 * time.Second

// teardownBudget is how long Run gives teardown (write-backs included)
// once the user asked for it: a second interrupt must end the run within
// two seconds, so a write-back that would take longer is interrupted and
// its changes kept.
const teardownBudget = 1500 * time.Millisecond

// WithSignals makes Run behave as a terminal user expects: the first
// signal from ch (SIGINT, SIGTERM, SIGHUP) is forwarded to the command's
// process group; a second one, or the command not ending within the
// interrupt grace, tears the VM down (Result.Interrupted, ErrInterrupted).
// A signal while the VM boots aborts the boot. The caller keeps
// signal.Notify'ing ch; Run only reads it.
func WithSignals(ch <-chan os.Signal) RunOption {
	return func(o *runOptions) { o.signals = ch }
}

// WithStarted calls fn once the command runs (not if it could not be
// started), with its Process: the place to put a terminal into raw mode
// or follow its size with Process.Resize. fn must not block.
func WithStarted(fn func(*Process)) RunOption {
	return func(o *runOptions) { o.started = fn }
}

// WithInterruptGrace sets the interrupt grace (DefaultInterruptGrace).
func WithInterruptGrace(d time.Duration) RunOption {
	return func(o *runOptions) { o.grace = d }
}

// Run starts a sandbox with cfg, runs cmd in it, and closes it. Its error
// is the command's (as Process.Wait's) or the sandbox's; write-back
// failures are in Result.WriteBacks.
func Run(ctx context.Context, cfg Config, cmd Cmd, opts ...RunOption) (Result, error) {
	o := runOptions{grace: DefaultInterruptGrace, teardownGrace: teardownBudget}
	for _, opt := range opts {
		opt(&o)
	}
	var res Result
	res.Code = -1

	// A signal while booting aborts the boot.
	startCtx, cancelStart := context.WithCancel(ctx)
	defer cancelStart()
	interrupted := make(chan syscall.Signal, 1)
	stopWatch := make(chan struct{})
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		select {
		case sig := <-o.signals:
			interrupted <- toSignal(sig)
			cancelStart()
		case <-stopWatch:
		}
	}()
	sb, err := Start(startCtx, cfg)
	close(stopWatch)
	<-watchDone
	select {
	case res.Interrupted = <-interrupted:
	default:
	}
	if err != nil {
		if res.Interrupted != 0 {
			return res, fmt.Errorf("%w (%s) while the VM was starting", ErrInterrupted, res.Interrupted)
		}
		return res, err
	}
	if res.Interrupted != 0 {
		// Interrupted just as the start finished.
		sb.abandonGuest()
		res.WriteBacks, _ = sb.Close(ctx)
		res.Timings = sb.Timings()
		return res, fmt.Errorf("%w (%s) while the VM was starting", ErrInterrupted, res.Interrupted)
	}

	execCtx, cancelExec := context.WithCancel(ctx)
	defer cancelExec()
	p, err := sb.Start(execCtx, cmd)
	if err == nil {
		res.ExitStatus, res.Interrupted, err = waitInterruptible(p, o, cancelExec)
	}

	// Teardown. After an interrupt it gets a bounded budget, and a
	// further signal cuts it short; both keep unwritten changes staged.
	closeCtx, cancelClose := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelClose()
	if res.Interrupted != 0 {
		sb.abandonGuest()
		var cancel context.CancelFunc
		closeCtx, cancel = context.WithTimeout(closeCtx, o.teardownGrace)
		defer cancel()
	}
	closing := make(chan struct{})
	go func() {
		select {
		case <-o.signals:
			cancelClose()
		case <-closing:
		}
	}()
	res.WriteBacks, _ = sb.Close(closeCtx)
	close(closing)
	res.Timings = sb.Timings()
	if c, ok := sb.MissingSnapshot(); ok {
		res.MissingSnapshot = &c
	}
	var ve *VMError
	if errors.As(err, &ve) && ve.ConsoleLog == "" {
		ve.ConsoleLog = sb.consoleLogKept()
	}
	if err == nil && res.Interrupted != 0 {
		err = fmt.Errorf("%w (%s); the VM was torn down", ErrInterrupted, res.Interrupted)
	}
	return res, err
}

// waitInterruptible waits for p, forwarding the first signal and tearing
// down on a second one or when the grace runs out.
func waitInterruptible(p *Process, o runOptions, cancel context.CancelFunc) (ExitStatus, syscall.Signal, error) {
	var (
		grace   <-chan time.Time
		first   syscall.Signal
		started = p.Started()
	)
	if o.started == nil {
		started = nil
	}
	for {
		select {
		case <-started:
			started = nil
			if p.PID() != 0 {
				o.started(p)
			}
		case <-p.Done():
			st, err := p.Wait()
			return st, 0, err
		case sig := <-o.signals:
			s := toSignal(sig)
			if first != 0 {
				cancel()
				return ExitStatus{Code: -1}, s, nil
			}
			first = s
			go func() { _ = p.Signal(context.Background(), s) }()
			t := time.NewTimer(o.grace)
			defer t.Stop()
			grace = t.C
		case <-grace:
			cancel()
			return ExitStatus{Code: -1}, first, nil
		}
	}
}

func toSignal(sig os.Signal) syscall.Signal {
	if s, ok := sig.(syscall.Signal); ok {
		return s
	}
	return syscall.SIGINT
}

// abandonGuest makes Close skip the guest's graceful shutdown: the user
// wants out, and a killed guest's filesystems are repaired on the host.
func (sb *Sandbox) abandonGuest() {
	sb.mu.Lock()
	sb.abandon = true
	sb.mu.Unlock()
}

// Run runs cmd in the sandbox as the package's Run does in a fresh one,
// with the same options (WithSignals, WithStarted, WithInterruptGrace),
// but leaves the sandbox up: the first signal goes to the command, a
// second one (or the end of the grace) kills the command, not the
// sandbox, and the error is then ErrInterrupted.
func (sb *Sandbox) Run(ctx context.Context, cmd Cmd, opts ...RunOption) (Result, error) {
	o := runOptions{grace: DefaultInterruptGrace, teardownGrace: teardownBudget}
	for _, opt := range opts {
		opt(&o)
	}
	res := Result{ExitStatus: ExitStatus{Code: -1}}
	execCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	p, err := sb.Start(execCtx, cmd)
	if err != nil {
		return res, err
	}
	res.ExitStatus, res.Interrupted, err = waitInterruptible(p, o, cancel)
	if err == nil && res.Interrupted != 0 {
		err = fmt.Errorf("%w (%s); the command was killed", ErrInterrupted, res.Interrupted)
	}
	return res, err
}
