// Command mvmctl runs commands in throwaway microVMs.
//
//	mvmctl bootstrap               # once: build the guest kernel and initramfs
//	mvmctl exec -- uname -a        # boot, run, stream, tear down, exit with its code
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:]))
}

// globalOptions are flags every command has.
type globalOptions struct {
	verbose bool
	log     *slog.Logger
}

func run(args []string) int {
	g := &globalOptions{}
	root := newRootCommand(g)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if msg := ee.message(); msg != "" {
			fmt.Fprintf(os.Stderr, "mvmctl: %s\n", msg)
		}
		return ee.code
	}
	fmt.Fprintf(os.Stderr, "mvmctl: %v\n", err)
	return exitFailure
}

// exitError carries an exit status out of a command's RunE, so that the
// command's deferred teardown runs before the process exits. With neither
// msg nor err it exits silently.
type exitError struct {
	code int
	msg  string
	err  error
}

func (e *exitError) message() string {
	if e.msg != "" {
		return e.msg
	}
	if e.err != nil {
		return e.err.Error()
	}
	return ""
}

func (e *exitError) Error() string {
	if m := e.message(); m != "" {
		return m
	}
	return fmt.Sprintf("exit status %d", e.code)
}

func (e *exitError) Unwrap() error { return e.err }

func newRootCommand(g *globalOptions) *cobra.Command {
	root := &cobra.Command{
		Use:   "mvmctl",
		Short: "Run commands in throwaway microVMs",
		Long: `mvmctl runs a command in a fresh microVM: it boots the VM, runs the command
through a guest agent, streams its output, tears the VM down and exits with
the command's exit code.

Run "mvmctl bootstrap" once to build the guest kernel and initramfs, and
"mvmctl doctor" to check the host and learn how to fix what is missing.`,
		Example: `  mvmctl doctor
  mvmctl bootstrap
  mvmctl exec -- uname -a
  source <(mvmctl completion bash)    # TAB completion in this shell`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, _ []string) {
			level := slog.LevelWarn
			if g.verbose {
				level = slog.LevelDebug
			}
			g.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
		},
	}
	root.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "print what mvmctl does, with timings, on stderr")
	root.AddCommand(newExecCommand(g), newBootstrapCommand(g), newRecoverCommand(g), newTemplateCommand(g), newPsCommand(), newSandboxCommand(g), newMCPCommand(g), newVersionCommand(), newDoctorCommand(), newSnapshotHealCommand(g), newPoolCommand(g))
	addCompletions(root)
	return root
}
