package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/qmp"
)

// stopTimeout bounds a polite stop of a machine whose start failed.
const stopTimeout = 2 * time.Second

// snapshotKeyVersion changes whenever this package changes how it saves
// or restores machines, or what a booted guest is told: 3 gives the
// guest the TSC's rate (a snapshot saved by an older mvm on a busy host
// may have a guest on 10 ms jiffies, and every restore would keep it).
const snapshotKeyVersion = "3"

// SnapshotKey implements backend.Snapshotter. QEMU restores state only
// into the build that saved it, so the key is the binary itself: its path,
// size, modification time and inode, read with one stat (no process to
// run on the exec path). Upgrading QEMU changes the key and the old
// snapshots are no longer used.
func (b *Backend) SnapshotKey(ctx context.Context) (string, error) {
	bin := b.Path
	if bin == "" {
		var err error
		if bin, err = FindBinary(); err != nil {
			return "", err
		}
	}
	real, err := filepath.EvalSymlinks(bin)
	if err != nil {
		return "", err
	}
	var st unix.Stat_t
	if err := unix.Stat(real, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", real, err)
	}
	return fmt.Sprintf("qemu/%s %s size=%d mtime=%d.%09d ino=%d", snapshotKeyVersion, real, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ino), nil
}

// x-ignore-shared leaves RAM that lives in a shared memory backend out of
// the migration stream: the RAM file is the snapshot's memory.
var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}

// SaveSnapshot implements backend.SnapshotSaver: it stops the guest, writes
// its device state to the snapshot directory's state file (handed to QEMU
// as a descriptor: a confined QEMU cannot open files), makes both files
// durable and stops the VMM.
func (m *machine) SaveSnapshot(ctx context.Context) error {
	if m.snapshot == nil || m.snapshot.Restore {
		return errors.New("qemu: this machine was not booted for a snapshot")
	}
	if _, err := m.qmp.Execute(ctx, "stop", nil); err != nil {
		return fmt.Errorf("pause for snapshot: %w", err)
	}
	if _, err := m.qmp.Execute(ctx, "migrate-set-capabilities", ignoreShared); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	statePath := filepath.Join(m.snapshot.Dir, snapshotState)
	f, err := os.OpenFile(statePath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := m.qmp.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": "snapshot"}, f); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if _, err := m.qmp.Execute(ctx, "migrate", map[string]any{"uri": "fd:snapshot"}); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := m.waitMigration(ctx, "query-migrate"); err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := f.Sync(); err != nil {
		return err
	}
	stopCtx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	if err := m.Stop(stopCtx); err != nil {
		return err
	}
	// The RAM file was written through a shared mapping; make it durable
	// before anything records the snapshot as usable.
	ram, err := os.Open(filepath.Join(m.snapshot.Dir, snapshotRAM))
	if err != nil {
		return err
	}
	defer ram.Close()
	if err := ram.Sync(); err != nil {
		return err
	}
	if canMapReadOnlyRAM(ctx, m.bin) {
		return os.WriteFile(filepath.Join(m.snapshot.Dir, snapshotRAMReadOnly), nil, 0o644)
	}
	return nil
}

// Pause implements backend.Pauser: the guest is stopped and its whole
// state, RAM included (zero pages take a few bytes each), goes to dir's
// state file; then the VMM ends. ram0 says whether the machine's RAM is
// the ram0 memory backend (a restored or resumed machine's), which the
// resumed machine must have too.
func (m *machine) Pause(ctx context.Context, dir string) (bool, error) {
	ram0 := m.snapshot != nil && (!m.snapshot.Paused || m.snapshot.PausedRAM0)
	if _, err := m.qmp.Execute(ctx, "stop", nil); err != nil {
		return false, fmt.Errorf("pause: %w", err)
	}
	noIgnore := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": false}}}
	if _, err := m.qmp.Execute(ctx, "migrate-set-capabilities", noIgnore); err != nil {
		return false, fmt.Errorf("pause: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, snapshotState), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return false, err
	}
	defer f.Close()
	if _, err := m.qmp.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": "pause"}, f); err != nil {
		return false, fmt.Errorf("pause: %w", err)
	}
	if _, err := m.qmp.Execute(ctx, "migrate", map[string]any{"uri": "fd:pause"}); err != nil {
		return false, fmt.Errorf("pause: %w", err)
	}
	if err := m.waitMigration(ctx, "query-migrate"); err != nil {
		return false, fmt.Errorf("pause: %w", err)
	}
	if err := f.Sync(); err != nil {
		return false, err
	}
	stopCtx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	return ram0, m.Stop(stopCtx)
}

// canMapReadOnlyRAM asks QEMU whether its memory-backend-file has the
// "rom" property (QEMU 8.2), which lets a restore open the RAM file
// read-only and still map it writable, copy-on-write. It runs once per
// snapshot saved, never on the exec path.
func canMapReadOnlyRAM(ctx context.Context, bin string) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "-object", "memory-backend-file,help").Output()
	return err == nil && hasROMProperty(out)
}

// hasROMProperty reads QEMU's "-object memory-backend-file,help", one
// property per line ("  rom=<OnOffAuto> - ...").
func hasROMProperty(help []byte) bool {
	for line := range strings.SplitSeq(string(help), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "rom=") {
			return true
		}
	}
	return false
}

// restore loads the saved device state into a VMM started with -incoming
// defer and lets the guest run.
func (m *machine) restore(ctx context.Context, fd int, events <-chan qmp.Event) error {
	start := time.Now()
	// A paused machine's state holds its RAM: it was saved without
	// x-ignore-shared, and must be loaded so.
	if !m.snapshot.Paused {
		if _, err := m.qmp.Execute(ctx, "migrate-set-capabilities", ignoreShared); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
	}
	if _, err := m.qmp.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(fd)}); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	qmpReady := time.Since(start)
	if err := m.waitMigration(ctx, "query-migrate"); err != nil {
		if m.refusedState() {
			err = fmt.Errorf("%w: %w (%s)", backend.ErrSnapshotRejected, err, lastLines(m.vmmOut.String(), 3))
		}
		return fmt.Errorf("restore: %w", err)
	}
	loaded := time.Since(start)
	if check := m.snapshot.BeforeResume; check != nil {
		if err := check(); err != nil {
			return err
		}
	}
	// QEMU may resume the guest by itself once the state is in; if not,
	// it is paused and waits for cont.
	ret, err := m.qmp.Execute(ctx, "query-status", nil)
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := json.Unmarshal(ret, &st); err != nil {
		return fmt.Errorf("restore: query-status: %w", err)
	}
	if !st.Running {
		if _, err := m.qmp.Execute(ctx, "cont", nil); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
	}
	m.log.Debug("restored", "qmp_ready", qmpReady, "state_loaded", loaded, "running", time.Since(start))
	return nil
}

// refusedState reports whether the VMM ended because it could not load
// the saved state: QEMU exits after a failed incoming migration, saying
// "load of migration failed". A VMM killed or dead for another reason
// (the host's doing) is not the snapshot's fault.
func (m *machine) refusedState() bool {
	select {
	case <-m.exited:
	case <-time.After(time.Second):
		return false
	}
	return strings.Contains(m.vmmOut.String(), "load of migration failed")
}

// waitMigration polls the migration's status until it completed or
// failed. Under x-ignore-shared it takes a few milliseconds: the stream is
// device state only.
func (m *machine) waitMigration(ctx context.Context, query string) error {
	for delay := 200 * time.Microsecond; ; delay = min(2*delay, 10*time.Millisecond) {
		ret, err := m.qmp.Execute(ctx, query, nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(ret, &st); err != nil {
			return fmt.Errorf("%s: %w", query, err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			msg := st.ErrorDesc
			if msg == "" {
				// QEMU 7.2 often leaves the reason on its stderr only.
				msg = lastLines(m.vmmOut.String(), 3)
			}
			err := fmt.Errorf("migration %s: %s", st.Status, msg)
			if st.Status == "failed" && m.snapshot != nil && m.snapshot.Restore {
				// QEMU read the state and refused it: the snapshot's
				// fault. A VMM that died or a lost connection is not
				// (the host may have killed it).
				err = fmt.Errorf("%w: %w", backend.ErrSnapshotRejected, err)
			}
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.exited:
			return fmt.Errorf("the VMM exited during the migration: %w", m.Err())
		case <-time.After(delay):
		}
	}
}

var (
	_ backend.Snapshotter   = (*Backend)(nil)
	_ backend.SnapshotSaver = (*machine)(nil)
)
