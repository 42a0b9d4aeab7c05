package ctrshim

import (
	"testing"

	"github.com/mvm-sh/mvm"
)

// TestMetricsLimit: the memory limit reported is the cgroup's when it is
// below the VM's memory, else the VM's (the task's real bound); the rest
// is the guest's counters as they came.
func TestMetricsLimit(t *testing.T) {
	const vm = 512 << 20
	for _, c := range []struct {
		name  string
		limit uint64
		want  uint64
	}{
		{"no cgroup limit", 0, vm},
		{"a lower limit", 128 << 20, 128 << 20},
		{"a limit above the VM's memory", 4 << 30, vm},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := metrics(mvm.CgroupStats{Memory: 10 << 20, MemoryLimit: c.limit, Pids: 3, CPUUsageMicros: 7, OOMKills: 1}, vm)
			if m.Memory.UsageLimit != c.want {
				t.Errorf("usage_limit = %d, want %d", m.Memory.UsageLimit, c.want)
			}
			if m.Memory.Usage != 10<<20 || m.Pids.Current != 3 || m.CPU.UsageUsec != 7 || m.MemoryEvents.OomKill != 1 {
				t.Errorf("counters changed on the way: %+v", m)
			}
		})
	}
}

func TestCgroupName(t *testing.T) {
	a, b := cgroupName("task-a"), cgroupName("task-b")
	if a == b || len(a) > 64 {
		t.Errorf("cgroup names %q and %q", a, b)
	}
}

// TestMetricsBounded: what a guest claims beyond its VM's memory is cut
// to it, and no part of memory is larger than what it is part of.
func TestMetricsBounded(t *testing.T) {
	const vm = 256 << 20
	m := metrics(mvm.CgroupStats{Memory: 1 << 40, Swap: 1 << 40, MemoryFile: 1 << 41, MemoryInactiveFile: 1 << 42, MemoryAnon: 1 << 43}, vm)
	mem := m.Memory
	if mem.Usage != vm || mem.SwapUsage != vm || mem.File != vm || mem.InactiveFile != vm || mem.Anon != vm {
		t.Errorf("not bounded by the VM's %d bytes: %+v", vm, mem)
	}
	m = metrics(mvm.CgroupStats{Memory: 100, MemoryFile: 60, MemoryInactiveFile: 80}, vm)
	if m.Memory.InactiveFile != 60 {
		t.Errorf("inactive_file %d above file 60", m.Memory.InactiveFile)
	}
}
