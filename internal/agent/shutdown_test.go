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
		// The shutdown must take no longer than this (plus slack).
		maxWait time.Duration
	}{
		// A command that exits within the grace (like poweroff itself)
		// reports its own status, and the shutdown waits no longer.
		{"exits by itself", "sleep 0.05; exit 3", 3, 0, 0},
		{"running", "exec sleep 100", 0, 15, 400 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := NewServer(nil, "test", Options{})
			// A self-exit grace long enough for any loaded machine, so
			// the first case cannot turn into a SIGTERM.
			srv.selfExitGrace, srv.termGrace = 200*time.Millisecond, 10*time.Second
			if tc.wantSignal == 0 {
				srv.selfExitGrace = 10 * time.Second
			}
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
			if took > tc.maxWait+2*time.Second {
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
	grace := srv.selfExitGrace + srv.termGrace
	if took := time.Since(start); took < grace || took > grace+2*time.Second {
		t.Fatalf("EndCommands took %s, want about %s", took, grace)
	}
}
