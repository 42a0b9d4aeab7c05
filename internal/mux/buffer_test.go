package mux

import (
	"bytes"
	"testing"
)

// TestStreamBufferWithinWindow: however the peer cuts its frames and
// however the reader lags, a stream's buffer never has more capacity than
// its window (append alone would double it past), and it hands back the
// bytes in order.
func TestStreamBufferWithinWindow(t *testing.T) {
	const window = 1 << 20
	for _, frame := range []int{1, 7 << 10, 64 << 10, 100_000} {
		st := &Stream{s: &Session{cfg: Config{Window: window}}}
		var sent, got bytes.Buffer
		next := byte(0)
		unread := func() int { return len(st.buf) - st.off }
		for round := 0; round < 200; round++ {
			// The peer fills what the window allows...
			for unread()+frame <= window {
				p := make([]byte, frame)
				for i := range p {
					p[i] = next
					next++
				}
				sent.Write(p)
				st.appendLocked(p)
				if c := cap(st.buf); c > window {
					t.Fatalf("frame %d: buffer capacity %d past the %d window", frame, c, window)
				}
			}
			// ...and the reader takes a third of it.
			n := max(unread()/3, 1)
			got.Write(st.buf[st.off : st.off+n])
			st.off += n
		}
		got.Write(st.buf[st.off:])
		if !bytes.Equal(got.Bytes(), sent.Bytes()) {
			t.Fatalf("frame %d: %d bytes out for %d in, or out of order", frame, got.Len(), sent.Len())
		}
	}
}
