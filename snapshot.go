package mvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/devices"
	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/diskusage"
	"github.com/mvm-sh/mvm/internal/snapshot"
)

// A run restores a snapshot (internal/snapshot) instead of booting when
// one was saved for its exact configuration; this file decides which one
// and makes them. A snapshot is taken with devices.SnapshotDirSlots
// directory slots, each a read-only drive and a writable one, so that
// runs with that many shared directories restore too.

// SnapshotInfo describes a saved snapshot.
type SnapshotInfo struct {
	// Dir holds its files.
	Dir string
	// Size is what it takes on disk (the RAM file is sparse).
	Size int64
	// Took is how long booting and saving took.
	Took time.Duration
}

// snapshotStore holds the snapshots of the default image, or of the
// sandbox's template (which the template store removes with it).
func (sb *Sandbox) snapshotStore() snapshot.Store {
	if sb.root != nil {
		return snapshot.Store{Root: sb.root.snapshots}
	}
	return snapshot.Store{Root: filepath.Join(sb.cfg.CacheDir, "snapshots")}
}

// snapshotKey is the key of the sandbox's machine: the VMM build, the
// kernel and initramfs, the template's disk, the shape and the slots.
func (sb *Sandbox) snapshotKey(ctx context.Context) (string, error) {
	sn, ok := sb.cfg.backend.(backend.Snapshotter)
	if !ok {
		return "", errors.New("the backend cannot restore snapshots")
	}
	vmm, err := sn.SnapshotKey(ctx)
	if err != nil {
		return "", err
	}
	p := snapshot.KeyParts{
		VMM: vmm, Kernel: sb.img.Kernel, Initrd: sb.img.Initrd, Args: sb.cfg.KernelArgs,
		CPUs: sb.cfg.CPUs, MemoryMiB: sb.cfg.memMiB, Accel: string(sb.cfg.accel.Kind), Slots: devices.SnapshotDirSlots,
	}
	if sb.root != nil {
		t := sb.root.lease.Template
		p.Template = t.Revision + " " + t.Digest + " " + t.Rootfs.Digest
		p.Root = sb.rootLayerSize()
	}
	return snapshot.Key(p)
}

// snapshotFix is the command that (re)makes this sandbox's snapshot.
func (sb *Sandbox) snapshotFix() string {
	fix := "mvmctl template snapshot"
	switch {
	case sb.root == nil:
		fix = "mvmctl bootstrap"
	case sb.cfg.Template != "":
		fix += " " + sb.cfg.Template
	}
	if sb.cfg.CPUs != DefaultCPUs || sb.cfg.memMiB != DefaultMemory>>20 {
		fix += fmt.Sprintf(" --cpus %d --memory %dM", sb.cfg.CPUs, sb.cfg.memMiB)
	}
	return fix
}

// snapshot returns the snapshot this sandbox can restore, with its store
// locked until unlock (see snapshot.Store.Lock), or nil and why it boots
// instead.
func (sb *Sandbox) snapshot(ctx context.Context) (c *snapshot.Checked, unlock func(), why string) {
	if sb.cfg.NoSnapshot {
		return nil, nil, "snapshots are off for this run"
	}
	if ok, why := sb.cfg.devices().Snapshottable(); !ok {
		return nil, nil, why
	}
	key, err := sb.snapshotKey(ctx)
	if err != nil {
		return nil, nil, err.Error()
	}
	st := sb.snapshotStore()
	unlock, err = st.Lock()
	if errors.Is(err, os.ErrNotExist) {
		err = snapshot.ErrNone
	} else if err == nil {
		if c, err = st.Find(key); err != nil {
			unlock()
		}
	}
	switch {
	case errors.Is(err, snapshot.ErrNone):
		sb.healWanted = true
		return nil, nil, err.Error() + " (" + sb.snapshotFix() + " makes one)"
	case errors.Is(err, snapshot.ErrCorrupt):
		sb.discard(c, "is damaged", err)
		return nil, nil, "its snapshot was damaged"
	case err != nil:
		return nil, nil, err.Error()
	}
	return c, unlock, ""
}

// restore starts the machine from the snapshot, with the run's disks in
// the snapshot's drive slots.
func (sb *Sandbox) restore(ctx context.Context, c *snapshot.Checked) (backend.Machine, error) {
	mounted := false
	if saved := c.Root(); saved != "" && sb.root != nil {
		// The saved guest has the root mounted: the run's writable
		// layer is a copy of the one it had (coldBoot makes a fresh
		// one again, should the restore fail).
		if err := snapshot.CopyRoot(saved, sb.root.upper); err != nil {
			return nil, err
		}
		sb.upperCopied, mounted = true, true
	}
	drives, err := slotDrives(sb.root, sb.dirs, c.Placeholder(), sb.vmDir, 0)
	if err != nil {
		return nil, err
	}
	m, err := sb.cfg.backend.Start(ctx, sb.machineConfig(drives, &backend.Snapshot{Dir: c.Dir, Restore: true, BeforeResume: c.CheckBeforeResume}))
	if err != nil {
		return nil, err
	}
	sb.restored, sb.snap, sb.drives = true, c, drives
	sb.rootMounted = mounted
	return m, nil
}

// slotDrives is the drive layout of a snapshotted machine: on a template,
// its disk and the root's writable layer; then for each of the
// devices.SnapshotDirSlots directory slots, a read-only drive and a
// writable one. Slots the run does not use hold placeholders: the shared
// read-only one of the snapshot, and a file of the run's for writable
// ones (never shared: the guest could write it), rwSize bytes long.
//
// When the snapshot is taken rwSize is snapshot.PlaceholderSize, which is
// what the guest learns; at a restore it is 0. The restored guest still
// believes the slot holds a TiB, but QEMU checks every request against
// the image's real size and fails what lies beyond it (EIO in the guest):
// an empty file is a slot the guest can neither read nor write, where a
// sparse TiB would let it allocate a TiB of the host's disk.
func slotDrives(root *rootPlan, dirs []*dirPlan, roPlaceholder, runDir string, rwSize int64) ([]backend.Drive, error) {
	var drives []backend.Drive
	if root != nil {
		upper := backend.Drive{Label: rootLabel, Path: root.upper}
		if upper.Path == "" {
			upper = backend.Drive{Path: filepath.Join(runDir, "slot-root.img")}
			if err := snapshot.SparseFile(upper.Path, rwSize); err != nil {
				return nil, err
			}
		}
		drives = append(drives, backend.Drive{Label: root.lowerLabel, Path: root.lower, ReadOnly: true}, upper)
	}
	for i := range devices.SnapshotDirSlots {
		ro := backend.Drive{Path: roPlaceholder, ReadOnly: true}
		rw := backend.Drive{}
		if i < len(dirs) {
			d := dirs[i]
			ro = backend.Drive{Label: d.lowerLabel, Path: d.lower, ReadOnly: true}
			if d.upper != "" {
				rw = backend.Drive{Label: d.upperLabel, Path: d.upper}
			}
		}
		if rw.Path == "" {
			p := filepath.Join(runDir, "slot-"+strconv.Itoa(i)+".img")
			if err := snapshot.SparseFile(p, rwSize); err != nil {
				return nil, err
			}
			rw.Path = p
		}
		drives = append(drives, ro, rw)
	}
	return drives, nil
}

// snapshotPlan is how PrepareSnapshot makes one: the start plan, with a
// snapshot directory instead of a run, no disks of its own (the slots
// get placeholders), and a save instead of the mounts.
func (sb *Sandbox) snapshotPlan() plan {
	return sb.startPlan().
		without("reclaim", "prepare disks", "network", "mount").
		replace("prepare run", step{"prepare snapshot", "clean up", sb.beginSnapshot}).
		replace("start vm", step{"start vm", "stop vm", sb.bootForSnapshot}).
		replace("agent ready", step{"agent ready", "", sb.quiesce}, step{"save", "", sb.save})
}

// PrepareSnapshot boots cfg's image to an idle guest agent and saves it,
// so that later sandboxes with a matching Config (same image, vCPUs,
// memory, accelerator, kernel arguments, and at most
// devices.SnapshotDirSlots shared directories) restore it instead of
// booting. It replaces the snapshot for that configuration, atomically:
// runs restoring the old one are not disturbed. Only Config's machine
// fields matter; Dirs must be empty.
func PrepareSnapshot(ctx context.Context, cfg Config) (SnapshotInfo, error) {
	start := time.Now()
	if len(cfg.Dirs) > 0 {
		return SnapshotInfo{}, invalid("Dirs", "", "a snapshot is taken without shared directories; runs add theirs")
	}
	if cfg.Network != nil || cfg.TAP != nil {
		return SnapshotInfo{}, invalid("Network", "", "a snapshot is taken without a network card (runs with one boot)")
	}
	sb, err := prepare(cfg)
	if err != nil {
		return SnapshotInfo{}, err
	}
	sb.name = "snapshot"
	err = sb.runPlan(ctx, sb.snapshotPlan())
	_ = sb.life.unwind(context.WithoutCancel(ctx))
	if err != nil {
		return SnapshotInfo{}, err
	}
	return SnapshotInfo{Dir: sb.savedDir, Size: diskusage.Of(sb.savedDir), Took: time.Since(start)}, nil
}

// beginSnapshot is the "prepare snapshot" step: a private directory in the
// store that becomes the snapshot once saved. The machine's own files
// (console log, writable placeholders) live inside it and are dropped.
func (sb *Sandbox) beginSnapshot(ctx context.Context) (undoFunc, error) {
	key, err := sb.snapshotKey(ctx)
	if err != nil {
		return nil, err
	}
	sv, err := sb.snapshotStore().Begin(key)
	if err != nil {
		return nil, err
	}
	sb.saving, sb.vmDir = sv, sv.RunDir
	return func(context.Context) error { sv.Close(); return nil }, nil
}

// bootForSnapshot boots the machine with every slot a placeholder of
// snapshot.PlaceholderSize (the template's disk in its own), as the guest
// must learn them.
func (sb *Sandbox) bootForSnapshot(ctx context.Context) (undoFunc, error) {
	if sb.root != nil {
		// A template's root is mounted before the save, on a layer
		// the snapshot keeps: a restored run starts with its root.
		sb.root.upper = sb.saving.Root()
		if err := dirimage.Scratch(ctx, sb.root.upper, sb.rootLayerSize(), rootLabel); err != nil {
			return nil, err
		}
	}
	drives, err := slotDrives(sb.root, nil, sb.saving.Placeholder(), sb.vmDir, snapshot.PlaceholderSize)
	if err != nil {
		return nil, err
	}
	m, err := sb.cfg.backend.Start(ctx, sb.machineConfig(drives, &backend.Snapshot{Dir: sb.saving.Dir}))
	if err != nil {
		return nil, fmt.Errorf("boot for a snapshot: %w", err)
	}
	sb.m = m
	return sb.stopVM, nil
}

// quiesce waits for the freshly booted agent, warms it up with one
// command (so the restored guest has its code paths translated and
// cached), and leaves it idle: no stream open, nothing in flight.
func (sb *Sandbox) quiesce(ctx context.Context) (undoFunc, error) {
	m := sb.m
	conn, err := m.DialAgent(ctx)
	if err != nil {
		return nil, err
	}
	c, err := agentclient.Dial(conn)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	hctx, cancel := context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	h, err := c.Hello(hctx)
	if err != nil {
		select {
		case <-m.Done():
			return nil, fmt.Errorf("boot for a snapshot: %w", vmEnded(m))
		case <-time.After(100 * time.Millisecond):
		}
		return nil, fmt.Errorf("boot for a snapshot: %w", err)
	}
	if !h.Has(agentproto.CapSnapshot) {
		return nil, fmt.Errorf("the guest agent (%s) cannot be snapshotted", h.AgentVersion)
	}
	p, err := c.Exec(hctx, agentclient.ExecSpec{Argv: []string{"true"}})
	if err != nil {
		return nil, err
	}
	if st, err := p.Wait(hctx); err != nil || st.Code != 0 {
		return nil, fmt.Errorf("warm-up command: %+v %v", st, err)
	}
	if r := sb.root; r != nil {
		// After the warm-up, which runs in the agent's own root: the
		// template's image need not have a `true`.
		if !h.Has(agentproto.CapRoot) {
			return nil, fmt.Errorf("the guest agent (%s) cannot run commands in a template", h.AgentVersion)
		}
		if err := c.Root(hctx, agentclient.Root{Template: r.lowerLabel, Upper: rootLabel}); err != nil {
			return nil, fmt.Errorf("template root: %w", err)
		}
		// Its two drives stay mounted: every restore gives them back
		// as saved (the template's disk, a copy of the layer).
		return nil, c.QuiesceKeepingDrives(hctx)
	}
	return nil, c.Quiesce(hctx)
}

// save saves the idle machine and puts the snapshot in place.
func (sb *Sandbox) save(ctx context.Context) (undoFunc, error) {
	saver, ok := sb.m.(backend.SnapshotSaver)
	if !ok {
		return nil, errors.New("the backend cannot save snapshots")
	}
	if err := saver.SaveSnapshot(ctx); err != nil {
		return nil, err
	}
	dir, err := sb.saving.Commit(snapshot.Meta{CPUs: sb.cfg.CPUs, MemoryMiB: sb.cfg.memMiB, Accel: string(sb.cfg.accel.Kind)})
	if err != nil {
		return nil, err
	}
	sb.savedDir = dir
	return nil, nil
}

// SnapshotFor returns the snapshot a sandbox with cfg would restore, or
// why it would boot instead (no snapshot, a stale one for another QEMU,
// kernel or machine). It starts nothing.
func SnapshotFor(ctx context.Context, cfg Config) (string, error) {
	sb, err := prepare(cfg)
	if err != nil {
		return "", err
	}
	var dir string
	find := func(ctx context.Context) (undoFunc, error) {
		c, unlock, why := sb.snapshot(ctx)
		if c == nil {
			return nil, errors.New(why)
		}
		unlock()
		dir = c.Dir
		return nil, nil
	}
	p := sb.startPlan().
		without("reclaim", "prepare disks", "network", "start vm", "agent ready", "mount").
		replace("prepare run", step{"find snapshot", "", find})
	err = sb.runPlan(ctx, p)
	_ = sb.life.unwind(context.WithoutCancel(ctx))
	return dir, err
}
