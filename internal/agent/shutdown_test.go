package agent

import (
	"testing"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
)

// waitStarted reads an exec stream up to its Started event and returns
// the command's pid.
func waitStarted(t *testing.T, rd *agentproto.Reader) int {
	t.Helper()
	var ev agentpb.ExecEvent
	if err := rd.Read(&ev); err != nil || ev.GetStarted() == nil {
		t.Fatalf("first event %v, %v; want Started", ev.Event, err)
	}
	return int(ev.GetStarted().Pid)
}

func TestEndCommands(t *testing.T) {
	for _, tc := range []struct {
		name   string
		script string
		// want is how the command ends: its own exit code, or the
		// SIGTERM of the shutdown.
		wantCode, wantSignal int32
		maxWait              time.Duration
	}{
		// A command that exits right away (like poweroff itself) reports
		// its own status, and the shutdown does not wait any longer.
		{"exits by itself", "sleep 0.05; exit 3", 3, 0, selfExitGrace},
		{"running", "exec sleep 100", 0, 15, selfExitGrace + termGrace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := NewServer(nil, "test", Options{})
			h := serve(t, srv)
			_, rd := h.exec("sh", "-c", tc.script)
			waitStarted(t, rd)
			start := time.Now()
			srv.EndCommands()
			took := time.Since(start)
			r := collect(t, rd)
			if r.exited.Code != tc.wantCode || r.exited.Signal != tc.wantSignal {
				t.Fatalf("exited %v, want code %d signal %d", r.exited, tc.wantCode, tc.wantSignal)
			}
			if took > tc.maxWait+time.Second {
				t.Fatalf("EndCommands took %s", took)
			}
			// No new command starts once the shutdown has begun.
			_, rd = h.exec("true")
			r = collect(t, rd)
			if sf := r.exited.StartFailure; sf == nil || sf.Reason != agentpb.StartFailure_REASON_OTHER {
				t.Fatalf("exec during shutdown: exited %v, want a start failure", r.exited)
			}
		})
	}
}

// A command that ignores SIGTERM does not hold the shutdown up for more
// than the grace periods.
func TestEndCommandsBounded(t *testing.T) {
	srv := NewServer(nil, "test", Options{})
	h := serve(t, srv)
	_, rd := h.exec("sh", "-c", "trap '' TERM; while :; do sleep 0.05; done")
	waitStarted(t, rd)
	start := time.Now()
	srv.EndCommands()
	if took := time.Since(start); took < selfExitGrace+termGrace || took > selfExitGrace+termGrace+2*time.Second {
		t.Fatalf("EndCommands took %s, want about %s", took, selfExitGrace+termGrace)
	}
}
