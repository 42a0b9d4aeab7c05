package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestPsShowsRunningVMs: `mvmctl ps` lists a VM while its command runs,
// with its owner, shape and status from the run's record, and nothing
// once the run is over; the record is private to the user.
func TestPsShowsRunningVMs(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--cpus", "1", "--memory", "256M", "--", "sh", "-c", "echo up; sleep 60")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "up\n" {
		t.Fatalf("first line %q, %v", line, err)
	}

	r := e.run(nil, "ps", "--json")
	var list []struct {
		Name      string `json:"name"`
		Status    string `json:"status"`
		CPUs      int    `json:"cpus"`
		MemoryMiB uint64 `json:"memory_mib"`
		PID       int    `json:"pid"`
		VMMPID    int    `json:"vmm_pid"`
	}
	if r.code != 0 || json.Unmarshal(r.stdout, &list) != nil || len(list) != 1 {
		t.Fatalf("ps --json: %s", r)
	}
	got := list[0]
	if got.Status != "running" || got.CPUs != 1 || got.MemoryMiB != 256 || got.PID != cmd.Process.Pid || got.VMMPID == 0 ||
		!strings.HasPrefix(got.Name, "exec-") {
		t.Errorf("ps lists %+v; want the running exec (pid %d, 1 vCPU, 256 MiB) with its VMM", got, cmd.Process.Pid)
	}
	// As root the VMM's process is the jailer, QEMU's parent.
	if vmms := e.vmms(); len(vmms) != 1 || (vmms[0] != got.VMMPID && parentPID(vmms[0]) != got.VMMPID) {
		t.Errorf("ps says VMM %d; the VMMs running are %v", got.VMMPID, vmms)
	}
	fi, err := os.Stat(filepath.Join(e.runDir, got.Name, "record.json"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("record: %v %v, want mode 0600", fi, err)
	}
	table := e.run(nil, "ps")
	if table.code != 0 || !strings.Contains(string(table.stdout), got.Name) || !strings.Contains(string(table.stdout), "running") {
		t.Errorf("ps: %s", table)
	}

	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
	if r := e.run(nil, "ps", "--json"); r.code != 0 || strings.TrimSpace(string(r.stdout)) != "[]" {
		t.Errorf("ps after the run: %s", r)
	}
	e.assertClean()
}

// parentPID is pid's parent, or 0.
func parentPID(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// pid (comm) state ppid ...: comm may hold spaces, so cut at the last ')'.
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(fields) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(fields[1])
	return ppid
}
