// Package doctor checks whether this host can run mvm's microVMs and, for
// everything that is missing or wrong, says what to run to fix it.
//
// It reads and probes, and never changes anything: no directory is
// created, no file written, no VM booted. QEMU is only asked what it
// supports and made to load the default image with its CPUs stopped, so a
// whole check takes a fraction of a second. Every check is a function of a
// Host, whose paths and lookups tests replace with a fake tree.
package doctor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/kernel"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// Status is the outcome of one check.
type Status string

// Statuses. Only Fail means `mvmctl exec` cannot work; Warn is something
// that limits it (software emulation, --add-dir without e2fsprogs) or
// deserves attention (kept changes, little disk space).
const (
	OK   Status = "ok"
	Warn Status = "warn"
	Fail Status = "fail"
	// Skip is a check that does not apply (the jailer when not root) or
	// could not run because an earlier one failed (QEMU's features
	// without QEMU).
	Skip Status = "skip"
)

// Result is one check's finding.
type Result struct {
	// ID names the check; IDs are stable (see docs/doctor.md).
	ID     string `json:"id"`
	Status Status `json:"status"`
	// Message is one line saying what was found.
	Message string `json:"message"`
	// Fix is the command that fixes a problem, when there is one.
	Fix string `json:"fix,omitempty"`
}

// SchemaVersion is the version of Report's JSON form. It changes only
// when a field changes meaning or goes away; new fields and new check IDs
// do not change it.
const SchemaVersion = 1

// Report is the outcome of every check, in a fixed order.
type Report struct {
	Schema int `json:"schema"`
	// OK is true when no check failed: `mvmctl exec` can work.
	OK bool `json:"ok"`
	// Accel is the accelerator a run would use ("kvm" or "tcg"), empty
	// when none can be chosen.
	Accel  string   `json:"accel"`
	Checks []Result `json:"checks"`
	// DurationMS is how long the checks took.
	DurationMS int64 `json:"duration_ms"`
}

// Counts returns how many checks ended with each status.
func (r Report) Counts() map[Status]int {
	c := map[Status]int{}
	for _, ch := range r.Checks {
		c[ch.Status]++
	}
	return c
}

// Host is what the checks look at. Local fills it in for this machine;
// tests point it at a fake tree.
type Host struct {
	// Root prefixes the fixed host paths the checks read (/dev/kvm,
	// /sys/module, /proc/cpuinfo, /etc/group); "" is the real root.
	Root string
	// Accel is the accelerator asked for (--accel or MVM_ACCEL), as
	// typed; "" is auto.
	Accel string

	// mvm's directories, and why they could not be located (no home).
	CacheDir, StateDir, RunDir, DataDir string
	DirErr                              error

	// QEMU is the QEMU binary, or QEMUErr why there is none; QEMUFromEnv
	// says that MVM_QEMU named it.
	QEMU        string
	QEMUErr     error
	QEMUFromEnv bool
	// Jailer and Agent are mvm's own binaries (or why they were not
	// found); Busybox is the busybox bootstrap puts in the initramfs.
	Jailer    string
	JailerErr error
	Agent     string
	AgentErr  error
	Busybox   string

	// The user the checks are for.
	Euid, Uid int
	Groups    []int // supplementary and primary group ids of this process
	User      string

	// Present reports whether a host dependency is there (tests fake
	// missing packages with it); nil uses the dependency's own test.
	Present func(hostdeps.Dep) bool
	// KernelSource finds the kernel source tarball; nil uses
	// kernel.FindSource.
	KernelSource func() (string, error)
	// KernelDeps are what compiling the guest kernel needs; nil uses
	// kernel.Deps.
	KernelDeps []hostdeps.Dep
	// InitrdKey is the key of the initramfs bootstrap would make from
	// an agent and a busybox; nil uses image.InitrdKey.
	InitrdKey func(agent, busybox string) (string, error)
	// DefaultSnapshot returns the snapshot `mvmctl exec` would restore,
	// or why it would boot instead; nil skips that part of the check.
	DefaultSnapshot func(ctx context.Context) (string, error)
	// SnapshotBudget is the disk space snapshots may take (0: no
	// limit), AutoSnapshot whether runs that boot for want of one make
	// it, and HealLog where that is logged ("" for none).
	SnapshotBudget int64
	AutoSnapshot   bool
	HealLog        string
	// Pool is what the user's pool holds, one line per shape ("ready 2
	// of 2"), and PoolProblem why a shape cannot fill; PoolRunning says
	// whether one runs at all.
	PoolRunning bool
	Pool        []string
	PoolProblem string

	// ProbeTimeout bounds each QEMU probe (0: DefaultProbeTimeout).
	ProbeTimeout time.Duration
	// MinFree is the free space below which a directory's filesystem
	// gets a warning (0: DefaultMinFree).
	MinFree uint64
}

// Defaults for Host's limits.
const (
	// DefaultProbeTimeout is generous: each probe takes 10-100 ms on an
	// idle host, but a loaded one may be far slower, and a probe that
	// times out reads as a broken QEMU.
	DefaultProbeTimeout = 3 * time.Second
	// DefaultMinFree covers a kernel build (its source unpacks to about
	// 1.5 GiB) or a read-write directory's scratch space.
	DefaultMinFree = 2 << 30
)

// Local describes this machine, with mvm's directories as a run would
// find them (MVM_* overrides included) and accelMode the accelerator asked
// for.
func Local(accelMode string) Host {
	h := Host{
		Accel:   accelMode,
		Euid:    os.Geteuid(),
		Uid:     os.Getuid(),
		Busybox: image.DefaultBusybox(),
	}
	var errs []error
	dir := func(f func() (string, error)) string {
		d, err := f()
		if err != nil {
			errs = append(errs, err)
		}
		return d
	}
	h.CacheDir = dir(xdg.CacheDir)
	h.StateDir = dir(xdg.StateDir)
	h.RunDir = dir(xdg.RunDir)
	h.DataDir = dir(dataDir)
	h.DirErr = errors.Join(errs...)

	h.QEMU, h.QEMUErr = qemu.FindBinary()
	h.QEMUFromEnv = os.Getenv("MVM_QEMU") != ""
	if h.QEMUErr == nil {
		if _, err := os.Stat(h.QEMU); err != nil {
			h.QEMU, h.QEMUErr = "", fmt.Errorf("MVM_QEMU=%s: %w", h.QEMU, err)
		}
	}
	h.Jailer, h.JailerErr = qemu.FindJailer()
	h.Agent, h.AgentErr = image.FindAgent()

	if gs, err := os.Getgroups(); err == nil {
		h.Groups = gs
	}
	h.Groups = append(h.Groups, os.Getgid())
	if u, err := user.Current(); err == nil {
		h.User = u.Username
	}
	return h
}

// dataDir is where templates live: MVM_DATA_DIR, else
// $XDG_DATA_HOME/mvm, else ~/.local/share/mvm, as xdg resolves its other
// directories.
func dataDir() (string, error) {
	if d := os.Getenv("MVM_DATA_DIR"); d != "" {
		return filepath.Abs(d)
	}
	if d := os.Getenv("XDG_DATA_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "mvm"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("locate home directory: %w", err)
	}
	return filepath.Join(home, ".local", "share", "mvm"), nil
}

func (h *Host) present(d hostdeps.Dep) bool {
	if h.Present != nil {
		return h.Present(d)
	}
	return d.Present()
}

// missing returns a *hostdeps.MissingError for the deps that are absent,
// or nil.
func (h *Host) missing(purpose string, deps ...hostdeps.Dep) *hostdeps.MissingError {
	var m []hostdeps.Dep
	for _, d := range deps {
		if !h.present(d) {
			m = append(m, d)
		}
	}
	if len(m) == 0 {
		return nil
	}
	return &hostdeps.MissingError{Purpose: purpose, Missing: m}
}

func (h *Host) kernelSource() (string, error) {
	if h.KernelSource != nil {
		return h.KernelSource()
	}
	return kernel.FindSource()
}

func (h *Host) kernelDeps() []hostdeps.Dep {
	if h.KernelDeps != nil {
		return h.KernelDeps
	}
	return kernel.Deps()
}

func (h *Host) path(p string) string { return h.Root + p }

// sudo prefixes a command that needs root with sudo, unless the checks
// are for root.
func (h *Host) sudo(cmd string) string {
	if h.Euid == 0 {
		return cmd
	}
	return "sudo " + cmd
}

// install is the command that installs Debian packages.
func (h *Host) install(pkgs ...string) string {
	return h.sudo("apt-get install -y --no-install-recommends " + strings.Join(pkgs, " "))
}

func (h *Host) probeTimeout() time.Duration {
	if h.ProbeTimeout > 0 {
		return h.ProbeTimeout
	}
	return DefaultProbeTimeout
}

func (h *Host) minFree() uint64 {
	if h.MinFree > 0 {
		return h.MinFree
	}
	return DefaultMinFree
}

// Run runs every check. The slow parts (QEMU probes, hashing the agent)
// run concurrently; ctx bounds them all.
func Run(ctx context.Context, h Host) Report {
	start := time.Now()
	f := gather(ctx, &h)
	checks := []Result{
		checkAccel(&h, f),
		checkKVM(&h, f),
		checkQEMU(&h, f),
		checkQEMUFeatures(&h, f),
		checkQEMUSandbox(&h, f),
		checkQEMUConfine(&h, f),
		checkJailer(&h, f),
		checkImage(&h, f),
		checkKernel(&h, f),
		checkAgent(&h, f),
		checkBusybox(&h, f),
		checkE2fsprogs(&h),
		checkMmdebstrap(&h),
		checkTemplates(&h),
		checkSnapshots(ctx, &h, f),
		checkPool(&h),
		checkDiskSpace(&h, "disk-cache", "cache", h.CacheDir),
		checkDiskSpace(&h, "disk-state", "state", h.StateDir),
		checkPrivateDir(&h, "state-dir", "state directory", h.StateDir, false),
		checkPrivateDir(&h, "run-dir", "run directory", h.RunDir, true),
		checkStaged(&h),
		checkLogs(&h),
	}
	r := Report{Schema: SchemaVersion, OK: true, Checks: checks}
	if f.accelErr == nil {
		r.Accel = string(f.accel.Kind)
	}
	for _, c := range checks {
		if c.Status == Fail {
			r.OK = false
		}
	}
	r.DurationMS = time.Since(start).Milliseconds()
	return r
}

// facts are what the checks share: gathered once, concurrently where it
// costs time.
type facts struct {
	mode     accel.Mode
	modeErr  error
	accel    accel.Choice
	accelErr error
	kvm      kvmFacts

	img    image.Image
	imgErr error

	qemu qemuFacts

	// agentStatic and agentKey describe h.Agent (agentErr when they
	// could not be found out); agentKey is the initramfs key it and
	// h.Busybox would give.
	agentStatic bool
	agentKey    string
	agentErr    error
}

func gather(ctx context.Context, h *Host) *facts {
	f := &facts{}
	var wg sync.WaitGroup
	f.mode, f.modeErr = accel.ParseMode(h.Accel)
	if f.modeErr == nil {
		f.accel, f.accelErr = accel.Host{Root: h.Root}.Resolve(f.mode)
	}
	f.kvm = gatherKVM(h)

	// QEMU's help texts do not depend on the image: start them first.
	var probes qemuFacts
	if h.QEMU != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			probes = probeQEMU(ctx, h.QEMU, h.probeTimeout())
		}()
	}
	if h.Agent != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.agentStatic, f.agentKey, f.agentErr = h.inspectAgent()
		}()
	}
	if h.CacheDir != "" {
		f.img, f.imgErr = image.Store{Root: h.CacheDir}.Load(image.DefaultName)
	} else {
		f.imgErr = h.DirErr
	}
	var dry probeResult
	dryRan := false
	if h.QEMU != "" && f.imgErr == nil && f.accelErr == nil && f.modeErr == nil {
		dryRan = true
		dry = dryStart(ctx, h.QEMU, h.probeTimeout(), f.img, f.accel.Kind)
	}
	wg.Wait()
	f.qemu = probes
	f.qemu.dryRan, f.qemu.dry = dryRan, dry
	return f
}

// inspectAgent checks that the agent is static and computes the
// initramfs key it would give with busybox.
func (h *Host) inspectAgent() (static bool, key string, err error) {
	if static, err = hostdeps.IsStatic(h.Agent); err != nil {
		return false, "", err
	}
	if _, serr := os.Stat(h.Busybox); serr != nil {
		return static, "", nil
	}
	initrdKey := h.InitrdKey
	if initrdKey == nil {
		initrdKey = image.InitrdKey
	}
	key, err = initrdKey(h.Agent, h.Busybox)
	return static, key, err
}

// WriteText prints one line per check, then a summary line. color adds
// ANSI colours to the status markers (only for a terminal).
func (r Report) WriteText(w io.Writer, color bool) error {
	width := 0
	for _, c := range r.Checks {
		width = max(width, len(c.ID))
	}
	var b strings.Builder
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%s  %-*s  %s", marker(c.Status, color), width, c.ID, c.Message)
		if c.Fix != "" {
			fmt.Fprintf(&b, "; fix: %s", c.Fix)
		}
		b.WriteByte('\n')
	}
	n := r.Counts()
	warnings := plural(n[Warn], "warning")
	if r.OK {
		fmt.Fprintf(&b, "mvmctl exec can work here (%s)\n", warnings)
	} else {
		fmt.Fprintf(&b, "mvmctl exec cannot work here: %s failed (%s); run the fixes above, then mvmctl doctor again\n", plural(n[Fail], "check"), warnings)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// marker is a status as a fixed-width word: FAIL stands out even without
// colour.
func marker(s Status, color bool) string {
	word, code := "ok  ", "32"
	switch s {
	case Warn:
		word, code = "warn", "33"
	case Fail:
		word, code = "FAIL", "31;1"
	case Skip:
		word, code = "skip", "2"
	}
	if !color {
		return word
	}
	return "\033[" + code + "m" + word + "\033[0m"
}
