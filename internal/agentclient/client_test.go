package agentclient_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/agent"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
)

// pair returns both ends of a unix socketpair, the same kind of byte
// stream the QEMU backend hands to the client.
func pair(t *testing.T) (host, guest net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := newFile(fd)
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	t.Cleanup(func() { conns[0].Close(); conns[1].Close() })
	return conns[0], conns[1]
}

// startAgent serves the agent protocol in-process on the guest end; the
// commands it runs are real host processes.
func startAgent(t *testing.T) *agentclient.Client {
	t.Helper()
	host, guest := pair(t)
	srv := agent.NewServer(nil, "test", agent.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); err := srv.ServeConn(ctx, guest); t.Log("serve:", err) }()
	c, err := agentclient.Dial(host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); cancel(); <-done })
	return c
}

func TestHelloAndPing(t *testing.T) {
	c := startAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h, err := c.Hello(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h.Version != agentproto.Version || h.AgentVersion != "test" {
		t.Errorf("hello = %+v", h)
	}
	if ok, _ := c.HasCapability(ctx, agentproto.CapExec); !ok {
		t.Errorf("exec capability missing from %v", h.Capabilities)
	}
	if ok, _ := c.HasCapability(ctx, agentproto.CapShutdown); ok {
		t.Errorf("shutdown announced by an agent without a shutdown hook")
	}
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestLargeOutput moves output much larger than the stream window through
// the spliced path, with stdout and stderr interleaved.
func TestLargeOutput(t *testing.T) {
	c := startAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	p, err := c.Exec(ctx, agentclient.ExecSpec{
		Argv:   []string{"sh", "-c", "head -c 20000000 /dev/urandom | tee /dev/stderr | sha256sum >&2"},
		Stdout: &out, Stderr: &errb,
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait(ctx)
	if err != nil || st.Code != 0 {
		t.Fatalf("%+v %v", st, err)
	}
	// stderr = the data, then its sha256 line; stdout is empty.
	data := errb.Bytes()
	if len(data) < 20000000 || out.Len() != 0 {
		t.Fatalf("stderr %d bytes, stdout %d", len(data), out.Len())
	}
	payload, sumLine := data[:20000000], string(data[20000000:])
	if got := fmt.Sprintf("%x", sha256.Sum256(payload)); !strings.HasPrefix(sumLine, got) {
		t.Fatalf("sha256 %s, guest says %q", got, sumLine)
	}
}

func TestPingWhileExecRuns(t *testing.T) {
	c := startAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A command whose output nobody reads fills its window; the session
	// must still answer pings and deliver signals.
	pr, pw := io.Pipe()
	defer pr.Close()
	p, err := c.Exec(ctx, agentclient.ExecSpec{Argv: []string{"yes"}, Stdout: pw})
	if err != nil {
		t.Fatal(err)
	}
	<-p.Started()
	time.Sleep(100 * time.Millisecond)
	for i := 0; i < 10; i++ {
		if _, err := c.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Signal(ctx, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	st, err := p.Wait(ctx)
	if err != nil || st.Signal != syscall.SIGTERM {
		t.Fatalf("status %+v %v, want death by SIGTERM", st, err)
	}
	if err := p.Signal(ctx, syscall.SIGTERM); err == nil {
		t.Error("signalling a finished exec should fail")
	}
}

func TestExec(t *testing.T) {
	c := startAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tests := []struct {
		name       string
		spec       agentclient.ExecSpec
		wantCode   int
		wantSignal syscall.Signal
		wantOut    string
		wantErr    string
		timedOut   bool
		reason     agentclient.StartReason
	}{
		{name: "echo", spec: agentclient.ExecSpec{Argv: []string{"echo", "hi there"}}, wantOut: "hi there\n"},
		{name: "exit code", spec: agentclient.ExecSpec{Argv: []string{"sh", "-c", "echo out; echo err >&2; exit 7"}}, wantCode: 7, wantOut: "out\n", wantErr: "err\n"},
		{name: "stdin", spec: agentclient.ExecSpec{Argv: []string{"sh", "-c", "cat; exit 3"}, Stdin: strings.NewReader("hello\n")}, wantCode: 3, wantOut: "hello\n"},
		{name: "no stdin reads dev null", spec: agentclient.ExecSpec{Argv: []string{"cat"}}},
		{name: "env and dir", spec: agentclient.ExecSpec{Argv: []string{"sh", "-c", `printf '%s|' "$A" "$PWD"`}, Env: []agentclient.EnvVar{{Name: "A", Value: "x y $(z)"}}, Dir: "/tmp"}, wantOut: "x y $(z)|/tmp|"},
		{name: "signal death", spec: agentclient.ExecSpec{Argv: []string{"sh", "-c", "kill -9 $$"}}, wantSignal: syscall.SIGKILL},
		{name: "timeout", spec: agentclient.ExecSpec{Argv: []string{"sleep", "30"}, Timeout: 300 * time.Millisecond}, wantSignal: syscall.SIGKILL, timedOut: true},
		{name: "not found", spec: agentclient.ExecSpec{Argv: []string{"mvm-no-such-command"}}, reason: agentclient.StartNotFound},
		{name: "not executable", spec: agentclient.ExecSpec{Argv: []string{"/etc/hostname"}}, reason: agentclient.StartNotExecutable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			tt.spec.Stdout, tt.spec.Stderr = &out, &errb
			p, err := c.Exec(ctx, tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			st, err := p.Wait(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if tt.reason != 0 {
				if st.StartFailure == nil || st.StartFailure.Reason != tt.reason {
					t.Fatalf("status %+v, want start failure %d", st, tt.reason)
				}
				return
			}
			if st.StartFailure != nil {
				t.Fatalf("start failure: %v", st.StartFailure)
			}
			if st.Code != tt.wantCode || st.Signal != tt.wantSignal || st.TimedOut != tt.timedOut {
				t.Errorf("status %+v, want code %d signal %v timedOut %v", st, tt.wantCode, tt.wantSignal, tt.timedOut)
			}
			if out.String() != tt.wantOut || errb.String() != tt.wantErr {
				t.Errorf("stdout %q stderr %q, want %q %q", out.String(), errb.String(), tt.wantOut, tt.wantErr)
			}
		})
	}
}
