package mvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/mvm-sh/mvm/internal/adddir"
	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/runstate"
)

// A paused sandbox can outlive the process that paused it: Detach leaves
// its run directory (disks, the saved RAM and device state, and a record
// of how to rebuild it) to a later process, which resumes it with
// ResumeDetached or ends it with CloseDetached. Reclaim leaves such a
// directory alone.

// detachedRecord is what a detached sandbox's run directory says of it.
type detachedRecord struct {
	Version int             `json:"version"`
	Config  Config          `json:"config"`
	Drives  []backend.Drive `json:"drives"`
	RAM0    bool            `json:"ram0"`
	Kernel  string          `json:"kernel"`
	Initrd  string          `json:"initrd"`
	// Lower is the template's disk, which must be the same at resume.
	Lower    string    `json:"lower,omitempty"`
	Paused   time.Time `json:"paused"`
	Restored bool      `json:"restored"`
}

const detachedVersion = 1

// Detach lets go of a paused sandbox without ending it: its run
// directory stays, with everything a later process needs to resume it
// (ResumeDetached) or end it (CloseDetached), and this Sandbox is done
// (closed, without a write-back: that happens when the sandbox ends).
func (sb *Sandbox) Detach() error {
	if sb.attached {
		return errors.New("detach: an attached sandbox belongs to another process")
	}
	if !sb.opMu.TryLock() {
		return fmt.Errorf("detach %s: %w: a pause or resume is under way", sb.name, ErrBusy)
	}
	defer sb.opMu.Unlock()
	sb.mu.Lock()
	status := sb.status
	sb.mu.Unlock()
	if status != StatusPaused {
		return fmt.Errorf("detach %s: the sandbox is %s; pause it first", sb.name, status)
	}
	if err := sb.writeDetached(); err != nil {
		return fmt.Errorf("detach %s: %w", sb.name, err)
	}
	sb.closeOnce.Do(func() {
		close(sb.stopMonitor)
		if sb.root != nil {
			sb.root.lease.Release()
		}
		sb.run.Release()
		sb.mu.Lock()
		sb.status = StatusClosed
		sb.mu.Unlock()
	})
	return nil
}

// writeDetached writes the record a later process rebuilds the paused
// sandbox from (Pause writes it too, so that the run survives this
// process's death as a paused sandbox).
func (sb *Sandbox) writeDetached() error {
	sb.mu.Lock()
	ram0 := sb.pausedRAM
	sb.mu.Unlock()
	cfg := sb.cfg.Config
	cfg.Logger, cfg.ImageProgress, cfg.backend = nil, nil, nil
	rec := detachedRecord{Version: detachedVersion, Config: cfg, Drives: sb.drives, RAM0: ram0,
		Kernel: sb.img.Kernel, Initrd: sb.img.Initrd, Paused: time.Now().UTC(), Restored: sb.restored}
	if sb.root != nil {
		rec.Lower = sb.root.lower
	}
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteBytes(sb.run.Path(runstate.DetachedFile), 0o600, b)
}

// DetachedInfo is a paused sandbox that no process holds.
type DetachedInfo struct {
	RunInfo
	Paused time.Time
}

// Detached lists the paused sandboxes of cfg's run directory that no
// process holds (Detach), oldest first. Only RunDir matters in cfg.
func Detached(cfg Config) ([]DetachedInfo, error) {
	if err := fillDirs(&cfg); err != nil {
		return nil, err
	}
	runs, err := runstate.List(cfg.RunDir)
	if err != nil {
		return nil, err
	}
	var out []DetachedInfo
	for _, r := range runs {
		if r.Live {
			continue
		}
		rec, err := readDetached(r.Dir)
		if err != nil {
			continue
		}
		out = append(out, DetachedInfo{
			RunInfo: RunInfo{Name: r.Name, Status: StatusPaused, Created: r.Created, Root: r.Root, CPUs: r.CPUs,
				MemoryMiB: r.MemoryMiB, Dirs: r.Dirs, Dir: r.Dir},
			Paused: rec.Paused,
		})
	}
	return out, nil
}

func readDetached(dir string) (detachedRecord, error) {
	var rec detachedRecord
	b, err := os.ReadFile(filepath.Join(dir, runstate.DetachedFile))
	if err != nil {
		return rec, err
	}
	if len(b) > 1<<20 {
		return rec, errors.New("detached record too large")
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, err
	}
	if rec.Version != detachedVersion {
		return rec, fmt.Errorf("detached record of version %d, not %d", rec.Version, detachedVersion)
	}
	return rec, nil
}

// adoptDetached rebuilds the Sandbox of a detached run directory, holding
// its lock, its template leased and its disks' plans made, without a VM.
// Its undos (release template, clean up, write back) are registered:
// Close ends the sandbox as Close of a started one would.
func adoptDetached(ctx context.Context, cfg Config, name string) (*Sandbox, detachedRecord, error) {
	var rec detachedRecord
	if err := fillDirs(&cfg); err != nil {
		return nil, rec, err
	}
	if !namePattern.MatchString(name) {
		return nil, rec, invalid("Name", name, "not a sandbox name")
	}
	dir := filepath.Join(cfg.RunDir, name)
	if _, err := os.Stat(filepath.Join(dir, runstate.DetachedFile)); err != nil {
		return nil, rec, fmt.Errorf("%w: no paused sandbox %s", ErrNotFound, name)
	}
	run, err := runstate.Adopt(cfg.RunDir, name)
	if err != nil {
		return nil, rec, err
	}
	// Read under the lock: another process may have resumed or ended it.
	rec, err = readDetached(dir)
	if err != nil {
		run.Release()
		if errors.Is(err, os.ErrNotExist) {
			return nil, rec, fmt.Errorf("%w: no paused sandbox %s", ErrNotFound, name)
		}
		return nil, rec, fmt.Errorf("paused sandbox %s: %w", name, err)
	}
	c := rec.Config
	c.Name, c.Logger = name, cfg.Logger
	c.CacheDir, c.StateDir, c.RunDir, c.DataDir = cfg.CacheDir, cfg.StateDir, cfg.RunDir, cfg.DataDir
	r, err := resolve(c)
	if err != nil {
		run.Release()
		return nil, rec, fmt.Errorf("paused sandbox %s: %w", name, err)
	}
	if err := defaultBackend(&r); err != nil {
		run.Release()
		return nil, rec, err
	}
	sb := newSandbox(r, image.Image{Kernel: rec.Kernel, Initrd: rec.Initrd})
	sb.run, sb.vmDir = run, run.Dir
	fail := func(err error) (*Sandbox, detachedRecord, error) {
		if sb.root != nil {
			sb.root.lease.Release()
		}
		run.Release()
		return nil, rec, err
	}
	if r.onTemplate() {
		undo, err := sb.leaseTemplate(ctx)
		if err != nil {
			return fail(fmt.Errorf("paused sandbox %s: %w", name, err))
		}
		if now := sb.root.lower; now != rec.Lower {
			_ = undo(ctx)
			sb.root = nil
			return fail(fmt.Errorf("paused sandbox %s: its template changed since it was paused (its disk is %s, was %s); the paused state is kept", name, now, rec.Lower))
		}
		sb.root.upper = filepath.Join(run.Dir, "root.img")
		sb.img.Kernel, sb.img.Initrd = rec.Kernel, rec.Initrd
		sb.life.push("release template", undo)
	}
	sb.life.push("clean up", sb.cleanUp)
	for i, spec := range r.dirs {
		p := &dirPlan{
			spec:       spec,
			dir:        run.Path(filepath.Join("dirs", strconv.Itoa(i))),
			lowerLabel: "mvm-dir-" + strconv.Itoa(i),
			upperLabel: "mvm-rw-" + strconv.Itoa(i),
		}
		p.lower = filepath.Join(p.dir, "lower.img")
		if spec.Mode == adddir.ReadWrite {
			p.upper = filepath.Join(p.dir, "upper.img")
		}
		sb.dirs = append(sb.dirs, p)
	}
	sb.life.push("write back", sb.writeBack)
	sb.drives = rec.Drives
	sb.pausedDir, sb.pausedRAM = run.Path("paused"), rec.RAM0
	return sb, rec, nil
}

// ResumeDetached resumes the paused sandbox called name that a process
// detached (Detach): this process becomes its owner. The sandbox's
// configuration is the one it was started with; only the directories,
// Logger and the accelerator's environment come from cfg. A resume that
// fails keeps the paused state for another try.
func ResumeDetached(ctx context.Context, cfg Config, name string) (*Sandbox, error) {
	sb, _, err := adoptDetached(ctx, cfg, name)
	if err != nil {
		return nil, err
	}
	release := func() {
		if sb.root != nil {
			sb.root.lease.Release()
		}
		sb.run.Release()
	}
	start := time.Now()
	// Until the guest answers, a death of this process must leave the
	// run to reclaim (which keeps its read-write changes), not a record
	// that offers its state again: once the guest ran, the disks moved on.
	record := sb.run.Path(runstate.DetachedFile)
	aside := record + ".resuming"
	if err := os.Rename(record, aside); err != nil {
		release()
		return nil, fmt.Errorf("resume %s: %w", name, err)
	}
	if err := sb.startResumed(ctx, sb.pausedDir, sb.pausedRAM); err != nil {
		if errors.Is(err, errStateKept) {
			_ = os.Rename(aside, record)
			release()
			return nil, &VMError{Op: "resume", Err: err}
		}
		// Spent: the sandbox ends here, its disks written back.
		os.Remove(aside)
		os.RemoveAll(sb.pausedDir)
		sb.pausedDir = ""
		sb.fail(&VMError{Op: "resume", Err: err})
		sb.mu.Lock()
		sb.status = StatusFailed
		sb.mu.Unlock()
		wbs, cerr := sb.Close(context.WithoutCancel(ctx))
		for _, wb := range wbs {
			if wb.Err != nil {
				cerr = errors.Join(cerr, wb.Err)
			}
		}
		return nil, errors.Join(&VMError{Op: "resume", Err: fmt.Errorf("%w; the sandbox was stopped and its read-write directories written back", err)}, cerr)
	}
	sb.life.record("resume", start, "")
	sb.life.push("stop vm", sb.stopVM)
	sb.life.push("disconnect", func(context.Context) error { return sb.agentClient().Close() })
	sb.life.push("shut down guest", sb.shutdownGuest)
	// From here the sandbox is this process's: the state it came from
	// is spent.
	os.Remove(aside)
	os.RemoveAll(sb.pausedDir)
	sb.pausedDir = ""
	sb.setStatus(StatusRunning)
	sb.monitor()
	return sb, nil
}

// CloseDetached ends the paused sandbox called name that a process
// detached, as Close ends a running one: its read-write directories are
// written back (as they were when it was paused) and its run directory is
// removed.
func CloseDetached(ctx context.Context, cfg Config, name string) ([]WriteBack, error) {
	sb, _, err := adoptDetached(ctx, cfg, name)
	if errors.Is(err, ErrNotFound) {
		return nil, err
	}
	if err != nil {
		// It cannot be rebuilt (a host directory, its template or QEMU
		// is gone): it ends as a crashed run does, its read-write
		// changes kept for `mvmctl recover`.
		if ferr := forgetDetached(ctx, cfg, name); ferr != nil {
			return nil, errors.Join(err, ferr)
		}
		return nil, fmt.Errorf("%w; its read-write changes are kept (mvmctl recover lists them)", err)
	}
	// From here it is an ordinary run being torn down: a write-back that
	// fails or is interrupted keeps its changes the usual way (staged/,
	// or the run left for reclaim to salvage), and nothing offers the
	// saved state again over disks the write-back may have repaired.
	os.Remove(sb.run.Path(runstate.DetachedFile))
	os.RemoveAll(sb.pausedDir)
	sb.pausedDir = ""
	// There is no VM to stop: the sandbox goes straight to its teardown.
	sb.mu.Lock()
	sb.status = StatusRunning
	sb.mu.Unlock()
	return sb.Close(ctx)
}

// forgetDetached turns the detached run called name into a leftover and
// reclaims it: its read-write directories go to staged/.
func forgetDetached(ctx context.Context, cfg Config, name string) error {
	if err := fillDirs(&cfg); err != nil {
		return err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	run, err := runstate.Adopt(cfg.RunDir, name)
	if err != nil {
		return err
	}
	os.Remove(run.Path(runstate.DetachedFile))
	os.RemoveAll(run.Path("paused"))
	run.Release()
	sb := newSandbox(resolved{Config: cfg}, image.Image{})
	_, err = runstate.ReclaimSalvaging(cfg.RunDir, sb.log, sb.salvage)
	return err
}
