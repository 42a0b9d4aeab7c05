package agent

import (
	"log/slog"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// cgroupMount is the cgroup2 hierarchy at /sys/fs/cgroup, where systemd
// and every container runtime look for it; one hierarchy serves the
// agent's root and a template's.
var cgroupMount = mount{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""}

// cgroupRoot is where cgroupMount is in the agent's own root.
const cgroupRoot = "/sys/fs/cgroup"

// enableControllers turns on, for the root cgroup's children, every
// controller the kernel offers (cpu, cpuset, memory, pids with mvm's
// kernel), as systemd does at boot: a program in the guest that makes a
// cgroup can then limit it. Commands stay in the root cgroup, which no
// limit applies to, as on a host without a service manager.
func enableControllers(log *slog.Logger) {
	b, err := os.ReadFile(cgroupRoot + "/cgroup.controllers")
	if err != nil {
		log.Debug("cgroup controllers", "err", err)
		return
	}
	// One at a time: a controller the kernel refuses (cpu with
	// RT_GROUP_SCHED, say) must not keep the others off.
	for _, c := range strings.Fields(string(b)) {
		if err := os.WriteFile(cgroupRoot+"/cgroup.subtree_control", []byte("+"+c), 0); err != nil {
			log.Warn("cgroup controller", "controller", c, "err", err)
		}
	}
}
