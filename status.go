package mvm

import (
	"slices"
	"time"

	"github.com/mvm-sh/mvm/internal/runstate"
)

// Status is where a sandbox is in its life. It moves only forward, along
// the transitions below, and each move is written to the sandbox's record
// in its run directory, where other processes find it (see Running).
type Status string

// Statuses.
const (
	// StatusStarting: Start is running its steps.
	StatusStarting Status = "starting"
	// StatusRunning: the agent answers; commands can be run.
	StatusRunning Status = "running"
	// StatusFailed: the VM or its agent died (Err says how); commands
	// fail, and Close still tears down what is left. The console log of
	// a sandbox that failed is kept.
	StatusFailed Status = "failed"
	// StatusPaused: Pause saved it to disk and ended its VMM; Resume
	// brings it back where it was. Commands are refused meanwhile.
	StatusPaused Status = "paused"
	// StatusClosing: Close (or a failed Start) is tearing it down.
	StatusClosing Status = "closing"
	// StatusClosed: nothing is left of it.
	StatusClosed Status = "closed"
)

// transitions is every move a status may make.
var transitions = map[Status][]Status{
	StatusStarting: {StatusRunning, StatusFailed, StatusClosing},
	StatusRunning:  {StatusFailed, StatusClosing, StatusPaused},
	StatusPaused:   {StatusRunning, StatusFailed, StatusClosing},
	StatusFailed:   {StatusClosing},
	StatusClosing:  {StatusClosed},
}

// Status is the sandbox's status now.
func (sb *Sandbox) Status() Status {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return sb.status
}

// setStatus moves the sandbox to status to, when the table allows it from
// where it is, and reports whether it did. A sandbox that fails while it
// is already closing stays closing, but is still known to have failed.
func (sb *Sandbox) setStatus(to Status) bool {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if to == StatusFailed {
		sb.everFailed = true
	}
	if !slices.Contains(transitions[sb.status], to) {
		return false
	}
	sb.status = to
	if sb.run != nil && to != StatusClosed {
		rec := runstate.Record{Status: string(to), Root: sb.cfg.rootName(), CPUs: sb.cfg.CPUs, MemoryMiB: sb.cfg.memMiB, Dirs: len(sb.cfg.dirs), Restored: sb.restored}
		if sb.m != nil {
			rec.VMM = sb.m.PID()
		}
		if err := sb.run.Save(rec); err != nil {
			sb.log.Debug("save the run's record", "err", err)
		}
	}
	return true
}

// closingOrClosed reports whether the sandbox takes no more commands.
func (sb *Sandbox) closingOrClosed() bool {
	s := sb.Status()
	return s == StatusClosing || s == StatusClosed
}

// RunInfo is a sandbox found in the run directory (see Running).
type RunInfo struct {
	Name   string
	Status Status
	// Owner is the process that runs the sandbox, VMM its VMM.
	Owner, VMM int
	Created    time.Time
	// Root is the template or image reference ("" for the default image).
	Root      string
	CPUs      int
	MemoryMiB uint64
	Dirs      int
	Restored  bool
	// Dir is its run directory.
	Dir string
}

// Running lists the sandboxes of cfg's run directory whose process is
// alive, oldest first: those of every program of this user (mvmctl exec,
// SDK programs), since they share the directory. Only RunDir matters in
// cfg.
func Running(cfg Config) ([]RunInfo, error) {
	if err := fillDirs(&cfg); err != nil {
		return nil, err
	}
	runs, err := runstate.List(cfg.RunDir)
	if err != nil {
		return nil, err
	}
	var out []RunInfo
	for _, l := range runs {
		if !l.Live {
			continue
		}
		st := Status(l.Status)
		if st == "" {
			st = StatusStarting
		}
		out = append(out, RunInfo{
			Name: l.Name, Status: st, Owner: l.Owner, VMM: l.VMM, Created: l.Created,
			Root: l.Root, CPUs: l.CPUs, MemoryMiB: l.MemoryMiB, Dirs: l.Dirs, Restored: l.Restored, Dir: l.Dir,
		})
	}
	return out, nil
}
