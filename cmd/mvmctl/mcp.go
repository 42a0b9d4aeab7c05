package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/spf13/cobra"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/mcpserver"
	"github.com/mvm-sh/mvm/internal/units"
)

func newMCPCommand(g *globalOptions) *cobra.Command {
	o := &execOptions{}
	var maxOutput, timeout, maxTimeout string
	var maxSandboxes int
	cmd := &cobra.Command{
		Use:   "mcp [flags]",
		Short: "Serve sandboxes to an AI agent over the Model Context Protocol (stdio)",
		Long: `mcp runs a Model Context Protocol server on stdin and stdout, for an AI agent
(Claude Desktop, an IDE, any MCP client) to drive sandboxes with: the tools
create_sandbox, run_command, get_output, write_file, read_file,
list_sandboxes and destroy_sandbox. Every sandbox it creates ends with it.

The defaults are safe for a model acting on its own: no network unless this
command is given one (--net or the allow-list flags: the agent cannot ask for
more), a timeout on every command, and at most --max-output of each stream
returned to the model (head and tail, marked; get_output pages through the
rest).`,
		Example: `  mvmctl mcp
  mvmctl mcp --allow-host pypi.org --allow-host files.pythonhosted.org`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			max, err := parseSize(maxOutput)
			if err != nil {
				return fmt.Errorf("--max-output: %w", err)
			}
			def, err := units.ParseTimeout(timeout)
			if err != nil {
				return err
			}
			maxT, err := units.ParseTimeout(maxTimeout)
			if err != nil {
				return err
			}
			o.cpus, o.memory, o.timeout = mvm.DefaultCPUs, "512", "0"
			cfg, _, err := o.request([]string{"true"})
			if err != nil {
				return o.explain(err)
			}
			cfg.Accel = mvm.Accel(strings.ToLower(o.accel))
			srv := mcpserver.New(mcpserver.Options{
				Base: cfg, MaxOutput: max, DefaultTimeout: def, MaxTimeout: maxT,
				MaxSandboxes: maxSandboxes, Version: version, Logger: g.log,
			})
			return srv.Run(cmd.Context(), &mcp.StdioTransport{})
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.accel, "accel", envOr("MVM_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env MVM_ACCEL)")
	f.StringArrayVarP(&o.addDirs, "add-dir", "d", nil, "share a host directory with every sandbox: HOST:GUEST[:ro|rw] (repeatable)")
	f.BoolVar(&o.net, "net", false, "give every sandbox a network (see mvmctl exec --help)")
	f.StringArrayVar(&o.allowHosts, "allow-host", nil, "give every sandbox a network reaching only HOST[:PORT] or *.DOMAIN (repeatable)")
	f.StringArrayVar(&o.allowCIDRs, "allow-cidr", nil, "give every sandbox a network reaching only this IPv4 network[:PORT] (repeatable)")
	f.StringVar(&maxOutput, "max-output", "16K", "the most of each output stream returned to the model per command")
	f.StringVar(&timeout, "timeout", "2m", "a command's timeout when the agent gives none")
	f.StringVar(&maxTimeout, "max-timeout", "30m", "the longest timeout the agent may ask for")
	f.IntVar(&maxSandboxes, "max-sandboxes", 8, "the most sandboxes at once")
	return cmd
}

// parseSize parses a byte count with an optional K or M suffix (KiB, MiB).
func parseSize(s string) (int, error) {
	mult := 1
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 || n > 64<<20/mult {
		return 0, fmt.Errorf("%q: want a size like 16K (at most 64M)", s)
	}
	return n * mult, nil
}
