package qmp

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRealQEMU runs the client against QEMU itself: a microvm with no
// kernel, held paused by -S, whose monitor is one end of a socketpair as
// in the real backend. It fails, never skips, without QEMU.
func TestRealQEMU(t *testing.T) {
	bin := os.Getenv("MVM_QEMU")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("qemu-system-x86_64"); err != nil {
			t.Fatalf("QEMU is missing (install qemu-system-x86): %v", err)
		}
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	child := os.NewFile(uintptr(fds[1]), "qmp-vmm")
	hostFile := os.NewFile(uintptr(fds[0]), "qmp-host")
	conn, err := netFileConn(hostFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-M", "microvm", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "32",
		"-chardev", "socket,id=qmp,fd=3", "-mon", "chardev=qmp,mode=control")
	cmd.ExtraFiles = []*os.File{child}
	out := &limitedBuffer{max: 4096}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	child.Close()
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()

	c := New(conn)
	defer c.Close()
	events := c.Events()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ret, err := c.Execute(ctx, "query-status", nil)
	if err != nil {
		t.Fatalf("query-status: %v (qemu: %s)", err, out)
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := json.Unmarshal(ret, &st); err != nil || st.Running {
		t.Fatalf("status of a VM started with -S: %s (%v)", ret, err)
	}
	expect := func(name string) {
		t.Helper()
		deadline := time.After(time.Second)
		for {
			select {
			case ev, ok := <-events:
				if !ok {
					t.Fatalf("events closed waiting for %s: %v", name, c.Err())
				}
				if ev.Name == name {
					return
				}
			case <-deadline:
				t.Fatalf("no %s event within a second", name)
			}
		}
	}
	for _, step := range []struct{ cmd, event string }{
		{"cont", "RESUME"},
		{"stop", "STOP"},
		{"system_reset", "RESET"},
		{"quit", "SHUTDOWN"},
	} {
		if _, err := c.Execute(ctx, step.cmd, nil); err != nil {
			t.Fatalf("%s: %v", step.cmd, err)
		}
		expect(step.event)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("connection still open after quit")
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("qemu after quit: %v (%s)", waitErr, out)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("qemu still running after quit")
	}
}

func netFileConn(f *os.File) (net.Conn, error) {
	defer f.Close()
	return net.FileConn(f)
}

// limitedBuffer keeps the first max bytes QEMU prints.
type limitedBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := l.max - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.b)
}
