package mvm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
	"github.com/mvm-sh/mvm/internal/units"
)

// A pool keeps VMs restored ahead of time, each waiting at its agent, and
// hands each to exactly one run: Start and Run take one when the user's
// pool has one of their shape ready (see fromPool), and fall back to
// starting their own when it has not. The VM is destroyed when its run
// ends, and the pool restores another in the background. What a clone
// must not share with its siblings (the clock, the random number
// generator, the boot id) is renewed when the VM is handed out, not when
// it was restored. docs/pool.md says what a user sees; docs/protocol.md
// ("Pools") what goes over the pool's socket.

// Pool tunables.
const (
	// DefaultPoolIdle is how long a shape may go without a take before
	// its VMs are given back (PoolOptions.IdleLimit).
	DefaultPoolIdle = 15 * time.Minute
	// MaxPoolSize bounds the VMs one shape keeps ready.
	MaxPoolSize = 16
	// poolSocketName is the pool's socket, in PoolDir.
	poolSocketName = "pool.sock"
	// poolHelloTimeout bounds a run's connect and hello to its pool,
	// takeTimeout the take (on the pool's side: the checks and the
	// refresh of the VM); a run that hits either starts its own VM.
	poolHelloTimeout = time.Second
	takeTimeout      = 3 * time.Second
	// refillDelay is how long after a take the pool waits (unless the
	// run ended first) before it restores the VM's replacement.
	refillDelay = 250 * time.Millisecond
	// readyFailWindow: a ready VM that fails sooner counts as a failed
	// start.
	readyFailWindow = 30 * time.Second
	// poolRetryMax bounds the wait between failed starts of a shape.
	poolRetryMax = 30 * time.Second
)

// CapPool is the capability a pool's hello announces.
const CapPool = "pool"

// PoolShape is one configuration a pool keeps VMs of. Of Config only
// what makes the machine matters: Template, CPUs, Memory, Accel, Kernel,
// KernelArgs, RootSpace and the directories; a pool cannot hold VMs with
// shared directories, a network, an Image reference (make it a template)
// or NoSnapshot.
type PoolShape struct {
	Config Config
	// Size is how many VMs of the shape the pool keeps ready (1..MaxPoolSize).
	Size int
}

// PoolOptions configure a pool.
type PoolOptions struct {
	Shapes []PoolShape
	// IdleLimit: a shape no run has taken a VM of for this long gives
	// its VMs back (their memory) until the next take asks for one; 0
	// means DefaultPoolIdle.
	IdleLimit time.Duration
	// Logger receives what the pool does; nil discards it.
	Logger *slog.Logger
}

// PoolStatus is what a pool holds (PoolStatusOf).
type PoolStatus struct {
	PID       int
	Started   time.Time
	IdleLimit time.Duration
	Shapes    []PoolShapeStatus
}

// PoolShapeStatus is one shape of a pool.
type PoolShapeStatus struct {
	Shape, Description string
	Size               int
	// Ready VMs wait for a run; Starting ones are being restored; Taken
	// ones serve a run.
	Ready, Starting, Taken int
	// Served is how many VMs were handed out, Missed how many takes
	// found none ready.
	Served, Missed uint64
	// PrivateBytes is the private memory of the ready VMs' VMMs: what is
	// not shared with the snapshot's RAM file or other processes.
	PrivateBytes int64
	// Idle: the VMs were given back for want of takes.
	Idle bool
	// LastError is why the last start failed, if it did.
	LastError string
}

// PoolDir is where the pool of cfg's user lives: its socket, lock, record
// and log, under StateDir (private to the user).
func PoolDir(cfg Config) (string, error) {
	if err := fillDirs(&cfg); err != nil {
		return "", err
	}
	return filepath.Join(cfg.StateDir, "pool"), nil
}

// poolShape is a shape's state in the pool.
type poolShape struct {
	cfg         Config
	shape, desc string
	size        int
	wake        chan struct{}

	mu       sync.Mutex
	ready    []*pooledVM
	starting int
	taken    int
	served   uint64
	missed   uint64
	lastTake time.Time // the last take, served or missed (idleness)
	lastOut  time.Time // the last VM handed out (the refill's delay)
	backoff  time.Duration
	retryAt  time.Time // no start before, after failures
	idle     bool
	lastErr  string
}

// pooledVM is a VM of the pool and the key of the machine it is.
type pooledVM struct {
	sb   *Sandbox
	key  string
	gone chan struct{} // closed when it left the ready list
}

// Pool keeps VMs ready for runs; see NewPool.
type Pool struct {
	opts    PoolOptions
	log     *slog.Logger
	shapes  []*poolShape
	byShape map[string]*poolShape
	started time.Time
	seq     uint64
	seqMu   sync.Mutex
	// served sessions (taken VMs), which outlive the pool's context
	sessions sync.WaitGroup
}

// NewPool checks opts: every shape must be one a pool can hold, and no
// two the same.
func NewPool(opts PoolOptions) (*Pool, error) {
	if len(opts.Shapes) == 0 {
		return nil, invalid("Shapes", "", "a pool needs at least one shape")
	}
	if opts.IdleLimit < 0 {
		return nil, invalid("IdleLimit", opts.IdleLimit.String(), "must not be negative")
	}
	if opts.IdleLimit == 0 {
		opts.IdleLimit = DefaultPoolIdle
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	p := &Pool{opts: opts, log: opts.Logger, byShape: map[string]*poolShape{}, started: time.Now()}
	for _, s := range opts.Shapes {
		if s.Size < 1 || s.Size > MaxPoolSize {
			return nil, invalid("Size", strconv.Itoa(s.Size), "must be between 1 and %d", MaxPoolSize)
		}
		r, err := resolve(s.Config)
		if err != nil {
			return nil, err
		}
		shape, why := poolShapeOf(r)
		if why != "" {
			return nil, invalid("Shapes", describeShape(r), "a pool cannot hold it: %s", why)
		}
		if p.byShape[shape] != nil {
			return nil, invalid("Shapes", describeShape(r), "given twice")
		}
		cfg := r.Config
		cfg.NoPool, cfg.Logger, cfg.Name, cfg.Env = true, opts.Logger, "", nil
		ps := &poolShape{cfg: cfg, shape: shape, desc: describeShape(r), size: s.Size, wake: make(chan struct{}, 1), lastTake: p.started}
		p.shapes = append(p.shapes, ps)
		p.byShape[shape] = ps
	}
	return p, nil
}

// poolShapeOf is the shape a pool's VM must have to serve r, or why none
// can: what the machine is made of, the directories it is found in, and
// nothing a run sets per command.
func poolShapeOf(r resolved) (shape, why string) {
	switch {
	case r.NoPool:
		return "", "the pool is off for this run"
	case r.backend != nil:
		return "", "a test backend"
	case r.Image != "":
		return "", "an image reference (a template made from it can be pooled)"
	case r.RootDir != "", r.RootDigest != "":
		return "", "a root directory"
	case len(r.Dirs) > 0:
		return "", "shared directories"
	case r.Network != nil, r.TAP != nil:
		return "", "a network"
	case r.NoSnapshot:
		return "", "snapshots are off"
	}
	if err := fillDirs(&r.Config); err != nil {
		return "", err.Error()
	}
	kernel := r.Kernel
	if kernel != "" {
		if abs, err := filepath.Abs(kernel); err == nil {
			kernel = abs
		}
	}
	rootSpace := r.RootSpace
	if rootSpace == 0 {
		rootSpace = DefaultRootSpace
	}
	shape = strings.Join([]string{
		"v1", "template=" + strconv.Quote(r.Template), "cpus=" + strconv.Itoa(r.CPUs),
		"memory=" + strconv.FormatUint(r.memMiB, 10), "accel=" + string(r.accel.Kind),
		"kernel=" + strconv.Quote(kernel), "args=" + strconv.Quote(strings.Join(r.KernelArgs, " ")),
		"rootspace=" + strconv.FormatInt(rootSpace, 10),
		"cache=" + strconv.Quote(r.CacheDir), "data=" + strconv.Quote(r.DataDir),
	}, " ")
	return shape, ""
}

// describeShape says what a shape is, for people.
func describeShape(r resolved) string {
	root := "default image"
	if r.Template != "" {
		root = "template " + r.Template
	}
	s := fmt.Sprintf("%s, %d CPUs, %s", root, r.CPUs, units.FormatMiB(r.memMiB))
	if r.Kernel != "" {
		s += ", kernel " + r.Kernel
	}
	return s
}

// Run fills the pool and serves it on ln until ctx ends. Then it stops
// taking, gives back the ready VMs, and waits for the runs of the VMs it
// handed out to end before it returns (a run is never cut short by a
// pool that stops). ln is closed; a ListenPool listener's lock is held
// until Run returns.
func (p *Pool) Run(ctx context.Context, ln net.Listener) error {
	pl, _ := ln.(*poolListener)
	if pl != nil {
		pl.running.Store(true)
	}
	// A pool whose socket failed ends (its fillers with it), rather
	// than keep VMs no run can take.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var fillers sync.WaitGroup
	for _, s := range p.shapes {
		fillers.Add(1)
		go func() {
			defer fillers.Done()
			p.fill(ctx, s)
		}()
	}
	err := p.serve(ctx, ln)
	cancel()
	fillers.Wait()
	for _, s := range p.shapes {
		s.mu.Lock()
		vms := s.ready
		s.ready = nil
		s.mu.Unlock()
		for _, vm := range vms {
			close(vm.gone)
			p.destroy(vm)
		}
	}
	p.sessions.Wait()
	if pl != nil {
		// Only now: until its last run ended this is the user's pool.
		pl.lock.Release()
	}
	return err
}

// serve accepts the pool's clients until ctx ends.
func (p *Pool) serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var delay time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("pool: %w", err)
			}
			// Out of descriptors, most likely: wait, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			p.log.Warn("accept", "err", err, "retry in", delay)
			sleep(ctx, delay)
			continue
		}
		delay = 0
		if err := sameUser(conn); err != nil {
			p.log.Warn("refused a client", "err", err)
			conn.Close()
			continue
		}
		p.sessions.Add(1)
		go func() {
			defer p.sessions.Done()
			p.serveConn(ctx, conn)
		}()
	}
}

// sameUser refuses a peer that is not this process's user: the socket is
// private (0600 in a 0700 directory), and this says so again.
func sameUser(conn net.Conn) error {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return errors.New("not a unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer uid %d is not %d", cred.Uid, os.Geteuid())
	}
	return nil
}

// serveConn serves one client: its hello, then status calls or one take,
// after which the session is the VM's.
func (p *Pool) serveConn(ctx context.Context, conn net.Conn) {
	sess := mux.Server(conn, agentproto.SessionConfig())
	defer sess.Close()
	// Until a take, the session ends with the pool; after one, with
	// its run.
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	st, err := sess.Accept()
	if err != nil {
		stop()
		return
	}
	if err := p.hello(st); err != nil {
		stop()
		return
	}
	for {
		st, err := sess.Accept()
		if err != nil {
			stop()
			return
		}
		var req agentpb.Request
		if err := agentproto.NewReader(st).Read(&req); err != nil {
			st.Close()
			continue
		}
		switch call := req.Call.(type) {
		case *agentpb.Request_PoolStatus:
			_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_PoolStatus{PoolStatus: p.statusReply()}})
			st.Close()
		case *agentpb.Request_Take:
			if !stop() {
				// The pool is stopping: this session is closed.
				st.Close()
				return
			}
			vm, s := p.take(ctx, call.Take.Shape)
			if vm == nil {
				msg := "has no VM of this shape ready"
				if s == nil {
					msg = "keeps no VMs of this shape (mvmctl pool status lists its shapes)"
				}
				_ = replyError(st, agentpb.Error_CODE_NOT_FOUND, msg)
				st.Close()
				// The client ends the session: closing it here could
				// lose the reply in flight. It ends with the pool again.
				stop = context.AfterFunc(ctx, func() { sess.Close() })
				continue
			}
			p.serveTaken(sess, st, vm, s)
			return
		default:
			_ = replyError(st, agentpb.Error_CODE_FAILED_PRECONDITION, "a pool's client must take a VM first")
			st.Close()
		}
	}
}

// hello answers a client's hello as a pool.
func (p *Pool) hello(st *mux.Stream) error {
	defer st.Close()
	var req agentpb.Request
	if err := agentproto.NewReader(st).Read(&req); err != nil {
		return err
	}
	h := req.GetHello()
	if h == nil || agentproto.Version < h.MinVersion || agentproto.Version > h.MaxVersion {
		_ = replyError(st, agentpb.Error_CODE_VERSION, fmt.Sprintf("the pool speaks protocol version %d", agentproto.Version))
		return errors.New("no hello, or no common version")
	}
	return agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Hello{Hello: &agentpb.HelloReply{
		Version: agentproto.Version, AgentVersion: "pool", Capabilities: []string{CapPool},
	}}})
}

// serveTaken hands vm to the session: the take's reply, then every later
// stream to the guest, until the session ends and the VM is destroyed.
func (p *Pool) serveTaken(sess *mux.Session, st *mux.Stream, vm *pooledVM, s *poolShape) {
	defer func() {
		p.destroy(vm)
		s.mu.Lock()
		s.taken--
		s.mu.Unlock()
		s.poke()
	}()
	gh := vm.sb.helloReply()
	err := agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Take{Take: &agentpb.TakeReply{
		Name: vm.sb.name, Version: gh.Version, AgentVersion: gh.AgentVersion, Capabilities: vm.sb.clientCapabilities(),
	}}})
	st.Close()
	if err != nil {
		return
	}
	p.log.Debug("handed out", "vm", vm.sb.name, "shape", s.desc)
	// The VM ends with its run's session, whatever its streams wait
	// for (a guest that stopped reading a stdin the client no longer
	// sends), and the session with the VM: a VM that failed (frozen,
	// crashed) fails its run, as an unpooled run's would.
	ended := make(chan struct{})
	defer close(ended)
	go func() {
		select {
		case <-sess.Done():
			p.destroy(vm)
		case <-vm.sb.Failed():
			sess.Close()
		case <-ended:
		}
	}()
	// Not the pool's context: a pool that stops lets its runs finish.
	vm.sb.serveSession(context.Background(), sess, "run")
}

// take hands out a ready VM of shape, refreshed, or nil when none is
// ready (the shape is then filled again if it had been given back).
func (p *Pool) take(ctx context.Context, shape string) (*pooledVM, *poolShape) {
	s := p.byShape[shape]
	if s == nil {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, takeTimeout)
	defer cancel()
	var key string
	var keyErr error
	keyDone := false
	for {
		s.mu.Lock()
		s.lastTake = time.Now()
		if s.idle {
			s.idle = false
			s.poke()
		}
		if len(s.ready) == 0 {
			s.missed++
			s.mu.Unlock()
			return nil, s
		}
		vm := s.ready[0]
		s.ready = s.ready[1:]
		close(vm.gone)
		s.taken++
		s.lastOut = time.Now()
		s.mu.Unlock()
		s.poke()
		t0 := time.Now()
		if !keyDone {
			// What the shape is made of now: a template made again, a
			// new kernel or QEMU since the VM was restored make it
			// stale.
			key, keyErr = currentKey(ctx, s.cfg)
			keyDone = true
		}
		err := keyErr
		if err == nil && key != vm.key {
			err = errors.New("its template, kernel or VMM changed since it was restored")
		}
		if err == nil {
			err = vm.sb.Err()
		}
		t1 := time.Now()
		if err == nil {
			err = vm.sb.agentClient().Refresh(ctx)
		}
		if err == nil {
			p.log.Debug("take", "vm", vm.sb.name, "check", t1.Sub(t0), "refresh", time.Since(t1))
			s.mu.Lock()
			s.served++
			// A VM that served a run: the shape starts well again.
			s.backoff = 0
			s.mu.Unlock()
			return vm, s
		}
		p.log.Info("not handed out", "vm", vm.sb.name, "err", err)
		go p.destroy(vm)
		s.mu.Lock()
		s.taken--
		if keyErr == nil && key != vm.key {
			// The others were restored from the same stale machine.
			for _, other := range s.ready {
				close(other.gone)
				go p.destroy(other)
			}
			s.ready = nil
		}
		s.mu.Unlock()
		if ctx.Err() != nil {
			return nil, s
		}
	}
}

// poke wakes the shape's filler.
func (s *poolShape) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// fill keeps the shape's ready VMs at its size until ctx ends, one start
// at a time, and gives them back when no take came for the idle limit.
func (p *Pool) fill(ctx context.Context, s *poolShape) {
	for ctx.Err() == nil {
		s.mu.Lock()
		if !s.idle && time.Since(s.lastTake) >= p.opts.IdleLimit && len(s.ready) > 0 {
			p.giveBack(s)
		}
		// A VM just handed out is left its run's first moments before
		// its replacement starts: on a small host a restore beside it
		// slows the very run the pool is for.
		settle := max(refillDelay-time.Since(s.lastOut), time.Until(s.retryAt))
		if s.taken == 0 {
			settle = time.Until(s.retryAt)
		}
		short := !s.idle && len(s.ready)+s.starting < s.size
		need := short && settle <= 0
		if need {
			s.starting++
		}
		s.mu.Unlock()
		if need {
			vm, err := p.startVM(ctx, s)
			s.mu.Lock()
			s.starting--
			switch {
			case err == nil && ctx.Err() == nil:
				s.ready = append(s.ready, vm)
				s.lastErr = ""
			case err != nil && ctx.Err() == nil:
				s.lastErr = err.Error()
				s.failedStart()
			}
			retry := s.backoff
			s.mu.Unlock()
			switch {
			case err == nil && ctx.Err() != nil:
				p.destroy(vm)
			case err == nil:
				go p.watchReady(s, vm, time.Now())
			case ctx.Err() == nil:
				p.log.Warn("start a VM", "shape", s.desc, "err", err, "retry in", retry)
			}
			continue
		}
		// Until a take or a VM's end wakes it, the retry or the refill
		// is due, or the shape turns idle.
		s.mu.Lock()
		wait := time.Hour
		switch {
		case short:
			wait = max(settle, time.Millisecond)
		case !s.idle:
			wait = max(p.opts.IdleLimit-time.Since(s.lastTake), 10*time.Millisecond)
		}
		s.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
		case <-s.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// failedStart backs the shape's starts off after a failure (1 s, then
// doubling to poolRetryMax), until a VM of it serves a run; s.mu is held.
func (s *poolShape) failedStart() {
	s.backoff = min(max(2*s.backoff, time.Second), poolRetryMax)
	s.retryAt = time.Now().Add(s.backoff)
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// giveBack destroys the shape's ready VMs for want of takes; s.mu is held.
func (p *Pool) giveBack(s *poolShape) {
	p.log.Info("idle: giving the VMs back", "shape", s.desc, "vms", len(s.ready))
	for _, vm := range s.ready {
		close(vm.gone)
		go p.destroy(vm)
	}
	s.ready, s.idle = nil, true
}

// watchReady drops a ready VM that fails before it is taken. One that
// fails soon after it became ready (at ready) counts as a failed start: a
// template whose guest powers off by itself must not be restored again
// and again.
func (p *Pool) watchReady(s *poolShape, vm *pooledVM, ready time.Time) {
	select {
	case <-vm.gone:
		return
	case <-vm.sb.Failed():
	}
	s.mu.Lock()
	found := false
	for i, r := range s.ready {
		if r == vm {
			s.ready = append(s.ready[:i:i], s.ready[i+1:]...)
			close(vm.gone)
			s.lastErr = "a ready VM failed: " + vm.sb.Err().Error()
			if time.Since(ready) < readyFailWindow {
				s.failedStart()
			}
			found = true
			break
		}
	}
	s.mu.Unlock()
	if found {
		p.log.Warn("a ready VM failed", "vm", vm.sb.name, "err", vm.sb.Err())
		p.destroy(vm)
		s.poke()
	}
}

// startVM starts one VM of the shape and warms it: under emulation a
// restored guest runs its first command slowly while the emulator
// translates the code of the paths it takes (fork, exec, the agent's own)
// afresh; a first command run now, before any run sees the VM, moves that
// cost out of the run.
func (p *Pool) startVM(ctx context.Context, s *poolShape) (*pooledVM, error) {
	cfg := s.cfg
	cfg.Name = p.vmName()
	sb, err := Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	sb.pooled = true
	vm := &pooledVM{sb: sb, gone: make(chan struct{})}
	fail := func(err error) (*pooledVM, error) {
		p.destroy(vm)
		return nil, err
	}
	if !sb.helloReply().Has(agentproto.CapRefresh) {
		return fail(fmt.Errorf("its guest agent (%s) cannot be refreshed when it is handed out; update the image (mvmctl bootstrap) or the template", sb.helloReply().AgentVersion))
	}
	if vm.key, err = sb.snapshotKey(ctx); err != nil {
		return fail(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for range 2 {
		// The take's own calls too: the first refresh also binds the
		// boot id's file over /proc's.
		if err := sb.agentClient().Refresh(wctx); err != nil {
			return fail(fmt.Errorf("warm up: %w", err))
		}
		if _, err := sb.Exec(wctx, Cmd{Argv: []string{"true"}}); err != nil && !errors.Is(err, ErrCommandNotFound) {
			return fail(fmt.Errorf("warm up: %w", err))
		}
	}
	p.log.Debug("ready", "vm", sb.name, "shape", s.desc, "restored", sb.restored)
	return vm, nil
}

// vmName names a pool VM: pool-<pid>-<n>, unique among running VMs.
func (p *Pool) vmName() string {
	p.seqMu.Lock()
	defer p.seqMu.Unlock()
	p.seq++
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return "pool-" + strconv.FormatInt(int64(os.Getpid()), 16) + "-" + strconv.FormatUint(p.seq, 10) + hex.EncodeToString(b)
}

// destroy ends a pool VM at once: nothing in it is kept.
func (p *Pool) destroy(vm *pooledVM) {
	vm.sb.abandonGuest()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := vm.sb.Close(ctx); err != nil {
		p.log.Debug("close", "vm", vm.sb.name, "err", err)
	}
}

// currentKey is the snapshot key cfg's machine has now.
func currentKey(ctx context.Context, cfg Config) (string, error) {
	sb, err := prepare(cfg)
	if err != nil {
		return "", err
	}
	if sb.cfg.onTemplate() {
		undo, err := sb.leaseTemplate(ctx)
		if err != nil {
			return "", err
		}
		defer func() { _ = undo(ctx) }()
	}
	return sb.snapshotKey(ctx)
}

// Status is what the pool holds now.
func (p *Pool) Status() PoolStatus {
	st := PoolStatus{PID: os.Getpid(), Started: p.started, IdleLimit: p.opts.IdleLimit}
	for _, s := range p.shapes {
		s.mu.Lock()
		ss := PoolShapeStatus{
			Shape: s.shape, Description: s.desc, Size: s.size, Ready: len(s.ready), Starting: s.starting,
			Taken: s.taken, Served: s.served, Missed: s.missed, Idle: s.idle, LastError: s.lastErr,
		}
		vms := append([]*pooledVM(nil), s.ready...)
		s.mu.Unlock()
		for _, vm := range vms {
			ss.PrivateBytes += vm.sb.privateMemory()
		}
		st.Shapes = append(st.Shapes, ss)
	}
	return st
}

func (p *Pool) statusReply() *agentpb.PoolStatusReply {
	st := p.Status()
	r := &agentpb.PoolStatusReply{Pid: uint32(st.PID), StartedUnixNano: st.Started.UnixNano(), IdleLimitMillis: uint64(st.IdleLimit.Milliseconds())}
	for _, s := range st.Shapes {
		r.Shapes = append(r.Shapes, &agentpb.PoolShape{
			Shape: s.Shape, Description: s.Description, Size: uint32(s.Size), Ready: uint32(s.Ready),
			Starting: uint32(s.Starting), Taken: uint32(s.Taken), Served: s.Served, Missed: s.Missed,
			PrivateBytes: uint64(s.PrivateBytes), Idle: s.Idle, LastError: s.LastError,
		})
	}
	return r
}
