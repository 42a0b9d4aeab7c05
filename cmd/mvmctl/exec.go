package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/adddir"
	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/launchplan"
	"github.com/mvm-sh/mvm/internal/units"
)

type execOptions struct {
	addDirs     []string
	launchPlan  string
	cpus        int
	memory      string
	timeout     string
	env         []string
	workdir     string
	accel       string
	interactive bool
	tty         bool
	kernel      string
	noSnapshot  bool
	template    string
	image       string
	user        string
	entrypoint  string
	entrySet    bool
	net         bool
	allowHosts  []string
	allowCIDRs  []string
	loopback    []string
	addHosts    []string
	publish     []string
}

func newExecCommand(g *globalOptions) *cobra.Command {
	o := &execOptions{}
	cmd := &cobra.Command{
		Use:   "exec [flags] -- COMMAND [ARG...]",
		Short: "Run a command in a throwaway microVM",
		Long: `exec boots a fresh microVM, runs COMMAND in it, streams its stdout and
stderr as they are written, tears the VM down and exits with COMMAND's exit
status.

Arguments reach the guest exactly as given (no shell is involved). stdin is
forwarded when it is not a terminal, or always with -i.

With -t the command runs on a pseudo-terminal in the guest, sized like
yours and following it: its stdout and stderr are then one stream (as on
any terminal), and with -i your keys go to it raw (Ctrl-C interrupts its
foreground job, not the VM). -t alone gives the command a terminal without
forwarding stdin; -it needs a terminal on stdin. TERM is passed on (xterm
if unset).

Exit status: COMMAND's own; 128+N if it died of signal N (or mvmctl was
interrupted by signal N); 124 on timeout; 125 if mvmctl or the VM failed,
or writing COMMAND's output failed; 126 if COMMAND cannot be executed; 127
if it was not found.`,
		Example: `  mvmctl exec -- uname -a
  mvmctl exec -it -- sh
  echo hi | mvmctl exec -- sh -c 'cat; exit 3'
  mvmctl exec --timeout 5s -- sleep 60
  mvmctl exec -e GREETING='hello world' -w /tmp -- sh -c 'echo "$GREETING"; pwd'
  mvmctl exec -d ./src:/src:ro -d ./out:/out:rw -- sh -c 'sort /src/data > /out/sorted'
  mvmctl exec --template py --allow-host pypi.org --allow-host files.pythonhosted.org -- pip install requests
  mvmctl exec --template py -p 8000:8000 -- python3 -m http.server`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runExec(cmd, g, o, args)
		},
	}
	f := cmd.Flags()
	// Everything after the first non-flag argument belongs to COMMAND, so
	// "mvmctl exec ls -la" works as well as "mvmctl exec -- ls -la".
	f.SetInterspersed(false)
	f.StringArrayVarP(&o.addDirs, "add-dir", "d", nil, "share a host directory: HOST:GUEST[:ro|rw] (repeatable; default ro; rw writes the guest's changes back)")
	f.StringVar(&o.launchPlan, "launch-plan", "", "take the command, working directory and environment from an mvmforge launch.json")
	f.IntVar(&o.cpus, "cpus", mvm.DefaultCPUs, "number of vCPUs")
	f.StringVar(&o.memory, "memory", units.FormatMiB(mvm.DefaultMemory>>20), "guest memory (e.g. 256M, 1G; a bare number is MiB)")
	f.StringVar(&o.timeout, "timeout", mvm.DefaultTimeout.String(), "kill COMMAND after this long (30, 30s, 2m; 0 for none)")
	f.StringArrayVarP(&o.env, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable; a bare KEY copies the host's value)")
	f.StringVarP(&o.workdir, "workdir", "w", "", "working directory in the guest (created if missing; default /)")
	f.StringVar(&o.accel, "accel", envOr("MVM_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env MVM_ACCEL)")
	f.BoolVarP(&o.interactive, "interactive", "i", false, "forward stdin even when it is a terminal")
	f.BoolVarP(&o.tty, "tty", "t", false, "run COMMAND on a terminal (stdout and stderr become one stream); with -i, your terminal's keys go to it raw")
	f.StringVar(&o.kernel, "kernel", "", "boot this vmlinux instead of the default image's kernel")
	f.BoolVar(&o.noSnapshot, "no-snapshot", false, "boot the VM even when a snapshot of it could be restored")
	f.StringVar(&o.template, "template", "", "run in this template's root filesystem (see mvmctl template)")
	f.StringVar(&o.image, "image", "", "run in this container image (a registry reference, docker-archive:FILE, oci-archive:FILE or oci:DIR[:TAG]), converted on first use and cached")
	f.StringVarP(&o.user, "user", "u", "", "run as this user of the root filesystem: name, uid, name:group or uid:gid (default: the image's, else root)")
	f.StringVar(&o.entrypoint, "entrypoint", "", "replace the image's entrypoint (and its default arguments)")
	f.BoolVar(&o.net, "net", false, "give the VM a network: outbound connections to public addresses, DNS (implied by the flags below)")
	f.StringArrayVar(&o.allowHosts, "allow-host", nil, "reach only allowed destinations: this host name, or *.DOMAIN, with an optional :PORT (repeatable)")
	f.StringArrayVar(&o.allowCIDRs, "allow-cidr", nil, "reach only allowed destinations: this IPv4 network, with an optional :PORT; may name private networks (repeatable)")
	f.StringArrayVar(&o.loopback, "allow-host-loopback", nil, "let the guest reach this port of the host's 127.0.0.1, at host.mvm.internal (repeatable)")
	f.StringArrayVar(&o.addHosts, "add-host", nil, "a static DNS name NAME:IPv4 for the guest, reachable as if allowed (repeatable)")
	f.StringArrayVarP(&o.publish, "publish", "p", nil, "publish a guest TCP port: [HOSTIP:]HOSTPORT:GUESTPORT (default host address 127.0.0.1; repeatable)")
	return cmd
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func runExec(cmd *cobra.Command, g *globalOptions, o *execOptions, argv []string) error {
	// Everything the user typed is checked before anything boots; the
	// SDK checks the rest (paths, accelerator, image) before it boots.
	o.entrySet = cmd.Flags().Changed("entrypoint")
	cfg, c, err := o.request(argv)
	if err != nil {
		return &exitError{code: exitFailure, err: o.explain(err)}
	}
	cfg.Logger = g.log
	if cfg.Template != "" || cfg.Image != "" {
		if c.Argv, err = o.imageCommand(cmd, cfg, c.Argv); err != nil {
			return &exitError{code: exitFailure, err: o.explain(err)}
		}
	}
	c.Stdout = cmd.OutOrStdout()
	c.Stderr = cmd.ErrOrStderr()
	var ht *hostTerminal
	switch {
	case o.tty:
		// docker's rules: -t gives the command a terminal; only -i
		// forwards stdin, which must then be a terminal too.
		var err error
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

	// Interrupts go to the run, which forwards the first to the command.
	// SIGPIPE is caught so that a closed stdout becomes an EPIPE error
	// (and a SIGPIPE for the guest command) instead of killing mvmctl
	// before it can tear the VM down.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)

	runOpts := []mvm.RunOption{mvm.WithSignals(sigs)}
	if ht != nil {
		runOpts = append(runOpts, mvm.WithStarted(ht.attach))
	}
	res, err := mvm.Run(cmd.Context(), cfg, c, runOpts...)
	if ht != nil {
		// Before anything below prints on the terminal.
		ht.restore()
	}
	if g.verbose {
		printTimings(cmd.ErrOrStderr(), res.Timings)
	}
	reportWriteBacks(cmd.ErrOrStderr(), res.WriteBacks, g.verbose)
	if res.MissingSnapshot != nil {
		// The run's output is out; the next identical run restores.
		spawnHeal(g, *res.MissingSnapshot)
	}
	code, msg := exitStatus(res, o.explain(err), c.Timeout)
	if errors.Is(err, mvm.ErrCommandNotFound) && cfg.Template == "" && cfg.Image == "" && len(c.Argv) > 0 {
		if hint := notFoundHint(c.Argv[0]); hint != "" {
			msg += "\nmvmctl: " + hint
		}
	}
	if code == 0 && msg == "" {
		return nil
	}
	return &exitError{code: code, msg: msg}
}

// request validates the flags and builds the sandbox configuration and
// the command.
func (o *execOptions) request(argv []string) (mvm.Config, mvm.Cmd, error) {
	var cfg mvm.Config
	var c mvm.Cmd
	var plan launchplan.Entrypoint
	switch {
	case o.launchPlan != "" && len(argv) > 0:
		return cfg, c, fmt.Errorf("--launch-plan %s supplies the command; remove the command after -- (%q) or the flag", o.launchPlan, argv)
	case o.launchPlan != "":
		var err error
		if plan, err = launchplan.Load(o.launchPlan); err != nil {
			return cfg, c, err
		}
		argv = plan.Command
	case o.template == "" && o.image == "" && (len(argv) == 0 || argv[0] == ""):
		return cfg, c, errors.New("no command given: mvmctl exec [flags] -- COMMAND [ARG...] (or --launch-plan FILE, or a --template or --image with a command of its own)")
	case len(argv) > 0 && argv[0] == "" && !o.entrySet:
		return cfg, c, errors.New("the command is an empty string")
	}
	if o.template != "" && o.image != "" {
		// The SDK refuses it too; the command line names both flags.
		return cfg, c, errors.New("--template and --image both name the root filesystem: give one")
	}
	if o.entrySet && o.template == "" && o.image == "" {
		return cfg, c, errors.New("--entrypoint needs a --template or --image (the default image has no entrypoint)")
	}
	if o.cpus < 1 {
		// The SDK takes 0 for its default; on the command line the
		// default is the flag's.
		return cfg, c, fmt.Errorf("--cpus %d: must be at least 1", o.cpus)
	}
	mem, err := units.ParseMemory(o.memory)
	if err != nil {
		return cfg, c, err
	}
	timeout, err := units.ParseTimeout(o.timeout)
	if err != nil {
		return cfg, c, err
	}
	cliEnv, err := envvar.ParseFlags(o.env, os.LookupEnv)
	if err != nil {
		return cfg, c, err
	}
	// Lowest to highest: apps[0].env, entrypoint.env (merged by the
	// launch plan), --env.
	env := envvar.Merge(plan.Env, cliEnv)
	workdir := plan.WorkingDir
	if o.workdir != "" {
		workdir = o.workdir
	}
	cfg = mvm.Config{
		CPUs:       o.cpus,
		Memory:     int64(mem) << 20,
		Accel:      mvm.Accel(strings.ToLower(o.accel)),
		Kernel:     o.kernel,
		NoSnapshot: o.noSnapshot,
		Template:   o.template,
		Image:      o.image,
		// MVM_KERNEL_ARGS adds guest kernel arguments, e.g. "mvm.debug"
		// for agent debug logs in the console log.
		KernelArgs: strings.Fields(os.Getenv("MVM_KERNEL_ARGS")),
	}
	if cfg.Network, err = o.network(); err != nil {
		return cfg, c, err
	}
	for _, raw := range o.addDirs {
		// The grammar is the command line's; what the directories may
		// be is the SDK's to check.
		d, err := adddir.Parse(raw)
		if err != nil {
			return cfg, c, err
		}
		cfg.Dirs = append(cfg.Dirs, mvm.Dir{Host: d.Host, Guest: d.Guest, Writable: d.Mode == adddir.ReadWrite})
	}
	c = mvm.Cmd{Argv: argv, Env: envvar.Strings(env), Dir: workdir, Timeout: timeout, User: o.user}
	if err := cfg.Validate(); err != nil {
		return cfg, c, err
	}
	return cfg, c, c.Validate()
}

// network is the VM's network from the flags, or nil for none. Any of
// the network flags implies --net.
func (o *execOptions) network() (*mvm.Network, error) {
	if !o.net && len(o.allowHosts)+len(o.allowCIDRs)+len(o.loopback)+len(o.addHosts)+len(o.publish) == 0 {
		return nil, nil
	}
	n := &mvm.Network{AllowHosts: o.allowHosts, AllowCIDRs: o.allowCIDRs, Hosts: o.addHosts}
	for _, s := range o.loopback {
		p, err := strconv.ParseUint(s, 10, 16)
		if err != nil || p == 0 {
			return nil, fmt.Errorf("--allow-host-loopback %q: want a port, 1-65535", s)
		}
		n.AllowHostLoopback = append(n.AllowHostLoopback, uint16(p))
	}
	for _, s := range o.publish {
		p, err := parsePublish(s)
		if err != nil {
			return nil, fmt.Errorf("--publish %q: %w", s, err)
		}
		n.Publish = append(n.Publish, p)
	}
	return n, nil
}

// parsePublish parses docker's -p grammar, TCP only:
// [HOSTIP:]HOSTPORT:GUESTPORT.
func parsePublish(s string) (mvm.Port, error) {
	var p mvm.Port
	if strings.HasSuffix(s, "/udp") {
		return p, errors.New("UDP ports cannot be published")
	}
	s = strings.TrimSuffix(s, "/tcp")
	parts := strings.Split(s, ":")
	switch len(parts) {
	case 2:
	case 3:
		p.HostIP, parts = parts[0], parts[1:]
	default:
		return p, errors.New("want [HOSTIP:]HOSTPORT:GUESTPORT")
	}
	hp, err1 := strconv.ParseUint(parts[0], 10, 16)
	gp, err2 := strconv.ParseUint(parts[1], 10, 16)
	if err1 != nil || err2 != nil || hp == 0 || gp == 0 {
		return p, errors.New("ports are 1-65535")
	}
	p.HostPort, p.GuestPort = uint16(hp), uint16(gp)
	return p, nil
}

// explain words an error of the SDK's checks in the command line's terms:
// its fields become the flags the user typed.
func (o *execOptions) explain(err error) error {
	var re *mvm.RequestError
	if !errors.As(err, &re) {
		return err
	}
	return &explained{msg: re.Describe(o.flagName), err: err}
}

// flagName names a field of mvm.Config or mvm.Cmd as mvmctl exec's flags
// set it; "" leaves the message without one.
func (o *execOptions) flagName(field string) string {
	if f, ok := execFlags[field]; ok {
		return f
	}
	if base, _, ok := strings.Cut(field, "["); ok && strings.HasPrefix(base, "Network.") {
		return execFlags[base]
	}
	if s, ok := strings.CutPrefix(field, "Dirs["); ok {
		if i, err := strconv.Atoi(strings.TrimSuffix(s, "]")); err == nil && i >= 0 && i < len(o.addDirs) {
			return "--add-dir " + strconv.Quote(o.addDirs[i])
		}
	}
	return field
}

// execFlags is the flag (or variable) that sets each request field.
var execFlags = map[string]string{
	"CPUs":        "--cpus",
	"Memory":      "--memory",
	"Accel":       "--accel",
	"Kernel":      "--kernel",
	"KernelArgs":  "MVM_KERNEL_ARGS",
	"Template":    "--template",
	"Image":       "--image",
	"Dirs":        "",
	"Cmd":         "",
	"Cmd.Argv":    "command",
	"Cmd.Env":     "--env",
	"Env":         "--env",
	"Cmd.Dir":     "--workdir",
	"Cmd.User":    "--user",
	"Cmd.Timeout": "--timeout",
	"Cmd.TTY":     "--tty",

	"Network":                   "--net",
	"Network.AllowHosts":        "--allow-host",
	"Network.AllowCIDRs":        "--allow-cidr",
	"Network.AllowHostLoopback": "--allow-host-loopback",
	"Network.Hosts":             "--add-host",
	"Network.Publish":           "--publish",
}

// explained is an error with the command line's wording.
type explained struct {
	msg string
	err error
}

func (e *explained) Error() string { return e.msg }
func (e *explained) Unwrap() error { return e.err }

// imageCommand applies docker run's rules to the command of a run on a
// template: the image's Entrypoint, then the arguments given (or, without
// any, the image's Cmd); --entrypoint replaces the Entrypoint and drops
// the Cmd. A launch plan's command is taken whole.
func (o *execOptions) imageCommand(cmd *cobra.Command, cfg mvm.Config, args []string) ([]string, error) {
	if o.launchPlan != "" {
		return args, nil
	}
	if cfg.Image != "" {
		cfg.ImageProgress = newImageProgress(cmd.ErrOrStderr()).event
	}
	t, err := mvm.LookupTemplate(cmd.Context(), cfg)
	if err != nil {
		return nil, err
	}
	entry, defaults := t.Entrypoint, t.Cmd
	if o.entrySet {
		entry, defaults = nil, nil
		if o.entrypoint != "" {
			entry = []string{o.entrypoint}
		}
	}
	if len(args) == 0 {
		args = defaults
	}
	argv := append(append([]string(nil), entry...), args...)
	if len(argv) == 0 {
		return nil, fmt.Errorf("no command given, and %s has no Entrypoint or Cmd", templateLabel(cfg))
	}
	return argv, nil
}

func templateLabel(cfg mvm.Config) string {
	if cfg.Template != "" {
		return "template " + cfg.Template
	}
	return "image " + cfg.Image
}

// hasEnv reports whether env (KEY=VALUE) sets key.
func hasEnv(env []string, key string) bool {
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == key {
			return true
		}
	}
	return false
}

func printTimings(w io.Writer, timings []mvm.Timing) {
	var b strings.Builder
	b.WriteString("mvmctl:")
	for i, t := range timings {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, " %s %dms", t.Step, t.Duration.Milliseconds())
		if t.Detail != "" {
			fmt.Fprintf(&b, " (%s)", t.Detail)
		}
	}
	if len(timings) > 0 {
		last := timings[len(timings)-1]
		fmt.Fprintf(&b, "; total %dms", (last.Start + last.Duration).Milliseconds())
	}
	fmt.Fprintln(w, b.String())
}

// reportWriteBacks tells the user about read-write directories: failures
// always (the command's exit status stays its own), successes with -v.
func reportWriteBacks(w io.Writer, wbs []mvm.WriteBack, verbose bool) {
	for _, wb := range wbs {
		var werr *mvm.WriteBackError
		switch {
		case errors.As(wb.Err, &werr) && werr.Kept != "":
			fmt.Fprintf(w, "mvmctl: could not write the guest's changes back to %s: %v\nmvmctl: they are kept in %s; apply them with: mvmctl recover %s\n",
				wb.Dir.Host, werr.Err, werr.Kept, werr.Kept)
		case wb.Err != nil:
			fmt.Fprintf(w, "mvmctl: could not write the guest's changes back to %s: %v\n", wb.Dir.Host, wb.Err)
		case verbose:
			fmt.Fprintf(w, "mvmctl: wrote back %s: %s\n", wb.Dir.Host, wb.Stats)
		}
	}
}
