// Command containerd-shim-mvm-v2 is mvm's containerd shim
// (io.containerd.mvm.v2): containerd runs it for each task of a runtime
// configured with that name, and it runs the task's processes in a
// microVM. See docs/kubernetes.md.
package main

import (
	"os"

	"github.com/containerd/containerd/runtime/v2/shim"

	"github.com/mvm-sh/mvm/internal/ctrshim"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == ctrshim.HealCommand {
		// The shim's own healer (see ctrshim.HealCommand), not a verb
		// of containerd's.
		os.Exit(ctrshim.Heal(os.Args[2:], os.Stderr))
	}
	shim.Run(ctrshim.RuntimeName, ctrshim.New)
}
