package mvm

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestPoolTakeRefreshes: a VM handed out gets a new boot id and the
// host's clock at the take, whatever it had while it waited. It boots
// real VMs from the default image, as the examples do.
func TestPoolTakeRefreshes(t *testing.T) {
	cfg := Config{StateDir: t.TempDir(), RunDir: filepath.Join(t.TempDir(), "run")}
	p, err := NewPool(PoolOptions{Shapes: []PoolShape{{Config: cfg, Size: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := ListenPool(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ListenPool(cfg); err != ErrPoolRunning {
		t.Fatalf("a second ListenPool: %v, want ErrPoolRunning", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, ln) }()
	deadline := time.Now().Add(2 * time.Minute)
	for p.Status().Shapes[0].Ready < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %+v", p.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	s := p.shapes[0]
	s.mu.Lock()
	ready := s.ready[0].sb
	s.mu.Unlock()
	// The waiting VM's boot id, and a clock set far into the past.
	var before bytes.Buffer
	if st, err := ready.Exec(ctx, Cmd{Argv: []string{"sh", "-c", "cat /proc/sys/kernel/random/boot_id; date -s @1000000000 >/dev/null"}, Stdout: &before}); err != nil || st.Code != 0 {
		t.Fatalf("on the ready VM: %v %v", st, err)
	}

	sb, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !sb.taken || sb.name != ready.name {
		t.Fatalf("Start did not take the pool's VM: %s (taken %v), the pool's is %s", sb.name, sb.taken, ready.name)
	}
	var after bytes.Buffer
	if st, err := sb.Exec(ctx, Cmd{Argv: []string{"sh", "-c", "cat /proc/sys/kernel/random/boot_id; date +%s"}, Stdout: &after}); err != nil || st.Code != 0 {
		t.Fatalf("on the taken VM: %v %v", st, err)
	}
	b, a := strings.Fields(before.String()), strings.Fields(after.String())
	if len(b) != 1 || len(a) != 2 || len(a[0]) != 36 {
		t.Fatalf("before %q, after %q", before.String(), after.String())
	}
	if a[0] == b[0] {
		t.Errorf("the boot id %s was not renewed at the take", a[0])
	}
	guest, _ := strconv.ParseInt(a[1], 10, 64)
	if d := time.Now().Unix() - guest; d < -2 || d > 5 {
		t.Errorf("guest clock %d after the take, host %d", guest, time.Now().Unix())
	}
	if _, err := sb.Pause(ctx); err == nil {
		t.Error("a taken VM was paused")
	}
	if _, err := sb.Close(ctx); err != nil {
		t.Fatal(err)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Everything the pool started is gone with it, and its lock too.
	if entries, _ := os.ReadDir(cfg.RunDir); len(entries) != 0 {
		t.Errorf("run directories left: %v", entries)
	}
	ln2, err := ListenPool(cfg)
	if err != nil {
		t.Fatalf("ListenPool after the pool ended: %v", err)
	}
	ln2.Close()
}
