package mvm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/snapshot"
)

// snapFake is the fake backend with snapshots: a machine started from one
// is a fake machine that fails as the test says (its VMM exits, or its
// guest hangs), as a guest restored from a RAM file damaged on disk does.
type snapFake struct {
	*fakeBackend
	onRestore  func(*fakeMachine)
	restoreErr error // what a restore fails with
	restores   int
}

func (b *snapFake) SnapshotKey(context.Context) (string, error) { return "fake-vmm", nil }

func (b *snapFake) Start(ctx context.Context, cfg backend.Config) (backend.Machine, error) {
	if cfg.Snapshot != nil && cfg.Snapshot.Restore && b.restoreErr != nil {
		b.restores++
		return nil, b.restoreErr
	}
	m, err := b.fakeBackend.Start(ctx, cfg)
	if err == nil && cfg.Snapshot != nil && cfg.Snapshot.Restore {
		b.restores++
		if b.onRestore != nil {
			b.onRestore(m.(*fakeMachine))
		}
		// The state is loaded; the guest resumes only if the check says so.
		if check := cfg.Snapshot.BeforeResume; check != nil {
			if err := check(); err != nil {
				_ = m.Stop(ctx)
				return nil, err
			}
		}
	}
	return m, err
}

// writeSnapshot lays out a snapshot that the store finds for cfg.
func writeSnapshot(t *testing.T, cfg Config) string {
	t.Helper()
	sb, err := prepare(cfg)
	if err != nil {
		t.Fatal(err)
	}
	key, err := sb.snapshotKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	sv, err := sb.snapshotStore().Begin(key)
	if err != nil {
		t.Fatal(err)
	}
	defer sv.Close()
	for name, data := range map[string]string{"ram": "guest memory", "state": "device state"} {
		if err := os.WriteFile(filepath.Join(sv.Dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir, err := sv.Commit(snapshot.Meta{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := sb.snapshotStore().Find(key); err != nil || got.Dir != dir {
		t.Fatalf("the snapshot written is not usable: %v", err)
	}
	return dir
}

// rewrite writes a file of a snapshot again, after a pause long enough
// for its change time to move.
func rewrite(path, data string) {
	time.Sleep(20 * time.Millisecond)
	_ = os.WriteFile(path, []byte(data), 0o644)
}

// TestSnapshotFailureBoots: a snapshot that is damaged on disk, that its
// VMM rejects, or that restores into a guest that dies or does not
// answer, is discarded (so that it is rebuilt, not tried again), the
// sandbox boots instead and says why in its timings. A restore that fails
// for the host's reasons, or races a new snapshot, boots and keeps the
// snapshot. A run whose VMM wrote the RAM file discards it, loudly.
func TestSnapshotFailureBoots(t *testing.T) {
	defer func(d time.Duration) { restoreTimeout = d }(restoreTimeout)
	restoreTimeout = 300 * time.Millisecond
	tests := []struct {
		name       string
		damage     func(dir string)
		onRestore  func(dir string, m *fakeMachine)
		restoreErr error
		duringRun  func(dir string)
		restores   int
		why        string
		kept       bool   // the snapshot stays
		log        string // what the one warning or error says
	}{
		{name: "guest dies", onRestore: func(_ string, m *fakeMachine) { m.crash() }, restores: 1,
			why: "cold boot after the restored guest failed"},
		{name: "guest hangs", onRestore: func(_ string, m *fakeMachine) { m.freeze() }, restores: 1,
			why: "cold boot after the restored guest failed"},
		{name: "RAM file truncated", damage: func(dir string) { _ = os.Truncate(filepath.Join(dir, "ram"), 3) },
			why: "cold boot: its snapshot was damaged"},
		{name: "RAM file rewritten", damage: func(dir string) { rewrite(filepath.Join(dir, "ram"), "guest MEMORY") },
			why: "cold boot: its snapshot was damaged"},
		{name: "state garbled", damage: func(dir string) { _ = os.WriteFile(filepath.Join(dir, "state"), []byte("device statf"), 0o644) },
			why: "cold boot: its snapshot was damaged"},
		{name: "state missing", damage: func(dir string) { _ = os.Remove(filepath.Join(dir, "state")) },
			why: "cold boot: its snapshot was damaged"},
		{name: "record garbled", damage: func(dir string) { _ = os.WriteFile(filepath.Join(dir, "snapshot.json"), []byte("{"), 0o644) },
			why: "cold boot: its snapshot was damaged"},
		{name: "VMM rejects the state", restoreErr: fmt.Errorf("restore: %w: migration failed", backend.ErrSnapshotRejected), restores: 1,
			why: "cold boot: its snapshot failed to restore"},
		{name: "host error", restoreErr: errors.New("fork/exec qemu: resource temporarily unavailable"), restores: 1,
			why: "cold boot: its snapshot failed to restore (kept)", kept: true, log: "could not restore the snapshot"},
		{name: "replaced while restoring", restores: 1, onRestore: func(dir string, _ *fakeMachine) {
			rewrite(filepath.Join(dir, "snapshot.json"), strings.Replace(readFile(dir, "snapshot.json"), `"created": "`, `"created": "1`, 1))
		}, why: "cold boot: its snapshot was replaced while it restored", kept: true, log: "-"},
		{name: "RAM file written while restoring", restores: 1, onRestore: func(dir string, _ *fakeMachine) { rewrite(filepath.Join(dir, "ram"), "guest MEMORY") },
			why: "cold boot: its snapshot was written while it restored", log: "level=ERROR msg=\"the snapshot's RAM file or state was written"},
		{name: "VMM writes the RAM file", restores: 1, duringRun: func(dir string) { rewrite(filepath.Join(dir, "ram"), "guest MEMORY") },
			why: "restored from snapshot", log: "level=ERROR msg=\"the snapshot's RAM file or state was written"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &snapFake{fakeBackend: newFakeBackend(), restoreErr: tt.restoreErr}
			cfg := fakeConfig(t, b.fakeBackend)
			cfg.backend = b
			logs := &syncWriter{}
			cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
			dir := writeSnapshot(t, cfg)
			if tt.onRestore != nil {
				b.onRestore = func(m *fakeMachine) { tt.onRestore(dir, m) }
			}
			if tt.damage != nil {
				tt.damage(dir)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sb, err := Start(ctx, cfg)
			if err != nil {
				t.Fatalf("start: %v", err)
			}
			if _, err := sb.Exec(ctx, Cmd{Argv: []string{"true"}}); err != nil {
				t.Fatalf("exec: %v", err)
			}
			if tt.duringRun != nil {
				tt.duringRun(dir)
			}
			var details []string
			for _, tm := range sb.Timings() {
				details = append(details, tm.Step+" ("+tm.Detail+")")
			}
			if _, err := sb.Close(context.Background()); err != nil {
				t.Errorf("close: %v", err)
			}
			if b.restores != tt.restores {
				t.Errorf("%d restores, want %d", b.restores, tt.restores)
			}
			if _, err := os.Stat(dir); tt.kept != (err == nil) {
				t.Errorf("snapshot kept: %v, want %v", err == nil, tt.kept)
			}
			if !strings.Contains(strings.Join(details, ", "), tt.why) {
				t.Errorf("timings %q do not say %q", details, tt.why)
			}
			want := tt.log
			if want == "" {
				want = "mvmctl bootstrap rebuilds it"
			}
			lines := strings.Count(logs.String(), "level=")
			switch {
			case want == "-" && lines != 0:
				t.Errorf("want no warning, got:\n%s", logs.String())
			case want != "-" && (lines != 1 || !strings.Contains(logs.String(), want)):
				t.Errorf("want one line saying %q, got:\n%s", want, logs.String())
			}
		})
	}
}

func readFile(dir, name string) string {
	b, _ := os.ReadFile(filepath.Join(dir, name))
	return string(b)
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
