package agent

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// drainGrace bounds how long the agent waits for the output pipes to reach
// end-of-file after the command's process group has been killed. Only a
// process that left the group (setsid) and kept a pipe open can make it
// wait that long. Once it has passed, the agent sends what the pipes hold
// at that moment (everything the dead group wrote is in there) and stops
// reading: only what the leftover process writes later is dropped, since
// Exited must be the last event. Data already written is never dropped,
// however slowly the host reads: sending it waits for the host.
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

// streamWriter serialises whole messages onto one exec stream: the stdout
// and stderr readers and the exit path all write to it. After the first
// failure (the host went away) every send fails at once, and the pumps
// just drain.
type streamWriter struct {
	mu  sync.Mutex
	st  *mux.Stream
	err error
}

// errFinished is what sends fail with once Exited has been sent.
var errFinished = errors.New("exec already reported its exit")

// finish sends the last event of the stream; every later send fails, so
// nothing can follow it.
func (sw *streamWriter) finish(ev *agentpb.ExecEvent) error {
	err := sw.send(ev)
	sw.mu.Lock()
	if sw.err == nil {
		sw.err = errFinished
	}
	sw.mu.Unlock()
	return err
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
	if _, err := sw.st.Write(b); err != nil {
		sw.err = agentproto.Classify(err)
	}
	return sw.err
}

// outputHeadroom is the room an output buffer keeps in front of the data
// for the message prefix and the frame header.
const outputHeadroom = mux.HeaderSize + agentproto.MaxOutputPrefix

// sendOutput sends buf[outputHeadroom:outputHeadroom+n] as one Output
// event without copying it: the message prefix and the frame header are
// written into the headroom in front of the data.
func (sw *streamWriter) sendOutput(buf []byte, n int, fd agentpb.Output_Fd) error {
	var pbuf [agentproto.MaxOutputPrefix]byte
	prefix := agentproto.AppendOutputPrefix(pbuf[:0], fd, n)
	start := outputHeadroom - len(prefix)
	copy(buf[start:], prefix)
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.err != nil {
		return sw.err
	}
	if err := sw.st.WriteFrame(buf[start-mux.HeaderSize : outputHeadroom+n]); err != nil {
		sw.err = agentproto.Classify(err)
	}
	return sw.err
}

// runExec serves one exec stream from start to Exited.
func (s *session) runExec(stream *mux.Stream, in *agentproto.Reader, req *agentpb.Exec) {
	out := &streamWriter{st: stream}
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
	// A relative working directory is relative to the root, as it was
	// to the agent's own working directory, /.
	cwd := path.Join("/", req.Cwd)
	root := s.srv.cmdRoot()
	chroot := "" // Exec.root, as a path in root
	if req.Root != "" {
		if !s.srv.opts.Mounts {
			fail(agentpb.StartFailure_REASON_INVALID, unix.EINVAL, "exec.root is not served by this agent")
			return
		}
		sub, inRoot, err := s.srv.subRoot(root, req.Root)
		if err != nil {
			fail(agentpb.StartFailure_REASON_OTHER, errnoOf(err), "%v", err)
			return
		}
		root, chroot = sub, inRoot
	}
	id := rootIdentity
	if req.User != "" || envValue(env, "HOME") == "" {
		if id, err = resolveUser(root, req.User); err != nil {
			fail(agentpb.StartFailure_REASON_USER, 0, "%v", err)
			return
		}
	}
	env = withDefault(env, "HOME", id.home)
	if err := ensureDir(root, cwd); err != nil {
		fail(agentpb.StartFailure_REASON_CWD, errnoOf(err), "working directory %q: %v", cwd, err)
		return
	}
	path, err := lookPath(root, req.Argv[0], envValue(env, "PATH"), cwd, id)
	if err != nil {
		reason, errno := classifyStartErr(err)
		fail(reason, errno, "%s: %v", req.Argv[0], err)
		return
	}

	var win *unix.Winsize
	if req.Tty {
		if win, err = winsize(req.Window); err != nil {
			fail(agentpb.StartFailure_REASON_INVALID, unix.EINVAL, "%v", err)
			return
		}
		env = withDefault(env, "TERM", "xterm")
	}
	cgFD := -1
	if req.Cgroup == "" && req.CgroupLimits != nil {
		fail(agentpb.StartFailure_REASON_INVALID, unix.EINVAL, "cgroup limits without a cgroup")
		return
	}
	if req.Cgroup != "" {
		if !s.srv.opts.Mounts || !haveCgroups() {
			fail(agentpb.StartFailure_REASON_INVALID, unix.EINVAL, "cgroups are not served by this agent")
			return
		}
		if cgFD, err = openCgroup(req.Cgroup, req.CgroupLimits); err != nil {
			fail(agentpb.StartFailure_REASON_INVALID, errnoOf(err), "%v", err)
			return
		}
		defer unix.Close(cgFD)
	}
	sio, err := newStdio(root, req.Stdin, win)
	if err != nil {
		fail(agentpb.StartFailure_REASON_OTHER, errnoOf(err), "%v", err)
		return
	}
	if req.Tty && id.uid != 0 {
		// As grantpt(3) does: the terminal belongs to its user.
		_ = sio.child[0].Chown(int(id.uid), -1)
	}

	attr := &syscall.ProcAttr{
		Dir:   cwd,
		Env:   env,
		Files: []uintptr{sio.child[0].Fd(), sio.child[1].Fd(), sio.child[2].Fd()},
		// A new session makes the command a process group leader, so
		// timeouts and signals reach everything it spawned, and detaches
		// it from the agent's console. On a terminal, the terminal
		// (its fd 0) becomes the session's controlling terminal, and
		// the command's group its foreground group.
		Sys: &syscall.SysProcAttr{Setsid: true, Setctty: req.Tty, Ctty: 0},
	}
	if id.explicit {
		attr.Sys.Credential = &syscall.Credential{Uid: id.uid, Gid: id.gid, Groups: id.groups}
	}
	if cgFD >= 0 {
		// The child is born in the cgroup (clone3's CLONE_INTO_CGROUP):
		// nothing it forks can start outside it.
		attr.Sys.UseCgroupFD, attr.Sys.CgroupFD = true, cgFD
	}
	fork := func() (int, error) { return syscall.ForkExec(path, req.Argv, attr) }
	if !root.isHost() {
		// The command's root is the template's; the agent stays where
		// it is. The spawner forks from inside the root, so cwd and
		// path are paths there; without one, Go's fork applies the
		// chroot before the working directory.
		if sp := s.srv.rootSpawner(); sp != nil {
			// In an Exec.root, the child chroots from the
			// spawner's root into the directory.
			attr.Sys.Chroot = chroot
			inRoot := fork
			fork = func() (int, error) { return sp.fork(inRoot) }
		} else {
			attr.Sys.Chroot = root.path
		}
	}
	pid, status, err := s.reaper.start(fork)
	// The child holds its own copies now: on a terminal, the end of
	// output is when no process has the slave open any more.
	sio.startedChild()
	if err != nil {
		sio.closeAgentEnds()
		// The child enters the working directory after it has taken
		// the user's credentials, so EACCES may be the directory's
		// rather than the command's: say which.
		if errnoOf(err) == unix.EACCES && !id.mayEnter(root, cwd) {
			fail(agentpb.StartFailure_REASON_CWD, unix.EACCES, "working directory %q: permission denied for uid %d", cwd, id.uid)
			return
		}
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

	go pumpInput(in, sio.stdinW, sio.master)

	var drained sync.WaitGroup
	drained.Add(len(sio.outputs))
	for _, o := range sio.outputs {
		go pumpOutput(&drained, out, o.f, o.fd)
	}

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
	ran := time.Since(started)
	// Whatever the command left behind in its group goes with it: that is
	// what closes the output pipes, and a throwaway VM has no use for
	// strays.
	_ = unix.Kill(-pid, unix.SIGKILL)
	if req.Tty {
		// A shell's jobs are groups of their own in its session, and
		// hold the terminal: the whole session goes.
		killSession(pid, unix.SIGKILL)
	}
	p.markReaped()
	if !waitTimeout(&drained, s.srv.drainGrace) {
		// Either the host reads slowly (a pump is waiting for send
		// window) or something that left the process group still holds
		// a pipe. A past read deadline tells both pumps to send what
		// their pipe holds now and stop, instead of waiting for an
		// end-of-file that may never come.
		s.log.Debug("output not at end-of-file after the command ended; sending what is buffered", "pid", pid)
		for _, o := range sio.outputs {
			_ = o.f.SetReadDeadline(pastDeadline)
		}
		drained.Wait()
	}

	ex := &agentpb.Exited{
		TimedOut:       timedOut.Load(),
		DurationMicros: uint64(ran.Microseconds()),
	}
	switch {
	case ws.Exited():
		ex.Code = int32(ws.ExitStatus())
	case ws.Signaled():
		ex.Signal = int32(ws.Signal())
	}
	if err := out.finish(&agentpb.ExecEvent{Event: &agentpb.ExecEvent_Exited{Exited: ex}}); err != nil {
		s.log.Debug("exit not delivered", "pid", pid, "err", err)
	}
}

// pastDeadline is a read deadline that has always passed: setting it stops
// an output pump (see pumpOutput).
var pastDeadline = time.Unix(1, 0)

// pumpOutput forwards one output pipe until end-of-file, or until its read
// deadline passes: then it forwards what the pipe holds at that moment
// and stops. Each chunk is sent before the next is read, so a slow host
// fills the pipe and stalls the command, as a pipe would, instead of
// losing data. When the stream is gone it keeps reading and discarding,
// so the command never blocks on a full pipe because nobody listens.
func pumpOutput(wg *sync.WaitGroup, out *streamWriter, r *os.File, fd agentpb.Output_Fd) {
	defer wg.Done()
	defer r.Close()
	buf := make([]byte, outputHeadroom+agentproto.ChunkSize)
	data := buf[outputHeadroom:]
	send := func(n int) { _ = out.sendOutput(buf, n, fd) }
	for {
		n, err := r.Read(data)
		if n > 0 {
			send(n)
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			_ = readBuffered(r, data, send)
			return
		}
		if err != nil {
			return
		}
	}
}

// readBuffered reads what the pipe r holds right now into p, without
// waiting for more, and hands each chunk to emit, which may block (the
// next read waits for it). It reads at most what the pipe held on entry
// (FIONREAD, which Linux spells TIOCINQ), so a writer that keeps writing
// cannot keep it going.
//
// The reads go through RawConn.Control on the non-blocking descriptor:
// the poller (Read, RawConn.Read) fails once the read deadline has passed
// without trying the descriptor at all.
func readBuffered(r *os.File, p []byte, emit func(n int)) error {
	rc, err := r.SyscallConn()
	if err != nil {
		return err
	}
	var left int
	var ioctlErr error
	if err := rc.Control(func(fd uintptr) { left, ioctlErr = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }); err != nil {
		return err
	}
	if ioctlErr != nil {
		// Not a pipe after all: read until it would block, at most what
		// a full pipe could hold.
		left = maxPipeSize
	}
	for left > 0 {
		var n int
		var rerr error
		if err := rc.Control(func(fd uintptr) { n, rerr = unix.Read(int(fd), p[:min(len(p), left)]) }); err != nil {
			return err
		}
		switch {
		case errors.Is(rerr, unix.EINTR):
			continue
		case errors.Is(rerr, unix.EAGAIN):
			return nil
		case rerr != nil:
			return rerr
		case n == 0:
			return nil
		}
		emit(n)
		left -= n
	}
	return nil
}

// pumpInput follows the host's ExecInput messages until the stream ends:
// stdin data goes to w (the command's stdin pipe, or the terminal) until
// the host says eof, and window sizes go to the terminal master (nil when
// the command has none). A pipe is closed at eof, so the command reads
// end-of-file; a terminal is not (that would hang it up): input just
// stops. After the command stops reading (EPIPE, or EIO from a terminal
// nobody has open) the rest is dropped, so the host's writes never block.
func pumpInput(in *agentproto.Reader, w, master *os.File) {
	tty := master != nil
	stop := func() {
		if w != nil && !tty {
			w.Close()
		}
		w = nil
	}
	defer stop()
	var msg agentpb.ExecInput
	for {
		msg.Reset()
		if err := in.Read(&msg); err != nil {
			return
		}
		if ws := msg.GetResize(); ws != nil && tty {
			_ = resize(master, ws)
			continue
		}
		sd := msg.GetStdin()
		if sd == nil {
			continue
		}
		if w != nil && len(sd.Data) > 0 {
			if _, err := w.Write(sd.Data); err != nil {
				stop()
			}
		}
		if sd.Eof {
			stop()
		}
	}
}

// stdio is a command's standard files: what the child gets, what the
// agent keeps (the output it forwards, where stdin goes).
type stdio struct {
	child   [3]*os.File // fds 0, 1, 2 of the command
	outputs []output    // what the agent reads and forwards
	stdinW  *os.File    // where the host's stdin goes; nil when not forwarded
	master  *os.File    // the terminal's master, with tty
	// childOnly are the child's files the agent closes once the child
	// has them.
	childOnly []*os.File
}

type output struct {
	f  *os.File
	fd agentpb.Output_Fd
}

// newStdio prepares a command's standard files: pipes (stdin from
// /dev/null unless forwarded), or with ws a terminal of that size from
// root's devpts, which is then all three.
func newStdio(root *fsRoot, forwardStdin bool, ws *unix.Winsize) (*stdio, error) {
	if ws != nil {
		master, slave, err := openPTY(root, ws)
		if err != nil {
			return nil, fmt.Errorf("terminal: %w", err)
		}
		sio := &stdio{child: [3]*os.File{slave, slave, slave}, childOnly: []*os.File{slave}, master: master,
			outputs: []output{{master, agentpb.Output_FD_STDOUT}}}
		if forwardStdin {
			sio.stdinW = master
		}
		return sio, nil
	}
	stdin, stdinW, err := stdinFor(forwardStdin)
	if err != nil {
		return nil, fmt.Errorf("stdin: %w", err)
	}
	stdoutR, stdoutW, err := os.Pipe()
	if err != nil {
		closeAll(stdin, stdinW)
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		closeAll(stdin, stdinW, stdoutR, stdoutW)
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	// A 1 MiB pipe (the default maximum) lets a fast writer run ahead of
	// the agent, so output moves in large chunks with few wakeups.
	for _, f := range []*os.File{stdoutR, stderrR} {
		setPipeSize(f, maxPipeSize)
	}
	return &stdio{
		child:     [3]*os.File{stdin, stdoutW, stderrW},
		childOnly: []*os.File{stdin, stdoutW, stderrW},
		stdinW:    stdinW,
		outputs:   []output{{stdoutR, agentpb.Output_FD_STDOUT}, {stderrR, agentpb.Output_FD_STDERR}},
	}, nil
}

// startedChild closes the agent's copies of the child's files.
func (sio *stdio) startedChild() { closeAll(sio.childOnly...) }

// closeAgentEnds closes what the agent kept, for a command that did not
// start.
func (sio *stdio) closeAgentEnds() {
	closeAll(sio.stdinW)
	for _, o := range sio.outputs {
		if o.f != sio.stdinW {
			o.f.Close()
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

// waitTimeout waits for wg at most d and reports whether it finished.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	// A stopped timer, not time.After: an idle agent has no timer left
	// to fire (it may be snapshotted and restored at any point).
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// buildEnv turns the request env into execve form: later entries win, and
// PATH is supplied when absent (HOME comes with the command's identity).
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
	return env, nil
}

// withDefault adds key=value to env unless env has key.
func withDefault(env []string, key, value string) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, key+"=") {
			return env
		}
	}
	return append(env, key+"="+value)
}

func envValue(env []string, key string) string {
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, key+"="); ok {
			return v
		}
	}
	return ""
}

// ensureDir creates the working directory dir inside root when missing.
func ensureDir(root *fsRoot, dir string) error {
	fd, err := root.mkdirAll(dir, 0o755)
	if err != nil {
		return err
	}
	return unix.Close(fd)
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

// maxPipeSize is the size the output pipes are given: Linux's default
// fs.pipe-max-size.
const maxPipeSize = 1 << 20

// setPipeSize enlarges a pipe's buffer; failure (a lowered
// fs.pipe-max-size) only costs speed.
func setPipeSize(f *os.File, size int) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, size)
	})
}
