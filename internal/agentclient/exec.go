package agentclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/mux"
)

// ExecSpec describes a command to run in the guest.
type ExecSpec struct {
	// Argv is the command; Argv[0] is looked up in the guest's PATH.
	Argv []string
	// Env is the complete environment as NAME=VALUE pairs in order; later
	// entries win. The agent adds PATH and HOME when absent.
	Env []EnvVar
	// Dir is the working directory ("" means /); created when missing.
	Dir string
	// Stdin, when non-nil, is copied to the command's stdin until EOF.
	// When nil the command reads /dev/null.
	Stdin io.Reader
	// Stdout and Stderr receive the command's output as it arrives; nil
	// discards it.
	Stdout, Stderr io.Writer
	// OnOutputError is called (once per stream) when writing to Stdout or
	// Stderr fails; output for that stream is dropped from then on. The
	// caller decides what the guest should make of it (e.g. SIGPIPE).
	OnOutputError func(s Stream, err error)
	// Timeout is enforced by the agent; 0 means none.
	Timeout time.Duration
	// KillGrace is the SIGTERM-to-SIGKILL grace on timeout; 0 kills at
	// once.
	KillGrace time.Duration
	// User runs the command as another user, docker-style ("uid",
	// "uid:gid", "name", "name:group"...), resolved in the command
	// root's /etc/passwd and /etc/group; "" is root. It needs
	// agentproto.CapExecUser: an agent without it ignores the field and
	// runs the command as root.
	User string
	// Cgroup starts the command in that guest cgroup (agentproto.CapCgroup).
	Cgroup string
	// Root runs the command in that directory as its root
	// (agentproto.CapExecRoot).
	Root string
	// CgroupLimits are written to Cgroup before the command starts.
	CgroupLimits *agentpb.CgroupLimits
	// TTY, when set, runs the command on a pseudo-terminal of this size:
	// the terminal is its stdin, stdout and stderr, everything it writes
	// arrives on Stdout (Stderr gets nothing), and Stdin is typed into
	// the terminal byte for byte (0x03 interrupts the foreground job as
	// Ctrl-C does; the end of Stdin only stops input, see agent.proto).
	// Resize changes the size. It needs agentproto.CapExecTTY: an agent
	// without it ignores the field and runs the command on pipes.
	TTY *TTY
}

// TTY is a terminal's size: rows and columns, and optionally pixels.
type TTY struct {
	Rows, Cols       uint16
	XPixels, YPixels uint16
}

// EnvVar is one environment variable.
type EnvVar = envvar.Var

// Stream names one of a command's output streams.
type Stream int

// The output streams.
const (
	Stdout Stream = 1
	Stderr Stream = 2
)

func (s Stream) String() string {
	switch s {
	case Stdout:
		return "stdout"
	case Stderr:
		return "stderr"
	}
	return "stream " + strconv.Itoa(int(s))
}

// ExitStatus is how a command ended.
type ExitStatus struct {
	// Code is the exit status when the command exited normally.
	Code int
	// Signal is the signal that killed the command, or 0.
	Signal syscall.Signal
	// TimedOut: the agent killed the command at ExecSpec.Timeout.
	TimedOut bool
	// StartFailure is set when the command never ran.
	StartFailure *StartFailure
	// Duration is the command's run time measured in the guest.
	Duration time.Duration
}

// StartFailure says why a command did not start.
type StartFailure struct {
	Reason  StartReason
	Errno   syscall.Errno
	Message string
}

// StartReason classifies a start failure.
type StartReason int

// Start failure reasons (agent.proto's StartFailure.Reason).
const (
	StartOther         StartReason = iota
	StartNotFound                  // argv[0] was not found
	StartNotExecutable             // argv[0] exists but cannot be executed
	StartCwd                       // the working directory is unusable
	StartInvalid                   // the request itself is invalid
	StartUser                      // ExecSpec.User names no user or group of the root
)

func startReason(r agentpb.StartFailure_Reason) StartReason {
	switch r {
	case agentpb.StartFailure_REASON_NOT_FOUND:
		return StartNotFound
	case agentpb.StartFailure_REASON_NOT_EXECUTABLE:
		return StartNotExecutable
	case agentpb.StartFailure_REASON_CWD:
		return StartCwd
	case agentpb.StartFailure_REASON_INVALID:
		return StartInvalid
	case agentpb.StartFailure_REASON_USER:
		return StartUser
	}
	return StartOther
}

func (f *StartFailure) Error() string { return f.Message }

// Process is a command started by Exec.
type Process struct {
	c  *Client
	id string
	st *mux.Stream

	startedOnce sync.Once
	started     chan struct{}
	pid         atomic.Uint32

	done   chan struct{}
	status ExitStatus
	err    error
}

var execSeq atomic.Uint64

// Exec asks the agent to start a command and returns at once; output flows
// to spec's writers in the background. Use Wait for the exit status.
func (c *Client) Exec(ctx context.Context, spec ExecSpec) (*Process, error) {
	// An empty argv is sent as it is: a sandbox's owner that holds a
	// template fills in the image's Entrypoint and Cmd, and an agent
	// refuses it (REASON_INVALID).
	st, err := c.sess.OpenContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("exec: open stream: %w", agentproto.Classify(err))
	}
	p := &Process{
		c:       c,
		id:      "exec-" + strconv.FormatUint(execSeq.Add(1), 10),
		st:      st,
		started: make(chan struct{}),
		done:    make(chan struct{}),
	}
	req := &agentpb.Exec{
		Argv:            spec.Argv,
		Cwd:             spec.Dir,
		Stdin:           spec.Stdin != nil,
		TimeoutMillis:   uint64(spec.Timeout.Milliseconds()),
		KillGraceMillis: uint64(spec.KillGrace.Milliseconds()),
		Id:              p.id,
		User:            spec.User,
		Cgroup:          spec.Cgroup,
		Root:            spec.Root,
		CgroupLimits:    spec.CgroupLimits,
	}
	if t := spec.TTY; t != nil {
		req.Tty = true
		req.Window = windowSize(t.Rows, t.Cols, t.XPixels, t.YPixels)
	}
	if spec.Timeout > 0 && req.TimeoutMillis == 0 {
		req.TimeoutMillis = 1
	}
	for _, e := range spec.Env {
		req.Env = append(req.Env, &agentpb.EnvVar{Name: e.Name, Value: e.Value})
	}
	if err := agentproto.WriteContext(ctx, st, &agentpb.Request{Call: &agentpb.Request_Exec{Exec: req}}); err != nil {
		st.Close()
		return nil, fmt.Errorf("exec: send request: %w", err)
	}
	if spec.Stdin != nil {
		go p.pumpStdin(spec.Stdin)
	}
	go p.readEvents(spec)
	return p, nil
}

// Started is closed when the agent reports the command running (or its exit).
func (p *Process) Started() <-chan struct{} { return p.started }

// PID is the command's pid in the guest, once started.
func (p *Process) PID() int { return int(p.pid.Load()) }

// Done is closed when Wait would return.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait blocks until the agent reports the exit (after the last byte of
// output was handed to the writers) or ctx ends.
func (p *Process) Wait(ctx context.Context) (ExitStatus, error) {
	select {
	case <-p.done:
		return p.status, p.err
	case <-ctx.Done():
		return ExitStatus{}, ctx.Err()
	}
}

// Signal delivers sig to the command's process group in the guest.
func (p *Process) Signal(ctx context.Context, sig syscall.Signal) error {
	if err := p.c.signal(ctx, p.id, int(sig)); err != nil {
		return fmt.Errorf("signal %s: %w", sig, err)
	}
	return nil
}

// Resize sets the size of the command's terminal (ExecSpec.TTY); the
// guest kernel sends SIGWINCH to the terminal's foreground job when the
// size changed. Without a terminal the agent ignores it.
func (p *Process) Resize(ctx context.Context, rows, cols uint16) error {
	msg := &agentpb.ExecInput{Input: &agentpb.ExecInput_Resize{Resize: windowSize(rows, cols, 0, 0)}}
	if err := agentproto.WriteContext(ctx, p.st, msg); err != nil {
		return fmt.Errorf("resize: %w", err)
	}
	return nil
}

func windowSize(rows, cols, x, y uint16) *agentpb.WindowSize {
	return &agentpb.WindowSize{Rows: uint32(rows), Cols: uint32(cols), XPixels: uint32(x), YPixels: uint32(y)}
}

func (p *Process) markStarted() { p.startedOnce.Do(func() { close(p.started) }) }

func (p *Process) readEvents(spec ExecSpec) {
	defer close(p.done)
	defer p.markStarted()
	defer p.st.Close()
	outs := map[agentpb.Output_Fd]*sink{
		agentpb.Output_FD_STDOUT: {w: spec.Stdout, stream: Stdout},
		agentpb.Output_FD_STDERR: {w: spec.Stderr, stream: Stderr},
	}
	in := agentproto.NewReader(p.st)
	var ev agentpb.ExecEvent
	for {
		ev.Reset()
		if err := in.Read(&ev); err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("%w: exec stream ended without an exit status", agentproto.ErrClosed)
			}
			p.err = err
			return
		}
		switch e := ev.Event.(type) {
		case *agentpb.ExecEvent_Started:
			p.pid.Store(e.Started.Pid)
			p.markStarted()
		case *agentpb.ExecEvent_Output:
			if s := outs[e.Output.Fd]; s != nil {
				if err := s.write(e.Output.Data); err != nil && spec.OnOutputError != nil {
					spec.OnOutputError(s.stream, err)
				}
			}
		case *agentpb.ExecEvent_Exited:
			p.status = exitStatus(e.Exited)
			return
		}
	}
}

// sink is one output destination; after its first write error it drops
// everything, so a closed stdout cannot stall stderr or the exit status.
type sink struct {
	w      io.Writer
	stream Stream
	failed bool
}

// write returns the error of the first failed write only.
func (s *sink) write(b []byte) error {
	if s.w == nil || s.failed {
		return nil
	}
	if _, err := s.w.Write(b); err != nil {
		s.failed = true
		return err
	}
	return nil
}

func exitStatus(e *agentpb.Exited) ExitStatus {
	st := ExitStatus{
		Code:     int(e.Code),
		Signal:   syscall.Signal(e.Signal),
		TimedOut: e.TimedOut,
		Duration: time.Duration(e.DurationMicros) * time.Microsecond,
	}
	if f := e.StartFailure; f != nil {
		st.StartFailure = &StartFailure{Reason: startReason(f.Reason), Errno: syscall.Errno(f.Errno), Message: f.Message}
	}
	return st
}

// pumpStdin forwards stdin in chunks and then the end-of-file. It stops
// quietly when the stream is gone (the command ended).
func (p *Process) pumpStdin(r io.Reader) {
	buf := make([]byte, agentproto.ChunkSize)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			msg := &agentpb.ExecInput{Input: &agentpb.ExecInput_Stdin{Stdin: &agentpb.Stdin{Data: buf[:n]}}}
			if werr := agentproto.Write(p.st, msg); werr != nil {
				return
			}
		}
		if err != nil {
			// EOF or a read error: either way the command sees end-of-file.
			_ = agentproto.Write(p.st, &agentpb.ExecInput{Input: &agentpb.ExecInput_Stdin{Stdin: &agentpb.Stdin{Eof: true}}})
			return
		}
	}
}
