// Package agent is the guest side of the agent protocol: it serves hello,
// ping, exec, signal, mount and shutdown calls, one session per byte
// stream from the host (the virtio-serial port, or each connection of a
// listener such as vsock: listen.go), and (in pid1.go) does the duties of
// the guest's init process.
//
// The protocol is specified in api/agent/v1/agent.proto and
// docs/protocol.md; framing and session settings come from
// internal/agentproto.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// Server serves agent sessions. One Server lives for the whole guest; each
// host connection is one session.
type Server struct {
	log     *slog.Logger
	version string
	reaper  *reaper
	opts    Options
	// The grace periods (drainGrace, selfExitGrace, termGrace), set
	// differently by tests.
	drainGrace, selfExitGrace, termGrace time.Duration

	// mu guards the sessions and the shutdown state, so that a guest
	// shutdown can reach every running command and let it report its
	// end (EndCommands).
	mu       sync.Mutex
	sessions map[*session]struct{}
	running  int           // execs between start and Exited
	idle     chan struct{} // closed while running == 0
	stopping bool          // EndCommands was called: no new execs

	// fsMu guards the filesystem state that Root and Mount change: the
	// commands' root and the drives the agent has mounted.
	fsMu sync.Mutex
	// netMu makes Network calls one at a time.
	netMu     sync.Mutex
	root      *fsRoot
	spawner   *spawner        // forks the root's commands; nil: chroot (or the agent's own root)
	rootLabel string          // the template's label, once a Root call set one
	mounted   map[string]bool // device paths the agent mounted
	drives    drives
	// The host's boot id is bound over the proc file in these roots
	// (by path); hasBootID: the host gave one.
	bootIDBound map[string]bool
	hasBootID   bool
	// subRoots are the Exec.root directories (by path in the agent's
	// namespace) whose kernel filesystems are mounted; subMu orders
	// their mounting and their release.
	subRoots map[string]bool
	subMu    sync.Mutex
}

// Options are the hooks that differ between an agent running as the guest's
// init and one running under a test or another init.
type Options struct {
	// OnHello applies what the host's hello carries (clock, entropy). Only
	// the guest's init sets it: applying a host clock anywhere else would
	// be wrong.
	OnHello func(*agentpb.Hello) error
	// OnShutdown is called once the reply to a Shutdown call is on its way.
	// Nil makes the agent refuse Shutdown.
	OnShutdown func()
	// Mounts enables the Mount call (only the guest's init may mount).
	Mounts bool
	// Ready, if set, is closed when the guest is ready for commands;
	// execs wait for it (hello and ping do not).
	Ready <-chan struct{}
	// StartUptime is the guest uptime when the agent started, reported in
	// HelloReply for boot timing breakdowns.
	StartUptime time.Duration
}

// NewServer returns a server. version is reported in HelloReply.
func NewServer(log *slog.Logger, version string, opts Options) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	idle := make(chan struct{})
	close(idle)
	s := &Server{
		log: log, version: version, reaper: processReaper(), opts: opts,
		drainGrace: drainGrace, selfExitGrace: selfExitGrace, termGrace: termGrace,
		sessions: make(map[*session]struct{}), idle: idle,
		root: hostRoot, mounted: make(map[string]bool), drives: guestDrives,
		bootIDBound: make(map[string]bool),
	}
	s.drives.flush = s.flushUnmounted
	return s
}

// cmdRoot is the root the next command runs in.
func (s *Server) cmdRoot() *fsRoot {
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	return s.root
}

// rootSpawner is the spawner of the commands' root, nil when there is none.
func (s *Server) rootSpawner() *spawner {
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	return s.spawner
}

// capabilities is what this agent announces in HelloReply.
func (s *Server) capabilities() []string {
	caps := []string{
		agentproto.CapPing,
		agentproto.CapExec,
		agentproto.CapExecStdin,
		agentproto.CapExecTimeout,
		agentproto.CapSignal,
		agentproto.CapExecTTY,
		agentproto.CapFiles,
	}
	if unix.Geteuid() == 0 {
		// Only root can become another user, or give files away.
		caps = append(caps, agentproto.CapExecUser, agentproto.CapFilesOwners)
	}
	if s.opts.Mounts {
		caps = append(caps, agentproto.CapMount, agentproto.CapMountLabel, agentproto.CapRoot, agentproto.CapHelloHostname, agentproto.CapNetwork)
		caps = append(caps, agentproto.CapExecRoot, agentproto.CapRelease, agentproto.CapFilesRoot)
		if haveCgroups() {
			caps = append(caps, agentproto.CapCgroup)
		}
		if s.opts.OnHello != nil {
			// The clock and the reseed come with the hello hook,
			// the rest with owning the guest's filesystems.
			caps = append(caps, agentproto.CapSnapshot, agentproto.CapPause, agentproto.CapRefresh)
		}
	}
	if s.opts.OnShutdown != nil {
		caps = append(caps, agentproto.CapShutdown)
	}
	return caps
}

// ServeConn serves sessions over conn until the host closes it, ctx ends,
// or the transport fails, and then closes conn. A host may start a new
// session on the same connection (see channel). Commands still running
// when a session ends are killed: they belong to the session that started
// them.
func (s *Server) ServeConn(ctx context.Context, conn io.ReadWriteCloser) error {
	defer conn.Close()
	return s.serveChannel(ctx, newChannel(conn))
}

// serveSession runs one session on sc until it ends.
func (s *Server) serveSession(ctx context.Context, sc *sessionConn) error {
	sess := mux.Server(sc, agentproto.SessionConfig())
	defer sess.Close()
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()

	ss := &session{srv: s, log: s.log, reaper: s.reaper, conn: sc, procs: make(map[*proc]struct{}), byID: make(map[string]*proc)}
	s.mu.Lock()
	s.sessions[ss] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.sessions, ss)
		s.mu.Unlock()
		ss.killAll()
	}()

	// Stream 1 must be hello, and nothing else is accepted until it has
	// been answered: that is what makes it safe for the host to pipeline
	// its first exec right behind the hello.
	st, err := sess.Accept()
	if err != nil {
		return agentproto.Classify(fmt.Errorf("accept hello: %w", err))
	}
	if err := ss.hello(st); err != nil {
		return err
	}
	for {
		st, err := sess.Accept()
		if err != nil {
			err = agentproto.Classify(err)
			if errors.Is(err, agentproto.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept stream: %w", err)
		}
		go ss.serveStream(st)
	}
}

// session is the state of one host connection.
type session struct {
	srv    *Server
	log    *slog.Logger
	reaper *reaper
	conn   *sessionConn

	mu    sync.Mutex
	procs map[*proc]struct{} // every running command, for teardown
	byID  map[string]*proc   // those the host named, for Signal
}

func (ss *session) hello(st *mux.Stream) error {
	defer st.Close()
	in := agentproto.NewReader(st)
	var req agentpb.Request
	if err := in.Read(&req); err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	h := req.GetHello()
	if h == nil {
		_ = replyError(st, agentpb.Error_CODE_VERSION, "the first call of a session must be hello")
		return errors.New("session did not start with hello")
	}
	v, err := negotiate(h.MinVersion, h.MaxVersion)
	if err != nil {
		_ = replyError(st, agentpb.Error_CODE_VERSION, err.Error())
		return err
	}
	if ss.srv.opts.Mounts {
		if err := checkHelloIdentity(h.Hostname, h.BootId); err != nil {
			_ = replyError(st, agentpb.Error_CODE_INVALID_ARGUMENT, err.Error())
			return err
		}
	}
	if ss.srv.opts.OnHello != nil {
		// Logged by the hook; the session is more use than a clock.
		_ = ss.srv.opts.OnHello(h)
	}
	if ss.srv.opts.Mounts {
		ss.srv.applyIdentity(h.Hostname, h.BootId)
	}
	return agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Hello{Hello: &agentpb.HelloReply{
		Version:                v,
		AgentVersion:           ss.srv.version,
		Capabilities:           ss.srv.capabilities(),
		GuestUptimeMicros:      uptimeMicros(),
		AgentStartUptimeMicros: uint64(ss.srv.opts.StartUptime / time.Microsecond),
	}}})
}

// negotiate picks the highest version inside both ranges.
func negotiate(hostMin, hostMax uint32) (uint32, error) {
	v := min(hostMax, agentproto.Version)
	if v < max(hostMin, agentproto.MinVersion) {
		return 0, fmt.Errorf("host speaks protocol versions %d..%d, agent speaks %d..%d",
			hostMin, hostMax, agentproto.MinVersion, agentproto.Version)
	}
	return v, nil
}

// waitReady waits until the guest is ready for commands (the root is
// set up): file calls see what commands see.
func (ss *session) waitReady() {
	if ready := ss.srv.opts.Ready; ready != nil {
		<-ready
	}
}

func (ss *session) serveStream(st *mux.Stream) {
	defer st.Close()
	in := agentproto.NewReader(st)
	var req agentpb.Request
	if err := in.Read(&req); err != nil {
		ss.log.Debug("read request", "err", err)
		return
	}
	switch call := req.Call.(type) {
	case *agentpb.Request_Ping:
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Pong{Pong: &agentpb.Pong{Payload: call.Ping.Payload}}})
	case *agentpb.Request_Exec:
		ss.waitReady()
		if !ss.srv.beginExec() {
			refuseExec(st, "the guest is shutting down")
			return
		}
		defer ss.srv.endExec()
		ss.runExec(st, in, call.Exec)
	case *agentpb.Request_Signal:
		ss.signal(st, call.Signal)
	case *agentpb.Request_CopyIn:
		ss.waitReady()
		ss.copyIn(st, in, call.CopyIn)
	case *agentpb.Request_CopyOut:
		ss.waitReady()
		ss.copyOut(st, call.CopyOut)
	case *agentpb.Request_Stat:
		ss.waitReady()
		ss.stat(st, call.Stat)
	case *agentpb.Request_Shutdown:
		if ss.srv.opts.OnShutdown == nil {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "shutdown is not served by this agent")
			return
		}
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Shutdown{Shutdown: &agentpb.ShutdownReply{}}})
		st.Close()
		ss.srv.opts.OnShutdown()
	case *agentpb.Request_Mount:
		if !ss.srv.opts.Mounts {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "mount is not served by this agent")
			return
		}
		ss.waitReady()
		if err := ss.srv.mountDevice(call.Mount); err != nil {
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Mount{Mount: &agentpb.MountReply{}}})
	case *agentpb.Request_Root:
		if !ss.srv.opts.Mounts {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "root is not served by this agent")
			return
		}
		ss.waitReady()
		start := time.Now()
		if err := ss.srv.setRoot(call.Root); err != nil {
			ss.log.Debug("root failed", "err", err)
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		ss.log.Debug("root set", "template", call.Root.LowerLabel, "took", time.Since(start))
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Root{Root: &agentpb.RootReply{}}})
	case *agentpb.Request_Network:
		if !ss.srv.opts.Mounts {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "network is not served by this agent")
			return
		}
		start := time.Now()
		if err := ss.srv.configureNetwork(call.Network); err != nil {
			ss.log.Debug("network failed", "err", err)
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		ss.log.Debug("network configured", "address", call.Network.Address, "took", time.Since(start))
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Network{Network: &agentpb.NetworkReply{}}})
	case *agentpb.Request_Quiesce:
		if !ss.srv.opts.Mounts || ss.srv.opts.OnHello == nil {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "quiesce is not served by this agent")
			return
		}
		ss.waitReady()
		if err := ss.srv.quiesce(call.Quiesce.GetKeepDrives()); err != nil {
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Quiesce{Quiesce: &agentpb.QuiesceReply{}}})
		// The reply is out: nothing more of this session may be.
		ss.conn.setQuiet()
		ss.log.Debug("quiesced; the next session may come from a restored snapshot")
	case *agentpb.Request_Refresh:
		if !ss.srv.opts.Mounts || ss.srv.opts.OnHello == nil {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "refresh is not served by this agent")
			return
		}
		if err := ss.srv.refresh(call.Refresh); err != nil {
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Refresh{Refresh: &agentpb.RefreshReply{}}})
	case *agentpb.Request_CgroupStats:
		if !ss.srv.opts.Mounts || !haveCgroups() {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "cgroups are not served by this agent")
			return
		}
		r, err := cgroupStats(call.CgroupStats.GetName())
		if err != nil {
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_CgroupStats{CgroupStats: r}})
	case *agentpb.Request_Release:
		if !ss.srv.opts.Mounts {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "release is not served by this agent")
			return
		}
		if call.Release.GetCgroup() != "" && !haveCgroups() {
			_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "cgroups are not served by this agent")
			return
		}
		if err := ss.srv.release(call.Release); err != nil {
			_ = replyError(st, errorCode(err), err.Error())
			return
		}
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Release{Release: &agentpb.ReleaseReply{}}})
	case *agentpb.Request_Hello:
		_ = replyError(st, agentpb.Error_CODE_VERSION, "hello was already done in this session")
	default:
		_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, fmt.Sprintf("unknown call %T", req.Call))
	}
}

func (ss *session) signal(st io.Writer, req *agentpb.Signal) {
	ss.mu.Lock()
	p := ss.byID[req.ExecId]
	ss.mu.Unlock()
	if p == nil {
		_ = replyError(st, agentpb.Error_CODE_NOT_FOUND, fmt.Sprintf("no running exec %q", req.ExecId))
		return
	}
	if req.Signal <= 0 || req.Signal >= 65 {
		_ = replyError(st, agentpb.Error_CODE_INVALID_ARGUMENT, fmt.Sprintf("invalid signal %d", req.Signal))
		return
	}
	if err := p.kill(unix.Signal(req.Signal)); err != nil {
		_ = replyError(st, agentpb.Error_CODE_NOT_FOUND, fmt.Sprintf("exec %q: %v", req.ExecId, err))
		return
	}
	_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Signal{Signal: &agentpb.SignalReply{}}})
}

func (ss *session) register(id string, p *proc) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.procs[p] = struct{}{}
	if id == "" {
		return nil
	}
	if _, ok := ss.byID[id]; ok {
		return fmt.Errorf("exec id %q is already in use", id)
	}
	ss.byID[id] = p
	return nil
}

func (ss *session) unregister(id string, p *proc) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	delete(ss.procs, p)
	if ss.byID[id] == p {
		delete(ss.byID, id)
	}
}

// beginExec counts an exec as running until endExec; it refuses once the
// guest is shutting down.
func (s *Server) beginExec() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return false
	}
	if s.running == 0 {
		s.idle = make(chan struct{})
	}
	s.running++
	return true
}

func (s *Server) endExec() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.running--
	if s.running == 0 {
		close(s.idle)
	}
}

// waitExecs waits until no exec is running or d has passed, and reports
// whether none is.
func (s *Server) waitExecs(d time.Duration) bool {
	s.mu.Lock()
	idle := s.idle
	s.mu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-idle:
		return true
	case <-t.C:
		return false
	}
}

// signalAll sends sig to the process group of every running command of
// every session.
func (s *Server) signalAll(sig unix.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ss := range s.sessions {
		ss.signalAll(sig)
	}
}

// Grace periods of EndCommands.
const (
	// selfExitGrace is how long commands get to end on their own: the
	// command that asked for the shutdown (poweroff) usually exits at
	// once, and should report its own status rather than a signal.
	selfExitGrace = 250 * time.Millisecond
	// termGrace is how long commands get between SIGTERM and the
	// SIGKILL of the power-off.
	termGrace = time.Second
)

// EndCommands ends what runs before a shutdown the guest asked for (a
// poweroff in the guest): new execs are refused, running commands get
// selfExitGrace to end by themselves, then SIGTERM and termGrace more.
// Each exec reports its end (Exited) to the host as usual, so the host
// learns how its command ended before the VM goes. It returns when no
// exec is left or the grace periods are over; what is still running is
// for the caller to kill (PowerOff does).
func (s *Server) EndCommands() {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	if s.waitExecs(s.selfExitGrace) {
		return
	}
	s.signalAll(unix.SIGTERM)
	s.waitExecs(s.termGrace)
}

func (ss *session) signalAll(sig unix.Signal) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for p := range ss.procs {
		_ = p.kill(sig)
	}
}

func (ss *session) killAll() { ss.signalAll(unix.SIGKILL) }

// refuseExec ends an exec stream that was never started.
func refuseExec(st io.Writer, msg string) {
	_ = agentproto.Write(st, &agentpb.ExecEvent{Event: &agentpb.ExecEvent_Exited{Exited: &agentpb.Exited{
		StartFailure: &agentpb.StartFailure{Reason: agentpb.StartFailure_REASON_OTHER, Errno: int32(unix.ESHUTDOWN), Message: msg},
	}}})
}

// errorCode maps a failed call's error to the protocol's code.
func errorCode(err error) agentpb.Error_Code {
	switch {
	case errors.Is(err, errInvalidRequest):
		return agentpb.Error_CODE_INVALID_ARGUMENT
	case errors.Is(err, errPrecondition):
		return agentpb.Error_CODE_FAILED_PRECONDITION
	}
	return agentpb.Error_CODE_INTERNAL
}

func replyError(w io.Writer, code agentpb.Error_Code, msg string) error {
	return agentproto.Write(w, &agentpb.Response{Result: &agentpb.Response_Error{Error: &agentpb.Error{Code: code, Message: msg}}})
}

// Uptime is the guest's time since boot, for boot timing logs.
func Uptime() time.Duration { return time.Duration(uptimeMicros()) * time.Microsecond }

func uptimeMicros() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return uint64(time.Duration(ts.Nano()) / time.Microsecond)
}
