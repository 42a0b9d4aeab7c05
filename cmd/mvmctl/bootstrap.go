package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/units"
	"github.com/mvm-sh/mvm/internal/xdg"
)

type bootstrapOptions struct {
	kernel     string
	jobs       int
	noCompile  bool
	noSnapshot bool
	// cpus and memory shape the machine snapshotted.
	cpus   int
	memory string
}

func newBootstrapCommand(g *globalOptions) *cobra.Command {
	o := &bootstrapOptions{}
	cmd := &cobra.Command{
		Use:   "bootstrap",
		Short: "Build the default guest image (kernel + initramfs) into the cache",
		Long: `bootstrap builds the default image that "mvmctl exec" boots:

  - a minimal guest kernel, compiled once from the distribution's kernel
    source package (linux-source-6.1 on Debian 12) with mvm's config
    fragment, and cached by a hash of its inputs;
  - an initramfs holding the mvm guest agent and a static busybox userland.

  - a snapshot of the default VM (2 vCPUs, 512M, or --cpus and --memory)
    booted to its agent, which "mvmctl exec" restores instead of booting
    when it asks for that machine (see docs/snapshots.md). Snapshots of
    other shapes made before stay.

It is idempotent: when nothing changed it only checks the cache (the
snapshot is taken again, a second or two). With --kernel it uses your
vmlinux instead of compiling one (see docs/kernel.md for what it must have
built in).`,
		Example: `  mvmctl bootstrap                      # compile the kernel once, then only check the cache
  mvmctl bootstrap -j 4
  mvmctl bootstrap --kernel ./vmlinux   # boot your own kernel instead
  mvmctl bootstrap --no-compile         # in CI: fail fast when the kernel is not cached
  mvmctl bootstrap --no-snapshot        # no snapshot of the default VM (every exec boots)
  mvmctl bootstrap --cpus 4 --memory 2G # also snapshot the machine of exec --cpus 4 --memory 2G`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBootstrap(cmd, g, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.kernel, "kernel", "", "use this uncompressed vmlinux instead of compiling one")
	f.IntVarP(&o.jobs, "jobs", "j", 0, "parallel compile jobs (default: one per CPU)")
	f.BoolVar(&o.noCompile, "no-compile", false, "fail instead of compiling the kernel when it is not cached")
	f.BoolVar(&o.noSnapshot, "no-snapshot", false, "do not snapshot the default VM")
	f.IntVar(&o.cpus, "cpus", mvm.DefaultCPUs, "vCPUs of the machine to snapshot (runs with that --cpus restore it)")
	f.StringVar(&o.memory, "memory", units.FormatMiB(mvm.DefaultMemory>>20), "guest memory of the machine to snapshot (runs with that --memory restore it)")
	return cmd
}

func runBootstrap(cmd *cobra.Command, g *globalOptions, o *bootstrapOptions) error {
	// The snapshot's machine is checked before minutes of kernel build.
	mem, err := units.ParseMemory(o.memory)
	if err != nil {
		return err
	}
	if o.cpus < 1 || o.cpus > mvm.MaxCPUs {
		return fmt.Errorf("--cpus must be 1..%d, got %d", mvm.MaxCPUs, o.cpus)
	}
	cache, err := xdg.CacheDir()
	if err != nil {
		return err
	}
	agent, err := image.FindAgent()
	if err != nil {
		return err
	}
	p := newProgressPrinter(cmd.ErrOrStderr())
	img, err := image.Bootstrap(cmd.Context(), image.Store{Root: cache}, image.BootstrapOptions{
		Kernel:    o.kernel,
		Agent:     agent,
		Busybox:   image.DefaultBusybox(),
		Jobs:      o.jobs,
		NoCompile: o.noCompile,
		Progress:  p.event,
		Log:       g.log,
	})
	p.finish()
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "kernel:    %s\ninitramfs: %s\n", img.Kernel, img.Initrd)
	if o.noSnapshot {
		return nil
	}
	p.println("snapshot: booting the default VM to save it")
	info, err := mvm.PrepareSnapshot(cmd.Context(), mvm.Config{
		CacheDir: cache, Logger: g.log, Accel: mvm.Accel(envOr("MVM_ACCEL", "auto")),
		CPUs: o.cpus, Memory: int64(mem) << 20,
	})
	if err != nil {
		return fmt.Errorf("snapshot the default VM: %w", err)
	}
	p.println(fmt.Sprintf("snapshot: saved in %s (%s on disk)", info.Took.Round(time.Millisecond), units.FormatBytes(info.Size)))
	fmt.Fprintf(cmd.OutOrStdout(), "snapshot:  %s\n", info.Dir)
	return nil
}

// progressPrinter shows bootstrap progress on stderr: a line per step, and
// during the kernel build a status line redrawn in place on a terminal or
// printed every 30 s otherwise (CI logs).
type progressPrinter struct {
	w        io.Writer
	tty      bool
	last     time.Time
	inStatus bool
}

func newProgressPrinter(w io.Writer) *progressPrinter {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &progressPrinter{w: w, tty: tty}
}

func (p *progressPrinter) event(e image.Event) {
	if k := e.Kernel; k != nil {
		var line string
		switch k.Phase {
		case "compile":
			pct := 0
			if k.Total > 0 {
				pct = min(99, 100*k.Step/k.Total)
			}
			line = fmt.Sprintf("kernel: compiling, ~%d%% (%d steps, %s)", pct, k.Step, k.Elapsed.Round(time.Second))
		case "done":
			line = fmt.Sprintf("kernel: built in %s", k.Elapsed.Round(time.Second))
		default:
			line = "kernel: " + k.Phase
		}
		if p.tty && k.Phase == "compile" {
			fmt.Fprintf(p.w, "\r\033[K%s", line)
			p.inStatus = true
			return
		}
		if k.Phase == "compile" && time.Since(p.last) < 30*time.Second {
			return
		}
		p.last = time.Now()
		p.println(line)
		return
	}
	p.println(e.Step + ": " + e.Detail)
}

func (p *progressPrinter) println(s string) {
	if p.inStatus {
		fmt.Fprint(p.w, "\r\033[K")
		p.inStatus = false
	}
	fmt.Fprintln(p.w, s)
}

func (p *progressPrinter) finish() {
	if p.inStatus {
		fmt.Fprintln(p.w)
		p.inStatus = false
	}
}
