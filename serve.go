package mvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

// maxClientStreams bounds the streams one client of Serve has open at
// once; more are reset.
const maxClientStreams = 256

// CapSandbox is the capability a sandbox served by Serve adds to its
// guest's: the peer is a sandbox's host process, not the guest agent.
const CapSandbox = "sandbox"

// clientCaps are the guest capabilities a client of Serve may use: the
// others (mounts, the root, the network, shutdown, snapshots) are the
// owner's business.
var clientCaps = []string{
	agentproto.CapPing, agentproto.CapExec, agentproto.CapExecStdin, agentproto.CapExecTimeout,
	agentproto.CapSignal, agentproto.CapExecTTY, agentproto.CapExecUser, agentproto.CapFiles,
	agentproto.CapCgroup, agentproto.CapExecRoot, agentproto.CapFilesOwners, agentproto.CapRelease,
}

// Serve serves the sandbox to other processes on ln, in the agent
// protocol (docs/protocol.md): each connection is a session whose hello
// the sandbox answers itself and whose exec, signal, ping and file calls
// it passes to the guest, with the template's defaults applied as Exec
// applies them. Calls that change the VM (mount, root, network,
// shutdown, quiesce) are refused. A command belongs to the connection
// that started it: it is killed when that connection goes away before
// the command ended. Attach is the client. Serve returns when ctx ends
// or ln fails, and closes ln.
func (sb *Sandbox) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("serve: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb.serveClient(ctx, conn, "c"+strconv.FormatUint(sb.clientSeq.Add(1), 10))
		}()
	}
}

// activity is when the sandbox last served a client call, for idle
// timeouts (IdleSince).
type activity struct {
	mu    sync.Mutex
	last  time.Time
	busy  int
	conns int
}

// IdleSince is when the sandbox last had a command running or a call in
// flight from a client of Serve; the zero time while one is.
func (sb *Sandbox) IdleSince() time.Time {
	sb.act.mu.Lock()
	defer sb.act.mu.Unlock()
	if sb.act.busy > 0 {
		return time.Time{}
	}
	if sb.act.last.IsZero() {
		return sb.life.t0
	}
	return sb.act.last
}

// inFlight is how many calls and commands are under way.
func (a *activity) inFlight() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.busy
}

func (a *activity) begin() {
	a.mu.Lock()
	a.busy++
	a.mu.Unlock()
}

func (a *activity) end() {
	a.mu.Lock()
	a.busy--
	a.last = time.Now()
	a.mu.Unlock()
}

func (sb *Sandbox) serveClient(ctx context.Context, conn net.Conn, id string) {
	sess := mux.Server(conn, agentproto.SessionConfig())
	defer sess.Close()
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()
	st, err := sess.Accept()
	if err != nil {
		return
	}
	if err := sb.helloClient(st); err != nil {
		sb.log.Debug("client hello", "client", id, "err", err)
		return
	}
	sb.serveSession(ctx, sess, id)
}

// serveSession passes the streams of a client's session to the guest
// until the session ends (a pool serves a session this way once it has
// handed the client this sandbox).
func (sb *Sandbox) serveSession(ctx context.Context, sess *mux.Session, id string) {
	var wg sync.WaitGroup
	defer wg.Wait()
	// One client cannot hold more than its share of streams (each is a
	// goroutine here and may be one in the guest).
	slots := make(chan struct{}, maxClientStreams)
	for {
		st, err := sess.Accept()
		if err != nil {
			return
		}
		select {
		case slots <- struct{}{}:
		default:
			_ = st.Reset()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			sb.proxyStream(ctx, st, id)
		}()
	}
}

// helloClient answers a client's hello: the guest's session version, if
// the client speaks it, and what the client may use.
func (sb *Sandbox) helloClient(st *mux.Stream) error {
	defer st.Close()
	var req agentpb.Request
	if err := agentproto.NewReader(st).Read(&req); err != nil {
		return err
	}
	h := req.GetHello()
	if h == nil {
		_ = replyError(st, agentpb.Error_CODE_VERSION, "the first call of a session must be hello")
		return errors.New("no hello")
	}
	gh := sb.helloReply()
	v := gh.Version
	if v < h.MinVersion || v > h.MaxVersion {
		msg := fmt.Sprintf("the sandbox speaks protocol version %d, the client %d..%d", v, h.MinVersion, h.MaxVersion)
		_ = replyError(st, agentpb.Error_CODE_VERSION, msg)
		return errors.New(msg)
	}
	return agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Hello{Hello: &agentpb.HelloReply{
		Version: v, AgentVersion: gh.AgentVersion, Capabilities: sb.clientCapabilities(),
	}}})
}

// clientCapabilities is what a client of Serve (or of a pool) may use of
// the guest.
func (sb *Sandbox) clientCapabilities() []string {
	caps := []string{CapSandbox}
	for _, c := range sb.helloReply().Capabilities {
		if slices.Contains(clientCaps, c) {
			caps = append(caps, c)
		}
	}
	return caps
}

func replyError(w io.Writer, code agentpb.Error_Code, msg string) error {
	return agentproto.Write(w, &agentpb.Response{Result: &agentpb.Response_Error{Error: &agentpb.Error{Code: code, Message: msg}}})
}

// proxyStream passes one client stream to the guest: its request,
// checked and adjusted, then the rest of the stream both ways as bytes.
func (sb *Sandbox) proxyStream(ctx context.Context, st *mux.Stream, client string) {
	in := agentproto.NewReader(st)
	var req agentpb.Request
	if err := in.Read(&req); err != nil {
		st.Close()
		return
	}
	execID := ""
	switch call := req.Call.(type) {
	case *agentpb.Request_Ping:
		// Answered here: what a client checks is that its sandbox's
		// owner is there (paused or not).
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Pong{Pong: &agentpb.Pong{Payload: call.Ping.Payload}}})
		st.Close()
		return
	case *agentpb.Request_Pause:
		ps, err := sb.Pause(ctx)
		if err != nil {
			_ = replyError(st, ownerErrorCode(err), err.Error())
		} else {
			_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Pause{Pause: &agentpb.PauseReply{
				StateBytes: uint64(ps.StateBytes), DurationMicros: uint64(ps.Duration.Microseconds())}}})
		}
		st.Close()
		return
	case *agentpb.Request_Resume:
		d, err := sb.Resume(ctx)
		if err != nil {
			_ = replyError(st, ownerErrorCode(err), err.Error())
		} else {
			_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Resume{Resume: &agentpb.ResumeReply{DurationMicros: uint64(d.Microseconds())}}})
		}
		st.Close()
		return
	case *agentpb.Request_CopyIn, *agentpb.Request_CopyOut, *agentpb.Request_Stat, *agentpb.Request_CgroupStats, *agentpb.Request_Release:
		if err := sb.paused(); err != nil {
			_ = replyError(st, agentpb.Error_CODE_FAILED_PRECONDITION, err.Error())
			st.Close()
			return
		}
	case *agentpb.Request_Exec:
		if err := sb.execDefaults(call.Exec); err != nil {
			_ = agentproto.Write(st, &agentpb.ExecEvent{Event: &agentpb.ExecEvent_Exited{Exited: &agentpb.Exited{
				StartFailure: &agentpb.StartFailure{Reason: agentpb.StartFailure_REASON_INVALID, Message: err.Error()},
			}}})
			st.Close()
			return
		}
		// Exec ids are the guest session's: each client gets its own
		// name space, and every exec an id, so that it can be killed
		// when its client goes away.
		if call.Exec.Id == "" {
			call.Exec.Id = "anon-" + strconv.FormatUint(anonExec.Add(1), 10)
		}
		call.Exec.Id = client + "/" + call.Exec.Id
		execID = call.Exec.Id
	case *agentpb.Request_Signal:
		call.Signal.ExecId = client + "/" + call.Signal.ExecId
	case *agentpb.Request_Console:
		b, err := sb.Console(ctx)
		w := agentproto.NewFileDataWriter(st)
		if err != nil {
			_ = w.Fail(agentpb.Error_CODE_UNSUPPORTED, err)
		} else if _, err := w.Write(b); err == nil {
			_ = w.Close()
		}
		st.Close()
		return
	default:
		_ = replyError(st, agentpb.Error_CODE_UNSUPPORTED, "not served to clients of a sandbox")
		st.Close()
		return
	}
	if err := sb.Err(); err != nil || sb.closingOrClosed() {
		_ = st.Reset()
		return
	}
	sb.act.begin()
	defer sb.act.end()
	if err := sb.paused(); err != nil {
		if req.GetExec() != nil {
			_ = agentproto.Write(st, &agentpb.ExecEvent{Event: &agentpb.ExecEvent_Exited{Exited: &agentpb.Exited{
				StartFailure: &agentpb.StartFailure{Reason: agentpb.StartFailure_REASON_OTHER, Message: err.Error()},
			}}})
		} else {
			_ = replyError(st, agentpb.Error_CODE_FAILED_PRECONDITION, err.Error())
		}
		st.Close()
		return
	}
	gs, err := sb.agentClient().Forward(ctx, &req)
	if err != nil {
		sb.log.Debug("forward", "client", client, "err", err)
		_ = st.Reset()
		return
	}
	var guestDone atomic.Bool
	upDone := make(chan struct{})
	go func() {
		defer close(upDone)
		_, err := io.Copy(gs, in.Raw())
		switch {
		case guestDone.Load():
		case err == nil:
			_ = gs.CloseWrite()
		default:
			// The client went away: so does its command.
			_ = gs.Reset()
			sb.killOrphan(execID)
		}
	}()
	_, err = io.Copy(st, gs)
	guestDone.Store(true)
	if err != nil {
		_ = st.Reset()
		_ = gs.Reset()
		if !errors.Is(err, mux.ErrStreamReset) {
			sb.killOrphan(execID)
		}
	} else {
		_ = st.CloseWrite()
	}
	st.Close()
	gs.Close()
	<-upDone
}

var anonExec atomic.Uint64

// ownerErrorCode is the protocol's code for a Pause or Resume error.
func ownerErrorCode(err error) agentpb.Error_Code {
	switch {
	case errors.Is(err, ErrBusy), errors.Is(err, ErrPaused):
		return agentpb.Error_CODE_FAILED_PRECONDITION
	case errors.Is(err, ErrInvalid):
		return agentpb.Error_CODE_INVALID_ARGUMENT
	}
	return agentpb.Error_CODE_INTERNAL
}

// killOrphan kills the exec id (if any) whose client went away.
func (sb *Sandbox) killOrphan(id string) {
	if id == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := sb.agentClient().Kill(ctx, id, int(syscall.SIGKILL)); err != nil {
		sb.log.Debug("kill the command of a client that went away", "exec", id, "err", err)
	}
}

// execDefaults applies the template's defaults to a client's exec, as
// Start applies them to a Cmd.
func (sb *Sandbox) execDefaults(e *agentpb.Exec) error {
	cmd := Cmd{Argv: e.Argv, Dir: e.Cwd, User: e.User}
	for _, v := range e.Env {
		cmd.Env = append(cmd.Env, v.Name+"="+v.Value)
	}
	cmd, err := sb.withImageDefaults(cmd)
	if err != nil {
		return err
	}
	if len(cmd.Argv) == 0 || cmd.Argv[0] == "" {
		return errors.New("no command given")
	}
	env, err := cmd.check()
	if err != nil {
		return err
	}
	e.Argv, e.Cwd, e.User = cmd.Argv, cmd.Dir, cmd.User
	e.Env = e.Env[:0]
	for _, v := range env {
		e.Env = append(e.Env, &agentpb.EnvVar{Name: v.Name, Value: v.Value})
	}
	return nil
}
