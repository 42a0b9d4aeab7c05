package runner

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentclient"
)

func completedResult(st agentclient.ExitStatus) Result {
	return Result{Completed: true, Status: st}
}

func startFailureResult(r agentpb.StartFailure_Reason) Result {
	return completedResult(agentclient.ExitStatus{StartFailure: &agentclient.StartFailure{Reason: r, Message: "cannot start"}})
}

func TestExitCode(t *testing.T) {
	tests := []struct {
		name string
		res  Result
		err  error
		want int
	}{
		{"exit 0", completedResult(agentclient.ExitStatus{Code: 0}), nil, 0},
		{"exit 7", completedResult(agentclient.ExitStatus{Code: 7}), nil, 7},
		{"exit 255", completedResult(agentclient.ExitStatus{Code: 255}), nil, 255},
		{"killed by SIGKILL", completedResult(agentclient.ExitStatus{Signal: syscall.SIGKILL}), nil, 137},
		{"killed by SIGTERM", completedResult(agentclient.ExitStatus{Signal: syscall.SIGTERM}), nil, 143},
		{"signal wins over code", completedResult(agentclient.ExitStatus{Code: 3, Signal: syscall.SIGSEGV}), nil, 139},
		{"timed out", completedResult(agentclient.ExitStatus{TimedOut: true}), nil, 124},
		{"timed out and killed", completedResult(agentclient.ExitStatus{TimedOut: true, Signal: syscall.SIGKILL}), nil, 124},
		{"timed out with a code", completedResult(agentclient.ExitStatus{TimedOut: true, Code: 1}), nil, 124},
		{"not found", startFailureResult(agentpb.StartFailure_REASON_NOT_FOUND), nil, 127},
		{"not executable", startFailureResult(agentpb.StartFailure_REASON_NOT_EXECUTABLE), nil, 126},
		{"bad cwd", startFailureResult(agentpb.StartFailure_REASON_CWD), nil, 125},
		{"invalid", startFailureResult(agentpb.StartFailure_REASON_INVALID), nil, 125},
		{"other", startFailureResult(agentpb.StartFailure_REASON_OTHER), nil, 125},
		{"unspecified", startFailureResult(agentpb.StartFailure_REASON_UNSPECIFIED), nil, 125},
		{"interrupted by SIGINT", Result{Interrupted: syscall.SIGINT}, nil, 130},
		{"interrupted by SIGTERM", Result{Interrupted: syscall.SIGTERM}, nil, 143},
		{"interrupted by SIGHUP", Result{Interrupted: syscall.SIGHUP}, nil, 129},
		{"not completed", Result{}, nil, 125},
		{"not completed, status ignored", Result{Status: agentclient.ExitStatus{Code: 3}}, nil, 125},
		{"completed after an interrupt", Result{Completed: true, Interrupted: syscall.SIGINT, Status: agentclient.ExitStatus{Code: 42}}, nil, 42},
		{"killed after an interrupt", Result{Completed: true, Interrupted: syscall.SIGINT, Status: agentclient.ExitStatus{Signal: syscall.SIGINT}}, nil, 130},
		{"host timeout", Result{Status: agentclient.ExitStatus{TimedOut: true}}, &Error{Op: "timeout", Err: errors.New("guest did not stop")}, 124},
		{"wrapped host timeout", Result{}, fmt.Errorf("run: %w", &Error{Op: "timeout", Err: errors.New("x")}), 124},
		{"vm failure", Result{}, &Error{Op: "vm", Err: errors.New("crashed")}, 125},
		{"boot failure", Result{}, &Error{Op: "boot", Err: errors.New("no agent")}, 125},
		{"plain error", Result{}, errors.New("boom"), 125},
		{"error wins over a completed status", completedResult(agentclient.ExitStatus{Code: 0}), errors.New("boom"), 125},
		{"error wins over an interrupt", Result{Interrupted: syscall.SIGINT}, &Error{Op: "run", Err: context.Canceled}, 125},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ExitCode(tt.res, tt.err); got != tt.want {
				t.Errorf("ExitCode(%+v, %v) = %d, want %d", tt.res, tt.err, got, tt.want)
			}
		})
	}
}

func TestErrorMessage(t *testing.T) {
	inner := errors.New("agent did not answer")
	tests := []struct {
		name string
		err  *Error
		want string
	}{
		{"without log", &Error{Op: "boot", Err: inner}, "boot: agent did not answer"},
		{"with log", &Error{Op: "boot", Err: inner, ConsoleLog: "/var/log/mvm/exec-1.console.log"},
			"boot: agent did not answer (guest console log: /var/log/mvm/exec-1.console.log)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
			if !errors.Is(tt.err, inner) {
				t.Errorf("errors.Is(%v, inner) = false", tt.err)
			}
		})
	}
}

func TestNewName(t *testing.T) {
	re := regexp.MustCompile(`^exec-([0-9a-f]+)-([0-9a-f]+)$`)
	a := NewName()
	m := re.FindStringSubmatch(a)
	if m == nil {
		t.Fatalf("NewName() = %q, want exec-<hex>-<hex>", a)
	}
	if pid, err := strconv.ParseInt(m[1], 16, 64); err != nil || pid != int64(os.Getpid()) {
		t.Errorf("NewName() = %q: pid part %q, want %x", a, m[1], os.Getpid())
	}
	if len(m[2]) > 10 {
		t.Errorf("NewName() = %q: time part longer than 40 bits", a)
	}
	time.Sleep(time.Microsecond)
	b := NewName()
	if !re.MatchString(b) {
		t.Fatalf("NewName() = %q, want exec-<hex>-<hex>", b)
	}
	if a == b {
		t.Errorf("two NewName() calls both gave %q", a)
	}
}

// writeAgedFile creates dir/name with its modification time age ago.
func writeAgedFile(t *testing.T, dir, name string, age time.Duration) {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(name), 0o600); err != nil {
		t.Fatal(err)
	}
	mt := time.Now().Add(-age)
	if err := os.Chtimes(p, mt, mt); err != nil {
		t.Fatal(err)
	}
}

func sortedNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

func TestPruneLogs(t *testing.T) {
	type file struct {
		name string
		age  time.Duration
	}
	// Names sort in a different order than ages, so a name-ordered prune
	// would keep the wrong ones.
	logs := []file{
		{"exec-a.console.log", 5 * time.Hour},
		{"exec-a.vmm.log", 5 * time.Hour},
		{"exec-b.console.log", 1 * time.Hour},
		{"exec-c.console.log", 3 * time.Hour},
		{"exec-c.vmm.log", 0},
		{"exec-d.console.log", 2 * time.Hour},
		{"exec-d.vmm.log", 2 * time.Hour},
		{"exec-e.console.log", 4 * time.Hour},
		{"notes.txt", 100 * time.Hour},
		{"exec-z.vmm.log", 100 * time.Hour},
	}
	tests := []struct {
		name string
		n    int
		want []string
	}{
		{"keep all when under the limit", 10, []string{
			"exec-a.console.log", "exec-a.vmm.log", "exec-b.console.log", "exec-c.console.log", "exec-c.vmm.log",
			"exec-d.console.log", "exec-d.vmm.log", "exec-e.console.log", "exec-z.vmm.log", "notes.txt",
		}},
		{"keep all at the limit", 5, []string{
			"exec-a.console.log", "exec-a.vmm.log", "exec-b.console.log", "exec-c.console.log", "exec-c.vmm.log",
			"exec-d.console.log", "exec-d.vmm.log", "exec-e.console.log", "exec-z.vmm.log", "notes.txt",
		}},
		{"keep newest three", 3, []string{
			"exec-b.console.log", "exec-c.console.log", "exec-c.vmm.log",
			"exec-d.console.log", "exec-d.vmm.log", "exec-z.vmm.log", "notes.txt",
		}},
		{"keep newest one", 1, []string{"exec-b.console.log", "exec-z.vmm.log", "notes.txt"}},
		{"keep none", 0, []string{"exec-z.vmm.log", "notes.txt"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range logs {
				writeAgedFile(t, dir, f.name, f.age)
			}
			pruneLogs(dir, tt.n)
			if diff := cmp.Diff(tt.want, sortedNames(t, dir)); diff != "" {
				t.Errorf("files after pruneLogs(%d) (-want +got):\n%s", tt.n, diff)
			}
		})
	}
}
