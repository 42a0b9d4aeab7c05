package mvm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/adddir"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/devices"
	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/execreq"
	"github.com/mvm-sh/mvm/internal/template"
	"github.com/mvm-sh/mvm/internal/units"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// Defaults a sandbox gets for zero Config fields.
const (
	DefaultCPUs    = 2
	DefaultMemory  = 512 << 20
	DefaultTimeout = 60 * time.Second
	// MaxCPUs is the most vCPUs the guest kernel is built for.
	MaxCPUs = 64
	// MinMemory is the least guest RAM the default image boots in.
	MinMemory = 64 << 20
	// DefaultRootSpace is how much a guest may write into the root of a
	// template by default.
	DefaultRootSpace = 1 << 30
)

// MaxDrives is how many disks a VM without a network card can have (see
// internal/devices: every virtio device takes one of devices.Transports,
// the agent's channel one of them). A read-only shared directory takes
// one, a read-write one two, a template two.
const MaxDrives = devices.MaxDrives

// Config describes a sandbox. The zero value is valid: the default image
// with DefaultCPUs and DefaultMemory.
type Config struct {
	// CPUs is the number of vCPUs (1..MaxCPUs; 0 means DefaultCPUs).
	CPUs int
	// Memory is the guest RAM in bytes (at least MinMemory, whole MiB;
	// 0 means DefaultMemory).
	Memory int64
	// Accel chooses hardware virtualisation or emulation; the zero value
	// is AccelAuto.
	Accel Accel
	// Kernel, when set, is an uncompressed vmlinux booted instead of the
	// image's (see docs/kernel.md for what it must have built in).
	Kernel string
	// KernelArgs are extra guest kernel arguments (no whitespace inside
	// one).
	KernelArgs []string
	// Template runs commands in the root filesystem of a template (made
	// with `mvmctl template create`) instead of the default image's
	// busybox root: a real userland such as Debian or a container image.
	// Image does the same for a container image reference
	// ("python:3.12-slim", "docker-archive:app.tar", "oci:dir:tag"),
	// converted on first use and cached by digest. At most one of the
	// two. The template itself is never modified: the guest's root is an
	// overlay of it whose writable layer is thrown away at Close.
	Template, Image string
	// RootDir does the same for a directory of the host: its tree is
	// written as a disk image at every Start (tens of milliseconds for a
	// small image) and shared, with the snapshots made of it, by every
	// run of the same content. Owners, modes and times are kept, but for
	// the root directory's own times, which say when a mount point was
	// made (the guest sees 1970). It is how a container runtime's mounted
	// root (containerd's snapshotter) becomes the VM's.
	RootDir string
	// RootDigest names a tree a RootDir run wrote, by its digest
	// (Template.Digest, "sha256:HEX"): the same root from the cache,
	// without the directory and without writing it again. At most one of
	// Template, Image, RootDir and RootDigest.
	RootDigest string
	// RootSpace is how much the guest may write into its root (on top of
	// a template) before the filesystem is full: 0 means
	// DefaultRootSpace. The layer is a sparse file that costs host disk
	// only as it is used, and only while the sandbox lives.
	RootSpace int64
	// ImageProgress, when set, receives what converting an Image does
	// (pulling layers, writing the disk). It is called from one goroutine
	// at a time.
	ImageProgress func(ImageProgress) `json:"-"`
	// Dirs are host directories shared with the guest.
	Dirs []Dir
	// Network, when set, gives the VM a network card (see Network); nil
	// is no network device at all.
	Network *Network
	// TAP, instead of Network, puts the VM's network card on a TAP
	// device the caller made and owns (see TAP): what the containerd
	// shim gives a pod's VM in the pod's network namespace.
	TAP *TAP `json:"-"`
	// Env is the environment every command of the sandbox starts with,
	// as KEY=VALUE strings: after a template's Env, before the command's
	// own (later ones win).
	Env []string
	// Name names the sandbox in its run directory and in `mvmctl ps`:
	// [A-Za-z0-9][A-Za-z0-9_.-]{0,62}, unique among running sandboxes;
	// "" gets a generated one.
	Name string
	// NoSnapshot makes the sandbox boot even when a snapshot of its
	// configuration could be restored (see PrepareSnapshot).
	NoSnapshot bool
	// NoPool makes Start and Run start their own VM even when the
	// user's pool (mvmctl pool, Pool) has one of this configuration
	// ready; MVM_NO_POOL=1 does the same for every run.
	NoPool bool

	// CacheDir holds images (default: $XDG_CACHE_HOME/mvm), StateDir
	// what outlives a run: kept console logs, staged write-backs
	// (default: $XDG_STATE_HOME/mvm), RunDir the per-run directories
	// (default: StateDir/runs). The MVM_CACHE_DIR, MVM_STATE_DIR and
	// MVM_RUN_DIR environment variables override the defaults.
	CacheDir, StateDir, RunDir string
	// DataDir holds templates (default: $XDG_DATA_HOME/mvm; MVM_DATA_DIR
	// overrides it).
	DataDir string

	// Logger receives debug logs of every step; nil discards them.
	Logger *slog.Logger `json:"-"`

	// backend replaces the VMM (tests run a fake machine).
	backend backend.Backend
}

// Dir is a host directory shared with the guest. Read-only by default:
// with Writable, the guest works on an overlay of it and what it changed
// is written back when the sandbox closes (see docs/add-dir.md).
type Dir struct {
	Host     string // host directory (absolute or relative to the working directory)
	Guest    string // absolute guest path
	Writable bool
}

// Accel chooses how guest code runs.
type Accel string

// Accelerators.
const (
	// AccelAuto uses KVM when it can run a standard guest kernel (not on
	// PVM-only hosts), and TCG otherwise.
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// resolved is a validated Config with its defaults filled in.
type resolved struct {
	Config
	memMiB uint64
	dirs   []adddir.Spec
	accel  accel.Choice
	net    *resolvedNetwork
}

// Validate checks cfg as Start does before anything boots, and returns
// the same *RequestError (ErrInvalid) Start would: a front end calls it
// to reject bad input before it does anything else. It reads the host
// (shared directories, the kernel file, the accelerator) but changes
// nothing.
func (cfg Config) Validate() error {
	_, err := resolve(cfg)
	return err
}

// namePattern is what a sandbox name may be: a file name in the run
// directory, and a word in a shell.
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// resolve validates cfg, before anything boots.
func resolve(cfg Config) (resolved, error) {
	r := resolved{Config: cfg}
	if cfg.Name != "" && !namePattern.MatchString(cfg.Name) {
		return r, invalid("Name", execreq.Quote(cfg.Name), "must match %s", namePattern)
	}
	if r.CPUs == 0 {
		r.CPUs = DefaultCPUs
	}
	if r.CPUs < 1 || r.CPUs > MaxCPUs {
		return r, invalid("CPUs", strconv.Itoa(cfg.CPUs), "must be between 1 and %d", MaxCPUs)
	}
	if r.Memory == 0 {
		r.Memory = DefaultMemory
	}
	if r.Memory < MinMemory || r.Memory%(1<<20) != 0 {
		v := strconv.FormatInt(cfg.Memory, 10) + " bytes"
		if cfg.Memory%(1<<20) == 0 && cfg.Memory > 0 {
			v = units.FormatMiB(uint64(cfg.Memory >> 20))
		}
		return r, invalid("Memory", v, "must be a whole number of MiB, at least %s", units.FormatMiB(MinMemory>>20))
	}
	r.memMiB = uint64(r.Memory >> 20)
	mode, err := accel.ParseMode(string(cfg.Accel))
	if err != nil {
		return r, &RequestError{Field: "Accel", Err: err}
	}
	if r.accel, err = (accel.Host{}).Resolve(mode); err != nil {
		return r, &RequestError{Field: "Accel", Err: err}
	}
	if cfg.Kernel != "" {
		if _, err := os.Stat(cfg.Kernel); err != nil {
			return r, &RequestError{Field: "Kernel", Value: cfg.Kernel, Err: errors.Unwrap(err)}
		}
	}
	for _, kv := range cfg.Env {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return r, invalid("Env", execreq.Quote(kv), "want KEY=VALUE")
		}
		if err := execreq.Env(envvar.Var{Name: name, Value: value}); err != nil {
			return r, &RequestError{Field: "Env", Value: execreq.Quote(name), Err: err}
		}
	}
	for _, k := range cfg.KernelArgs {
		if k == "" || strings.ContainsAny(k, " \t\n\x00") {
			return r, invalid("KernelArgs", execreq.Quote(k), "a kernel argument cannot be empty or contain whitespace")
		}
	}
	if cfg.Template != "" && cfg.Image != "" {
		return r, invalid("Template", "", "give a template or an image, not both")
	}
	if cfg.RootDigest != "" && (cfg.Template != "" || cfg.Image != "" || cfg.RootDir != "") {
		return r, invalid("RootDigest", cfg.RootDigest, "give one of a template, an image, a root directory and a root digest")
	}
	if cfg.RootDir != "" {
		if cfg.Template != "" || cfg.Image != "" {
			return r, invalid("RootDir", cfg.RootDir, "give one of a template, an image, a root directory and a root digest")
		}
		if fi, err := os.Stat(cfg.RootDir); err != nil {
			return r, &RequestError{Field: "RootDir", Value: cfg.RootDir, Err: err}
		} else if !fi.IsDir() {
			return r, invalid("RootDir", cfg.RootDir, "not a directory")
		}
		if r.RootDir, err = filepath.Abs(cfg.RootDir); err != nil {
			return r, &RequestError{Field: "RootDir", Value: cfg.RootDir, Err: err}
		}
	}
	if cfg.Template != "" {
		if err := template.CheckName(cfg.Template); err != nil {
			return r, &RequestError{Field: "Template", Err: err}
		}
	}
	if r.dirs, err = checkDirs(cfg.Dirs); err != nil {
		return r, err
	}
	if cfg.Network != nil {
		if r.net, err = checkNetwork(cfg.Network); err != nil {
			return r, err
		}
	}
	if cfg.TAP != nil {
		if cfg.Network != nil {
			return r, invalid("TAP", "", "a VM has one network card: Network or TAP, not both")
		}
		if err := cfg.TAP.check(); err != nil {
			return r, err
		}
	}
	if err := r.devices().Check(); err != nil {
		return r, &RequestError{Field: "Dirs", Err: err}
	}
	if r.RootSpace == 0 {
		r.RootSpace = DefaultRootSpace
	}
	if r.RootSpace < 16<<20 {
		return r, invalid("RootSpace", strconv.FormatInt(cfg.RootSpace, 10), "at least 16 MiB")
	}
	if err := fillDirs(&r.Config); err != nil {
		return r, err
	}
	if r.Logger == nil {
		r.Logger = slog.New(slog.DiscardHandler)
	}
	return r, nil
}

// checkDirs checks the shared directories (see adddir.Check), naming them
// by their place in Config.Dirs.
func checkDirs(dirs []Dir) ([]adddir.Spec, error) {
	specs := make([]adddir.Spec, len(dirs))
	for i, d := range dirs {
		specs[i] = adddir.Spec{Host: d.Host, Guest: d.Guest}
		if d.Writable {
			specs[i].Mode = adddir.ReadWrite
		}
	}
	out, err := adddir.Check(specs)
	var ae *adddir.Error
	if errors.As(err, &ae) {
		re := &RequestError{Field: dirField(ae.Index), Err: ae.Err, Hint: ae.Hint, link: ae.Link}
		if ae.Other >= 0 {
			re.Other = dirField(ae.Other)
		}
		return nil, re
	}
	return out, err
}

func dirField(i int) string { return "Dirs[" + strconv.Itoa(i) + "]" }

// fillDirs fills in the default directories of cfg.
func fillDirs(cfg *Config) error {
	var err error
	for _, d := range []struct {
		p   *string
		def func() (string, error)
	}{{&cfg.CacheDir, xdg.CacheDir}, {&cfg.StateDir, xdg.StateDir}, {&cfg.RunDir, xdg.RunDir}, {&cfg.DataDir, xdg.DataDir}} {
		if *d.p == "" {
			if *d.p, err = d.def(); err != nil {
				return err
			}
		}
	}
	return nil
}

// onTemplate: the root is a template's (or an image's).
func (r resolved) onTemplate() bool {
	return r.Template != "" || r.Image != "" || r.RootDir != "" || r.RootDigest != ""
}

// rootName names the root in records: the template or image reference,
// "" for the default image.
func (r resolved) rootName() string {
	switch {
	case r.Template != "":
		return r.Template
	case r.RootDir != "":
		return r.RootDir
	case r.RootDigest != "":
		return r.RootDigest
	}
	return r.Image
}

// devices is what the machine puts on its virtio transports.
func (r resolved) devices() devices.Use {
	u := devices.Use{Template: r.onTemplate(), Network: r.Network != nil || r.TAP != nil}
	for _, d := range r.dirs {
		u.Dirs = append(u.Dirs, d.Mode == adddir.ReadWrite)
	}
	return u
}

// Cmd is a command to run in a sandbox.
type Cmd struct {
	// Argv is the command and its arguments. Argv[0] is looked up in the
	// guest's PATH when it has no slash. No shell is involved: every
	// argument reaches the command exactly as given. On a template, nil
	// runs the image's own command (Entrypoint then Cmd).
	Argv []string
	// Env is the environment as KEY=VALUE strings; later ones win. On a
	// template it adds to (and overrides) the image's Env. The guest adds
	// PATH and HOME when they are missing.
	Env []string
	// Dir is the working directory in the guest, created when missing;
	// "" means the image's WorkingDir on a template, else /.
	Dir string
	// Stdin, when non-nil, is copied to the command's stdin until EOF;
	// nil gives the command /dev/null.
	Stdin io.Reader
	// Stdout and Stderr receive the command's output as it is written;
	// nil discards it. A write that fails with EPIPE gives the command a
	// SIGPIPE, as a closed pipe would on the host; any other failed write
	// stops the command with an *OutputError.
	Stdout, Stderr io.Writer
	// Timeout, when positive, is enforced in the guest: the command's
	// process group gets SIGTERM, then SIGKILL after KillGrace, and the
	// result is ErrTimeout. If the guest does not report the end within
	// a few seconds more, the host gives up on it.
	Timeout time.Duration
	// KillGrace is the SIGTERM-to-SIGKILL grace at the timeout (0 means
	// DefaultKillGrace).
	KillGrace time.Duration
	// User runs the command as a user of the guest's root filesystem, as
	// docker run --user does: "name", "uid", "name:group", "uid:gid";
	// names are resolved in the root's /etc/passwd and /etc/group, with
	// the user's supplementary groups. "" is root (or a template's User).
	User string
	// TTY, when set, runs the command on a pseudo-terminal of that size:
	// it is the command's controlling terminal and its stdin, stdout and
	// stderr, so all output arrives on Stdout, with the terminal's own
	// conversions (\n becomes \r\n). Stdin, when set, is the terminal's
	// input: a Ctrl-C typed there (byte 0x03) interrupts the foreground
	// job through the guest's line discipline. Resize changes the size.
	TTY *TTY
	// Cgroup, when set, starts the command in the guest cgroup of that
	// name (a child of /sys/fs/cgroup, made when missing), and with it
	// everything the command spawns; Sandbox.CgroupStats reads its
	// counters. One path component of letters, digits, '.', '_' and '-'
	// (at most 64). The containerd shim puts each container's processes
	// in one, for its metrics and its OOM kills.
	Cgroup string
	// CgroupLimits, with Cgroup, are written to the cgroup before the
	// command starts in it (a pod's container's own limits, inside the
	// pod's VM).
	CgroupLimits *CgroupLimits
	// Root, when set, is a directory of the guest's root to run the
	// command in as its root (chroot), with kernel filesystems of its
	// own (/proc, /sys, /dev, /run), as a container has: Argv[0], Dir
	// and User are resolved inside it. The containerd shim runs each
	// container of a pod this way, in the pod's VM, in a root it copied
	// there.
	Root string
}

// CgroupLimits are a guest cgroup's limits; a zero field is no change.
type CgroupLimits struct {
	// Memory is memory.max in bytes.
	Memory uint64
	// CPUQuota of CPU time per CPUPeriod is cpu.max (both or neither).
	CPUQuota, CPUPeriod time.Duration
}

// TTY is a terminal's size in characters.
type TTY struct {
	Rows, Cols uint16
}

// DefaultKillGrace is how long a timed-out command has between SIGTERM and
// SIGKILL.
const DefaultKillGrace = 2 * time.Second

// Validate checks the command as Sandbox.Start does before it sends it,
// and returns the same *RequestError (ErrInvalid): the limits are what
// the guest's execve and the agent protocol carry. An empty Argv is
// valid here (on a template it runs the image's command); Start refuses
// it where there is none.
func (c Cmd) Validate() error {
	_, err := c.check()
	return err
}

// check validates the command and returns its environment as the agent
// protocol carries it.
func (c *Cmd) check() ([]envvar.Var, error) {
	for i, a := range c.Argv {
		if err := execreq.Arg(a); err != nil {
			return nil, invalid("Cmd.Argv", "", "argument %d %w", i, err)
		}
	}
	vars := make([]envvar.Var, 0, len(c.Env))
	for _, kv := range c.Env {
		name, value, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, invalid("Cmd.Env", execreq.Quote(kv), "want KEY=VALUE")
		}
		v := envvar.Var{Name: name, Value: value}
		if err := execreq.Env(v); err != nil {
			return nil, &RequestError{Field: "Cmd.Env", Value: execreq.Quote(name), Err: err}
		}
		vars = append(vars, v)
	}
	if err := execreq.Dir(c.Dir); err != nil {
		return nil, &RequestError{Field: "Cmd.Dir", Value: execreq.Quote(c.Dir), Err: err}
	}
	if err := execreq.Total(c.Argv, vars); err != nil {
		return nil, &RequestError{Field: "Cmd", Err: err}
	}
	if c.Timeout < 0 {
		return nil, invalid("Cmd.Timeout", c.Timeout.String(), "negative durations are not allowed")
	}
	if c.KillGrace < 0 {
		return nil, invalid("Cmd.KillGrace", c.KillGrace.String(), "negative durations are not allowed")
	}
	if strings.ContainsAny(c.User, "\x00\n") || len(c.User) > 256 {
		return nil, invalid("Cmd.User", execreq.Quote(c.User), "not a user name or id")
	}
	if c.Root != "" {
		if err := execreq.Dir(c.Root); err != nil {
			return nil, &RequestError{Field: "Cmd.Root", Value: execreq.Quote(c.Root), Err: err}
		}
	}
	if c.Cgroup != "" {
		if err := agentproto.CheckCgroupName(c.Cgroup); err != nil {
			return nil, invalid("Cmd.Cgroup", execreq.Quote(c.Cgroup), "%v", err)
		}
	}
	if l := c.CgroupLimits; l != nil {
		if c.Cgroup == "" {
			return nil, invalid("Cmd.CgroupLimits", "", "limits need a Cmd.Cgroup to apply to")
		}
		if (l.CPUQuota == 0) != (l.CPUPeriod == 0) || l.CPUQuota < 0 || l.CPUPeriod < 0 || l.CPUPeriod > 0 && l.CPUPeriod < time.Millisecond {
			return nil, invalid("Cmd.CgroupLimits", fmt.Sprintf("%v/%v", l.CPUQuota, l.CPUPeriod), "a CPU limit is a quota and a period of at least 1ms")
		}
	}
	if c.TTY != nil && (c.TTY.Rows == 0 || c.TTY.Cols == 0) {
		return nil, invalid("Cmd.TTY", fmt.Sprintf("%dx%d", c.TTY.Rows, c.TTY.Cols), "rows and columns of a terminal must be positive")
	}
	return vars, nil
}

func (r resolved) String() string {
	return fmt.Sprintf("%d vCPUs, %d MiB, %s, %d dirs", r.CPUs, r.memMiB, r.accel.Kind, len(r.dirs))
}
