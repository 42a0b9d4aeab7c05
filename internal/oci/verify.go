package oci

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
)

// verifier checks a stream against its digest (and size, when known) as
// it is read: the read that reaches the end returns an error wrapping
// ErrDigest instead of io.EOF if the bytes were not the right ones, so
// that nothing read from a bad blob is ever taken for complete.
type verifier struct {
	r     io.Reader
	h     hash.Hash
	what  string
	want  string // "sha256:..."
	size  int64  // -1: unknown
	limit int64  // most bytes accepted (0: none)
	n     int64
}

func newVerifier(r io.Reader, what, want string, size, limit int64) (*verifier, error) {
	if len(want) != len("sha256:")+64 || want[:7] != "sha256:" {
		return nil, fmt.Errorf("%w: %s: digest %q is not a sha256 digest", ErrInvalid, what, want)
	}
	return &verifier{r: r, h: sha256.New(), what: what, want: want, size: size, limit: limit}, nil
}

func (v *verifier) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	switch {
	case v.size >= 0 && v.n > v.size:
		return n, fmt.Errorf("%w: %s is longer than its %d bytes", ErrDigest, v.what, v.size)
	case v.limit > 0 && v.n > v.limit:
		return n, fmt.Errorf("%w: %s is larger than %d bytes", ErrInvalid, v.what, v.limit)
	case err != io.EOF:
		return n, err
	case v.size >= 0 && v.n != v.size:
		return n, fmt.Errorf("%w: %s has %d bytes, want %d (truncated)", ErrDigest, v.what, v.n, v.size)
	}
	if got := "sha256:" + hex.EncodeToString(v.h.Sum(nil)); got != v.want {
		return n, fmt.Errorf("%w: %s is %s, want %s", ErrDigest, v.what, got, v.want)
	}
	return n, io.EOF
}

// counter reports how many bytes have gone through it.
type counter struct {
	r    io.Reader
	n    int64
	last int64
	fn   func(n int64)
}

func (c *counter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.fn != nil && (c.n-c.last >= 1<<20 || err != nil) {
		c.last = c.n
		c.fn(c.n)
	}
	return n, err
}
