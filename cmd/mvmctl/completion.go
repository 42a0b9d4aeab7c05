package main

import (
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm/internal/writeback"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// addCompletions tells the shell completion scripts (`mvmctl completion
// bash|zsh|fish`) what each flag and argument takes, so that a TAB offers
// accelerators for --accel, directories for --add-dir and JSON files for
// --launch-plan, and no host file names where none make sense. Flags are
// matched by name on every command that has them.
func addCompletions(root *cobra.Command) {
	accels := cobra.FixedCompletions([]string{
		"auto\tKVM when it can run a standard guest kernel, else TCG",
		"kvm\thardware virtualisation",
		"tcg\tsoftware emulation",
	}, cobra.ShellCompDirectiveNoFileComp)
	dirs := func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return nil, cobra.ShellCompDirectiveFilterDirs
	}
	jsonFiles := func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return []string{"json"}, cobra.ShellCompDirectiveFilterFileExt
	}
	files := func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return nil, cobra.ShellCompDirectiveDefault
	}
	byFlag := map[string]cobra.CompletionFunc{
		"accel":       accels,
		"add-dir":     dirs,
		"launch-plan": jsonFiles,
		"kernel":      files,
		// Values to type, not host paths (--workdir is a guest path).
		"cpus":    cobra.NoFileCompletions,
		"memory":  cobra.NoFileCompletions,
		"timeout": cobra.NoFileCompletions,
		"env":     cobra.NoFileCompletions,
		"workdir": cobra.NoFileCompletions,
		"jobs":    cobra.NoFileCompletions,
	}
	for _, c := range root.Commands() {
		for name, fn := range byFlag {
			if c.Flags().Lookup(name) != nil {
				_ = c.RegisterFlagCompletionFunc(name, fn)
			}
		}
		switch c.Name() {
		case "exec":
			// COMMAND and its arguments run in the guest, where host
			// file names mean nothing. Flags are offered only before the
			// command (cobra stops at "--" and at the first argument).
			c.ValidArgsFunction = cobra.NoFileCompletions
		case "recover":
			c.ValidArgsFunction = completeStaged
		case "bootstrap", "doctor", "version":
			c.ValidArgsFunction = cobra.NoFileCompletions
		}
	}
}

// completeStaged offers the staged change sets recover can apply.
func completeStaged(_ *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	state, err := xdg.StateDir()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	list, err := writeback.ListStaged(filepath.Join(state, "staged"))
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var out []string
	for _, s := range list {
		if !strings.HasPrefix(s.Dir, toComplete) || slices.Contains(args, s.Dir) {
			continue
		}
		out = append(out, s.Dir+"\t"+s.Pending.Host)
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}
