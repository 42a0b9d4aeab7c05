package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm/internal/units"
	"github.com/mvm-sh/mvm/internal/writeback"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// exitCodeInterrupted is the status of a recover stopped by SIGINT or
// SIGTERM, as a shell reports a command killed by SIGINT.
const exitCodeInterrupted = 130

func newRecoverCommand(g *globalOptions) *cobra.Command {
	var discard, all bool
	cmd := &cobra.Command{
		Use:   "recover [--discard] [--all | STAGED_DIR...]",
		Short: "Write back (or discard) the kept changes of read-write directories",
		Long: `When the changes a guest made to a read-write --add-dir cannot be written
back (the host directory became unwritable or full, the change set is
invalid, mvmctl was killed, the write-back was interrupted...), mvmctl keeps
them in a staged directory under its state directory and names it.

Without arguments, recover lists what is staged: directory, host directory,
age and size on disk. With STAGED_DIRs (or --all) it applies them to their
host directory, with the same checks as a write-back at the end of a run,
and removes each once applied; an interrupted or failed one stays staged.
With --discard it removes them without applying anything.

At most ` + fmt.Sprint(writeback.DefaultMaxStaged) + ` change sets, taking at most ` + fmt.Sprint(writeback.DefaultMaxStagedBytes>>30) + ` GiB, are kept; beyond that
the oldest are dropped, with a warning.`,
		Example: `  mvmctl recover                                                   # list what is kept
  mvmctl recover ~/.local/state/mvm/staged/exec-2253-d45ffdf6bf-0  # apply one
  mvmctl recover --all                                             # apply everything kept
  mvmctl recover --discard --all                                   # drop everything kept`,
		RunE: func(cmd *cobra.Command, args []string) error {
			state, err := xdg.StateDir()
			if err != nil {
				return err
			}
			staged := filepath.Join(state, "staged")
			if all {
				if len(args) > 0 {
					return errors.New("--all takes no STAGED_DIR arguments")
				}
				list, err := writeback.ListStaged(staged)
				if err != nil {
					return err
				}
				for _, s := range list {
					args = append(args, s.Dir)
				}
				if len(args) == 0 {
					fmt.Fprintln(cmd.ErrOrStderr(), "nothing is staged")
					return nil
				}
			}
			if len(args) == 0 {
				if discard {
					return errors.New("--discard needs STAGED_DIR arguments or --all")
				}
				return listStaged(cmd.OutOrStdout(), cmd.ErrOrStderr(), staged)
			}
			if discard {
				var errs []error
				for _, dir := range args {
					if err := writeback.Discard(dir); err != nil {
						errs = append(errs, err)
						continue
					}
					fmt.Fprintf(cmd.OutOrStdout(), "discarded %s\n", dir)
				}
				return errors.Join(errs...)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			var errs []error
			for _, dir := range args {
				if err := recoverOne(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), dir); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", dir, err))
				}
				if ctx.Err() != nil {
					return &exitError{code: exitCodeInterrupted, err: errors.Join(errs...)}
				}
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().BoolVar(&discard, "discard", false, "remove the staged changes instead of applying them")
	cmd.Flags().BoolVar(&all, "all", false, "every staged change set")
	return cmd
}

func listStaged(stdout, stderr io.Writer, staged string) error {
	list, err := writeback.ListStaged(staged)
	if err != nil {
		return err
	}
	if len(list) == 0 {
		fmt.Fprintln(stderr, "nothing is staged")
		return nil
	}
	for _, s := range list {
		host := s.Pending.Host
		if s.Err != nil {
			host = "(unreadable record: " + s.Err.Error() + ")"
		}
		fmt.Fprintf(stdout, "%s\t%s\t%s\t%s\n", s.Dir, host, units.ShortAge(time.Since(s.Created())), units.FormatBytes(s.Size))
	}
	return nil
}

func recoverOne(ctx context.Context, stdout, stderr io.Writer, dir string) error {
	p, err := writeback.LoadPending(dir)
	if err != nil {
		return err
	}
	st, err := writeback.Commit(ctx, p)
	if errors.Is(err, writeback.ErrHostDirReplaced) && noSymlinks(p.Host) {
		// Not the directory the run started with, but one the user put
		// at that very path (recreated, restored, or a filesystem whose
		// device number changed across a reboot), with no symlink on the
		// way to it: the user asked for it by name.
		fmt.Fprintf(stderr, "mvmctl: %s is not the directory the run started with; writing the changes into the one there now\n", p.Host)
		p.HostDev, p.HostIno = 0, 0
		st, err = writeback.Commit(ctx, p)
	}
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("write-back to %s interrupted: %w (the staged changes are left in place; run recover again to apply them)", p.Host, err)
		}
		return fmt.Errorf("write back to %s: %w (the staged changes are left in place)", p.Host, err)
	}
	fmt.Fprintf(stdout, "wrote back %s: %s\n", p.Host, st)
	return os.RemoveAll(dir)
}

// noSymlinks reports whether no component of the absolute path p is a
// symlink.
func noSymlinks(p string) bool {
	if !filepath.IsAbs(p) {
		return false
	}
	for q := filepath.Clean(p); q != "/"; q = filepath.Dir(q) {
		fi, err := os.Lstat(q)
		if err != nil || fi.Mode()&os.ModeSymlink != 0 {
			return false
		}
	}
	return true
}
