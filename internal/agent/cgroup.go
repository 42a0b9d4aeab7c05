package agent

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
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
// limit applies to, as on a host without a service manager, unless
// their Exec names one (Exec.cgroup: a containerd task's).
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

// haveCgroups says whether the cgroup2 hierarchy is mounted (a --kernel
// kernel may lack it) on a kernel that can start a process in a cgroup
// (clone3's CLONE_INTO_CGROUP, Linux 5.7) and kill one (cgroup.kill,
// 5.14).
func haveCgroups() bool {
	if _, err := os.Stat(cgroupRoot + "/cgroup.controllers"); err != nil {
		return false
	}
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	return kernelAtLeast(unix.ByteSliceToString(u.Release[:]), 5, 14)
}

// kernelAtLeast reports whether a kernel release ("6.1.0-mvm") is at
// least major.minor.
func kernelAtLeast(release string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

// killCgroup kills every process of the cgroup name (cgroup.kill) and
// removes it once they are gone, waiting up to a second for them.
func killCgroup(name string) error {
	if err := agentproto.CheckCgroupName(name); err != nil {
		return err
	}
	dir := cgroupRoot + "/" + name
	if err := os.WriteFile(dir+"/cgroup.kill", []byte("1"), 0); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("cgroup %s: %w", name, err)
	}
	deadline := time.Now().Add(time.Second)
	for {
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: %w", name, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openCgroup opens the cgroup name, a child of the root, making it if it
// is missing and giving it lim: the directory a clone into it
// (CLONE_INTO_CGROUP) takes.
func openCgroup(name string, lim *agentpb.CgroupLimits) (int, error) {
	if err := agentproto.CheckCgroupName(name); err != nil {
		return -1, err
	}
	dir := cgroupRoot + "/" + name
	if err := unix.Mkdir(dir, 0o755); err != nil && err != unix.EEXIST {
		return -1, fmt.Errorf("cgroup %s: %w", name, err)
	}
	if err := setLimits(dir, lim); err != nil {
		return -1, fmt.Errorf("cgroup %s: %w", name, err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("cgroup %s: %w", name, err)
	}
	return fd, nil
}

// setLimits writes lim's non-zero limits into the cgroup dir.
func setLimits(dir string, lim *agentpb.CgroupLimits) error {
	if lim == nil {
		return nil
	}
	if m := lim.GetMemoryMax(); m > 0 {
		if err := os.WriteFile(dir+"/memory.max", []byte(strconv.FormatUint(m, 10)), 0); err != nil {
			return fmt.Errorf("memory.max: %w", err)
		}
	}
	q, per := lim.GetCpuQuotaMicros(), lim.GetCpuPeriodMicros()
	if (q == 0) != (per == 0) {
		return fmt.Errorf("cpu.max needs both a quota and a period, got %d and %d", q, per)
	}
	if q > 0 {
		if err := os.WriteFile(dir+"/cpu.max", []byte(strconv.FormatUint(q, 10)+" "+strconv.FormatUint(per, 10)), 0); err != nil {
			return fmt.Errorf("cpu.max: %w", err)
		}
	}
	return nil
}

// maxCgroupFile bounds what is read of one cgroup file.
const maxCgroupFile = 64 << 10

// cgroupStats reads the counters of the cgroup name.
func cgroupStats(name string) (*agentpb.CgroupStatsReply, error) {
	if err := agentproto.CheckCgroupName(name); err != nil {
		return nil, err
	}
	dir, err := os.OpenRoot(cgroupRoot + "/" + name)
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	read := func(file string) []byte {
		f, err := dir.Open(file)
		if err != nil {
			return nil
		}
		defer f.Close()
		b, _ := io.ReadAll(io.LimitReader(f, maxCgroupFile))
		return b
	}
	r := &agentpb.CgroupStatsReply{}
	cpu := keyed(read("cpu.stat"))
	r.CpuUsageUsec, r.CpuUserUsec, r.CpuSystemUsec = cpu["usage_usec"], cpu["user_usec"], cpu["system_usec"]
	r.CpuNrPeriods, r.CpuNrThrottled, r.CpuThrottledUsec = cpu["nr_periods"], cpu["nr_throttled"], cpu["throttled_usec"]
	r.MemoryCurrent = single(read("memory.current"))
	r.MemoryMax = single(read("memory.max"))
	r.SwapCurrent = single(read("memory.swap.current"))
	r.PidsCurrent = single(read("pids.current"))
	r.PidsMax = single(read("pids.max"))
	ev := keyed(read("memory.events"))
	r.OomEvents, r.OomKills = ev["oom"], ev["oom_kill"]
	mem := keyed(read("memory.stat"))
	r.MemoryFile, r.MemoryInactiveFile, r.MemoryAnon = mem["file"], mem["inactive_file"], mem["anon"]
	return r, nil
}

// keyed parses a flat-keyed cgroup file ("key value" lines).
func keyed(b []byte) map[string]uint64 {
	m := map[string]uint64{}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), " ")
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(v, 10, 64); err == nil {
			m[k] = n
		}
	}
	return m
}

// single parses a one-value cgroup file; "max" (no limit) is 0.
func single(b []byte) uint64 {
	n, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n
}
