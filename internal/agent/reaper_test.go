package agent

import (
	"errors"
	"syscall"
	"testing"
)

// TestForkGate: once closeForks has run (PowerOff, before it kills every
// process), no command starts; before, they do.
func TestForkGate(t *testing.T) {
	t.Cleanup(func() {
		forkGate.Lock()
		forkGate.closed = false
		forkGate.Unlock()
	})
	r := newReaper()
	fork := func() (int, error) {
		return syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{})
	}
	pid, status, err := r.start(fork)
	if err != nil {
		t.Fatal(err)
	}
	if ws := <-status; !ws.Exited() || ws.ExitStatus() != 0 {
		t.Fatalf("pid %d: %v", pid, ws)
	}
	closeForks()
	called := false
	_, _, err = r.start(func() (int, error) { called = true; return fork() })
	if !errors.Is(err, errPoweringOff) || called {
		t.Fatalf("start after closeForks: %v (fork called: %v)", err, called)
	}
}
