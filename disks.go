package mvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/mvm-sh/mvm/internal/adddir"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/writeback"
)

// WriteBack is what happened to one read-write directory when its sandbox
// closed.
type WriteBack struct {
	Dir Dir
	// Written, Deleted, ... count what the write-back did.
	Stats WriteBackStats
	// Err is a *WriteBackError when the changes could not be written
	// back (they are then kept at Kept).
	Err  error
	Kept string
}

// WriteBackStats counts what a write-back did. Device nodes and sockets
// the guest made are never written back, and set-user-ID and set-group-ID
// bits are dropped: a guest cannot plant privilege on the host.
type WriteBackStats struct {
	Written, Deleted, Dirs, Links  int
	Bytes                          int64
	Devices, Sockets, SetIDDropped int
}

func (s WriteBackStats) String() string {
	return writeback.Stats{
		Written: s.Written, Deleted: s.Deleted, Dirs: s.Dirs, Links: s.Links, Bytes: s.Bytes,
		Devices: s.Devices, Sockets: s.Sockets, SetIDDropped: s.SetIDDropped,
	}.String()
}

// dirPlan is one shared directory of a sandbox: its images in the run
// directory and the labels the guest finds them by. Labels and image sizes
// depend only on the directory's position and its tree, so a sandbox's
// drive layout is predictable.
type dirPlan struct {
	spec         adddir.Spec
	dir          string // run-private directory holding the images
	lower, upper string // image paths; upper only for read-write
	lowerLabel   string
	upperLabel   string
	stats        dirimage.Stats
}

func hasWritable(dirs []*dirPlan) bool {
	for _, d := range dirs {
		if d.upper != "" {
			return true
		}
	}
	return false
}

// prepareDisks builds the images of every shared directory, in parallel.
// Its undo is the write-back, which runs once the VM has stopped.
func (sb *Sandbox) prepareDisks(ctx context.Context) (undoFunc, error) {
	if err := sb.prepareRoot(ctx); err != nil {
		return nil, fmt.Errorf("template root: %w", err)
	}
	specs := sb.cfg.dirs
	plans := make([]*dirPlan, len(specs))
	errs := make([]error, len(specs))
	var wg sync.WaitGroup
	for i, spec := range specs {
		p := &dirPlan{
			spec:       spec,
			dir:        sb.run.Path(filepath.Join("dirs", strconv.Itoa(i))),
			lowerLabel: "mvm-dir-" + strconv.Itoa(i),
			upperLabel: "mvm-rw-" + strconv.Itoa(i),
		}
		p.lower = filepath.Join(p.dir, "lower.img")
		plans[i] = p
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = p.build(ctx)
		}()
	}
	wg.Wait()
	sb.dirs = plans
	for i, err := range errs {
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("--add-dir %q: %w", specs[i].Raw, err)
		}
	}
	return sb.writeBack, nil
}

func (p *dirPlan) build(ctx context.Context) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	var err error
	if p.stats, err = dirimage.Build(ctx, p.spec.Host, p.lower, p.lowerLabel); err != nil {
		return err
	}
	if p.spec.Mode != adddir.ReadWrite {
		return nil
	}
	upper := filepath.Join(p.dir, "upper.img")
	if err := dirimage.Scratch(ctx, upper, dirimage.ScratchSize(p.stats), p.upperLabel); err != nil {
		return err
	}
	// Recorded before the VM starts: if mvmctl dies, the next run finds
	// it and keeps the guest's changes for `mvmctl recover`.
	if err := writeback.SavePending(p.dir, writeback.Pending{
		Host: p.spec.Host, Guest: p.spec.Guest, Lower: p.lower, Upper: upper, Created: time.Now().UTC(),
	}); err != nil {
		return err
	}
	p.upper = upper
	return nil
}

func (p *dirPlan) drives() []backend.Drive {
	d := []backend.Drive{{Label: p.lowerLabel, Path: p.lower, ReadOnly: true}}
	if p.upper != "" {
		d = append(d, backend.Drive{Label: p.upperLabel, Path: p.upper})
	}
	return d
}

func mountAll(ctx context.Context, c *agentclient.Client, dirs []*dirPlan) error {
	for _, d := range dirs {
		m := agentclient.Mount{Device: d.lowerLabel, Target: d.spec.Guest, ReadOnly: d.upper == ""}
		if d.upper != "" {
			m.Upper = d.upperLabel
		}
		if err := c.Mount(ctx, m); err != nil {
			return fmt.Errorf("--add-dir %q: %w", d.spec.Raw, err)
		}
	}
	return nil
}

// writeBack applies every read-write directory's changes to the host,
// after the VM has stopped. A directory whose write-back fails keeps its
// data under the state directory's staged/; if even that fails, Kept
// names its place in the run directory, which is then left for the next
// run to salvage. Cancelling ctx interrupts a write-back, whose changes
// are then kept the same way.
func (sb *Sandbox) writeBack(ctx context.Context) error {
	var out []WriteBack
	for i, d := range sb.dirs {
		if d.upper == "" {
			continue
		}
		wb := WriteBack{Dir: Dir{Host: d.spec.Host, Guest: d.spec.Guest, Writable: true}}
		pend, err := writeback.LoadPending(d.dir)
		if err != nil {
			pend = writeback.Pending{Host: d.spec.Host, Guest: d.spec.Guest, Lower: d.lower, Upper: d.upper}
		}
		st, err := writeback.Commit(ctx, pend)
		wb.Stats = WriteBackStats(st)
		if err != nil {
			sb.log.Debug("write-back failed", "dir", d.spec.Host, "err", err)
			werr := &WriteBackError{Host: d.spec.Host, Err: err}
			kept, serr := writeback.Stage(d.dir, filepath.Join(sb.stagedDir(), sb.name+"-"+strconv.Itoa(i)))
			if serr != nil {
				werr.Err = errors.Join(err, serr)
				kept = d.dir
				sb.mu.Lock()
				sb.keepRun = true
				sb.mu.Unlock()
			} else {
				sb.pruneStaged()
			}
			werr.Kept, wb.Kept = kept, kept
			wb.Err = werr
		} else {
			sb.log.Debug("written back", "dir", d.spec.Host, "stats", wb.Stats.String())
		}
		out = append(out, wb)
	}
	sb.mu.Lock()
	sb.writeBacks = out
	sb.mu.Unlock()
	return nil
}

func (sb *Sandbox) stagedDir() string { return filepath.Join(sb.cfg.StateDir, "staged") }

// pruneStaged applies the caps on staged/, oldest first.
func (sb *Sandbox) pruneStaged() {
	dropped, err := writeback.PruneStaged(sb.stagedDir(), writeback.DefaultMaxStaged, writeback.DefaultMaxStagedBytes)
	for _, d := range dropped {
		sb.log.Warn("dropped old kept changes: too many kept", "dir", d,
			"max", writeback.DefaultMaxStaged, "max_bytes", writeback.DefaultMaxStagedBytes)
	}
	if err != nil {
		sb.log.Warn("pruning kept changes", "err", err)
	}
}

// salvage is runstate's hook for the leftovers of a run that died: any
// read-write directory it had is moved to staged/ instead of being deleted
// with the run, and reported. An error keeps the run directory.
func (sb *Sandbox) salvage(runDir string) error {
	matches, _ := filepath.Glob(filepath.Join(runDir, "dirs", "*", writeback.PendingFile))
	var errs []error
	for _, m := range matches {
		src := filepath.Dir(m)
		p, err := writeback.LoadPending(src)
		if err != nil {
			continue
		}
		dst := filepath.Join(sb.stagedDir(), filepath.Base(runDir)+"-"+filepath.Base(src))
		if _, err := writeback.Stage(src, dst); err != nil {
			sb.log.Warn("could not keep the changes of a crashed run", "dir", p.Host, "err", err)
			errs = append(errs, err)
			continue
		}
		sb.log.Warn("an earlier run ended without writing back its read-write directory; its changes are kept",
			"dir", p.Host, "kept", dst, "recover", "mvmctl recover "+dst)
		sb.pruneStaged()
	}
	return errors.Join(errs...)
}
