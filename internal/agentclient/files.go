package agentclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
	"github.com/mvm-sh/mvm/internal/treecopy"
)

// FileInfo is what the guest's lstat says of a file.
type FileInfo struct {
	Name       string
	Mode       uint32 // st_mode: type and permission bits
	Size       int64
	ModTime    time.Time
	UID, GID   uint32
	LinkTarget string
}

// IsDir reports whether the file is a directory.
func (fi FileInfo) IsDir() bool { return fi.Mode&syscall.S_IFMT == syscall.S_IFDIR }

// IsRegular reports whether the file is a regular file.
func (fi FileInfo) IsRegular() bool { return fi.Mode&syscall.S_IFMT == syscall.S_IFREG }

// IsSymlink reports whether the file is a symbolic link.
func (fi FileInfo) IsSymlink() bool { return fi.Mode&syscall.S_IFMT == syscall.S_IFLNK }

func fileInfo(m *agentpb.FileInfo) FileInfo {
	if m == nil {
		return FileInfo{}
	}
	return FileInfo{
		Name: m.Name, Mode: m.Mode, Size: int64(min(m.Size, 1<<62)), ModTime: time.Unix(0, m.MtimeUnixNano),
		UID: m.Uid, GID: m.Gid, LinkTarget: m.LinkTarget,
	}
}

// Stat describes the guest's path, and with list the entries of the
// directory it names (truncated says the agent cut the list).
func (c *Client) Stat(ctx context.Context, path string, list bool) (info FileInfo, entries []FileInfo, truncated bool, err error) {
	return c.StatIn(ctx, "", path, list)
}

// StatIn is Stat with path resolved inside root, a directory of the
// guest's command root (Stat.root: capability files.root); "" is Stat.
func (c *Client) StatIn(ctx context.Context, root, path string, list bool) (info FileInfo, entries []FileInfo, truncated bool, err error) {
	resp, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Stat{Stat: &agentpb.Stat{Path: path, List: list, Root: root}}})
	if err != nil {
		return FileInfo{}, nil, false, err
	}
	r := resp.GetStat()
	if r == nil {
		return FileInfo{}, nil, false, errors.New("stat: the agent answered something else")
	}
	for _, e := range r.Entries {
		entries = append(entries, fileInfo(e))
	}
	return fileInfo(r.Info), entries, r.Truncated, nil
}

// CopyIn sends the tar stream src (see treecopy) to be unpacked as the
// guest's path, with the stream's owners when keepOwners is set (else
// everything is root's). It returns once the agent has unpacked it all,
// or as soon as the agent refused it.
func (c *Client) CopyIn(ctx context.Context, path string, src io.Reader, keepOwners bool) (treecopy.Stats, error) {
	return c.CopyInWith(ctx, &agentpb.CopyIn{Path: path, KeepOwners: keepOwners}, src)
}

// CopyInWith is CopyIn with the whole request: its root and parents
// (capability files.root) as well.
func (c *Client) CopyInWith(ctx context.Context, req *agentpb.CopyIn, src io.Reader) (treecopy.Stats, error) {
	st, err := c.openStream(ctx, &agentpb.Request{Call: &agentpb.Request_CopyIn{CopyIn: req}})
	if err != nil {
		return treecopy.Stats{}, err
	}
	defer st.Close()
	stop := context.AfterFunc(ctx, func() { _ = st.Reset() })
	defer stop()
	sent := make(chan error, 1)
	go func() {
		w := agentproto.NewFileDataWriter(st)
		_, err := io.Copy(w, src)
		if err == nil {
			err = w.Close()
		} else {
			// The source failed: the agent must not take a
			// truncated stream for a whole one.
			_ = st.Reset()
		}
		sent <- err
	}()
	var resp agentpb.Response
	rerr := agentproto.NewReader(st).Read(&resp)
	if rerr != nil || resp.GetError() != nil {
		// The agent gave up early: stop sending.
		_ = st.Reset()
	}
	serr := <-sent
	switch {
	case ctx.Err() != nil:
		return treecopy.Stats{}, ctx.Err()
	case rerr == nil && resp.GetError() != nil:
		return treecopy.Stats{}, remoteError(resp.GetError())
	case serr != nil && !errors.Is(serr, agentproto.ErrClosed):
		return treecopy.Stats{}, fmt.Errorf("read the source: %w", serr)
	case rerr != nil:
		return treecopy.Stats{}, rerr
	}
	r := resp.GetCopyIn()
	if r == nil {
		return treecopy.Stats{}, errors.New("copy in: the agent answered something else")
	}
	return treecopy.Stats{Files: int(min(r.Files, 1<<31)), Dirs: int(min(r.Dirs, 1<<31)), Links: int(min(r.Links, 1<<31)), Bytes: int64(min(r.Bytes, 1<<62))}, nil
}

// CopyOut asks the agent for the guest's path as a tar stream (see
// treecopy). The reader ends with io.EOF after the whole stream, or with
// the agent's *RemoteError; Close abandons the stream.
func (c *Client) CopyOut(ctx context.Context, path string) (io.ReadCloser, error) {
	st, err := c.openStream(ctx, &agentpb.Request{Call: &agentpb.Request_CopyOut{CopyOut: &agentpb.CopyOut{Path: path}}})
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = st.Reset() })
	return &copyOutStream{st: st, stop: stop, r: agentproto.NewFileDataReader(agentproto.NewReader(st))}, nil
}

type copyOutStream struct {
	st   *mux.Stream
	stop func() bool
	r    *agentproto.FileDataReader
}

func (s *copyOutStream) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	var fe *agentproto.RemoteFileError
	if errors.As(err, &fe) {
		err = &RemoteError{Code: fe.Code.String(), Message: fe.Message}
	}
	return n, err
}

func (s *copyOutStream) Close() error {
	s.stop()
	_ = s.st.Reset()
	return nil
}

// openStream opens a stream and writes req on it.
func (c *Client) openStream(ctx context.Context, req *agentpb.Request) (*mux.Stream, error) {
	st, err := c.sess.OpenContext(ctx)
	if err != nil {
		return nil, ctxErr(ctx, agentproto.Classify(err))
	}
	if err := agentproto.WriteContext(ctx, st, req); err != nil {
		_ = st.Reset()
		return nil, ctxErr(ctx, err)
	}
	return st, nil
}

// Forward opens a stream with req as its request, for a proxy that
// passes the rest of the stream through (see mvm's Serve).
func (c *Client) Forward(ctx context.Context, req *agentpb.Request) (*mux.Stream, error) {
	return c.openStream(ctx, req)
}

// Kill sends sig to the process group of the exec named id.
func (c *Client) Kill(ctx context.Context, id string, sig int) error { return c.signal(ctx, id, sig) }

// Console asks a sandbox's owner for its guest's console (see mvm's
// Serve): the reader ends with io.EOF after all of it.
func (c *Client) Console(ctx context.Context) (io.ReadCloser, error) {
	st, err := c.openStream(ctx, &agentpb.Request{Call: &agentpb.Request_Console{Console: &agentpb.Console{}}})
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = st.Reset() })
	return &copyOutStream{st: st, stop: stop, r: agentproto.NewFileDataReader(agentproto.NewReader(st))}, nil
}

// Pause asks a sandbox's owner to pause it (see mvm's Sandbox.Pause).
func (c *Client) Pause(ctx context.Context) (stateBytes int64, took time.Duration, err error) {
	resp, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Pause{Pause: &agentpb.Pause{}}})
	if err != nil {
		return 0, 0, err
	}
	r := resp.GetPause()
	if r == nil {
		return 0, 0, errors.New("pause: the owner answered something else")
	}
	return int64(min(r.StateBytes, 1<<62)), time.Duration(min(r.DurationMicros, 1<<40)) * time.Microsecond, nil
}

// Resume asks a sandbox's owner to resume it.
func (c *Client) Resume(ctx context.Context) (time.Duration, error) {
	resp, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Resume{Resume: &agentpb.Resume{}}})
	if err != nil {
		return 0, err
	}
	r := resp.GetResume()
	if r == nil {
		return 0, errors.New("resume: the owner answered something else")
	}
	return time.Duration(min(r.DurationMicros, 1<<40)) * time.Microsecond, nil
}
