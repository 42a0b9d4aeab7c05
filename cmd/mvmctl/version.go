package main

import (
	"fmt"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm/internal/agentproto"
)

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print version information",
		Example: `  mvmctl version`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "mvmctl %s\nagent protocol %d (accepts %d..%d)\n%s %s/%s\n",
				version, agentproto.Version, agentproto.MinVersion, agentproto.Version,
				runtime.Version(), runtime.GOOS, runtime.GOARCH)
			return nil
		},
	}
}
