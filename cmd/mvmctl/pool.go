package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/units"
)

// A pool is a per-user process (`mvmctl pool serve`, started detached by
// `mvmctl pool start`) that keeps VMs restored ahead of time; mvmctl exec
// takes one when the pool has one of its shape (see mvm.Pool). The
// process's log is pool.log in the pool's directory.

// poolSpec is what pool start hands pool serve on stdin.
type poolSpec struct {
	Shapes    []mvm.PoolShape
	IdleLimit time.Duration
}

// poolLogLimit bounds the pool's log (what the guests do can make it
// write: VMs failing in a loop).
const poolLogLimit = 4 << 20

func newPoolCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pool",
		Short: "Keep VMs restored ahead of time, for runs that start in milliseconds",
		Long: `A pool is a process of yours (no root, no system daemon) that keeps VMs
restored from their snapshot, each waiting at its agent. mvmctl exec (and
the SDK's Start and Run) takes one when its configuration matches a shape
of the pool (the default image or a template, CPUs, memory) and it has no
shared directory, network or --image; otherwise, or when the pool has
none ready, it starts its own VM as usual. -v says which.

Every VM serves one run and is then destroyed; the pool restores another
in the background. The clock, the random number generator and the boot id
of a VM are renewed when it is handed out. A shape no run took a VM of
for the idle limit gives its VMs back until the next run asks for one.`,
		Example: `  mvmctl pool start --size 2
  mvmctl pool start --shape size=2 --shape template=py,cpus=1,memory=256M,size=1
  mvmctl pool status
  mvmctl pool stop`,
	}
	cmd.AddCommand(newPoolStartCommand(g), newPoolStatusCommand(), newPoolStopCommand(), newPoolServeCommand(g))
	return cmd
}

type poolStartOptions struct {
	size     int
	template string
	cpus     int
	memory   string
	accel    string
	shapes   []string
	idle     string
	wait     bool
}

func newPoolStartCommand(g *globalOptions) *cobra.Command {
	o := &poolStartOptions{}
	cmd := &cobra.Command{
		Use:   "start [flags]",
		Short: "Start your pool (one shape from the flags, or several --shape)",
		Example: `  mvmctl pool start --size 2 --wait
  mvmctl pool start --template py --cpus 1 --memory 256M
  mvmctl pool start --shape size=2 --shape template=py,size=1 --idle 1h`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			spec, err := o.spec(cmd)
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			return startPool(cmd, g, spec, o.wait)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.size, "size", 1, fmt.Sprintf("VMs of the shape kept ready (1..%d)", mvm.MaxPoolSize))
	f.StringVar(&o.template, "template", "", "the shape runs in this template (default: the default image)")
	f.IntVar(&o.cpus, "cpus", mvm.DefaultCPUs, "the shape's vCPUs")
	f.StringVar(&o.memory, "memory", units.FormatMiB(mvm.DefaultMemory>>20), "the shape's guest memory")
	f.StringVar(&o.accel, "accel", envOr("MVM_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env MVM_ACCEL); runs must choose the same")
	f.StringArrayVar(&o.shapes, "shape", nil, "a shape: size=N,template=T,cpus=C,memory=M (any of them; repeatable; replaces the flags above)")
	f.StringVar(&o.idle, "idle", mvm.DefaultPoolIdle.String(), "give a shape's VMs back when no run took one for this long")
	f.BoolVar(&o.wait, "wait", false, "return once every shape has its VMs ready")
	return cmd
}

// spec is the pool the flags describe; every shape is checked here, before
// any process starts.
func (o *poolStartOptions) spec(cmd *cobra.Command) (poolSpec, error) {
	idle, err := units.ParseTimeout(o.idle)
	if err != nil || idle <= 0 {
		return poolSpec{}, fmt.Errorf("--idle %q: want a duration such as 15m", o.idle)
	}
	spec := poolSpec{IdleLimit: idle}
	accel := mvm.Accel(o.accel)
	if len(o.shapes) == 0 {
		mem, err := units.ParseMemory(o.memory)
		if err != nil {
			return poolSpec{}, fmt.Errorf("--memory: %w", err)
		}
		spec.Shapes = []mvm.PoolShape{{Size: o.size, Config: mvm.Config{Template: o.template, CPUs: o.cpus, Memory: int64(mem) << 20, Accel: accel}}}
	} else {
		for _, f := range []string{"size", "template", "cpus", "memory"} {
			if cmd.Flags().Changed(f) {
				return poolSpec{}, fmt.Errorf("--%s and --shape: give the shape's %s in --shape", f, f)
			}
		}
	}
	for _, s := range o.shapes {
		ps, err := parseShape(s)
		if err != nil {
			return poolSpec{}, err
		}
		ps.Config.Accel = accel
		spec.Shapes = append(spec.Shapes, ps)
	}
	// The SDK's own checks, now: the same the pool makes.
	if _, err := mvm.NewPool(mvm.PoolOptions{Shapes: spec.Shapes, IdleLimit: idle}); err != nil {
		return poolSpec{}, err
	}
	for _, s := range spec.Shapes {
		if s.Config.Template != "" {
			if _, err := mvm.LookupTemplate(cmd.Context(), mvm.Config{Template: s.Config.Template}); err != nil {
				return poolSpec{}, err
			}
		}
	}
	return spec, nil
}

// parseShape reads a --shape: comma-separated key=value pairs.
func parseShape(s string) (mvm.PoolShape, error) {
	ps := mvm.PoolShape{Size: 1}
	if strings.TrimSpace(s) == "" {
		return ps, fmt.Errorf("--shape %q: empty", s)
	}
	seen := map[string]bool{}
	for kv := range strings.SplitSeq(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || v == "" {
			return ps, fmt.Errorf("--shape %q: %q is not KEY=VALUE", s, kv)
		}
		if seen[k] {
			return ps, fmt.Errorf("--shape %q: %s given twice", s, k)
		}
		seen[k] = true
		var err error
		switch k {
		case "size":
			ps.Size, err = strconv.Atoi(v)
		case "cpus":
			ps.Config.CPUs, err = strconv.Atoi(v)
		case "memory":
			var mem uint64
			mem, err = units.ParseMemory(v)
			ps.Config.Memory = int64(mem) << 20
		case "template":
			ps.Config.Template = v
		default:
			return ps, fmt.Errorf("--shape %q: unknown key %q (size, template, cpus, memory)", s, k)
		}
		if err != nil {
			return ps, fmt.Errorf("--shape %q: %s: %w", s, k, err)
		}
	}
	return ps, nil
}

// startPool starts the detached pool process and waits until it serves
// (and, with wait, until its VMs are ready).
func startPool(cmd *cobra.Command, g *globalOptions, spec poolSpec, wait bool) error {
	fail := func(err error) error { return &exitError{code: exitFailure, err: err} }
	if st, err := mvm.PoolStatusOf(cmd.Context(), mvm.Config{}); err == nil {
		return fail(fmt.Errorf("%w (pid %d); mvmctl pool stop ends it", mvm.ErrPoolRunning, st.PID))
	}
	dir, err := mvm.PoolDir(mvm.Config{})
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail(err)
	}
	logf, err := os.OpenFile(filepath.Join(dir, "pool.log"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fail(err)
	}
	defer logf.Close()
	b, err := json.Marshal(spec)
	if err != nil {
		return fail(err)
	}
	args := []string{"pool", "serve"}
	if g.verbose {
		args = append(args, "-v")
	}
	pid, err := spawnReady(args, b, logf, "the pool's process")
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "pool started (pid %d); its log is %s\n", pid, logf.Name())
	if !wait {
		return nil
	}
	return waitPoolReady(cmd.Context(), cmd.OutOrStdout())
}

// waitPoolReady waits until every shape of the pool has its VMs ready, or
// says why one cannot.
func waitPoolReady(ctx context.Context, w io.Writer) error {
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		st, err := mvm.PoolStatusOf(ctx, mvm.Config{})
		if err != nil {
			return &exitError{code: exitFailure, err: err}
		}
		full := true
		for _, s := range st.Shapes {
			if s.LastError != "" && s.Ready == 0 {
				return &exitError{code: exitFailure, msg: fmt.Sprintf("the pool cannot start VMs of %s: %s", s.Description, oneLine(s.LastError, 2000))}
			}
			full = full && s.Ready >= s.Size
		}
		if full {
			fmt.Fprintln(w, "pool ready")
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return &exitError{code: exitFailure, msg: "the pool's VMs were not ready within 5 minutes (mvmctl pool status)"}
}

func newPoolServeCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "serve",
		Short:   "Be the pool (started by pool start)",
		Hidden:  true,
		Example: "  # not typed by users: mvmctl pool start runs\n  mvmctl pool serve < pool.json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return servePool(g)
		},
	}
}

// servePool is the pool process: it serves until SIGTERM, SIGINT or
// SIGHUP, then lets the runs it handed VMs to finish. A second signal
// ends it at once (its VMs die with it).
func servePool(g *globalOptions) error {
	var spec poolSpec
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fmt.Printf("error: read the pool's configuration: %v\n", err)
		return &exitError{code: exitFailure}
	}
	level := slog.LevelInfo
	if g.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(&cappedWriter{w: os.Stderr, left: poolLogLimit}, &slog.HandlerOptions{Level: level}))
	pool, err := mvm.NewPool(mvm.PoolOptions{Shapes: spec.Shapes, IdleLimit: spec.IdleLimit, Logger: log})
	var ln net.Listener
	if err == nil {
		ln, err = mvm.ListenPool(mvm.Config{})
	}
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return &exitError{code: exitFailure, err: err}
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	signal.Ignore(syscall.SIGPIPE)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		sig := <-sigs
		log.Info("stopping: the runs of VMs handed out finish first", "signal", sig)
		cancel()
		sig = <-sigs
		// The VMs die with this process; the next run's reclaim pass
		// removes their directories.
		log.Warn("stopped at once", "signal", sig)
		os.Exit(1)
	}()
	log.Info("serving", "pid", os.Getpid(), "shapes", len(spec.Shapes))
	fmt.Println("ready")
	// stdout was pool start's pipe: from now on it is the log.
	_ = syscall.Dup2(2, 1)
	if err := pool.Run(ctx, ln); err != nil {
		log.Error("pool", "err", err)
		return &exitError{code: exitFailure, err: err}
	}
	log.Info("stopped")
	return nil
}

func newPoolStatusCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show your pool: its shapes, VMs and memory",
		Example: `  mvmctl pool status
  mvmctl pool status --json | jq '.Shapes[] | {Description, Ready, Served}'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := mvm.PoolStatusOf(cmd.Context(), mvm.Config{})
			if errors.Is(err, mvm.ErrNoPool) {
				if asJSON {
					fmt.Fprintln(cmd.OutOrStdout(), "null")
					return nil
				}
				fmt.Fprintln(cmd.OutOrStdout(), "no pool is running (mvmctl pool start)")
				return nil
			}
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printPoolStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printPoolStatus(w io.Writer, st mvm.PoolStatus) {
	fmt.Fprintf(w, "pool: pid %d, up %s, idle limit %s\n", st.PID, time.Since(st.Started).Round(time.Second), st.IdleLimit)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SHAPE\tSIZE\tREADY\tSTARTING\tTAKEN\tSERVED\tMISSED\tMEMORY")
	for _, s := range st.Shapes {
		ready := strconv.Itoa(s.Ready)
		if s.Idle {
			ready = "0 (idle)"
		}
		mem := "-"
		if s.Ready > 0 {
			mem = fmt.Sprintf("%s (%s per VM)", units.FormatMiB(uint64(s.PrivateBytes>>20)), units.FormatMiB(uint64(s.PrivateBytes/int64(s.Ready)>>20)))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%d\t%d\t%d\t%s\n", s.Description, s.Size, ready, s.Starting, s.Taken, s.Served, s.Missed, mem)
	}
	_ = tw.Flush()
	for _, s := range st.Shapes {
		if s.LastError != "" {
			fmt.Fprintf(w, "%s: the last start failed: %s\n", s.Description, oneLine(s.LastError, 300))
		}
	}
}

func newPoolStopCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "stop",
		Short:   "Stop your pool; runs that took a VM of it finish first",
		Example: `  mvmctl pool stop`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := mvm.PoolStatusOf(cmd.Context(), mvm.Config{})
			if errors.Is(err, mvm.ErrNoPool) {
				fmt.Fprintln(cmd.OutOrStdout(), "no pool is running")
				return nil
			}
			if err != nil {
				return &exitError{code: exitFailure, err: err}
			}
			if err := syscall.Kill(st.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
				return &exitError{code: exitFailure, err: fmt.Errorf("stop the pool (pid %d): %w", st.PID, err)}
			}
			taken := 0
			for _, s := range st.Shapes {
				taken += s.Taken
			}
			if taken > 0 {
				fmt.Fprintf(cmd.ErrOrStderr(), "mvmctl: waiting for %d runs on the pool's VMs to finish\n", taken)
			}
			for syscall.Kill(st.PID, 0) == nil {
				time.Sleep(20 * time.Millisecond)
			}
			fmt.Fprintln(cmd.OutOrStdout(), "pool stopped")
			return nil
		},
	}
}
