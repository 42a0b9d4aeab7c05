package mvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/lockfile"
	"github.com/mvm-sh/mvm/internal/snapshot"
	"github.com/mvm-sh/mvm/internal/template"
	"github.com/mvm-sh/mvm/internal/units"
)

// A run that boots because its configuration has no snapshot (none was
// made, or it was discarded: damaged, or made by a QEMU, kernel or agent
// no longer installed) says so (Result.MissingSnapshot,
// Sandbox.MissingSnapshot), and HealSnapshot makes the one it lacked. mvmctl
// does that after the run, in a detached, niced process of its own, so the
// next identical run restores; an SDK program decides for itself. The
// snapshots of all stores together are kept within a disk budget
// (SnapshotBudget): the ones restored longest ago go first.

// ErrSnapshotExists is HealSnapshot's answer when the configuration has
// a snapshot already (another process made it meanwhile).
var ErrSnapshotExists = errors.New("the snapshot exists")

// DefaultSnapshotBudget is the disk space all snapshots together may take
// unless MVM_SNAPSHOT_BUDGET says otherwise: a default image's snapshot
// takes about 60 MiB, a template's up to a few hundred.
const DefaultSnapshotBudget = 2 << 30

// SnapshotBudget is the disk space all snapshots together may take:
// MVM_SNAPSHOT_BUDGET (a size such as 4G or 500M; 0 for no limit), or
// DefaultSnapshotBudget.
func SnapshotBudget() (int64, error) {
	v := strings.TrimSpace(os.Getenv("MVM_SNAPSHOT_BUDGET"))
	switch v {
	case "":
		return DefaultSnapshotBudget, nil
	case "0":
		return 0, nil
	}
	mib, err := units.ParseMemory(v)
	if err != nil {
		return 0, fmt.Errorf("MVM_SNAPSHOT_BUDGET: %w", err)
	}
	return int64(mib) << 20, nil
}

// MissingSnapshot reports whether this sandbox booted because its
// configuration has no snapshot that could be restored, with the
// configuration HealSnapshot takes to make it. It is false for a sandbox
// that restored, that was told not to (NoSnapshot), or whose
// configuration cannot be snapshotted (a network, more shared
// directories than the snapshot's slots).
func (sb *Sandbox) MissingSnapshot() (Config, bool) {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if !sb.healWanted || sb.hello == nil {
		return Config{}, false
	}
	c := sb.cfg.Config
	heal := Config{
		CPUs: c.CPUs, Memory: c.Memory, Accel: c.Accel, Kernel: c.Kernel, KernelArgs: c.KernelArgs,
		Template: c.Template, Image: c.Image, RootDigest: c.RootDigest, RootSpace: c.RootSpace,
		CacheDir: c.CacheDir, StateDir: c.StateDir, RunDir: c.RunDir, DataDir: c.DataDir,
	}
	if c.RootDir != "" && sb.root != nil {
		// The directory may be gone by the time the snapshot is made
		// (a container's root, unmounted at its delete); its tree is
		// in the cache.
		heal.RootDigest = sb.root.lease.Template.Digest
	}
	return heal, true
}

// HealSnapshot makes the snapshot cfg's machine configuration lacks, as
// PrepareSnapshot does (a fresh VM, nothing of any run in it), unless the
// configuration has one already (ErrSnapshotExists) or another process is
// making it (ErrBusy): one at a time per configuration, under a lock
// taken without waiting. It then keeps the stores within SnapshotBudget
// and appends what it did to the log in the cache directory
// (snapshots/heal.log).
func HealSnapshot(ctx context.Context, cfg Config) (SnapshotInfo, error) {
	info, err := healSnapshot(ctx, cfg)
	switch {
	case err == nil:
		logHeal(cfg, fmt.Sprintf("made %s (%s, %d MiB) in %s", info.Dir, describeMachine(cfg), info.Size>>20, info.Took.Round(time.Millisecond)))
	case errors.Is(err, ErrSnapshotExists), errors.Is(err, ErrBusy):
	default:
		logHeal(cfg, fmt.Sprintf("failed for %s: %v", describeMachine(cfg), err))
	}
	return info, err
}

func healSnapshot(ctx context.Context, cfg Config) (SnapshotInfo, error) {
	budget, err := SnapshotBudget()
	if err != nil {
		return SnapshotInfo{}, err
	}
	sb, err := prepare(cfg)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if sb.cfg.onTemplate() {
		// The template's lease is what gives the sandbox its snapshot
		// store (the plan's template step takes it).
		release, err := sb.leaseTemplate(ctx)
		if err != nil {
			return SnapshotInfo{}, err
		}
		defer release(ctx)
	}
	key, err := sb.snapshotKey(ctx)
	if err != nil {
		return SnapshotInfo{}, err
	}
	st := sb.snapshotStore()
	if err := os.MkdirAll(st.Root, 0o755); err != nil {
		return SnapshotInfo{}, err
	}
	l, err := lockfile.Take(filepath.Join(st.Root, "."+filepath.Base(st.Dir(key))+".heal"), unix.LOCK_EX|unix.LOCK_NB, true)
	if errors.Is(err, lockfile.ErrWouldBlock) {
		return SnapshotInfo{}, fmt.Errorf("%w: another process is making this snapshot", ErrBusy)
	}
	if err != nil {
		return SnapshotInfo{}, err
	}
	defer l.Release()
	failed := filepath.Join(st.Root, "."+filepath.Base(st.Dir(key))+".heal-failed")
	if fi, err := os.Stat(failed); err == nil && time.Since(fi.ModTime()) < healRetry {
		// Every cold run of a configuration whose save fails (a full
		// disk) would otherwise boot a second VM to fail again.
		return SnapshotInfo{}, fmt.Errorf("%w: making this snapshot failed %s ago; the next try is after %s", ErrBusy, time.Since(fi.ModTime()).Round(time.Second), healRetry)
	}
	if unlock, err := st.Lock(); err == nil {
		_, err = st.Find(key)
		unlock()
		if err == nil {
			return SnapshotInfo{}, ErrSnapshotExists
		}
	}
	info, err := PrepareSnapshot(ctx, cfg)
	if err != nil {
		if f, ferr := os.OpenFile(failed, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o644); ferr == nil {
			f.Close()
		}
		return SnapshotInfo{}, err
	}
	_ = os.Remove(failed)
	// What no run can restore any more (another QEMU, kernel or agent
	// build) goes from every store, not only this one's.
	for _, other := range snapshotStores(cfg) {
		if other.Root != st.Root {
			other.PruneStale(key)
		}
	}
	if budget > 0 {
		pruneSnapshots(cfg, budget, info.Dir)
	}
	return info, nil
}

// healRetry is how long after a failed heal of a configuration the next
// is not tried.
const healRetry = 10 * time.Minute

// snapshotStores are every store of snapshots under cfg's directories:
// the default image's, and one per template revision.
func snapshotStores(cfg Config) []snapshot.Store {
	r := cfg
	if err := fillDirs(&r); err != nil {
		return nil
	}
	stores := []snapshot.Store{{Root: filepath.Join(r.CacheDir, "snapshots")}}
	ts, err := template.Open(r.DataDir, r.CacheDir)
	if err != nil {
		return stores
	}
	revs, _ := os.ReadDir(filepath.Join(ts.CacheDir(), "snapshots"))
	for _, e := range revs {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			stores = append(stores, snapshot.Store{Root: filepath.Join(ts.CacheDir(), "snapshots", e.Name())})
		}
	}
	return stores
}

// SnapshotUsage lists every snapshot under cfg's directories (the default
// image's and the templates'), least recently used first.
func SnapshotUsage(cfg Config) []snapshot.Usage {
	var all []snapshot.Usage
	for _, st := range snapshotStores(cfg) {
		us, _ := st.List()
		all = append(all, us...)
	}
	slices.SortFunc(all, func(a, b snapshot.Usage) int { return a.LastUsed.Compare(b.LastUsed) })
	return all
}

// pruneSnapshots removes the least recently used snapshots until all of
// them fit in budget, never keep (the one just made) and never one a run
// is restoring at this moment.
func pruneSnapshots(cfg Config, budget int64, keep string) {
	all := SnapshotUsage(cfg)
	var total int64
	for _, u := range all {
		total += u.Size
	}
	for _, u := range all {
		if total <= budget {
			return
		}
		if u.Dir == keep {
			continue
		}
		if ok, err := u.Remove(); ok && err == nil {
			total -= u.Size
			logHeal(cfg, fmt.Sprintf("pruned %s (%d MiB, last used %s) to keep the snapshots within %d MiB", u.Dir, u.Size>>20, u.LastUsed.Format(time.RFC3339), budget>>20))
		}
	}
}

// describeMachine names a configuration in the heal log.
func describeMachine(cfg Config) string {
	what := "the default image"
	switch {
	case cfg.Template != "":
		what = "template " + cfg.Template
	case cfg.Image != "":
		what = "image " + cfg.Image
	case cfg.RootDir != "":
		what = "root directory " + cfg.RootDir
	case cfg.RootDigest != "":
		what = "tree " + cfg.RootDigest
	}
	cpus := cfg.CPUs
	if cpus == 0 {
		cpus = DefaultCPUs
	}
	mem := cfg.Memory
	if mem == 0 {
		mem = DefaultMemory
	}
	return what + ", " + strconv.Itoa(cpus) + " vCPUs, " + strconv.FormatInt(mem>>20, 10) + " MiB"
}

// healLogMax bounds the heal log: past it, the log starts over (the
// previous one is kept as heal.log.1).
const healLogMax = 256 << 10

// HealLog is the log HealSnapshot appends to.
func HealLog(cfg Config) string {
	r := cfg
	if err := fillDirs(&r); err != nil {
		return ""
	}
	return filepath.Join(r.CacheDir, "snapshots", "heal.log")
}

func logHeal(cfg Config, line string) {
	p := HealLog(cfg)
	if p == "" {
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return
	}
	if fi, err := os.Stat(p); err == nil && fi.Size() > healLogMax {
		_ = os.Rename(p, p+".1")
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s %s\n", time.Now().Format(time.RFC3339), line)
}
