package mvm

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/backend"
)

// snapFake is the fake backend with snapshots: a machine started from one
// is a fake machine that fails as the test says (its VMM exits, or its
// guest hangs), as a guest restored from a RAM file damaged on disk does.
type snapFake struct {
	*fakeBackend
	onRestore func(*fakeMachine)
	restores  int
}

func (b *snapFake) SnapshotKey(context.Context) (string, error) { return "fake-vmm", nil }

func (b *snapFake) Start(ctx context.Context, cfg backend.Config) (backend.Machine, error) {
	m, err := b.fakeBackend.Start(ctx, cfg)
	if err == nil && cfg.Snapshot != nil && cfg.Snapshot.Restore {
		b.restores++
		if b.onRestore != nil {
			b.onRestore(m.(*fakeMachine))
		}
	}
	return m, err
}

// writeSnapshot lays out a snapshot that findSnapshot accepts for cfg.
func writeSnapshot(t *testing.T, cfg Config) string {
	t.Helper()
	r, err := resolve(cfg)
	if err != nil {
		t.Fatal(err)
	}
	img, err := loadImage(r)
	if err != nil {
		t.Fatal(err)
	}
	key, err := snapshotKey(context.Background(), r, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := snapshotDir(r, key, nil)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string]string{"ram": "guest memory", "state": "device state", "placeholder": ""} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sum, err := fileSHA256(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(snapshotMeta{Format: snapshotFormat, Key: key, StateSHA256: sum, RAMSize: int64(len("guest memory"))})
	if err := os.WriteFile(filepath.Join(dir, "snapshot.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := findSnapshot(dir, key); err != nil || got != dir {
		t.Fatalf("the snapshot written is not usable: %v", err)
	}
	return dir
}

// TestSnapshotFailureBoots: a snapshot that is damaged on disk, or
// restores into a guest that dies or does not answer, is discarded (so
// that it is rebuilt, not tried again), the sandbox boots instead and
// says why in its timings.
func TestSnapshotFailureBoots(t *testing.T) {
	defer func(d time.Duration) { restoreTimeout = d }(restoreTimeout)
	restoreTimeout = 300 * time.Millisecond
	tests := []struct {
		name      string
		damage    func(dir string)
		onRestore func(*fakeMachine)
		restores  int
		why       string
	}{
		{name: "guest dies", onRestore: func(m *fakeMachine) { m.crash() }, restores: 1,
			why: "cold boot after the restored guest failed"},
		{name: "guest hangs", onRestore: func(m *fakeMachine) { m.freeze() }, restores: 1,
			why: "cold boot after the restored guest failed"},
		{name: "RAM file truncated", damage: func(dir string) { _ = os.Truncate(filepath.Join(dir, "ram"), 3) },
			why: "cold boot: its snapshot was damaged"},
		{name: "state garbled", damage: func(dir string) { _ = os.WriteFile(filepath.Join(dir, "state"), []byte("device statf"), 0o644) },
			why: "cold boot: its snapshot was damaged"},
		{name: "state missing", damage: func(dir string) { _ = os.Remove(filepath.Join(dir, "state")) },
			why: "cold boot: its snapshot was damaged"},
		{name: "record garbled", damage: func(dir string) { _ = os.WriteFile(filepath.Join(dir, "snapshot.json"), []byte("{"), 0o644) },
			why: "cold boot: its snapshot was damaged"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &snapFake{fakeBackend: newFakeBackend(), onRestore: tt.onRestore}
			cfg := fakeConfig(t, b.fakeBackend)
			cfg.backend = b
			logs := &syncWriter{}
			cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
			dir := writeSnapshot(t, cfg)
			if tt.damage != nil {
				tt.damage(dir)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sb, err := Start(ctx, cfg)
			if err != nil {
				t.Fatalf("start: %v", err)
			}
			defer sb.Close(context.Background())
			if _, err := sb.Exec(ctx, Cmd{Argv: []string{"true"}}); err != nil {
				t.Fatalf("exec: %v", err)
			}
			if b.restores != tt.restores {
				t.Errorf("%d restores, want %d", b.restores, tt.restores)
			}
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Errorf("the bad snapshot was kept: %v", err)
			}
			var details []string
			for _, tm := range sb.Timings() {
				details = append(details, tm.Step+" ("+tm.Detail+")")
			}
			if !strings.Contains(strings.Join(details, ", "), tt.why) {
				t.Errorf("timings %q do not say %q", details, tt.why)
			}
			if n := strings.Count(logs.String(), "level=WARN"); n != 1 || !strings.Contains(logs.String(), "mvmctl bootstrap rebuilds it") {
				t.Errorf("want one warning naming the fix, got:\n%s", logs.String())
			}
		})
	}
}

// syncWriter collects log lines: the sandbox logs from several
// goroutines.
type syncWriter struct {
	mu sync.Mutex
	b  strings.Builder
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
