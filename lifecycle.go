package mvm

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/runstate"
)

// A sandbox's life is a list of named steps: Start runs them in order and
// each one that succeeded may leave an undo, which Close (or a failed
// Start) runs in reverse. That is what makes teardown independent of
// defer order, lets a step be swapped (boot for restore) without touching
// the others, and gives the timing breakdown for free.
//
// Start: reclaim, prepare run, prepare disks, start vm, agent ready, mount.
// Close: shut down guest, disconnect, stop vm, write back, clean up.

// Timing is how long one step of a sandbox's life took.
type Timing struct {
	// Step names it ("boot", "write back", ...).
	Step string
	// Start is its offset from the start of the sandbox, Duration its
	// length.
	Start, Duration time.Duration
	// Detail adds what the step found out ("guest kernel 812ms").
	Detail string
}

// undoFunc undoes a step. It gets a context the caller may cancel (a
// second Ctrl-C), and must then finish promptly without losing data.
type undoFunc func(ctx context.Context) error

type undoStep struct {
	name string
	fn   undoFunc
}

// lifecycle records steps and their undos.
type lifecycle struct {
	t0  time.Time
	log *slog.Logger

	mu      sync.Mutex
	timings []Timing
	undos   []undoStep
	unwound bool
	detail  string // for the step running now (steps run one at a time)
}

func newLifecycle(log *slog.Logger) *lifecycle {
	return &lifecycle{t0: time.Now(), log: log}
}

// step runs fn as the step called name. fn returns the step's undo (nil
// for none), which is recorded even when fn also fails, since a step can
// fail half-way (a VMM that started but whose agent never answered must
// still be stopped).
func (l *lifecycle) step(ctx context.Context, name, undoName string, fn func(ctx context.Context) (undoFunc, error)) error {
	start := time.Now()
	undo, err := fn(ctx)
	l.mu.Lock()
	detail := l.detail
	l.detail = ""
	l.mu.Unlock()
	l.record(name, start, detail)
	if undo != nil {
		l.mu.Lock()
		l.undos = append(l.undos, undoStep{undoName, undo})
		l.mu.Unlock()
	}
	if err != nil {
		l.log.Debug("step failed", "step", name, "err", err)
	}
	return err
}

// annotate sets the detail of the step running now.
func (l *lifecycle) annotate(detail string) {
	l.mu.Lock()
	l.detail = detail
	l.mu.Unlock()
}

// record adds a timing for a step that began at start.
func (l *lifecycle) record(name string, start time.Time, detail string) {
	d := time.Since(start)
	l.mu.Lock()
	l.timings = append(l.timings, Timing{Step: name, Start: start.Sub(l.t0), Duration: d, Detail: detail})
	l.mu.Unlock()
}

// unwind runs every undo, last first, once. Each runs even if an earlier
// one failed; their errors are joined.
func (l *lifecycle) unwind(ctx context.Context) error {
	l.mu.Lock()
	if l.unwound {
		l.mu.Unlock()
		return nil
	}
	l.unwound = true
	undos := l.undos
	l.undos = nil
	l.mu.Unlock()
	var errs []error
	for i := len(undos) - 1; i >= 0; i-- {
		u := undos[i]
		start := time.Now()
		if err := u.fn(ctx); err != nil {
			errs = append(errs, err)
		}
		l.record(u.name, start, "")
	}
	return errors.Join(errs...)
}

// Timings returns what has been recorded so far.
func (l *lifecycle) Timings() []Timing {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Timing(nil), l.timings...)
}

// push records an undo for a step that ran outside step (a resume
// registers its undos only once all of it succeeded: a failed resume
// must keep the paused state, not tear it down).
func (l *lifecycle) push(undoName string, fn undoFunc) {
	l.mu.Lock()
	l.undos = append(l.undos, undoStep{undoName, fn})
	l.mu.Unlock()
}

// Reclaim removes what runs of this user left behind when their owner
// died (killed, crashed): it kills a VMM that outlived its owner and
// removes the run's directory, keeping a read-write directory's unwritten
// changes (mvmctl recover). Every Start does this first; a front end that
// knows an owner just died (a containerd shim's cleanup) calls it to
// clean up at once. It returns the runs it reclaimed. Only RunDir,
// StateDir and Logger matter in cfg.
func Reclaim(cfg Config) ([]string, error) {
	if err := fillDirs(&cfg); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	sb := newSandbox(resolved{Config: cfg}, image.Image{})
	return runstate.ReclaimSalvaging(cfg.RunDir, sb.log, sb.salvage)
}

// RunDirOf is the run directory a sandbox called name has while it runs
// (and, when its owner died, until Reclaim removes it). Only RunDir
// matters in cfg.
func RunDirOf(cfg Config, name string) (string, error) {
	if !namePattern.MatchString(name) {
		return "", invalid("Name", name, "not a sandbox name")
	}
	if err := fillDirs(&cfg); err != nil {
		return "", err
	}
	return filepath.Join(cfg.RunDir, name), nil
}
