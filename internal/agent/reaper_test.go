package agent

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// TestForkGate: once closeForks has run (PowerOff, before it kills every
// process), no command starts; before, they do. The reaper here reaps
// nothing (a second reaper in the process would take the children of
// the other tests' servers), and the fork only pretends.
func TestForkGate(t *testing.T) {
	t.Cleanup(func() {
		forkGate.Lock()
		forkGate.closed = false
		forkGate.Unlock()
	})
	r := &reaper{waiters: make(map[int]chan unix.WaitStatus)}
	const fakePID = 1 << 30 // above any pid_max: no child will ever have it
	calls := 0
	fork := func() (int, error) { calls++; return fakePID, nil }
	if pid, _, err := r.start(fork); err != nil || pid != fakePID {
		t.Fatalf("start before closeForks: %d %v", pid, err)
	}
	closeForks()
	if _, _, err := r.start(fork); !errors.Is(err, errPoweringOff) || calls != 1 {
		t.Fatalf("start after closeForks: %v (fork called %d times)", err, calls)
	}
}
