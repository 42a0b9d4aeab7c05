package oci

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
)

// stageFile holds the content of one tar stream's regular files, one
// after the other, in one file: a layer of 10 000 files costs one file
// on the host instead of 10 000. A file of alignMin bytes or more starts
// on a block boundary, and its blocks of zeros are not written, so that
// a sparse file of a terabyte (a /var/log/lastlog) costs what its data
// costs: the staging file has holes there, and the image will too.
type stageFile struct {
	f      *os.File
	off    int64  // where the next file's content may go
	buf    []byte // pending bytes, for [bufOff, bufOff+len(buf))
	bufOff int64
	chunk  []byte
	total  *atomic.Int64 // non-zero bytes staged by every stream of a conversion
	limit  int64
}

const (
	alignMin = 64 << 10
	stageBuf = 1 << 20
	block    = 4096
)

// errTooBig is wrapped when the staged content passes Limits.MaxBytes.
var errTooBig = errors.New("more content than the limit")

func newStageFile(f *os.File, total *atomic.Int64, limit int64) *stageFile {
	return &stageFile{f: f, buf: make([]byte, 0, stageBuf), chunk: make([]byte, 256<<10), total: total, limit: limit}
}

func (s *stageFile) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	_, err := s.f.WriteAt(s.buf, s.bufOff)
	s.buf = s.buf[:0]
	return err
}

// put appends p at s.off.
func (s *stageFile) put(p []byte) error {
	if len(s.buf) > 0 && s.bufOff+int64(len(s.buf)) != s.off {
		if err := s.flush(); err != nil {
			return err
		}
	}
	if len(s.buf) == 0 {
		s.bufOff = s.off
	}
	if len(s.buf)+len(p) > cap(s.buf) {
		if err := s.flush(); err != nil {
			return err
		}
		s.bufOff = s.off
		if len(p) > cap(s.buf) {
			if _, err := s.f.WriteAt(p, s.off); err != nil {
				return err
			}
			s.off += int64(len(p))
			return nil
		}
	}
	s.buf = append(s.buf, p...)
	s.off += int64(len(p))
	return nil
}

// add stages size bytes read from r and returns where they start.
func (s *stageFile) add(r io.Reader, size int64) (int64, error) {
	sparse := size >= alignMin
	if sparse {
		s.off = (s.off + block - 1) &^ (block - 1)
	}
	start := s.off
	var zero [block]byte
	for left := size; left > 0; {
		n := int(min(int64(len(s.chunk)), left))
		if _, err := io.ReadFull(r, s.chunk[:n]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		left -= int64(n)
		p := s.chunk[:n]
		written := int64(0)
		if !sparse {
			if err := s.put(p); err != nil {
				return 0, err
			}
			written, p = int64(n), nil
		}
		for len(p) > 0 {
			k := min(len(p), block)
			if k == block && bytes.Equal(p[:k], zero[:]) {
				s.off += block // a hole
			} else {
				if err := s.put(p[:k]); err != nil {
					return 0, err
				}
				written += int64(k)
			}
			p = p[k:]
		}
		if s.total.Add(written) > s.limit {
			return 0, fmt.Errorf("%w (%d bytes)", errTooBig, s.limit)
		}
	}
	return start, nil
}

// finish writes what is pending and makes the file as long as what it
// holds, a hole at its end included.
func (s *stageFile) finish() error {
	if err := s.flush(); err != nil {
		return err
	}
	fi, err := s.f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() < s.off {
		return s.f.Truncate(s.off)
	}
	return nil
}
