package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/adddir"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/execreq"
	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/launchplan"
	"github.com/mvm-sh/mvm/internal/runner"
	"github.com/mvm-sh/mvm/internal/units"
	"github.com/mvm-sh/mvm/internal/xdg"
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
	kernel      string
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

Exit status: COMMAND's own; 128+N if it died of signal N; 124 on timeout;
125 if mvmctl or the VM failed; 126 if COMMAND cannot be executed; 127 if it
was not found.`,
		Example: `  mvmctl exec -- uname -a
  echo hi | mvmctl exec -- sh -c 'cat; exit 3'
  mvmctl exec --timeout 5s -- sleep 60
  mvmctl exec -e GREETING='hello world' -w /tmp -- sh -c 'echo "$GREETING"; pwd'`,
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
	f.IntVar(&o.cpus, "cpus", runner.DefaultCPUs, "number of vCPUs")
	f.StringVar(&o.memory, "memory", units.FormatMiB(runner.DefaultMemoryMiB), "guest memory (e.g. 256M, 1G; a bare number is MiB)")
	f.StringVar(&o.timeout, "timeout", runner.DefaultTimeout.String(), "kill COMMAND after this long (30, 30s, 2m; 0 for none)")
	f.StringArrayVarP(&o.env, "env", "e", nil, "set an environment variable KEY=VALUE (repeatable; a bare KEY copies the host's value)")
	f.StringVarP(&o.workdir, "workdir", "w", "", "working directory in the guest (created if missing; default /)")
	f.StringVar(&o.accel, "accel", envOr("MVM_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env MVM_ACCEL)")
	f.BoolVarP(&o.interactive, "interactive", "i", false, "forward stdin even when it is a terminal")
	f.StringVar(&o.kernel, "kernel", "", "boot this vmlinux instead of the default image's kernel")
	return cmd
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// fail is a failure before or around the run: exit 125 with a message.
func fail(err error) error { return &exitError{code: exitCodeFailure, err: err} }

func runExec(cmd *cobra.Command, g *globalOptions, o *execOptions, argv []string) error {
	// Everything the user typed is checked before anything boots.
	req, err := o.request(argv)
	if err != nil {
		return fail(err)
	}
	deps := image.RuntimeDeps()
	if len(req.Dirs) > 0 {
		deps = append(deps, dirimage.Deps()...)
	}
	if err := hostdeps.Check("mvmctl exec", deps...); err != nil {
		return fail(err)
	}
	cache, err := xdg.CacheDir()
	if err != nil {
		return fail(err)
	}
	img, err := image.Store{Root: cache}.Load(image.DefaultName)
	if err != nil {
		return fail(err)
	}
	req.Kernel, req.Initrd = img.Kernel, img.Initrd
	if o.kernel != "" {
		req.Kernel = o.kernel
	}
	runRoot, err := xdg.RunDir()
	if err != nil {
		return fail(err)
	}
	state, err := xdg.StateDir()
	if err != nil {
		return fail(err)
	}

	// Interrupts go to the runner, which forwards the first to the
	// command. SIGPIPE is caught so that a closed stdout becomes an EPIPE
	// error (and a SIGPIPE for the guest command) instead of killing
	// mvmctl before it can tear the VM down.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	req.Signals = sigs

	req.Stdout = cmd.OutOrStdout()
	req.Stderr = cmd.ErrOrStderr()
	if o.interactive || !term.IsTerminal(int(os.Stdin.Fd())) {
		req.Stdin = os.Stdin
	}

	r := &runner.Runner{
		Backend:   qemu.New(g.log),
		RunRoot:   runRoot,
		LogDir:    filepath.Join(state, "logs"),
		StagedDir: filepath.Join(state, "staged"),
		Log:       g.log,
	}
	res, err := r.Run(cmd.Context(), req)
	if g.verbose {
		printTimings(cmd.ErrOrStderr(), res)
	}
	reportWriteBack(cmd.ErrOrStderr(), res.Dirs, g.verbose)
	code := runner.ExitCode(res, err)
	switch {
	case err != nil:
		return &exitError{code: code, err: err}
	case res.Completed && res.Status.StartFailure != nil:
		return &exitError{code: code, err: fmt.Errorf("%s", res.Status.StartFailure.Message)}
	case res.Completed && res.Status.TimedOut:
		return &exitError{code: code, err: fmt.Errorf("command timed out after %s and was killed", req.Timeout)}
	case !res.Completed && res.Interrupted != 0:
		return &exitError{code: code, err: fmt.Errorf("interrupted (%s); VM torn down", res.Interrupted)}
	case code != 0:
		return &exitError{code: code}
	}
	return nil
}

// request validates the flags and builds the run request.
func (o *execOptions) request(argv []string) (runner.Request, error) {
	var req runner.Request
	var plan launchplan.Entrypoint
	switch {
	case o.launchPlan != "" && len(argv) > 0:
		return req, fmt.Errorf("--launch-plan %s supplies the command; remove the command after -- (%q) or the flag", o.launchPlan, argv)
	case o.launchPlan != "":
		var err error
		if plan, err = launchplan.Load(o.launchPlan); err != nil {
			return req, err
		}
		argv = plan.Command
	case len(argv) == 0 || argv[0] == "":
		return req, errors.New("no command given: mvmctl exec [flags] -- COMMAND [ARG...] (or --launch-plan FILE)")
	}
	if o.cpus < 1 || o.cpus > 64 {
		return req, fmt.Errorf("invalid --cpus %d: must be between 1 and 64", o.cpus)
	}
	mem, err := units.ParseMemory(o.memory)
	if err != nil {
		return req, err
	}
	if mem < 64 {
		return req, fmt.Errorf("invalid --memory %q: the guest needs at least 64M", o.memory)
	}
	timeout, err := units.ParseTimeout(o.timeout)
	if err != nil {
		return req, err
	}
	cliEnv, err := envvar.ParseFlags(o.env, os.LookupEnv)
	if err != nil {
		return req, err
	}
	// Lowest to highest: apps[0].env, entrypoint.env (merged by the
	// launch plan), --env.
	env := envvar.Merge(plan.Env, cliEnv)
	workdir := plan.WorkingDir
	if o.workdir != "" {
		workdir = o.workdir
	}
	if err := execreq.Check(argv, env, workdir); err != nil {
		return req, err
	}
	dirs, err := adddir.Resolve(o.addDirs)
	if err != nil {
		return req, err
	}
	mode, err := accel.ParseMode(o.accel)
	if err != nil {
		return req, err
	}
	choice, err := accel.Host{}.Resolve(mode)
	if err != nil {
		return req, err
	}
	if o.kernel != "" {
		if _, err := os.Stat(o.kernel); err != nil {
			return req, fmt.Errorf("--kernel: %w", err)
		}
	}
	req = runner.Request{
		// MVM_KERNEL_ARGS adds guest kernel arguments, e.g. "mvm.debug"
		// for agent debug logs in the console log.
		KernelArgs: strings.Fields(os.Getenv("MVM_KERNEL_ARGS")),
		Argv:       argv,
		Dir:        workdir,
		Dirs:       dirs,
		Timeout:    timeout,
		CPUs:       o.cpus,
		MemoryMiB:  mem,
		Accel:      choice.Kind,
	}
	for _, v := range env {
		req.Env = append(req.Env, agentclient.EnvVar{Name: v.Name, Value: v.Value})
	}
	return req, nil
}

func printTimings(w io.Writer, res runner.Result) {
	t := res.Timings
	ms := func(d time.Duration) string { return fmt.Sprintf("%.0fms", float64(d)/float64(time.Millisecond)) }
	fmt.Fprintf(w, "mvmctl: add-dirs ready %s, vmm started %s, agent ready %s (guest kernel %s, agent init %s), command started %s, exited %s, torn down %s",
		ms(t.DirsReady), ms(t.VMMStarted), ms(t.AgentReady), ms(t.AgentStart), ms(t.GuestUptime-t.AgentStart), ms(t.CommandStarted), ms(t.CommandExited), ms(t.TornDown))
	if t.WriteBack > 0 {
		fmt.Fprintf(w, ", write-back %s", ms(t.WriteBack))
	}
	fmt.Fprintln(w)
}

// reportWriteBack tells the user about read-write directories: failures
// always (the command's exit status stays its own), successes with -v.
func reportWriteBack(w io.Writer, dirs []runner.DirResult, verbose bool) {
	for _, d := range dirs {
		switch {
		case d.Err != nil && d.Kept != "":
			fmt.Fprintf(w, "mvmctl: could not write the guest's changes back to %s: %v\nmvmctl: they are kept in %s; apply them with: mvmctl recover %s\n",
				d.Spec.Host, d.Err, d.Kept, d.Kept)
		case d.Err != nil:
			fmt.Fprintf(w, "mvmctl: could not write the guest's changes back to %s: %v\n", d.Spec.Host, d.Err)
		case verbose:
			fmt.Fprintf(w, "mvmctl: wrote back %s: %s\n", d.Spec.Host, d.Stats)
		}
	}
}
