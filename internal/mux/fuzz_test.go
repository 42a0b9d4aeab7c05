package mux

import (
	"bytes"
	"io"
	"sync"
	"testing"
	"time"
)

// guestBytes is a connection whose far end sent exactly data and then
// hung up; what the session writes is dropped.
type guestBytes struct {
	r      *bytes.Reader
	mu     sync.Mutex
	closed bool
}

func (g *guestBytes) Read(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, io.ErrClosedPipe
	}
	return g.r.Read(p)
}

func (g *guestBytes) Write(p []byte) (int, error) { return len(p), nil }

func (g *guestBytes) Close() error {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	return nil
}

// FuzzClientSession feeds bytes from a fake guest into the host's side of
// the session while the host has two streams open (like a hello and an
// exec) and reads them. Whatever the bytes, the session must not panic,
// must end once they run out, and must not allocate more than a few
// windows' worth.
func FuzzClientSession(f *testing.F) {
	f.Add([]byte{})
	f.Add(frame(typeData, 0, 1, 0xffffffff, []byte("junk")))
	f.Add(append(frame(typeWindowUpdate, flagACK, 1, 1<<20, nil), frame(typeData, flagFIN, 1, 5, []byte("hello"))...))
	f.Add(append(frame(typePing, flagSYN, 0, 1, nil), frame(typePing, flagACK, 0, 1, nil)...))
	f.Add(frame(typeWindowUpdate, flagSYN, 2, 0, nil))
	f.Add(frame(typeGoAway, 0, 0, 1, nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		before := totalAlloc()
		s := Client(&guestBytes{r: bytes.NewReader(data)}, Config{})
		var wg sync.WaitGroup
		for i := 0; i < 2; i++ {
			st, err := s.Open()
			if err != nil {
				break
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(io.Discard, st)
			}()
		}
		select {
		case <-s.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("session did not end when the guest's bytes ran out")
		}
		wg.Wait()
		if err := s.Err(); err == nil {
			t.Fatal("session ended without an error")
		}
		// The read buffer, two stream buffers of at most a window each and
		// their growth; never anything that scales with a length field.
		if grew := totalAlloc() - before; grew > 16<<20+4*uint64(len(data)) {
			t.Fatalf("allocated %d bytes for %d bytes of input", grew, len(data))
		}
	})
}
