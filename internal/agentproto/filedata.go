package agentproto

import (
	"errors"
	"fmt"
	"io"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// FileChunk is the most data one FileData message carries.
const FileChunk = 256 << 10

// RemoteFileError is a FileData error the sender reported in place of
// the rest of its stream.
type RemoteFileError struct {
	Code    agentpb.Error_Code
	Message string
}

func (e *RemoteFileError) Error() string { return e.Message }

// FileDataReader is the data of a stream of FileData messages as a
// reader: io.EOF after the message with eof, the sender's error after one
// with error, io.ErrUnexpectedEOF when the stream ends before either.
type FileDataReader struct {
	r    *Reader
	buf  []byte
	done error
}

// NewFileDataReader reads FileData messages from r.
func NewFileDataReader(r *Reader) *FileDataReader { return &FileDataReader{r: r} }

func (f *FileDataReader) Read(p []byte) (int, error) {
	for len(f.buf) == 0 {
		if f.done != nil {
			return 0, f.done
		}
		var m agentpb.FileData
		if err := f.r.Read(&m); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			f.done = fmt.Errorf("file stream: %w", err)
			return 0, f.done
		}
		f.buf = m.Data
		switch {
		case m.Error != nil:
			f.buf = nil
			f.done = &RemoteFileError{Code: m.Error.Code, Message: m.Error.Message}
		case m.Eof:
			f.done = io.EOF
		}
	}
	n := copy(p, f.buf)
	f.buf = f.buf[n:]
	return n, nil
}

// Drain reads what is left of the stream, up to its end, and reports
// whether it ended with eof.
func (f *FileDataReader) Drain() error {
	_, err := io.Copy(io.Discard, f)
	return err
}

// FileDataWriter sends what is written to it as FileData messages of at
// most FileChunk bytes each; Close sends the last one, with eof.
type FileDataWriter struct {
	w   io.Writer
	buf []byte
}

// NewFileDataWriter writes FileData messages to w.
func NewFileDataWriter(w io.Writer) *FileDataWriter {
	return &FileDataWriter{w: w, buf: make([]byte, 0, FileChunk)}
}

func (f *FileDataWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := copy(f.buf[len(f.buf):cap(f.buf)], p)
		f.buf = f.buf[:len(f.buf)+k]
		p, n = p[k:], n+k
		if len(f.buf) == cap(f.buf) {
			if err := f.send(&agentpb.FileData{Data: f.buf}); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

func (f *FileDataWriter) send(m *agentpb.FileData) error {
	err := Write(f.w, m)
	f.buf = f.buf[:0]
	return err
}

// Close sends what is buffered with eof.
func (f *FileDataWriter) Close() error { return f.send(&agentpb.FileData{Data: f.buf, Eof: true}) }

// Fail sends err in place of the rest of the stream.
func (f *FileDataWriter) Fail(code agentpb.Error_Code, err error) error {
	return f.send(&agentpb.FileData{Error: &agentpb.Error{Code: code, Message: err.Error()}})
}
