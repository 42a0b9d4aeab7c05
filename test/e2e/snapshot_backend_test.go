package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
)

// The QEMU backend's snapshot primitive on its own: boot to an idle agent,
// save, restore twice from the same files, and talk to the agent.
func TestBackendSnapshotRestore(t *testing.T) {
	snap := t.TempDir()
	cfg := machineConfig(t, "snap")
	cfg.Snapshot = &backend.Snapshot{Dir: snap}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	be := qemu.New(nil)
	m, err := be.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	conn, _ := m.DialAgent(ctx)
	c, err := agentclient.Dial(conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Hello(ctx); err != nil {
		t.Fatal(err)
	}
	c.Close()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	if err := m.(backend.SnapshotSaver).SaveSnapshot(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("saved in %s", time.Since(start))

	for i := 0; i < 2; i++ {
		rcfg := cfg
		rcfg.RunDir = t.TempDir()
		rcfg.Snapshot = &backend.Snapshot{Dir: snap, Restore: true}
		start := time.Now()
		m, err := be.Start(ctx, rcfg)
		if err != nil {
			t.Fatal(err)
		}
		restored := time.Since(start)
		conn, _ := m.DialAgent(ctx)
		c, err := agentclient.Dial(conn)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Hello(ctx); err != nil {
			t.Fatal(err)
		}
		hello := time.Since(start)
		p, err := c.Exec(ctx, agentclient.ExecSpec{Argv: []string{"true"}})
		if err != nil {
			t.Fatal(err)
		}
		if st, err := p.Wait(ctx); err != nil || st.Code != 0 {
			t.Fatalf("exec after restore: %+v %v", st, err)
		}
		t.Logf("restore %d: running after %s, hello after %s, exec done after %s", i, restored, hello, time.Since(start))
		c.Close()
		_ = m.Stop(ctx)
	}
}
