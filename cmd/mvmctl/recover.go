package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm/internal/writeback"
	"github.com/mvm-sh/mvm/internal/xdg"
)

func newRecoverCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "recover [STAGED_DIR...]",
		Short: "Write back the kept changes of read-write directories",
		Long: `When the changes a guest made to a read-write --add-dir cannot be written
back (the host directory became unwritable, mvmctl was killed, the guest's
filesystem needed repair that failed...), mvmctl keeps them in a staged
directory under its state directory and names it. recover applies such
staged changes to their host directory and removes them once applied.

Without arguments it lists what is staged.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			state, err := xdg.StateDir()
			if err != nil {
				return err
			}
			staged := filepath.Join(state, "staged")
			if len(args) == 0 {
				return listStaged(cmd, staged)
			}
			var errs []error
			for _, dir := range args {
				if err := recoverOne(cmd, dir); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", dir, err))
				}
			}
			return errors.Join(errs...)
		},
	}
}

func listStaged(cmd *cobra.Command, staged string) error {
	entries, err := os.ReadDir(staged)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	n := 0
	for _, e := range entries {
		dir := filepath.Join(staged, e.Name())
		p, err := writeback.LoadPending(dir)
		if err != nil {
			continue
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\n", dir, p.Host, p.Created.Local().Format("2006-01-02 15:04:05"))
		n++
	}
	if n == 0 {
		fmt.Fprintln(cmd.ErrOrStderr(), "nothing is staged")
	}
	return nil
}

func recoverOne(cmd *cobra.Command, dir string) error {
	p, err := writeback.LoadPending(dir)
	if err != nil {
		return err
	}
	st, err := writeback.Commit(cmd.Context(), p.Lower, p.Upper, p.Host)
	if err != nil {
		return fmt.Errorf("write back to %s: %w (the staged data is left in place)", p.Host, err)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "wrote back %s: %s\n", p.Host, st)
	return os.RemoveAll(dir)
}
