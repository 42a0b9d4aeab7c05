package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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

// dirPlan is one --add-dir of a run: its images in the run directory and
// the drive serials the guest finds them by. Serials and image sizes
// depend only on the spec's position and the tree, so a run's drive
// layout is predictable.
type dirPlan struct {
	spec         adddir.Spec
	dir          string // run-private directory holding the images
	lower, upper string // image paths; upper only for read-write
	lowerID      string
	upperID      string
	stats        dirimage.Stats
}

// DirResult is what happened to a read-write directory after the run.
type DirResult struct {
	Spec  adddir.Spec
	Stats writeback.Stats
	// Err is why the write-back failed; the guest's changes are then in
	// Kept, for `mvmctl recover`.
	Err  error
	Kept string
}

func hasWritable(dirs []*dirPlan) bool {
	for _, d := range dirs {
		if d.spec.Mode == adddir.ReadWrite {
			return true
		}
	}
	return false
}

// prepareDirs builds the images of all specs, in parallel.
func prepareDirs(ctx context.Context, runDir string, specs []adddir.Spec) ([]*dirPlan, error) {
	plans := make([]*dirPlan, len(specs))
	errs := make([]error, len(specs))
	var wg sync.WaitGroup
	for i, spec := range specs {
		p := &dirPlan{
			spec:    spec,
			dir:     filepath.Join(runDir, "dirs", strconv.Itoa(i)),
			lowerID: "mvm-dir-" + strconv.Itoa(i),
			upperID: "mvm-rw-" + strconv.Itoa(i),
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
	for i, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("--add-dir %q: %w", specs[i].Raw, err)
		}
	}
	return plans, nil
}

func (p *dirPlan) build(ctx context.Context) error {
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	var err error
	if p.stats, err = dirimage.Build(ctx, p.spec.Host, p.lower, p.lowerID); err != nil {
		return err
	}
	if p.spec.Mode != adddir.ReadWrite {
		return nil
	}
	p.upper = filepath.Join(p.dir, "upper.img")
	if err := dirimage.Scratch(ctx, p.upper, dirimage.ScratchSize(p.stats), p.upperID); err != nil {
		return err
	}
	// Recorded before the VM starts: if mvmctl dies, the next run finds
	// it and keeps the guest's changes for `mvmctl recover`.
	return writeback.SavePending(p.dir, writeback.Pending{
		Host: p.spec.Host, Guest: p.spec.Guest, Lower: p.lower, Upper: p.upper, Created: time.Now().UTC(),
	})
}

func (p *dirPlan) drives() []backend.Drive {
	d := []backend.Drive{{ID: p.lowerID, Path: p.lower, ReadOnly: true}}
	if p.upper != "" {
		d = append(d, backend.Drive{ID: p.upperID, Path: p.upper})
	}
	return d
}

func mountAll(ctx context.Context, c *agentclient.Client, dirs []*dirPlan) error {
	for _, d := range dirs {
		m := agentclient.Mount{DeviceSerial: d.lowerID, Target: d.spec.Guest, ReadOnly: d.upper == ""}
		if d.upper != "" {
			m.UpperSerial = d.upperID
		}
		if err := c.Mount(ctx, m); err != nil {
			return fmt.Errorf("--add-dir %q: %w", d.spec.Raw, err)
		}
	}
	return nil
}

// writeBack applies every read-write directory's changes to the host,
// after the VM has stopped. A directory whose write-back fails keeps its
// data under StagedDir; if even that fails, Kept names its place in the
// run directory, which Run then leaves for the next run to salvage.
func (r *Runner) writeBack(ctx context.Context, dirs []*dirPlan, name string, log *slog.Logger) []DirResult {
	var out []DirResult
	for i, d := range dirs {
		if d.upper == "" {
			continue
		}
		res := DirResult{Spec: d.spec}
		pend, err := writeback.LoadPending(d.dir)
		if err != nil {
			pend = writeback.Pending{Host: d.spec.Host, Guest: d.spec.Guest, Lower: d.lower, Upper: d.upper}
		}
		res.Stats, res.Err = writeback.Commit(context.WithoutCancel(ctx), pend)
		if res.Err != nil {
			log.Debug("write-back failed", "dir", d.spec.Host, "err", res.Err)
			if r.StagedDir == "" {
				res.Err = errors.Join(res.Err, errors.New("no staging directory configured; the changes are lost"))
			} else if kept, serr := writeback.Stage(d.dir, filepath.Join(r.StagedDir, name+"-"+strconv.Itoa(i))); serr != nil {
				res.Err = errors.Join(res.Err, serr)
				res.Kept = d.dir
			} else {
				res.Kept = kept
				r.pruneStaged(log)
			}
		} else {
			log.Debug("written back", "dir", d.spec.Host, "stats", res.Stats.String())
		}
		out = append(out, res)
	}
	return out
}

// pruneStaged applies the caps on StagedDir, oldest first.
func (r *Runner) pruneStaged(log *slog.Logger) {
	dropped, err := writeback.PruneStaged(r.StagedDir, writeback.DefaultMaxStaged, writeback.DefaultMaxStagedBytes)
	for _, d := range dropped {
		log.Warn("dropped old kept changes: too many kept", "dir", d,
			"max", writeback.DefaultMaxStaged, "max_bytes", writeback.DefaultMaxStagedBytes)
	}
	if err != nil {
		log.Warn("pruning kept changes", "err", err)
	}
}

// salvage is runstate's hook for the leftovers of a run that died: any
// read-write directory it had is moved to StagedDir instead of being
// deleted with the run, and reported. An error keeps the run directory.
func (r *Runner) salvage(runDir string, log *slog.Logger) error {
	matches, _ := filepath.Glob(filepath.Join(runDir, "dirs", "*", writeback.PendingFile))
	var errs []error
	for _, m := range matches {
		src := filepath.Dir(m)
		p, err := writeback.LoadPending(src)
		if err != nil || r.StagedDir == "" {
			continue
		}
		dst := filepath.Join(r.StagedDir, filepath.Base(runDir)+"-"+filepath.Base(src))
		if _, err := writeback.Stage(src, dst); err != nil {
			log.Warn("could not keep the changes of a crashed run", "dir", p.Host, "err", err)
			errs = append(errs, err)
			continue
		}
		log.Warn("an earlier run ended without writing back its read-write directory; its changes are kept",
			"dir", p.Host, "kept", dst, "recover", "mvmctl recover "+dst)
		r.pruneStaged(log)
	}
	return errors.Join(errs...)
}
