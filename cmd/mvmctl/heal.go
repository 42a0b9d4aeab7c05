package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/healproc"
)

// A run that booted for want of a snapshot leaves one for the next run:
// mvmctl starts `mvmctl snapshot-heal` after the run's command has ended
// and its output is out, detached (its own session, no terminal, no
// descriptor of the run's), niced, and does not wait for it. The healer
// boots a fresh VM (nothing the run's command touched) and saves it, one
// at a time per configuration; what it did goes to the heal log.

// spawnHeal starts the detached healer for cfg. Failing to start it only
// costs the next run its restore, so errors are logged, not returned.
func spawnHeal(g *globalOptions, cfg mvm.Config) {
	if healproc.Off() {
		return
	}
	pid, err := healproc.Spawn(cfg, "snapshot-heal")
	if err != nil {
		g.log.Debug("no snapshot made after the run", "err", err)
		return
	}
	g.log.Debug("making the missing snapshot in the background", "pid", pid, "log", mvm.HealLog(cfg))
}

func newSnapshotHealCommand(g *globalOptions) *cobra.Command {
	var spec string
	cmd := &cobra.Command{
		Use:     "snapshot-heal --config JSON",
		Short:   "Make the snapshot a run found missing (started by mvmctl exec)",
		Example: `  mvmctl snapshot-heal --config '{"CPUs":1,"Memory":536870912}'   # what exec starts after a cold run of --cpus 1`,
		Hidden:  true,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Below everything the user runs: the VM it boots is only
			// for the next run.
			healproc.Lower()
			var cfg mvm.Config
			if err := json.Unmarshal([]byte(spec), &cfg); err != nil {
				return &exitError{code: exitFailure, err: fmt.Errorf("--config: %w", err)}
			}
			cfg.Logger = g.log
			info, err := mvm.HealSnapshot(cmd.Context(), cfg)
			switch {
			case errors.Is(err, mvm.ErrSnapshotExists), errors.Is(err, mvm.ErrBusy):
				fmt.Fprintln(cmd.ErrOrStderr(), "snapshot-heal:", err)
				return nil
			case err != nil:
				return &exitError{code: exitFailure, err: err}
			}
			fmt.Fprintln(cmd.OutOrStdout(), info.Dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&spec, "config", "", "the machine configuration, as the SDK's Config in JSON")
	return cmd
}
