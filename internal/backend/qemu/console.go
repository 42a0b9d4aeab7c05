package qemu

import (
	"io"
	"net"
	"os"
	"sync"
)

// tail keeps the last limit bytes written to it. The guest's console is
// guest-controlled output that can run for as long as the VM does (a
// `yes > /dev/ttyS0` writes a few hundred KB/s), so only its end, which is
// what a failure report needs, is kept.
type tail struct {
	mu    sync.Mutex
	buf   []byte // ring of cap limit
	start int    // index of the oldest byte once full
	full  bool
	limit int
	total int64
}

func newTail(limit int) *tail { return &tail{buf: make([]byte, 0, limit), limit: limit} }

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(p)
	t.total += int64(n)
	if n >= t.limit {
		t.buf = append(t.buf[:0], p[n-t.limit:]...)
		t.start, t.full = 0, true
		return n, nil
	}
	if !t.full {
		room := t.limit - len(t.buf)
		if n <= room {
			t.buf = append(t.buf, p...)
			return n, nil
		}
		t.buf = append(t.buf, p[:room]...)
		t.start, t.full = 0, true
		p = p[room:]
	}
	return n, t.writeFullLocked(p)
}

// writeFullLocked writes p into a full ring at its oldest bytes.
func (t *tail) writeFullLocked(p []byte) error {
	for len(p) > 0 {
		c := copy(t.buf[t.start:], p)
		p = p[c:]
		t.start = (t.start + c) % t.limit
	}
	return nil
}

// Bytes returns the kept bytes, oldest first, and whether older bytes were
// dropped.
func (t *tail) Bytes() ([]byte, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.full {
		return append([]byte(nil), t.buf...), false
	}
	out := make([]byte, 0, t.limit)
	out = append(out, t.buf[t.start:]...)
	return append(out, t.buf[:t.start]...), t.total > int64(t.limit)
}

// drainConsole copies the console stream into t until the VMM closes it.
func drainConsole(c net.Conn, t *tail) {
	buf := make([]byte, 32<<10)
	_, _ = io.CopyBuffer(t, c, buf)
	c.Close()
}

// writeConsoleLog saves what t kept to path, marking a cut-off start.
func writeConsoleLog(path string, t *tail) error {
	b, truncated := t.Bytes()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if truncated {
		_, _ = f.WriteString("[mvm: earlier console output dropped; the last 1 MiB follows]\n")
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
