// Package ctrshim is mvm's containerd shim v2 (io.containerd.mvm.v2): it
// serves containerd's task API (version 2, what containerd 1.6 and 1.7
// speak) by running each container's processes in a microVM, through
// the mvm SDK. The container's root filesystem, which containerd's
// snapshotter lays out as mounts, is mounted in the bundle, written once
// into an ext4 template (content-addressed: the same layers cost nothing
// the second time) and attached to the VM read-only under the run's own
// writable layer, as for `mvmctl exec --template`.
//
// One shim process serves one task, or one pod: the containers of a CRI
// pod sandbox (the io.kubernetes.cri.sandbox-id annotation) share the
// sandbox's shim and its VM. The VM boots at the Start of the task (or of
// the pod's sandbox container) with that container's root, and ends at
// its Delete. A pod's other containers run in the same VM, each in its
// own root: their tree is copied into the VM's disk at Start, and their
// processes are chrooted there by the agent (Exec.root), each container
// in a cgroup of its own.
package ctrshim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	cgstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v2"
	apitypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/protobuf"
	ptypes "github.com/containerd/containerd/protobuf/types"
	"github.com/containerd/containerd/runtime/v2/shim"
	"github.com/containerd/fifo"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// RuntimeName is the runtime containerd names this shim by.
const RuntimeName = "io.containerd.mvm.v2"

var _ = (taskAPI.TaskService)(&Service{})

// Service is the shim's task service.
type Service struct {
	id string
	// ns is the containerd namespace the shim serves (-namespace):
	// events sent from no request (an exit, an OOM kill) go there, where
	// containerd's CRI plugin (k8s.io) listens for them.
	ns        string
	publisher shim.Publisher
	shutdown  func()
	log       *slog.Logger

	mu         sync.Mutex
	containers map[string]*container
	sb         *mvm.Sandbox // the VM, once its owner started
	net        *podNet      // the pod's network, bridged to the VM's card
	memory     int64        // the VM's memory in bytes
}

// container is one task of the shim: the VM's owner (a lone task, or a
// pod's sandbox), or a member of the owner's pod.
type container struct {
	id, bundle string
	spec       *specs.Spec
	rootDigest string              // the owner's root tree, written (mvm.Config.RootDigest)
	member     bool                // a pod's container, in its own root in the VM
	root       string              // a member's root in the VM, once copied
	mounts     mountPlan           // how the spec's mounts are provided
	procs      map[string]*process // "" is the init process
	deleting   bool                // a Delete of the container is under way
	// oomKills is the container cgroup's oom_kill count last seen: a
	// process's end that raised it was the OOM killer's doing.
	oomKills uint64
}

// The CRI's annotations on a container's spec.
const (
	annotationType      = "io.kubernetes.cri.container-type"
	annotationSandboxID = "io.kubernetes.cri.sandbox-id"
)

// podOf is the id of the pod sandbox spec's container belongs to, "" for
// a container of no pod (ctr run) or a pod's sandbox itself.
func podOf(id string, spec *specs.Spec) string {
	if spec.Annotations[annotationType] != "container" {
		return ""
	}
	if sb := spec.Annotations[annotationSandboxID]; sb != id {
		return sb
	}
	return ""
}

// container returns the shim's container id.
func (s *Service) container(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.containers[id]
	if c == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "container %s", id)
	}
	return c, nil
}

// process returns a process of container id.
func (s *Service) process(id, execID string) (*container, *process, error) {
	c, err := s.container(id)
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := c.procs[execID]
	if p == nil {
		return nil, nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process %q of %s", execID, id)
	}
	return c, p, nil
}

// cgroupName is the guest cgroup the task's processes run in (all of
// them, init and execs, as runc does): its counters are the task's
// metrics, and its oom_kill count tells an OOM kill from a plain SIGKILL.
func cgroupName(id string) string { return "ctr-" + shortID(id) }

// process is the init process or an exec of the task.
type process struct {
	id                    string
	argv, env             []string
	dir, user             string
	stdin, stdout, stderr string
	terminal              bool

	p        *mvm.Process
	pid      uint32
	starting bool // a Start is under way
	started  bool
	done     chan struct{}
	status   uint32
	exitedAt time.Time
	closers  []io.Closer
	stdinW   io.Closer
}

// New is the shim's init function (shim.Init).
func New(ctx context.Context, id string, publisher shim.Publisher, shutdown func()) (shim.Shim, error) {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("task", id)
	ns, _ := namespaces.Namespace(ctx)
	return &Service{id: id, ns: ns, publisher: publisher, shutdown: shutdown, log: log, containers: map[string]*container{}}, nil
}

// dirs are the mvm directories the shim uses: containerd runs shims as
// root with its own environment, so MVM_* variables or root's XDG
// directories (where `mvmctl bootstrap`, run as root, put the image).
func dirs() mvm.Config {
	if os.Getenv("HOME") == "" {
		os.Setenv("HOME", "/root")
	}
	var c mvm.Config
	c.DataDir, _ = xdg.DataDir()
	c.CacheDir, _ = xdg.CacheDir()
	return c
}

// StartShim starts the shim's long-lived process and returns its address
// (containerd runs `containerd-shim-mvm-v2 ... start`).
func (s *Service) StartShim(ctx context.Context, opts shim.StartOpts) (_ string, retErr error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return "", err
	}
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	cwd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	// A pod's containers are served by the shim of its sandbox, whose
	// socket is named after the pod.
	grouping := opts.ID
	if b, err := os.ReadFile(filepath.Join(cwd, "config.json")); err == nil {
		var spec specs.Spec
		if json.Unmarshal(b, &spec) == nil {
			if pod := podOf(opts.ID, &spec); pod != "" {
				grouping = pod
			}
		}
	}
	address, err := shim.SocketAddress(ctx, opts.Address, grouping)
	if err != nil {
		return "", err
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return "", err
		}
		if shim.CanConnect(address) {
			// The pod's shim runs: it serves this container too.
			if err := shim.WriteAddress("address", address); err != nil {
				return "", err
			}
			return address, nil
		}
		if err := shim.RemoveSocket(address); err != nil {
			return "", fmt.Errorf("remove the socket in use: %w", err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return "", err
		}
	}
	defer func() {
		if retErr != nil {
			socket.Close()
			_ = shim.RemoveSocket(address)
		}
	}()
	if err := shim.WriteAddress("address", address); err != nil {
		return "", err
	}
	f, err := socket.File()
	if err != nil {
		return "", err
	}
	defer f.Close()
	cmd, err := shimCommand(self, cwd, ns, opts)
	if err != nil {
		return "", err
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, f)
	if err := cmd.Start(); err != nil {
		return "", err
	}
	go func() { _ = cmd.Wait() }()
	if err := shim.WritePidFile("shim.pid", cmd.Process.Pid); err != nil {
		_ = cmd.Process.Kill()
		return "", err
	}
	return address, nil
}

// Cleanup is `containerd-shim-mvm-v2 ... delete`: containerd's cleanup
// after a shim that died. The VM died with the shim (its VMM is the
// shim's child); what is left is the bundle's rootfs mount and the
// container's template.
func (s *Service) Cleanup(ctx context.Context) (*taskAPI.DeleteResponse, error) {
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	if err := mount.UnmountAll(filepath.Join(cwd, "rootfs"), 0); err != nil {
		s.log.Warn("unmount the rootfs", "err", err)
	}
	// What the dead shim had set up in its pod's network namespace.
	if b, err := os.ReadFile(filepath.Join(cwd, "config.json")); err == nil {
		var spec specs.Spec
		if json.Unmarshal(b, &spec) == nil && podOf(s.id, &spec) == "" {
			if ns := netnsOf(&spec); ns != "" {
				if err := cleanUpPodNetwork(ctx, ns); err != nil {
					s.log.Warn("the pod's network", "err", err)
				}
			}
		}
	}
	// The VM's run directory, which its dead owner could not remove:
	// reclaimed once its VMM, which dies with the shim, is gone too.
	reclaimVM(s.log, vmName(s.id))
	return &taskAPI.DeleteResponse{ExitedAt: protobuf.ToTimestamp(time.Now()), ExitStatus: 128 + uint32(syscall.SIGKILL)}, nil
}

// Create mounts the rootfs and, for the VM's owner, makes the
// container's template; the VM starts with the owner's init process
// (Start). A pod's member is only recorded: its tree goes into the VM
// at its Start.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.containers[r.ID] != nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "task %s", r.ID)
	}
	b, err := os.ReadFile(filepath.Join(r.Bundle, "config.json"))
	if err != nil {
		return nil, err
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("config.json: %w", err)
	}
	if spec.Process == nil || len(spec.Process.Args) == 0 {
		return nil, errdefs.ToGRPCf(errdefs.ErrInvalidArgument, "the spec has no process args")
	}
	c := &container{id: r.ID, bundle: r.Bundle, spec: &spec, procs: map[string]*process{}}
	if pod := podOf(r.ID, &spec); pod != "" {
		if owner := s.containers[pod]; owner == nil || owner.member {
			return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s: its pod sandbox %s is not served by this shim", r.ID, pod)
		}
		c.member = true
	}
	if c.mounts, err = planMounts(spec.Mounts, c.member); err != nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrInvalidArgument, "container %s: %v", r.ID, err)
	}
	if !c.member {
		for _, o := range s.containers {
			if !o.member {
				return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "this shim already serves task %s", o.id)
			}
		}
	}
	rootfs := filepath.Join(r.Bundle, "rootfs")
	if len(r.Rootfs) > 0 {
		var mounts []mount.Mount
		for _, m := range r.Rootfs {
			mounts = append(mounts, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
		}
		if err := os.MkdirAll(rootfs, 0o711); err != nil {
			return nil, err
		}
		if err := mount.All(mounts, rootfs); err != nil {
			return nil, fmt.Errorf("mount the rootfs: %w", err)
		}
		defer func() {
			if retErr != nil {
				_ = mount.UnmountAll(rootfs, 0)
			}
		}()
	}
	if !c.member {
		// Written now (an early error, and Start only boots): the
		// image is content-addressed, so a container of an image run
		// before shares its file and its snapshot.
		cfg := dirs()
		cfg.RootDir = rootfs
		start := time.Now()
		t, err := mvm.LookupTemplate(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("the container's root filesystem: %w", err)
		}
		s.log.Info("rootfs written", "container", r.ID, "digest", t.Digest, "took", time.Since(start))
		c.rootDigest = t.Digest
	}
	c.procs[""] = s.newProcess("", spec.Process, r.Stdin, r.Stdout, r.Stderr, r.Terminal)
	s.containers[r.ID] = c
	return &taskAPI.CreateTaskResponse{}, nil
}

func (s *Service) newProcess(id string, sp *specs.Process, stdin, stdout, stderr string, terminal bool) *process {
	user := ""
	if sp.User.UID != 0 || sp.User.GID != 0 {
		user = strconv.FormatUint(uint64(sp.User.UID), 10) + ":" + strconv.FormatUint(uint64(sp.User.GID), 10)
	}
	return &process{
		id: id, argv: sp.Args, env: sp.Env, dir: sp.Cwd, user: user,
		stdin: stdin, stdout: stdout, stderr: stderr, terminal: terminal,
		done: make(chan struct{}),
	}
}

// shape is the VM's shape from the spec's resources: the memory limit
// (at least mvm.MinMemory), and the CPU quota rounded up.
func shape(spec *specs.Spec) (cpus int, memory int64) {
	if spec.Linux == nil || spec.Linux.Resources == nil {
		return 0, 0
	}
	res := spec.Linux.Resources
	if m := res.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		memory = max((*m.Limit+(1<<20)-1)&^((1<<20)-1), mvm.MinMemory)
	}
	if c := res.CPU; c != nil && c.Quota != nil && c.Period != nil && *c.Quota > 0 && *c.Period > 0 {
		cpus = int((uint64(*c.Quota) + *c.Period - 1) / *c.Period)
		cpus = min(max(cpus, 1), mvm.MaxCPUs)
	}
	return cpus, memory
}

// limits are the spec's memory limit and CPU quota as guest cgroup
// limits, nil without either.
func limits(spec *specs.Spec) *mvm.CgroupLimits {
	if spec.Linux == nil || spec.Linux.Resources == nil {
		return nil
	}
	var l mvm.CgroupLimits
	res := spec.Linux.Resources
	if m := res.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		l.Memory = uint64(*m.Limit)
	}
	if c := res.CPU; c != nil && c.Quota != nil && c.Period != nil && *c.Quota > 0 && *c.Period >= 1000 {
		// The kernel's least quota is 1 ms (the kubelet rounds up to
		// it too).
		l.CPUQuota, l.CPUPeriod = time.Duration(max(*c.Quota, 1000))*time.Microsecond, time.Duration(*c.Period)*time.Microsecond
	}
	if l == (mvm.CgroupLimits{}) {
		return nil
	}
	return &l
}

// Start starts the init process (booting the VM, or copying a pod
// member's tree into it) or an exec.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	again, vmUp, noRoot := p.started || p.starting, s.sb != nil, c.member && c.root == "" && r.ExecID != ""
	if !again {
		p.starting = true
	}
	s.mu.Unlock()
	switch {
	case again:
		return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "process %q of %s was started", r.ExecID, r.ID)
	case r.ExecID == "" && !c.member && vmUp:
		return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "the VM of %s is running", r.ID)
	case noRoot:
		// Its root is not in the VM: it would run in the pod sandbox's.
		return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s is not started", r.ID)
	}
	started := false
	defer func() {
		if !started {
			s.mu.Lock()
			p.starting = false
			s.mu.Unlock()
		}
	}()
	if r.ExecID == "" && !c.member {
		cpus, memory := shape(c.spec)
		cfg := dirs()
		cfg.RootDigest, cfg.CPUs, cfg.Memory, cfg.Name = c.rootDigest, cpus, memory, vmName(c.id)
		cfg.Dirs = c.mounts.dirs
		start := time.Now()
		var pn *podNet
		if ns := netnsOf(c.spec); ns != "" {
			if pn, err = setUpPodNetwork(ctx, ns); err != nil {
				return nil, fmt.Errorf("the pod's network: %w", err)
			}
			if pn != nil {
				cfg.TAP = pn.config
				s.log.Info("pod network", "container", c.id, "interface", pn.iface, "address", pn.config.Address, "gateway", pn.config.Gateway, "mac", pn.config.MAC)
			}
		}
		sb, err := mvm.Start(context.WithoutCancel(ctx), cfg)
		if err != nil {
			if pn != nil {
				pn.close(context.WithoutCancel(ctx))
			}
			return nil, err
		}
		how := "booted"
		if sb.Restored() {
			how = "restored"
		}
		s.log.Info("vm started", "container", c.id, "how", how, "took", time.Since(start))
		if memory == 0 {
			memory = mvm.DefaultMemory
		}
		s.mu.Lock()
		s.sb, s.memory, s.net = sb, memory, pn
		s.mu.Unlock()
		if err := s.copyMounts(ctx, sb, c, ""); err != nil {
			return nil, err
		}
	}
	if r.ExecID == "" && c.member {
		if err := s.copyRoot(ctx, c); err != nil {
			return nil, err
		}
	}
	if err := s.startProcess(c, p); err != nil {
		return nil, err
	}
	started = true
	if r.ExecID == "" {
		s.publish(ctx, "/tasks/start", &eventstypes.TaskStart{ContainerID: c.id, Pid: p.pid})
	} else {
		s.publish(ctx, "/tasks/exec-started", &eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: r.ExecID, Pid: p.pid})
	}
	return &taskAPI.StartResponse{Pid: p.pid}, nil
}

// memberRoot is where a pod member's root goes in the VM: a directory
// of the VM's own root, on its writable disk.
func memberRoot(id string) string { return "/.mvm-ctr-" + shortID(id) }

// copyRoot copies a pod member's mounted tree into the pod's VM, owners
// and all, as the member's root.
func (s *Service) copyRoot(ctx context.Context, c *container) error {
	s.mu.Lock()
	sb := s.sb
	s.mu.Unlock()
	if sb == nil {
		return errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s: its pod's sandbox is not started", c.id)
	}
	start := time.Now()
	// The tree's contents, so that a directory already there (a start
	// tried before) is merged into rather than copied into.
	st, err := sb.CopyIn(ctx, filepath.Join(c.bundle, "rootfs")+"/.", memberRoot(c.id), mvm.CopyOptions{KeepOwners: true})
	if err != nil {
		return fmt.Errorf("copy the container's root into the pod's VM: %w", err)
	}
	s.log.Info("rootfs copied into the pod's VM", "container", c.id, "files", st.Files, "bytes", st.Bytes, "took", time.Since(start))
	if err := s.copyMounts(ctx, sb, c, memberRoot(c.id)); err != nil {
		return err
	}
	s.mu.Lock()
	c.root = memberRoot(c.id)
	s.mu.Unlock()
	return nil
}

// vmName is the name of the task's VM (its run directory's).
func vmName(id string) string { return "ctr-" + shortID(id) }

// reclaimVM reclaims the run directory of the dead shim's VM, waiting up
// to 10 s for the VMM to die after its owner.
func reclaimVM(log *slog.Logger, name string) {
	dir, err := mvm.RunDirOf(mvm.Config{}, name)
	if err != nil {
		return
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := mvm.Reclaim(mvm.Config{}); err != nil {
			log.Warn("reclaim", "err", err)
		}
		if _, err := os.Stat(dir); os.IsNotExist(err) || time.Now().After(deadline) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func shortID(id string) string {
	h := sha256.Sum256([]byte(id))
	return hex.EncodeToString(h[:6])
}

// startProcess runs p of c in the VM with its stdio on containerd's
// FIFOs, in c's cgroup (and a member's root).
func (s *Service) startProcess(c *container, p *process) error {
	s.mu.Lock()
	sb, root := s.sb, c.root
	s.mu.Unlock()
	if sb == nil {
		return errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "the task is not started")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := mvm.Cmd{Argv: p.argv, Env: p.env, Dir: p.dir, User: p.user, Cgroup: cgroupName(c.id), Root: root}
	if c.member {
		// The pod's VM has the sandbox's shape; a container's own
		// limits bound its cgroup inside it.
		cmd.CgroupLimits = limits(c.spec)
	}
	if p.stdout != "" {
		w, err := fifo.OpenFifo(ctx, p.stdout, syscall.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("stdout: %w", err)
		}
		cmd.Stdout = w
		p.closers = append(p.closers, w)
	}
	if p.stderr != "" && !p.terminal {
		w, err := fifo.OpenFifo(ctx, p.stderr, syscall.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("stderr: %w", err)
		}
		cmd.Stderr = w
		p.closers = append(p.closers, w)
	}
	if p.stdin != "" {
		rd, err := fifo.OpenFifo(ctx, p.stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("stdin: %w", err)
		}
		cmd.Stdin = rd
		p.stdinW = rd
		p.closers = append(p.closers, rd)
	}
	if p.terminal {
		cmd.TTY = &mvm.TTY{Rows: 24, Cols: 80}
	}
	proc, err := sb.Start(context.Background(), cmd)
	if err != nil {
		for _, c := range p.closers {
			c.Close()
		}
		return err
	}
	<-proc.Started()
	s.mu.Lock()
	p.p, p.pid, p.started = proc, uint32(proc.PID()), true
	s.mu.Unlock()
	go s.reap(c, p)
	return nil
}

// reap waits for p of c to end and tells containerd.
func (s *Service) reap(c *container, p *process) {
	st, err := p.p.Wait()
	code := uint32(st.Code)
	switch {
	case st.Signal != 0:
		code = 128 + uint32(st.Signal)
	case err != nil && st.Code < 0:
		code = 255
	}
	for _, c := range p.closers {
		c.Close()
	}
	if st.Signal == syscall.SIGKILL && s.oomKilled(c) {
		s.log.Info("OOM kill", "container", c.id, "exec", p.id, "pid", p.pid)
		s.publish(context.Background(), "/tasks/oom", &eventstypes.TaskOOM{ContainerID: c.id})
	}
	if p.id == "" {
		// As when a container's init dies on a node (its PID namespace
		// goes with it): whatever else runs in the container, its execs
		// and what escaped its process group, is killed.
		s.releaseContainer(c, false)
	}
	s.mu.Lock()
	p.status, p.exitedAt = code, time.Now()
	s.mu.Unlock()
	close(p.done)
	s.publish(context.Background(), "/tasks/exit", &eventstypes.TaskExit{
		ContainerID: c.id, ID: p.execOrID(c.id), Pid: p.pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(p.exitedAt),
	})
}

// oomKilled says whether the container's cgroup counted an OOM kill
// since it last looked: containerd (and the CRI, as the reason
// OOMKilled) learns it from the TaskOOM event sent before the exit.
func (s *Service) oomKilled(c *container) bool {
	s.mu.Lock()
	sb := s.sb
	s.mu.Unlock()
	if sb == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := sb.CgroupStats(ctx, cgroupName(c.id))
	if err != nil {
		s.log.Warn("cgroup stats", "err", err)
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st.OOMKills <= c.oomKills {
		return false
	}
	c.oomKills = st.OOMKills
	return true
}

// releaseContainer kills what runs in c's cgroup and removes it, and
// with root also removes a member's root from the VM.
func (s *Service) releaseContainer(c *container, root bool) {
	s.mu.Lock()
	sb, dir := s.sb, c.root
	s.mu.Unlock()
	if sb == nil {
		return
	}
	if !root {
		dir = ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sb.Release(ctx, cgroupName(c.id), dir); err != nil {
		s.log.Warn("release", "container", c.id, "err", err)
	}
}

func (p *process) execOrID(id string) string {
	if p.id == "" {
		return id
	}
	return p.id
}

func (s *Service) publish(ctx context.Context, topic string, ev any) {
	if s.publisher == nil {
		return
	}
	ctx = namespaces.WithNamespace(context.WithoutCancel(ctx), s.namespaceOf(ctx))
	if err := s.publisher.Publish(ctx, topic, ev); err != nil {
		s.log.Warn("publish", "topic", topic, "err", err)
	}
}

func (s *Service) namespaceOf(ctx context.Context) string {
	if ns, ok := namespaces.Namespace(ctx); ok {
		return ns
	}
	if s.ns != "" {
		return s.ns
	}
	if ns := os.Getenv("NAMESPACE"); ns != "" {
		return ns
	}
	return namespaces.Default
}

// Delete ends a process's record, or a container: for the VM's owner
// the VM too, and its template; for any its rootfs mount. A member's
// files stay in the pod's VM until the VM ends.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	started, starting := p.started, p.starting
	s.mu.Unlock()
	if starting && !started {
		return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "process %q of %s is starting", r.ExecID, r.ID)
	}
	if started {
		select {
		case <-p.done:
		default:
			return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "process %q of %s is running", r.ExecID, r.ID)
		}
	}
	if r.ExecID == "" {
		// containerd's CRI deletes an exited task from its exit
		// monitor and from the TaskExit event: one delete does it.
		s.mu.Lock()
		again := c.deleting
		c.deleting = true
		s.mu.Unlock()
		if again {
			return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "container %s is being deleted", r.ID)
		}
	}
	if r.ExecID == "" && c.member {
		// Its files, mounts and cgroup in the VM go with it: a pod
		// whose container restarts must not fill the VM's disk.
		s.releaseContainer(c, true)
	}
	s.mu.Lock()
	if r.ExecID == "" && !c.member {
		for _, o := range s.containers {
			if o.member {
				c.deleting = false
				s.mu.Unlock()
				return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "the pod's container %s is not deleted yet", o.id)
			}
		}
	}
	delete(c.procs, r.ExecID)
	var sb *mvm.Sandbox
	var pn *podNet
	if r.ExecID == "" {
		delete(s.containers, c.id)
		if !c.member {
			sb, s.sb = s.sb, nil
			pn, s.net = s.net, nil
		}
	}
	s.mu.Unlock()
	if r.ExecID == "" {
		if sb != nil {
			heal, missing := sb.MissingSnapshot()
			wbs, err := sb.Close(context.Background())
			for _, wb := range wbs {
				s.log.Info("written back", "container", c.id, "dir", wb.Dir.Host, "written", wb.Stats.Written, "deleted", wb.Stats.Deleted, "err", wb.Err, "kept", wb.Kept)
			}
			if err != nil {
				s.log.Warn("the VM's end", "container", c.id, "err", err)
			}
			if pn != nil {
				pn.close(context.WithoutCancel(ctx))
			}
			if missing {
				s.spawnHeal(heal)
			}
		}
		if err := mount.UnmountAll(filepath.Join(c.bundle, "rootfs"), 0); err != nil {
			s.log.Warn("unmount the rootfs", "container", c.id, "err", err)
		}
		s.publish(ctx, "/tasks/delete", &eventstypes.TaskDelete{ContainerID: c.id, Pid: p.pid, ExitStatus: p.status, ExitedAt: protobuf.ToTimestamp(p.exitedAt)})
	}
	return &taskAPI.DeleteResponse{Pid: p.pid, ExitStatus: p.status, ExitedAt: protobuf.ToTimestamp(p.exitedAt)}, nil
}

// Exec records an exec process; Start runs it.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	var sp specs.Process
	if r.Spec == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrInvalidArgument, "exec %q has no process spec", r.ExecID)
	}
	if err := json.Unmarshal(r.Spec.Value, &sp); err != nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrInvalidArgument, "exec %q: %v", r.ExecID, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.ExecID == "" || c.procs[r.ExecID] != nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "exec %q", r.ExecID)
	}
	c.procs[r.ExecID] = s.newProcess(r.ExecID, &sp, r.Stdin, r.Stdout, r.Stderr, r.Terminal)
	return &ptypes.Empty{}, nil
}

// ResizePty resizes a process's terminal.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	p, err := s.running(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.p.Resize(ctx, uint16(r.Height), uint16(r.Width)); err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, nil
}

func (s *Service) running(id, execID string) (*process, error) {
	_, p, err := s.process(id, execID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !p.started {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process %q of %s is not running", execID, id)
	}
	return p, nil
}

// State reports a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	status := apitypes.Status_CREATED
	if p.started {
		status = apitypes.Status_RUNNING
		select {
		case <-p.done:
			status = apitypes.Status_STOPPED
		default:
		}
	}
	return &taskAPI.StateResponse{
		ID: r.ID, Bundle: c.bundle, Pid: p.pid, Status: status, Stdin: p.stdin, Stdout: p.stdout, Stderr: p.stderr,
		Terminal: p.terminal, ExitStatus: p.status, ExitedAt: protobuf.ToTimestamp(p.exitedAt), ExecID: r.ExecID,
	}, nil
}

// Kill signals a process (its process group, in the guest).
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	_, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	started := p.started
	s.mu.Unlock()
	if !started {
		return &ptypes.Empty{}, nil
	}
	select {
	case <-p.done:
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process %q already exited", r.ExecID)
	default:
	}
	if err := p.p.Signal(ctx, syscall.Signal(r.Signal)); err != nil {
		return nil, err
	}
	return &ptypes.Empty{}, nil
}

// Pids lists a container's processes (their guest pids).
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*apitypes.ProcessInfo
	for _, p := range c.procs {
		if p.started {
			out = append(out, &apitypes.ProcessInfo{Pid: p.pid})
		}
	}
	return &taskAPI.PidsResponse{Processes: out}, nil
}

// CloseIO closes a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	p, err := s.running(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if r.Stdin && p.stdinW != nil {
		p.stdinW.Close()
	}
	return &ptypes.Empty{}, nil
}

// Wait waits for a process to end.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &taskAPI.WaitResponse{ExitStatus: p.status, ExitedAt: protobuf.ToTimestamp(p.exitedAt)}, nil
}

// Connect says which processes serve a container.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var pid uint32
	if c := s.containers[r.ID]; c != nil && c.procs[""] != nil {
		pid = c.procs[""].pid
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: pid}, nil
}

// Shutdown ends the shim once its containers are gone.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	n := len(s.containers)
	s.mu.Unlock()
	if n > 0 {
		return &ptypes.Empty{}, nil
	}
	s.shutdown()
	return &ptypes.Empty{}, nil
}

var errNotBuilt = errors.New("not supported by the mvm shim yet")

func (s *Service) Pause(context.Context, *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	return nil, errdefs.ToGRPCf(errdefs.ErrNotImplemented, "pause: %v", errNotBuilt)
}

func (s *Service) Resume(context.Context, *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	return nil, errdefs.ToGRPCf(errdefs.ErrNotImplemented, "resume: %v", errNotBuilt)
}

func (s *Service) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	return nil, errdefs.ToGRPCf(errdefs.ErrNotImplemented, "checkpoint: %v", errNotBuilt)
}

// Stats reports the task's cgroup in the guest, in the shape runc's shim
// gives on a cgroup2 host (ctr task metrics, the CRI's container stats).
// A memory limit of none is the VM's memory: that is the task's bound.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	sb, memory := s.sb, s.memory
	s.mu.Unlock()
	if sb == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "task %s is not running", r.ID)
	}
	st, err := sb.CgroupStats(ctx, cgroupName(c.id))
	if err != nil {
		return nil, err
	}
	data, err := typeurl.MarshalAny(metrics(st, uint64(memory)))
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: protobuf.FromAny(data)}, nil
}

// metrics is st as containerd's cgroup2 metrics, with vmMemory as the
// memory limit where the cgroup has none.
//
// The guest chose the numbers; what the VM bounds is bounded here too:
// no memory figure above the VM's memory, none of its parts above the
// whole.
func metrics(st mvm.CgroupStats, vmMemory uint64) *cgstats.Metrics {
	limit := st.MemoryLimit
	if limit == 0 || limit > vmMemory {
		limit = vmMemory
	}
	usage := min(st.Memory, vmMemory)
	file := min(st.MemoryFile, usage)
	return &cgstats.Metrics{
		Pids: &cgstats.PidsStat{Current: st.Pids, Limit: st.PidsLimit},
		CPU: &cgstats.CPUStat{
			UsageUsec: st.CPUUsageMicros, UserUsec: st.CPUUserMicros, SystemUsec: st.CPUSystemMicros,
			NrPeriods: st.CPUPeriods, NrThrottled: st.CPUThrottled, ThrottledUsec: st.CPUThrottledMicros,
		},
		Memory: &cgstats.MemoryStat{
			Usage: usage, UsageLimit: limit, SwapUsage: min(st.Swap, vmMemory),
			File: file, InactiveFile: min(st.MemoryInactiveFile, file), Anon: min(st.MemoryAnon, usage),
		},
		MemoryEvents: &cgstats.MemoryEvents{Oom: st.OOMEvents, OomKill: st.OOMKills},
	}
}

func (s *Service) Update(context.Context, *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	return nil, errdefs.ToGRPCf(errdefs.ErrNotImplemented, "update: %v", errNotBuilt)
}

// shimCommand is the shim's long-lived process: this binary, without
// the start action, in its own process group (containerd's signals are
// not its).
func shimCommand(self, dir, ns string, opts shim.StartOpts) (*exec.Cmd, error) {
	cmd := exec.Command(self, "-namespace", ns, "-id", opts.ID, "-address", opts.Address)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOMAXPROCS=2")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, nil
}
