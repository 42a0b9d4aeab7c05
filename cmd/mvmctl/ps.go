package main

import (
	"fmt"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/units"
)

// psJSON is one line of `mvmctl ps --json`.
type psJSON struct {
	Name      string    `json:"name"`
	Status    string    `json:"status"`
	Root      string    `json:"root"`
	CPUs      int       `json:"cpus"`
	MemoryMiB uint64    `json:"memory_mib"`
	Dirs      int       `json:"dirs"`
	Restored  bool      `json:"restored"`
	Created   time.Time `json:"created"`
	PID       int       `json:"pid"`
	VMMPID    int       `json:"vmm_pid"`
}

func newPsCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ps [--json]",
		Short: "List the microVMs running now",
		Long: `ps lists this user's microVMs that are running now, oldest first: those of
every mvmctl exec and of every program built on the SDK, which share the run
directory. ROOT is the template or image ("-" for the default image); PID is
the process that owns the VM (mvmctl or the SDK program).`,
		Example: `  mvmctl ps
  mvmctl ps --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			runs, err := mvm.Running(mvm.Config{})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				list := make([]psJSON, 0, len(runs))
				for _, r := range runs {
					list = append(list, psJSON{r.Name, string(r.Status), r.Root, r.CPUs, r.MemoryMiB, r.Dirs, r.Restored, r.Created, r.Owner, r.VMM})
				}
				return writeJSON(out, list)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSTATUS\tROOT\tCPUS\tMEMORY\tDIRS\tCREATED\tPID")
			for _, r := range runs {
				root := r.Root
				if root == "" {
					root = "-"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n", r.Name, r.Status, root, r.CPUs,
					units.FormatMiB(r.MemoryMiB), r.Dirs, units.ShortAge(time.Since(r.Created)), strconv.Itoa(r.Owner))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
