package agent

import (
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// reaper owns every wait4 in the agent. As PID 1 the agent inherits every
// orphan in the guest, so it must reap children it never started; doing
// that with wait4(-1) would race any per-child Wait (os/exec), so instead a
// single loop reaps everything and hands statuses to whoever registered the
// pid. Commands are forked and registered under the reaper's lock, and the
// loop takes the same lock to deliver, so even a child that exits at once
// cannot have its status handed to nobody.
type reaper struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
}

var (
	reaperOnce sync.Once
	theReaper  *reaper
)

// processReaper returns the process's one reaper. wait4(-1) collects any
// child of the process, so two reapers would steal each other's statuses.
func processReaper() *reaper {
	reaperOnce.Do(func() { theReaper = newReaper() })
	return theReaper
}

func newReaper() *reaper {
	r := &reaper{waiters: make(map[int]chan unix.WaitStatus)}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		for range sigs {
			r.reapAll()
		}
	}()
	return r
}

// start runs fork under the reaper lock and registers the resulting pid, so
// the status of even an instantly exiting child cannot be lost.
func (r *reaper) start(fork func() (int, error)) (int, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	forkGate.RLock()
	defer forkGate.RUnlock()
	if forkGate.closed {
		return 0, nil, errPoweringOff
	}
	pid, err := fork()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[pid] = ch
	return pid, ch, nil
}

// reapAll collects every exited child. SIGCHLD coalesces, so one signal may
// stand for many exits.
func (r *reaper) reapAll() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		r.mu.Lock()
		// Orphans re-parented to PID 1 have no waiter; reaping them is
		// all they need.
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- ws
		}
		r.mu.Unlock()
	}
}

// forkGate lets PowerOff stop every later fork before it kills every
// process: a command whose exec arrived while the guest powers off would
// otherwise start after the kill and hold its root (and the disks under
// it) while the agent unmounts. A fork in progress finishes first, and
// its child is killed with the rest.
var forkGate struct {
	sync.RWMutex
	closed bool
}

// errPoweringOff is what a fork asked for after closeForks gets.
var errPoweringOff = errors.New("the guest is powering off")

// closeForks makes every later reaper start fail with errPoweringOff,
// once the forks in progress have returned.
func closeForks() {
	forkGate.Lock()
	forkGate.closed = true
	forkGate.Unlock()
}
