package agentclient_test

import (
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// ExecSpec.TTY runs the command on a terminal of that size, everything on
// Stdout, and Resize changes the size it sees.
func TestExecTTYAndResize(t *testing.T) {
	c := startAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if ok, err := c.HasCapability(ctx, agentproto.CapExecTTY); err != nil || !ok {
		t.Fatalf("%s: %v, %v", agentproto.CapExecTTY, ok, err)
	}
	in, w := io.Pipe()
	defer w.Close()
	var out, errb lockedBuffer
	p, err := c.Exec(ctx, agentclient.ExecSpec{
		Argv:  []string{"sh", "-c", `stty size; echo err >&2; read x; stty size; exit 4`},
		Stdin: in, Stdout: &out, Stderr: &errb,
		TTY: &agentclient.TTY{Rows: 7, Cols: 9},
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "err\r\n") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := p.Resize(ctx, 30, 100); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("go\r")); err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait(ctx)
	if err != nil || st.Code != 4 {
		t.Fatalf("exit: %+v, %v", st, err)
	}
	if got, want := out.String(), "7 9\r\nerr\r\ngo\r\n30 100\r\n"; got != want {
		t.Errorf("terminal output %q, want %q", got, want)
	}
	if errb.String() != "" {
		t.Errorf("stderr got %q: a terminal has one stream", errb.String())
	}
}
