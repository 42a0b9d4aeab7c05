package mvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/kernel"
)

// Every entry point that makes a machine (Start, PrepareSnapshot,
// SnapshotFor) begins with prepare, which checks the request and finds
// what it boots, and then runs a plan: a list of named steps, each of
// which may leave an undo that the sandbox's lifecycle runs in reverse
// (see lifecycle.go). The plans differ only where they must, and say so
// by editing the start plan: a snapshot is made by a sandbox that
// prepares a snapshot directory instead of a run, boots with empty drive
// slots, and saves instead of mounting.

// step is one named step of a plan. undo names its undo in the timings.
type step struct {
	name, undo string
	run        func(context.Context) (undoFunc, error)
}

// plan is the steps of one entry point, in order.
type plan []step

// without is p less the steps called names.
func (p plan) without(names ...string) plan {
	return slices.DeleteFunc(slices.Clone(p), func(s step) bool { return slices.Contains(names, s.name) })
}

// replace is p with the step called name replaced by with, in place; it
// panics when p has no such step, which is a programming error no test
// run can miss.
func (p plan) replace(name string, with ...step) plan {
	i := slices.IndexFunc(p, func(s step) bool { return s.name == name })
	if i < 0 {
		panic("plan has no step " + name)
	}
	return slices.Concat(p[:i:i], with, p[i+1:])
}

// runPlan runs p's steps in order, stopping at the first that fails or
// when ctx is cancelled. What the steps did is undone by the lifecycle's
// unwind, not here.
func (sb *Sandbox) runPlan(ctx context.Context, p plan) error {
	for _, s := range p {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := sb.life.step(ctx, s.name, s.undo, s.run); err != nil {
			return err
		}
	}
	return nil
}

// startPlan is how Start brings a sandbox up. Its undos, which Close runs
// last first: shut down guest, disconnect, stop vm, write back, clean up,
// release template.
func (sb *Sandbox) startPlan() plan {
	p := plan{
		{"reclaim", "", sb.reclaim},
		{"template", "release template", sb.leaseTemplate},
		{"prepare run", "clean up", sb.prepareRun},
		{"prepare disks", "write back", sb.prepareDisks},
		{"network", "stop network", sb.startNetwork},
		{"start vm", "stop vm", sb.boot},
		{"agent ready", "disconnect", sb.connect},
		{"mount", "shut down guest", sb.mount},
	}
	if !sb.cfg.onTemplate() {
		p = p.without("template")
	}
	switch {
	case sb.cfg.TAP != nil:
		p = p.replace("network", step{"network", "stop network", sb.startTAP})
	case sb.cfg.net == nil:
		p = p.without("network")
	}
	return p
}

// Start boots a sandbox and returns once its guest agent is ready and
// every directory is mounted. Everything in cfg is checked first: bad
// input fails in milliseconds with ErrInvalid and boots nothing.
// Cancelling ctx aborts the start (and tears down what was started); once
// Start has returned, the sandbox lives until Close.
//
// A VM the user's pool (Pool) holds ready for cfg is taken instead of
// starting one, unless cfg.NoPool is set; the Sandbox then behaves the
// same, except that it cannot be paused. Its first timing says which
// path the start took.
func Start(ctx context.Context, cfg Config) (*Sandbox, error) {
	t0 := time.Now()
	pooled, why := fromPool(ctx, cfg)
	if pooled != nil {
		return pooled, nil
	}
	sb, err := prepare(cfg)
	if err != nil {
		return nil, err
	}
	if why != "" {
		sb.life.t0 = t0
		sb.life.record("pool", t0, "not taken: "+why)
	}
	if err := sb.runPlan(ctx, sb.startPlan()); err != nil {
		if errors.Is(err, ErrVM) {
			sb.setStatus(StatusFailed)
		}
		sb.setStatus(StatusClosing)
		_ = sb.life.unwind(context.WithoutCancel(ctx))
		sb.setStatus(StatusClosed)
		var ve *VMError
		if errors.As(err, &ve) && ve.ConsoleLog == "" {
			ve.ConsoleLog = sb.consoleLogKept()
		}
		if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		return nil, err
	}
	sb.setStatus(StatusRunning)
	sb.monitor()
	return sb, nil
}

// prepare checks cfg and finds what its machine boots and with which
// backend: the part every entry point shares, before any step.
func prepare(cfg Config) (*Sandbox, error) {
	r, err := resolve(cfg)
	if err != nil {
		return nil, err
	}
	img, err := loadImage(r)
	if err != nil {
		return nil, err
	}
	if err := defaultBackend(&r); err != nil {
		return nil, err
	}
	return newSandbox(r, img), nil
}

// newSandbox is a sandbox of r booting img, before any step ran.
func newSandbox(r resolved, img image.Image) *Sandbox {
	sb := &Sandbox{
		cfg:         r,
		img:         img,
		name:        r.Name,
		status:      StatusStarting,
		failed:      make(chan struct{}),
		stopMonitor: make(chan struct{}),
		pingEvery:   keepaliveInterval,
		pingTimeout: keepaliveTimeout,
	}
	if sb.name == "" {
		sb.name = newName()
	}
	sb.log = r.Logger.With("vm", sb.name)
	sb.life = newLifecycle(sb.log)
	return sb
}

// defaultBackend sets the QEMU backend unless a test gave another, after
// checking that the host has what it runs.
func defaultBackend(r *resolved) error {
	if r.backend != nil {
		return nil
	}
	var deps []hostdeps.Dep
	if os.Getenv("MVM_QEMU") == "" {
		// MVM_QEMU names the binary itself; otherwise it comes from PATH.
		deps = image.RuntimeDeps()
	}
	if len(r.dirs) > 0 || r.onTemplate() {
		deps = append(deps, dirimage.Deps()...)
	}
	if err := hostdeps.Check("mvm", deps...); err != nil {
		return err
	}
	r.backend = qemu.New(r.Logger)
	return nil
}

// loadImage finds what the sandbox boots.
func loadImage(r resolved) (image.Image, error) {
	img, err := image.Store{Root: r.CacheDir}.Load(image.DefaultName)
	if err != nil {
		return image.Image{}, err
	}
	if r.Kernel != "" {
		if _, err := os.Stat(r.Kernel); err != nil {
			return image.Image{}, &RequestError{Field: "Kernel", Value: r.Kernel, Err: errors.Unwrap(err)}
		}
		takes, err := kernel.TakesLapicTimerHz(r.Kernel)
		if err != nil {
			return image.Image{}, &RequestError{Field: "Kernel", Value: r.Kernel, Err: err}
		}
		img.Kernel, img.KernelKey, img.LapicTimerHz = r.Kernel, image.UserKernelKey(r.Kernel), takes
	}
	return img, nil
}

// newName returns a transient VM name, exec-<pid>-<nanos> in hex.
func newName() string {
	return "exec-" + strconv.FormatInt(int64(os.Getpid()), 16) + "-" + strconv.FormatInt(time.Now().UnixNano()&0xffffffffff, 16)
}

// machineConfig is the backend configuration of the sandbox's machine
// with drives, booted or (with snap) restored or saved: the one place a
// machine's devices are put together, so that a snapshot and the runs
// that restore it cannot disagree about them.
func (sb *Sandbox) machineConfig(drives []backend.Drive, snap *backend.Snapshot) backend.Config {
	return backend.Config{
		Name:          sb.name,
		RunDir:        sb.vmDir,
		ConsoleLog:    filepath.Join(sb.vmDir, "console.log"),
		Kernel:        sb.img.Kernel,
		Initrd:        sb.img.Initrd,
		ForeignKernel: !sb.img.LapicTimerHz,
		KernelArgs:    sb.cfg.KernelArgs,
		CPUs:          sb.cfg.CPUs,
		MemoryMiB:     sb.cfg.memMiB,
		Accel:         sb.cfg.accel.Kind,
		Drives:        drives,
		NIC:           sb.nic,
		Snapshot:      snap,
	}
}
