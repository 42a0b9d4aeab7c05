package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
)

// drainGrace bounds how long the agent waits for the output pipes to reach
// end-of-file after the command's process group has been killed. Only a
// process that left the group (setsid) and kept the pipes open can make it
// wait that long; its later output is dropped.
const drainGrace = 2 * time.Second

// proc is a running command, as seen by Signal calls and session teardown.
type proc struct {
	pgid int

	mu     sync.Mutex
	reaped bool
}

// kill signals the command's whole process group, unless the group leader
// has already been reaped (then the group id may be free for reuse).
func (p *proc) kill(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reaped {
		return unix.ESRCH
	}
	return unix.Kill(-p.pgid, sig)
}

func (p *proc) markReaped() {
	p.mu.Lock()
	p.reaped = true
	p.mu.Unlock()
}

// streamWriter serialises whole frames onto one stream: the stdout and
// stderr readers and the exit path all write to it.
type streamWriter struct {
	mu  sync.Mutex
	w   io.Writer
	err error
}

func (sw *streamWriter) send(ev *agentpb.ExecEvent) error {
	b, err := agentproto.Marshal(ev)
	if err != nil {
		return err
	}
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.err != nil {
		return sw.err
	}
	if _, err := sw.w.Write(b); err != nil {
		sw.err = agentproto.Classify(err)
	}
	return sw.err
}

// runExec serves one exec stream from start to Exited.
func (s *session) runExec(stream io.ReadWriteCloser, in *agentproto.Reader, req *agentpb.Exec) {
	out := &streamWriter{w: stream}
	started := time.Now()
	fail := func(reason agentpb.StartFailure_Reason, errno syscall.Errno, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		s.log.Debug("exec start failed", "argv0", first(req.Argv), "reason", reason, "err", msg)
		_ = out.send(&agentpb.ExecEvent{Event: &agentpb.ExecEvent_Exited{Exited: &agentpb.Exited{
			StartFailure: &agentpb.StartFailure{Reason: reason, Errno: int32(errno), Message: msg},
		}}})
	}

	if len(req.Argv) == 0 {
		fail(agentpb.StartFailure_REASON_INVALID, 0, "empty argv")
		return
	}
	if bad := firstWithNUL(req.Argv); bad >= 0 {
		fail(agentpb.StartFailure_REASON_INVALID, unix.EINVAL, "argv[%d] contains a NUL byte", bad)
		return
	}
	env, err := buildEnv(req.Env)
	if err != nil {
		fail(agentpb.StartFailure_REASON_INVALID, unix.EINVAL, "%v", err)
		return
	}
	cwd := req.Cwd
	if cwd == "" {
		cwd = "/"
	}
	if err := ensureDir(cwd); err != nil {
		fail(agentpb.StartFailure_REASON_CWD, errnoOf(err), "working directory %q: %v", cwd, err)
		return
	}
	path, err := lookPath(req.Argv[0], envValue(env, "PATH"))
	if err != nil {
		reason, errno := classifyStartErr(err)
		fail(reason, errno, "%s: %v", req.Argv[0], err)
		return
	}

	stdin, stdinW, err := stdinFor(req.Stdin)
	if err != nil {
		fail(agentpb.StartFailure_REASON_OTHER, errnoOf(err), "stdin: %v", err)
		return
	}
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		closeAll(stdin, stdinW)
		fail(agentpb.StartFailure_REASON_OTHER, errnoOf(err), "stdout pipe: %v", err)
		return
	}
	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		closeAll(stdin, stdinW, stdoutR, stdoutW)
		fail(agentpb.StartFailure_REASON_OTHER, errnoOf(err), "stderr pipe: %v", err)
		return
	}

	attr := &syscall.ProcAttr{
		Dir:   cwd,
		Env:   env,
		Files: []uintptr{stdin.Fd(), stdoutW.Fd(), stderrW.Fd()},
		// A new session makes the command a process group leader, so
		// timeouts and signals reach everything it spawned, and detaches
		// it from the agent's console.
		Sys: &syscall.SysProcAttr{Setsid: true},
	}
	pid, status, err := s.reaper.start(func() (int, error) {
		return syscall.ForkExec(path, req.Argv, attr)
	})
	// The child holds its own copies now.
	closeAll(stdin, stdoutW, stderrW)
	if err != nil {
		closeAll(stdinW, stdoutR, stderrR)
		reason, errno := classifyStartErr(err)
		fail(reason, errno, "%s: %v", req.Argv[0], err)
		return
	}

	p := &proc{pgid: pid}
	if err := s.register(req.Id, p); err != nil {
		// The id clash is the host's bug; the command is already running,
		// so it still runs to completion, just without signalling by id.
		s.log.Warn("exec id not registered", "id", req.Id, "err", err)
	}
	defer s.unregister(req.Id, p)
	s.log.Debug("exec started", "pid", pid, "argv0", req.Argv[0])

	_ = out.send(&agentpb.ExecEvent{Event: &agentpb.ExecEvent_Started{Started: &agentpb.Started{Pid: uint32(pid)}}})

	go pumpStdin(in, stdinW)

	var drained sync.WaitGroup
	drained.Add(2)
	go pumpOutput(&drained, out, stdoutR, agentpb.Output_FD_STDOUT)
	go pumpOutput(&drained, out, stderrR, agentpb.Output_FD_STDERR)

	var timedOut atomic.Bool
	if req.TimeoutMillis > 0 {
		grace := time.Duration(req.KillGraceMillis) * time.Millisecond
		t := time.AfterFunc(time.Duration(req.TimeoutMillis)*time.Millisecond, func() {
			timedOut.Store(true)
			if grace <= 0 {
				_ = p.kill(unix.SIGKILL)
				return
			}
			_ = p.kill(unix.SIGTERM)
			time.AfterFunc(grace, func() { _ = p.kill(unix.SIGKILL) })
		})
		defer t.Stop()
	}

	ws := <-status
	// Whatever the command left behind in its group goes with it: that is
	// what closes the output pipes, and a throwaway VM has no use for
	// strays.
	_ = unix.Kill(-pid, unix.SIGKILL)
	p.markReaped()
	waitOrClose(&drained, drainGrace, stdoutR, stderrR)
	closeAll(stdoutR, stderrR)

	ex := &agentpb.Exited{
		TimedOut:       timedOut.Load(),
		DurationMicros: uint64(time.Since(started).Microseconds()),
	}
	switch {
	case ws.Exited():
		ex.Code = int32(ws.ExitStatus())
	case ws.Signaled():
		ex.Signal = int32(ws.Signal())
	}
	if err := out.send(&agentpb.ExecEvent{Event: &agentpb.ExecEvent_Exited{Exited: ex}}); err != nil {
		s.log.Debug("exit not delivered", "pid", pid, "err", err)
	}
}

// pumpOutput forwards one output pipe until end-of-file. When the stream is
// gone it keeps reading and discarding, so the command never blocks on a
// full pipe because nobody listens.
func pumpOutput(wg *sync.WaitGroup, out *streamWriter, r *os.File, fd agentpb.Output_Fd) {
	defer wg.Done()
	buf := make([]byte, agentproto.ChunkSize)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			_ = out.send(&agentpb.ExecEvent{Event: &agentpb.ExecEvent_Output{Output: &agentpb.Output{Fd: fd, Data: buf[:n]}}})
		}
		if err != nil {
			return
		}
	}
}

// pumpStdin copies ExecInput stdin data into the command's stdin until the
// host says eof or the stream ends. After the command stops reading (EPIPE)
// the rest is drained and dropped, so the host's writes never block.
func pumpStdin(in *agentproto.Reader, w *os.File) {
	defer func() {
		if w != nil {
			w.Close()
		}
	}()
	var msg agentpb.ExecInput
	for {
		msg.Reset()
		if err := in.Read(&msg); err != nil {
			return
		}
		sd := msg.GetStdin()
		if sd == nil {
			continue
		}
		if w != nil && len(sd.Data) > 0 {
			if _, err := w.Write(sd.Data); err != nil {
				w.Close()
				w = nil
			}
		}
		if sd.Eof && w != nil {
			w.Close()
			w = nil
		}
	}
}

// stdinFor returns the child's stdin and, when the host forwards stdin, the
// agent's end of the pipe feeding it.
func stdinFor(forward bool) (child, agentEnd *os.File, err error) {
	if !forward {
		f, err := os.Open(os.DevNull)
		return f, nil, err
	}
	r, w, err := os.Pipe()
	return r, w, err
}

// waitOrClose waits for wg; after grace it closes the files so blocked
// readers return, then waits again.
func waitOrClose(wg *sync.WaitGroup, grace time.Duration, files ...*os.File) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-time.After(grace):
		closeAll(files...)
		<-done
	}
}

// buildEnv turns the request env into execve form: later entries win, and
// PATH and HOME are supplied when absent.
func buildEnv(vars []*agentpb.EnvVar) ([]string, error) {
	idx := make(map[string]int, len(vars)+2)
	env := make([]string, 0, len(vars)+2)
	set := func(k, v string) {
		if i, ok := idx[k]; ok {
			env[i] = k + "=" + v
			return
		}
		idx[k] = len(env)
		env = append(env, k+"="+v)
	}
	for _, v := range vars {
		if v.Name == "" || strings.ContainsAny(v.Name, "=\x00") || strings.Contains(v.Value, "\x00") {
			return nil, fmt.Errorf("invalid environment variable %q", v.Name)
		}
		set(v.Name, v.Value)
	}
	if _, ok := idx["PATH"]; !ok {
		set("PATH", DefaultPath)
	}
	if _, ok := idx["HOME"]; !ok {
		set("HOME", "/root")
	}
	return env, nil
}

func envValue(env []string, key string) string {
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, key+"="); ok {
			return v
		}
	}
	return ""
}

func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return unix.ENOTDIR
	}
	return nil
}

func classifyStartErr(err error) (agentpb.StartFailure_Reason, syscall.Errno) {
	errno := errnoOf(err)
	switch errno {
	case unix.ENOENT, unix.ENOTDIR:
		return agentpb.StartFailure_REASON_NOT_FOUND, errno
	case unix.EACCES, unix.EPERM, unix.ENOEXEC, unix.EISDIR, unix.ETXTBSY:
		return agentpb.StartFailure_REASON_NOT_EXECUTABLE, errno
	}
	return agentpb.StartFailure_REASON_OTHER, errno
}

func errnoOf(err error) syscall.Errno {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return 0
}

func firstWithNUL(ss []string) int {
	for i, s := range ss {
		if strings.Contains(s, "\x00") {
			return i
		}
	}
	return -1
}

func first(ss []string) string {
	if len(ss) == 0 {
		return ""
	}
	return ss[0]
}

func closeAll(files ...*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}
