package e2e

import (
	"context"
	"errors"
	"io"
	"slices"
	"testing"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// maxLoadedPing bounds a session ping's round trip while the guest's CPUs
// are saturated and its agent streams output as fast as it can: a host
// keepalive with a timeout of a few seconds must not mistake a busy guest
// for a dead one.
const maxLoadedPing = 3 * time.Second

// TestSessionPingUnderGuestLoad pings the real agent at the session level
// (mux.Session.Ping, what a host keepalive uses) while a command keeps
// every guest CPU busy and floods stdout, under TCG.
func TestSessionPingUnderGuestLoad(t *testing.T) {
	m := startMachine(t, machineConfig(t, "ping-load"))
	conn, err := m.DialAgent(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	sess := mux.Client(conn, agentproto.SessionConfig())
	defer sess.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	call := func(req *agentpb.Request) *mux.Stream {
		st, err := sess.OpenContext(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := agentproto.Write(st, req); err != nil {
			t.Fatal(err)
		}
		return st
	}
	hello := call(&agentpb.Request{Call: &agentpb.Request_Hello{Hello: &agentpb.Hello{MinVersion: agentproto.MinVersion, MaxVersion: agentproto.Version}}})
	var resp agentpb.Response
	if err := agentproto.NewReader(hello).Read(&resp); err != nil || resp.GetHello() == nil {
		t.Fatalf("hello: %v %v", &resp, err)
	}
	hello.Close()

	// Four busy loops on two vCPUs, and 96 MiB of output; the agent kills
	// the loops when the shell exits.
	script := "for i in 1 2 3 4; do (while :; do :; done) & done; dd if=/dev/zero bs=65536 count=1536 2>/dev/null"
	exec := call(&agentpb.Request{Call: &agentpb.Request_Exec{Exec: &agentpb.Exec{Argv: []string{"sh", "-c", script}, TimeoutMillis: 90000}}})
	started := make(chan struct{})
	type outcome struct {
		bytes  int64
		exited *agentpb.Exited
		err    error
	}
	done := make(chan outcome, 1)
	go func() {
		var o outcome
		in := agentproto.NewReader(exec)
		for {
			var ev agentpb.ExecEvent
			if err := in.Read(&ev); err != nil {
				o.err = err
				break
			}
			switch e := ev.Event.(type) {
			case *agentpb.ExecEvent_Started:
				close(started)
			case *agentpb.ExecEvent_Output:
				o.bytes += int64(len(e.Output.Data))
			case *agentpb.ExecEvent_Exited:
				o.exited = e.Exited
			}
			if o.exited != nil {
				break
			}
		}
		done <- o
	}()
	select {
	case <-started:
	case <-ctx.Done():
		t.Fatal("the command did not start")
	}
	var rtts []time.Duration
	var o outcome
loop:
	for {
		pctx, pcancel := context.WithTimeout(ctx, 2*maxLoadedPing)
		d, err := sess.Ping(pctx)
		pcancel()
		if err != nil {
			t.Fatalf("ping %d under load: %v", len(rtts), err)
		}
		rtts = append(rtts, d)
		select {
		case o = <-done:
			break loop
		case <-time.After(100 * time.Millisecond):
		}
	}
	if o.err != nil && !errors.Is(o.err, io.EOF) {
		t.Fatalf("exec stream: %v", o.err)
	}
	if o.exited == nil || o.exited.Code != 0 || o.bytes != 96<<20 {
		t.Fatalf("command: %v, %d bytes of output", o.exited, o.bytes)
	}
	slices.Sort(rtts)
	worst := rtts[len(rtts)-1]
	t.Logf("%d pings under load: median %s, worst %s", len(rtts), rtts[len(rtts)/2], worst)
	if len(rtts) < 5 {
		t.Errorf("only %d pings while the command ran", len(rtts))
	}
	if worst > maxLoadedPing {
		t.Errorf("worst ping under load %s, bound %s", worst, maxLoadedPing)
	}
}
