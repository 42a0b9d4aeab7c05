package agent

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// A spawner forks a root's commands from one OS thread whose filesystem
// root is that root, entered as switch_root enters a new root: in a mount
// namespace of the thread's own, the root's mount is moved over / and the
// thread chroots to it. To the kernel the commands are then not chrooted
// (their root is the top of their namespace's root mount), which is what
// it asks of a process that creates a user namespace: chrooted callers
// get EPERM from unshare(CLONE_NEWUSER), so with a plain chroot
// `unshare -r`, bubblewrap, rootless podman and Chromium's sandbox fail.
//
// The namespace is a slave of the agent's: mounts the agent makes in the
// root later (a Mount call's shares, the boot id bound after a restore)
// appear in it, and nothing made in it comes back. It lives as long as
// the spawner's thread, which never leaves it; Go ends a locked thread
// whose goroutine returns, so nothing else ever runs with its state.
type spawner struct {
	mu      sync.Mutex // one fork at a time; guards closed
	closed  bool
	reqs    chan func()
	stopped chan struct{}
}

// spawners are the live spawners, which PowerOff stops before it
// unmounts: a namespace that outlived the unmount would keep the root's
// filesystems (and the writable layer's journal) open.
var spawners struct {
	sync.Mutex
	live map[*spawner]bool
}

// newSpawner starts a spawner for the root mounted at dir, which must be
// a mount point the agent has made shared (so that the spawner's copy
// follows it).
func newSpawner(dir string) (*spawner, error) {
	sp := &spawner{reqs: make(chan func()), stopped: make(chan struct{})}
	ready := make(chan error, 1)
	go sp.loop(dir, ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	spawners.Lock()
	if spawners.live == nil {
		spawners.live = make(map[*spawner]bool)
	}
	spawners.live[sp] = true
	spawners.Unlock()
	return sp, nil
}

func (sp *spawner) loop(dir string, ready chan<- error) {
	defer close(sp.stopped)
	// Never unlocked: see the type's comment.
	runtime.LockOSThread()
	home, err := unix.Open("/proc/thread-self/ns/mnt", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		ready <- fmt.Errorf("command root: %w", err)
		return
	}
	defer unix.Close(home)
	if err := enterRoot(dir); err != nil {
		ready <- fmt.Errorf("command root %s: %w", dir, err)
		return
	}
	ready <- nil
	for f := range sp.reqs {
		f()
	}
	// Back in the agent's namespace, this thread no longer holds its
	// own: the kernel tears it down now, before the caller unmounts, not
	// whenever the thread is reaped.
	// Should setns fail, the thread's exit still ends the namespace.
	_ = unix.Setns(home, unix.CLONE_NEWNS)
}

// enterRoot moves the calling thread into a new mount namespace whose
// root is the mount at dir. The thread must be locked and own its
// filesystem attributes, which unshare gives it.
func enterRoot(dir string) error {
	if err := unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make mounts slaves: %w", err)
	}
	if err := unix.Chdir(dir); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move the root over /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// errSpawnerStopped is returned for a fork asked of a stopped spawner.
var errSpawnerStopped = errors.New("the command root is being torn down")

// fork runs f (a fork) on the spawner's thread, so that the child starts
// in the root.
func (sp *spawner) fork(f func() (int, error)) (int, error) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.closed {
		return 0, errSpawnerStopped
	}
	var (
		pid  int
		err  error
		done = make(chan struct{})
	)
	sp.reqs <- func() {
		defer close(done)
		pid, err = f()
	}
	<-done
	return pid, err
}

// stop ends the spawner and its namespace, and waits for both.
func (sp *spawner) stop() {
	sp.mu.Lock()
	if !sp.closed {
		sp.closed = true
		close(sp.reqs)
	}
	sp.mu.Unlock()
	<-sp.stopped
	spawners.Lock()
	delete(spawners.live, sp)
	spawners.Unlock()
}

// stopSpawners stops every live spawner.
func stopSpawners() {
	spawners.Lock()
	live := make([]*spawner, 0, len(spawners.live))
	for sp := range spawners.live {
		live = append(live, sp)
	}
	spawners.Unlock()
	for _, sp := range live {
		sp.stop()
	}
}
