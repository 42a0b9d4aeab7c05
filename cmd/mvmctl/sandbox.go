package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/units"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// A sandbox made by `mvmctl sandbox create` is a detached mvmctl process
// (the supervisor: `mvmctl sandbox supervise`, never typed by a user)
// that starts the VM through the SDK and serves it on a unix socket in
// its run directory (mvm.Sandbox.Serve); every other sandbox command is a
// client of that socket (mvm.Attach). There is no daemon: the supervisor
// lives exactly as long as its sandbox, and when it ends it leaves a
// record (why it ended) that `sandbox ls` shows until `sandbox rm`.

// supervisorSpec is what create hands the supervisor on its stdin.
type supervisorSpec struct {
	Config mvm.Config    `json:"config"`
	Idle   time.Duration `json:"idle"`
	TTL    time.Duration `json:"ttl"`
	// IdlePause pauses an idle sandbox instead of stopping it.
	IdlePause bool `json:"idle_pause"`
}

// sandboxRecord is what is left of a sandbox whose supervisor ended, in
// the state directory's sandboxes/NAME.json.
type sandboxRecord struct {
	Name       string    `json:"name"`
	Status     string    `json:"status"` // "stopped" or "failed"
	Reason     string    `json:"reason"`
	Root       string    `json:"root"`
	CPUs       int       `json:"cpus"`
	MemoryMiB  uint64    `json:"memory_mib"`
	Dirs       int       `json:"dirs"`
	Created    time.Time `json:"created"`
	Ended      time.Time `json:"ended"`
	ConsoleLog string    `json:"console_log,omitempty"`
}

// sandboxesDir is where records and supervisor logs are kept.
func sandboxesDir() (string, error) {
	state, err := xdg.StateDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(state, "sandboxes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	return dir, os.Chmod(dir, 0o700)
}

func readRecord(name string) (*sandboxRecord, error) {
	dir, err := sandboxesDir()
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, name+".json"))
	if err != nil {
		return nil, err
	}
	var r sandboxRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("record of sandbox %s: %w", name, err)
	}
	return &r, nil
}

func newSandboxCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sandbox",
		Short: "Sandboxes that stay up across many commands",
		Long: `A sandbox is a microVM that stays up: create it once, then run commands in it,
copy files in and out, and remove it when done. Each sandbox is owned by a
detached mvmctl process of yours (no daemon, no root); the other commands
talk to it over a socket only you can open.`,
		Example: `  mvmctl sandbox create dev
  mvmctl sandbox exec dev -- sh -c 'echo hi > /tmp/f'
  mvmctl sandbox cp dev:/tmp/f ./f
  mvmctl sandbox ls
  mvmctl sandbox rm dev`,
	}
	cmd.AddCommand(newSandboxCreateCommand(g), newSandboxSuperviseCommand(g), newSandboxLsCommand(),
		newSandboxExecCommand(g), newSandboxCpCommand(g), newSandboxStopCommand(), newSandboxRmCommand(), newSandboxLogsCommand(),
		newSandboxPauseCommand(), newSandboxResumeCommand(g))
	return cmd
}

// namePattern is mvm's sandbox name pattern (mvm.SocketPath checks it too).
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

func newSandboxCreateCommand(g *globalOptions) *cobra.Command {
	o := &execOptions{}
	var idle, ttl, onIdle string
	cmd := &cobra.Command{
		Use:   "create [flags] [NAME]",
		Short: "Start a sandbox that stays up, and print its name",
		Long: `create boots a microVM that stays up until it is stopped or removed, and prints
its name (a generated one if NAME is not given). It takes exec's flags for the
VM: --template or --image, --cpus, --memory, -d, the network flags.

--idle stops the sandbox after that long without a command running or a file
being copied (--on-idle pause pauses it instead); --ttl stops it that long
after it was created. Read-write
directories are written back when it stops, as with exec.`,
		Example: `  mvmctl sandbox create dev
  mvmctl sandbox create --template py --idle 30m -d ./src:/src:rw py1`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if onIdle != "stop" && onIdle != "pause" {
				return &exitError{code: exitFailure, msg: fmt.Sprintf("--on-idle %q: want stop or pause", onIdle)}
			}
			return createSandbox(cmd, g, o, args, idle, ttl, onIdle == "pause")
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&o.addDirs, "add-dir", "d", nil, "share a host directory: HOST:GUEST[:ro|rw] (repeatable; rw is written back when the sandbox stops)")
	f.IntVar(&o.cpus, "cpus", mvm.DefaultCPUs, "number of vCPUs")
	f.StringVar(&o.memory, "memory", units.FormatMiB(mvm.DefaultMemory>>20), "guest memory (e.g. 256M, 1G; a bare number is MiB)")
	f.StringVar(&o.accel, "accel", envOr("MVM_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env MVM_ACCEL)")
	f.StringVar(&o.kernel, "kernel", "", "boot this vmlinux instead of the default image's kernel")
	f.BoolVar(&o.noSnapshot, "no-snapshot", false, "boot the VM even when a snapshot of it could be restored")
	f.StringVar(&o.template, "template", "", "use this template's root filesystem (see mvmctl template)")
	f.StringVar(&o.image, "image", "", "use this container image's root filesystem (converted on first use and cached)")
	f.BoolVar(&o.net, "net", false, "give the VM a network (see mvmctl exec --help)")
	f.StringArrayVar(&o.allowHosts, "allow-host", nil, "reach only allowed destinations: HOST[:PORT] or *.DOMAIN (repeatable)")
	f.StringArrayVar(&o.allowCIDRs, "allow-cidr", nil, "reach only allowed destinations: an IPv4 network[:PORT] (repeatable)")
	f.StringArrayVar(&o.loopback, "allow-host-loopback", nil, "let the guest reach this port of the host's 127.0.0.1 (repeatable)")
	f.StringArrayVar(&o.addHosts, "add-host", nil, "a static DNS name NAME:IPv4 for the guest (repeatable)")
	f.StringArrayVarP(&o.publish, "publish", "p", nil, "publish a guest TCP port: [HOSTIP:]HOSTPORT:GUESTPORT (repeatable)")
	f.StringArrayVarP(&o.env, "env", "e", nil, "set an environment variable KEY=VALUE for every command (repeatable; a bare KEY copies the host's value)")
	f.StringVar(&idle, "idle", "0", "stop the sandbox after this long idle (30m, 2h; 0 for never)")
	f.StringVar(&ttl, "ttl", "0", "stop the sandbox this long after it was created (0 for never)")
	f.StringVar(&onIdle, "on-idle", "stop", "what --idle does: stop or pause")
	return cmd
}

func createSandbox(cmd *cobra.Command, g *globalOptions, o *execOptions, args []string, idleS, ttlS string, idlePause bool) error {
	fail := func(err error) error { return &exitError{code: exitFailure, err: o.explain(err)} }
	idle, err := units.ParseTimeout(idleS)
	if err != nil {
		return fail(fmt.Errorf("--idle: %w", err))
	}
	ttl, err := units.ParseTimeout(ttlS)
	if err != nil {
		return fail(fmt.Errorf("--ttl: %w", err))
	}
	o.timeout = "0"
	cfg, c, err := o.request([]string{"true"})
	if err != nil {
		return fail(err)
	}
	// -e at create: every command's environment.
	cfg.Env = c.Env
	name := ""
	if len(args) == 1 {
		name = args[0]
	} else {
		name = generatedName()
	}
	if !namePattern.MatchString(name) {
		return fail(fmt.Errorf("%q is not a sandbox name (letters, digits, '_', '.', '-'; at most 63, starting with a letter or digit)", name))
	}
	if exists, why := sandboxExists(name); exists {
		return fail(fmt.Errorf("a sandbox called %s %s; remove it first (mvmctl sandbox rm %s)", name, why, name))
	}
	if cfg.Template != "" || cfg.Image != "" {
		// Converting an image shows its progress here, and a bad
		// reference fails before anything is started.
		c := cfg
		if c.Image != "" {
			c.ImageProgress = newImageProgress(cmd.ErrOrStderr()).event
		}
		if _, err := mvm.LookupTemplate(cmd.Context(), c); err != nil {
			return fail(err)
		}
	}
	cfg.Name = name
	spec, err := json.Marshal(supervisorSpec{Config: cfg, Idle: idle, TTL: ttl, IdlePause: idlePause})
	if err != nil {
		return fail(err)
	}
	dir, err := sandboxesDir()
	if err != nil {
		return fail(err)
	}
	// Kept for a later resume of the sandbox by a new supervisor.
	if err := atomicfile.WriteBytes(filepath.Join(dir, name+".spec.json"), 0o600, spec); err != nil {
		return fail(err)
	}
	if err := spawnSupervisor(g, name, spec, false); err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), name)
	return nil
}

// spawnSupervisor starts the detached supervisor of the sandbox name with
// spec (resuming its detached paused state with resume) and waits until
// it is ready or has said why it could not be.
func spawnSupervisor(g *globalOptions, name string, spec []byte, resume bool) error {
	fail := func(err error) error { return &exitError{code: exitFailure, err: err} }
	dir, err := sandboxesDir()
	if err != nil {
		return fail(err)
	}
	logf, err := os.OpenFile(filepath.Join(dir, name+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fail(err)
	}
	defer logf.Close()
	sargs := []string{"sandbox", "supervise", name}
	if resume {
		sargs = append(sargs, "--resume")
	}
	if g.verbose {
		sargs = append(sargs, "-v")
	}
	_, err = spawnReady(sargs, spec, logf, "the sandbox's process")
	return err
}

// spawnReady starts this binary with args, detached (its own session:
// the terminal's signals and hangup are not its), spec on its stdin and
// its stderr to logf, and waits for it to say "ready" on stdout, or why
// it could not be ("error: ..."). It returns the process's pid.
func spawnReady(args []string, spec []byte, logf *os.File, what string) (int, error) {
	fail := func(err error) error { return &exitError{code: exitFailure, err: err} }
	self, err := os.Executable()
	if err != nil {
		return 0, fail(err)
	}
	p := exec.Command(self, args...)
	p.Stdin = strings.NewReader(string(spec))
	p.Stderr = logf
	ready, err := p.StdoutPipe()
	if err != nil {
		return 0, fail(err)
	}
	p.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := p.Start(); err != nil {
		return 0, fail(err)
	}
	line, _ := bufio.NewReader(ready).ReadString('\n')
	line = strings.TrimSpace(line)
	if line != "ready" {
		_ = p.Wait()
		if msg, ok := strings.CutPrefix(line, "error: "); ok {
			return 0, &exitError{code: exitFailure, msg: msg}
		}
		b, _ := os.ReadFile(logf.Name())
		return 0, &exitError{code: exitFailure, msg: fmt.Sprintf("%s ended before it was ready: %s", what, strings.TrimSpace(tail(string(b), 2000)))}
	}
	pid := p.Process.Pid
	_ = p.Process.Release()
	return pid, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// generatedName is a fresh sandbox name, as docker gives one.
func generatedName() string {
	var b [4]byte
	f, err := os.Open("/dev/urandom")
	if err == nil {
		_, _ = io.ReadFull(f, b[:])
		f.Close()
	}
	return fmt.Sprintf("sb-%x", b)
}

// sandboxExists reports whether the name is taken, and how.
func sandboxExists(name string) (bool, string) {
	if info, ok := runningSandbox(name); ok {
		return true, "is " + string(info.Status)
	}
	if detachedSandbox(name) {
		return true, "is paused"
	}
	if r, err := readRecord(name); err == nil {
		return true, "exists (" + r.Status + ")"
	}
	if runs, err := mvm.Running(mvm.Config{}); err == nil {
		for _, r := range runs {
			if r.Name == name {
				return true, "is a VM that runs now (mvmctl ps)"
			}
		}
	}
	return false, ""
}

// detachedSandbox reports whether name is a paused sandbox no process
// holds.
func detachedSandbox(name string) bool {
	list, err := mvm.Detached(mvm.Config{})
	if err != nil {
		return false
	}
	for _, d := range list {
		if d.Name == name {
			return true
		}
	}
	return false
}

// runningSandbox finds the live sandbox called name: a run whose
// directory has the socket.
func runningSandbox(name string) (mvm.RunInfo, bool) {
	runs, err := mvm.Running(mvm.Config{})
	if err != nil {
		return mvm.RunInfo{}, false
	}
	for _, r := range runs {
		if r.Name == name {
			if _, err := os.Stat(filepath.Join(r.Dir, mvm.SocketName)); err == nil {
				return r, true
			}
		}
	}
	return mvm.RunInfo{}, false
}

func newSandboxSuperviseCommand(g *globalOptions) *cobra.Command {
	var resume bool
	cmd := &cobra.Command{
		Use:    "supervise NAME",
		Short:  "Own a sandbox's VM (started by sandbox create)",
		Hidden: true,
		Example: `  # not typed by users: mvmctl sandbox create runs
  mvmctl sandbox supervise dev < config.json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return supervise(g, args[0], resume)
		},
	}
	cmd.Flags().BoolVar(&resume, "resume", false, "resume the sandbox's detached paused state instead of starting it")
	return cmd
}

// supervise is the supervisor: it starts the sandbox, tells create it is
// ready on stdout, serves it until it is stopped (SIGTERM, SIGINT), idle
// or past its lifetime, or its VM died, then closes it and records why.
func supervise(g *globalOptions, name string, resume bool) error {
	var spec supervisorSpec
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fmt.Printf("error: read the sandbox's configuration: %v\n", err)
		return &exitError{code: exitFailure}
	}
	// The log is a file that lives as long as the sandbox, and what it
	// says may be the guest's doing (a flood of refused connections):
	// bounded.
	level := slog.LevelWarn
	if g.verbose {
		level = slog.LevelDebug
	}
	g.log = slog.New(slog.NewTextHandler(&cappedWriter{w: os.Stderr, left: supervisorLogLimit}, &slog.HandlerOptions{Level: level}))
	cfg := spec.Config
	cfg.Name, cfg.Logger = name, g.log
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	signal.Ignore(syscall.SIGPIPE)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var sb *mvm.Sandbox
	var err error
	if resume {
		sb, err = mvm.ResumeDetached(ctx, mvm.Config{Logger: g.log}, name)
	} else {
		sb, err = mvm.Start(ctx, cfg)
	}
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return &exitError{code: exitFailure, err: err}
	}
	path, err := mvm.SocketPath(cfg, name)
	var listener net.Listener
	if err == nil {
		listener, err = mvm.Listen(path)
	}
	if err != nil {
		_, _ = sb.Close(context.Background())
		fmt.Printf("error: %v\n", err)
		return &exitError{code: exitFailure, err: err}
	}
	served := make(chan error, 1)
	go func() { served <- sb.Serve(ctx, listener) }()
	fmt.Println("ready")
	// stdout was create's pipe: from now on it is the log.
	_ = syscall.Dup2(2, 1)

	created := time.Now()
	var ttl <-chan time.Time
	if spec.TTL > 0 {
		t := time.NewTimer(spec.TTL)
		defer t.Stop()
		ttl = t.C
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	status, reason := "stopped", ""
wait:
	for {
		if sb.Status() == mvm.StatusPaused {
			// Paused (by a client or --on-idle): the sandbox is left to
			// its run directory, and this process ends; resume starts a
			// new one. The pause's reply reaches its client first.
			time.Sleep(200 * time.Millisecond)
			cancel()
			listener.Close()
			<-served
			if sb.Status() == mvm.StatusPaused {
				return detachSupervised(g, sb, name)
			}
			// Resumed meanwhile: serve again.
			ctx, cancel = context.WithCancel(context.Background())
			defer cancel()
			if listener, err = mvm.Listen(path); err != nil {
				g.log.Error("listen again after a resume", "err", err)
				status, reason = "failed", err.Error()
				break wait
			}
			go func() { served <- sb.Serve(ctx, listener) }()
		}
		select {
		case sig := <-sigs:
			reason = "stopped (" + sig.String() + ")"
			break wait
		case <-ttl:
			reason = "its lifetime (--ttl " + spec.TTL.String() + ") ran out"
			break wait
		case <-sb.Failed():
			status, reason = "failed", sb.Err().Error()
			break wait
		case err := <-served:
			status, reason = "failed", fmt.Sprintf("serving the sandbox failed: %v", err)
			break wait
		case <-tick.C:
			if since := sb.IdleSince(); spec.Idle > 0 && sb.Status() == mvm.StatusRunning && !since.IsZero() && time.Since(since) >= spec.Idle {
				if spec.IdlePause {
					if _, err := sb.Pause(ctx); err == nil {
						g.log.Info("paused: idle", "name", name, "idle", spec.Idle)
						continue
					} else if errors.Is(err, mvm.ErrBusy) {
						continue
					} else {
						g.log.Warn("could not pause the idle sandbox; stopping it", "err", err)
					}
				}
				reason = "idle for " + spec.Idle.String() + " (--idle)"
				break wait
			}
		}
	}
	g.log.Info("sandbox ends", "name", name, "status", status, "reason", reason)
	cancel()
	listener.Close()
	rec := sandboxRecord{Name: name, Status: status, Reason: reason, Root: rootName(cfg), CPUs: cfg.CPUs, MemoryMiB: uint64(cfg.Memory >> 20), Dirs: len(cfg.Dirs), Created: created}
	dir, derr := sandboxesDir()
	if runs, err := mvm.Running(mvm.Config{}); err == nil {
		for _, r := range runs {
			if r.Name == name {
				rec.Created = r.Created
			}
		}
	}
	closeCtx, cancelClose := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancelClose()
	go func() {
		// A second signal hurries the teardown (changes are kept).
		select {
		case <-sigs:
			cancelClose()
		case <-closeCtx.Done():
		}
	}()
	wbs, _ := sb.Close(closeCtx)
	for _, wb := range wbs {
		if wb.Err != nil {
			rec.Reason += "; write-back of " + wb.Dir.Host + " failed: " + wb.Err.Error()
		}
	}
	rec.Ended = time.Now()
	if derr == nil {
		// For `sandbox logs` of an ended sandbox.
		if b, err := sb.Console(context.Background()); err == nil {
			p := filepath.Join(dir, name+".console.log")
			if atomicfile.WriteBytes(p, 0o600, b) == nil {
				rec.ConsoleLog = p
			}
		}
		b, _ := json.MarshalIndent(rec, "", "  ")
		if err := atomicfile.WriteBytes(filepath.Join(dir, name+".json"), 0o600, b); err != nil {
			g.log.Warn("write the sandbox's record", "err", err)
		}
	}
	if cfg, ok := sb.MissingSnapshot(); ok {
		// As exec does after its run: the next sandbox or run of this
		// configuration restores.
		spawnHeal(g, cfg)
	}
	return nil
}

// supervisorLogLimit bounds a supervisor's log file.
const supervisorLogLimit = 8 << 20

// cappedWriter writes up to left bytes to w, then one line saying the
// rest is dropped, then nothing.
type cappedWriter struct {
	mu    sync.Mutex
	w     io.Writer
	left  int64
	noted bool
}

func (c *cappedWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if int64(len(p)) <= c.left {
		c.left -= int64(len(p))
		return c.w.Write(p)
	}
	if !c.noted {
		c.noted = true
		_, _ = fmt.Fprintf(c.w, "mvmctl: the log reached its limit; the rest is dropped\n")
	}
	return len(p), nil
}

// detachSupervised hands a paused sandbox over to its run directory: the
// console log is kept for `sandbox logs`, and this supervisor ends.
func detachSupervised(g *globalOptions, sb *mvm.Sandbox, name string) error {
	if dir, err := sandboxesDir(); err == nil {
		if b, err := sb.Console(context.Background()); err == nil {
			_ = atomicfile.WriteBytes(filepath.Join(dir, name+".console.log"), 0o600, b)
		}
	}
	if path, err := mvm.SocketPath(mvm.Config{}, name); err == nil {
		os.Remove(path)
	}
	if err := sb.Detach(); err != nil {
		g.log.Error("detach the paused sandbox", "err", err)
		_, _ = sb.Close(context.Background())
		return &exitError{code: exitFailure, err: err}
	}
	g.log.Info("paused and detached", "name", name)
	return nil
}

func rootName(cfg mvm.Config) string {
	if cfg.Template != "" {
		return cfg.Template
	}
	return cfg.Image
}

// sandboxJSON is one entry of `sandbox ls --json`.
type sandboxJSON struct {
	Name      string    `json:"name"`
	Status    string    `json:"status"`
	Root      string    `json:"root"`
	CPUs      int       `json:"cpus"`
	MemoryMiB uint64    `json:"memory_mib"`
	Dirs      int       `json:"dirs"`
	Created   time.Time `json:"created"`
	PID       int       `json:"pid,omitempty"`
	Reason    string    `json:"reason,omitempty"`
}

func listSandboxes() ([]sandboxJSON, error) {
	var out []sandboxJSON
	runs, err := mvm.Running(mvm.Config{})
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, r := range runs {
		if _, err := os.Stat(filepath.Join(r.Dir, mvm.SocketName)); err != nil {
			continue
		}
		seen[r.Name] = true
		out = append(out, sandboxJSON{r.Name, string(r.Status), r.Root, r.CPUs, r.MemoryMiB, r.Dirs, r.Created, r.Owner, ""})
	}
	if det, err := mvm.Detached(mvm.Config{}); err == nil {
		for _, d := range det {
			seen[d.Name] = true
			out = append(out, sandboxJSON{d.Name, string(mvm.StatusPaused), d.Root, d.CPUs, d.MemoryMiB, d.Dirs, d.Created, 0, pausedAgo(d.Paused)})
		}
	}
	dir, err := sandboxesDir()
	if err != nil {
		return nil, err
	}
	recs, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	for _, p := range recs {
		name := strings.TrimSuffix(filepath.Base(p), ".json")
		if strings.HasSuffix(name, ".spec") || seen[name] {
			continue
		}
		if r, err := readRecord(name); err == nil {
			out = append(out, sandboxJSON{r.Name, r.Status, r.Root, r.CPUs, r.MemoryMiB, r.Dirs, r.Created, 0, r.Reason})
		}
	}
	return out, nil
}

func newSandboxLsCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls [--json]",
		Aliases: []string{"list"},
		Short:   "List your sandboxes",
		Example: `  mvmctl sandbox ls
  mvmctl sandbox ls --json`,
		Long: `ls lists your sandboxes: those that run, and those that ended (stopped or
failed, with why) until they are removed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := listSandboxes()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if list == nil {
					list = []sandboxJSON{}
				}
				return writeJSON(out, list)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATUS\tROOT\tCPUS\tMEMORY\tDIRS\tCREATED\tREASON")
			for _, s := range list {
				root := s.Root
				if root == "" {
					root = "-"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n", s.Name, s.Status, root, s.CPUs,
					units.FormatMiB(s.MemoryMiB), s.Dirs, units.ShortAge(time.Since(s.Created)), oneLine(s.Reason, 60))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func pausedAgo(t time.Time) string {
	if age := units.ShortAge(time.Since(t)); age != "just now" {
		return "paused " + age + " ago"
	}
	return "paused just now"
}

func oneLine(s string, n int) string {
	// What it shows may come from a guest: no control characters.
	s = strings.Map(func(r rune) rune {
		switch {
		case r == '\n' || r == '\t':
			return ' '
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r <= 0x9f):
			return -1
		}
		return r
	}, s)
	if len(s) > n {
		s = s[:n-3] + "..."
	}
	return s
}

// attach connects to the sandbox called name, with a clear error for one
// that ended or never was.
func attach(ctx context.Context, name string) (*mvm.Sandbox, error) {
	sb, err := mvm.Attach(ctx, mvm.Config{}, name)
	if err == nil {
		return sb, nil
	}
	if errors.Is(err, mvm.ErrNotFound) {
		if detachedSandbox(name) {
			return nil, fmt.Errorf("the sandbox %s is paused (mvmctl sandbox resume %s)", name, name)
		}
		if r, rerr := readRecord(name); rerr == nil {
			if r.Status == "failed" {
				return nil, fmt.Errorf("the sandbox %s failed: %s", name, r.Reason)
			}
			return nil, fmt.Errorf("the sandbox %s is %s: %s", name, r.Status, r.Reason)
		}
		return nil, fmt.Errorf("no sandbox called %s (mvmctl sandbox ls lists them)", name)
	}
	return nil, err
}

func newSandboxExecCommand(g *globalOptions) *cobra.Command {
	o := &execOptions{}
	cmd := &cobra.Command{
		Use:   "exec [flags] NAME -- COMMAND [ARG...]",
		Short: "Run a command in a sandbox",
		Long: `exec runs COMMAND in the sandbox NAME, with mvmctl exec's semantics: output
streamed as it is written, stdin forwarded when it is not a terminal (or with
-i), -t for a terminal, the same exit statuses. Ctrl-C goes to the command; a
second one kills it. The sandbox stays up.`,
		Example: `  mvmctl sandbox exec dev -- uname -a
  mvmctl sandbox exec -it dev -- sh`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return sandboxExec(cmd, o, args[0], args[1:])
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false)
	f.StringVar(&o.timeout, "timeout", "0", "kill COMMAND after this long (30s, 2m; 0 for none)")
	f.StringArrayVarP(&o.env, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable; a bare KEY copies the host's value)")
	f.StringVarP(&o.workdir, "workdir", "w", "", "working directory in the guest (created if missing)")
	f.BoolVarP(&o.interactive, "interactive", "i", false, "forward stdin even when it is a terminal")
	f.BoolVarP(&o.tty, "tty", "t", false, "run COMMAND on a terminal")
	f.StringVarP(&o.user, "user", "u", "", "run as this user of the root filesystem")
	return cmd
}

func sandboxExec(cmd *cobra.Command, o *execOptions, name string, argv []string) error {
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 || argv[0] == "" {
		return &exitError{code: exitFailure, msg: "no command given: mvmctl sandbox exec NAME -- COMMAND [ARG...]"}
	}
	timeout, err := units.ParseTimeout(o.timeout)
	if err != nil {
		return &exitError{code: exitFailure, err: err}
	}
	env, err := envvar.ParseFlags(o.env, os.LookupEnv)
	if err != nil {
		return &exitError{code: exitFailure, err: err}
	}
	c := mvm.Cmd{Argv: argv, Env: envvar.Strings(env), Dir: o.workdir, Timeout: timeout, User: o.user,
		Stdout: cmd.OutOrStdout(), Stderr: cmd.ErrOrStderr()}
	if err := c.Validate(); err != nil {
		return &exitError{code: exitFailure, err: o.explain(err)}
	}
	var ht *hostTerminal
	switch {
	case o.tty:
		if ht, err = newHostTerminal(o.interactive); err != nil {
			return &exitError{code: exitFailure, err: err}
		}
		defer ht.restore()
		sz := ht.size()
		c.TTY = &sz
		if o.interactive {
			c.Stdin = os.Stdin
		}
		if !hasEnv(c.Env, "TERM") {
			c.Env = append(c.Env, "TERM="+envOr("TERM", "xterm"))
		}
	case o.interactive || !term.IsTerminal(int(os.Stdin.Fd())):
		c.Stdin = os.Stdin
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)

	sb, err := attach(cmd.Context(), name)
	if err != nil {
		return &exitError{code: exitFailure, err: err}
	}
	defer sb.Close(context.Background())
	opts := []mvm.RunOption{mvm.WithSignals(sigs)}
	if ht != nil {
		opts = append(opts, mvm.WithStarted(ht.attach))
	}
	res, err := sb.Run(cmd.Context(), c, opts...)
	if ht != nil {
		ht.restore()
	}
	code, msg := exitStatus(res, o.explain(err), timeout)
	if errors.Is(err, mvm.ErrInterrupted) {
		msg = fmt.Sprintf("interrupted (%s); the command was killed, the sandbox goes on", res.Interrupted)
	}
	if code == 0 && msg == "" {
		return nil
	}
	return &exitError{code: code, msg: msg}
}

func newSandboxCpCommand(g *globalOptions) *cobra.Command {
	var limit string
	cmd := &cobra.Command{
		Use:   "cp [flags] SRC DST",
		Short: "Copy files and directory trees between the host and a sandbox",
		Long: `cp copies a file, a symbolic link or a directory tree between the host and a
sandbox, with docker cp's rules. One of SRC and DST is NAME:PATH (PATH absolute
in the guest). To a path that does not exist, the copy is made there; into a
directory, under its own name; "SRC/." copies a directory's contents. Modes and
modification times are kept; the guest's copies belong to root, the host's to
you, without setuid or setgid bits.

A copy out of a sandbox appears only once it has all arrived, and is bounded
by --limit and by the free space of the destination's filesystem: the guest
decides what it sends. DST may not be a symbolic link.`,
		Example: `  mvmctl sandbox cp ./src dev:/work
  mvmctl sandbox cp dev:/work/out.tar.gz .`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return sandboxCp(cmd, args[0], args[1], limit)
		},
	}
	cmd.Flags().StringVar(&limit, "limit", units.FormatMiB(uint64(mvm.DefaultCopyLimit>>20)), "the most a copy out of the sandbox may write (e.g. 500M, 20G)")
	return cmd
}

// splitSandboxPath splits NAME:PATH; ok is false for a host path (no
// colon before the first slash, as docker cp reads it).
func splitSandboxPath(s string) (name, p string, ok bool) {
	i := strings.IndexByte(s, ':')
	if i <= 0 || strings.Contains(s[:i], "/") {
		return "", s, false
	}
	return s[:i], s[i+1:], true
}

func sandboxCp(cmd *cobra.Command, src, dst, limitS string) error {
	sn, sp, sIn := splitSandboxPath(src)
	dn, dp, dIn := splitSandboxPath(dst)
	fail := func(err error) error { return &exitError{code: exitFailure, err: err} }
	switch {
	case sIn && dIn:
		return fail(errors.New("copying between two sandboxes is not supported: one of SRC and DST must be a host path"))
	case !sIn && !dIn:
		return fail(errors.New("one of SRC and DST must be NAME:PATH"))
	}
	lim, err := units.ParseMemory(limitS)
	if err != nil {
		return fail(fmt.Errorf("--limit: %w", err))
	}
	name := sn
	if dIn {
		name = dn
	}
	sb, err := attach(cmd.Context(), name)
	if err != nil {
		return fail(err)
	}
	defer sb.Close(context.Background())
	var st mvm.CopyStats
	var where string
	opts := mvm.CopyOptions{Limit: int64(lim) << 20}
	progress := term.IsTerminal(int(os.Stderr.Fd()))
	if progress {
		start := time.Now()
		opts.Progress = func(n int64) {
			if d := time.Since(start); d > 500*time.Millisecond {
				fmt.Fprintf(cmd.ErrOrStderr(), "\rcopying: %s (%.0f MiB/s)   ", units.FormatBytes(n), float64(n)/(1<<20)/d.Seconds())
			}
		}
	}
	if dIn {
		st, err = sb.CopyIn(cmd.Context(), sp, dp, opts)
		where = dst
	} else {
		st, err = sb.CopyOut(cmd.Context(), sp, dp, opts)
		where = dp
	}
	if progress && st.Duration > 500*time.Millisecond || progress && err != nil {
		fmt.Fprint(cmd.ErrOrStderr(), "\r\033[K")
	}
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			return fail(fmt.Errorf("%s %s: %w", pe.Op, pe.Path, pe.Err))
		}
		return fail(err)
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "Successfully copied %s (%d files) to %s in %s\n", units.FormatBytes(st.Bytes), st.Files, where, st.Duration.Round(time.Millisecond))
	return nil
}

func newSandboxStopCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "stop NAME...",
		Short:   "Stop sandboxes (their read-write directories are written back)",
		Example: `  mvmctl sandbox stop dev`,
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, name := range args {
				if err := stopSandbox(name); err != nil {
					return &exitError{code: exitFailure, err: err}
				}
				fmt.Fprintln(cmd.OutOrStdout(), name)
			}
			return nil
		},
	}
}

// stopDetached ends a paused sandbox no process holds.
func stopDetached(name string) error {
	var det mvm.DetachedInfo
	if list, err := mvm.Detached(mvm.Config{}); err == nil {
		for _, d := range list {
			if d.Name == name {
				det = d
			}
		}
	}
	wbs, err := mvm.CloseDetached(context.Background(), mvm.Config{}, name)
	reason := "stopped while paused"
	for _, wb := range wbs {
		if wb.Err != nil {
			reason += "; write-back of " + wb.Dir.Host + " failed: " + wb.Err.Error()
		}
	}
	if err != nil && len(wbs) == 0 {
		return fmt.Errorf("stop %s: %w", name, err)
	}
	dir, derr := sandboxesDir()
	if derr == nil {
		rec := sandboxRecord{Name: name, Status: "stopped", Reason: reason, Root: det.Root, CPUs: det.CPUs,
			MemoryMiB: det.MemoryMiB, Dirs: det.Dirs, Created: det.Created, Ended: time.Now()}
		if b, err := os.ReadFile(filepath.Join(dir, name+".console.log")); err == nil && len(b) > 0 {
			rec.ConsoleLog = filepath.Join(dir, name+".console.log")
		}
		b, _ := json.MarshalIndent(rec, "", "  ")
		_ = atomicfile.WriteBytes(filepath.Join(dir, name+".json"), 0o600, b)
	}
	return nil
}

// stopSandbox asks the supervisor to end the sandbox and waits until it
// has (its changes written back).
func stopSandbox(name string) error {
	info, ok := runningSandbox(name)
	if !ok && detachedSandbox(name) {
		return stopDetached(name)
	}
	if !ok {
		if _, err := readRecord(name); err == nil {
			return nil // already ended
		}
		return fmt.Errorf("no sandbox called %s (mvmctl sandbox ls lists them)", name)
	}
	if err := syscall.Kill(info.Owner, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop %s: %w", name, err)
	}
	deadline := time.Now().Add(6 * time.Minute)
	for time.Now().Before(deadline) {
		if syscall.Kill(info.Owner, 0) != nil {
			// It may have been pausing: then it left a paused sandbox.
			if detachedSandbox(name) {
				return stopDetached(name)
			}
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("stop %s: its process (%d) did not end", name, info.Owner)
}

func newSandboxRmCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove sandboxes, stopping those that run",
		Example: `  mvmctl sandbox rm dev
  mvmctl sandbox rm $(mvmctl sandbox ls --json | jq -r '.[].name')`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir, err := sandboxesDir()
			if err != nil {
				return err
			}
			for _, name := range args {
				if !namePattern.MatchString(name) {
					return &exitError{code: exitFailure, msg: fmt.Sprintf("%q is not a sandbox name", name)}
				}
				if err := stopSandbox(name); err != nil {
					return &exitError{code: exitFailure, err: err}
				}
				for _, suffix := range []string{".json", ".spec.json", ".log", ".console.log"} {
					_ = os.Remove(filepath.Join(dir, name+suffix))
				}
				fmt.Fprintln(cmd.OutOrStdout(), name)
			}
			return nil
		},
	}
}

func newSandboxLogsCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "logs NAME",
		Short:   "Print a sandbox's console log (its last " + units.FormatBytes(backend.ConsoleLogLimit) + ")",
		Example: `  mvmctl sandbox logs dev`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if _, ok := runningSandbox(name); ok {
				sb, err := attach(cmd.Context(), name)
				if err != nil {
					return &exitError{code: exitFailure, err: err}
				}
				defer sb.Close(context.Background())
				b, err := sb.Console(cmd.Context())
				if err != nil {
					return &exitError{code: exitFailure, err: err}
				}
				_, err = cmd.OutOrStdout().Write(b)
				return err
			}
			logPath := ""
			if r, err := readRecord(name); err == nil {
				logPath = r.ConsoleLog
			} else if detachedSandbox(name) {
				if dir, err := sandboxesDir(); err == nil {
					logPath = filepath.Join(dir, name+".console.log")
				}
			} else {
				return &exitError{code: exitFailure, msg: fmt.Sprintf("no sandbox called %s", name)}
			}
			f, err := os.Open(logPath)
			if err != nil {
				return &exitError{code: exitFailure, err: fmt.Errorf("the console log of %s: %w", name, err)}
			}
			defer f.Close()
			_, err = io.Copy(cmd.OutOrStdout(), io.LimitReader(f, backend.ConsoleLogLimit))
			return err
		},
	}
}

func newSandboxPauseCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "pause NAME",
		Short: "Save a sandbox to disk and end its VM, to resume it later where it was",
		Long: `pause saves the sandbox's RAM and device state to its directory, keeps its disks,
and ends its VM: a paused sandbox costs disk (and its small owning process),
no RAM or CPU. resume brings it back exactly where it was. A sandbox with a
command running, a copy in flight or a network cannot be paused.`,
		Example: `  mvmctl sandbox pause dev
  mvmctl sandbox resume dev`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sb, err := attach(cmd.Context(), args[0])
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			defer sb.Close(context.Background())
			owner, _ := runningSandbox(args[0])
			st, err := sb.Pause(cmd.Context())
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			// Its owner hands it to its run directory and ends.
			if owner.Owner != 0 {
				deadline := time.Now().Add(30 * time.Second)
				for time.Now().Before(deadline) && syscall.Kill(owner.Owner, 0) == nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "paused %s in %s (%s of state on disk)\n", args[0], st.Duration.Round(time.Millisecond), units.FormatBytes(st.StateBytes))
			return nil
		},
	}
}

func newSandboxResumeCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "resume NAME",
		Aliases: []string{"unpause"},
		Short:   "Resume a paused sandbox where it was",
		Example: `  mvmctl sandbox resume dev`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if detachedSandbox(name) {
				start := time.Now()
				dir, err := sandboxesDir()
				if err != nil {
					return &exitError{code: exitFailure, err: err}
				}
				spec, err := os.ReadFile(filepath.Join(dir, name+".spec.json"))
				if err != nil {
					return &exitError{code: exitFailure, err: fmt.Errorf("resume %s: its configuration: %w", name, err)}
				}
				if err := spawnSupervisor(g, name, spec, true); err != nil {
					return err
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "resumed %s in %s\n", name, time.Since(start).Round(time.Millisecond))
				return nil
			}
			sb, err := attach(cmd.Context(), name)
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			defer sb.Close(context.Background())
			d, err := sb.Resume(cmd.Context())
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "resumed %s in %s\n", args[0], d.Round(time.Millisecond))
			return nil
		},
	}
}
