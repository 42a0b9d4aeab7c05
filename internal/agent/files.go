package agent

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
	"github.com/mvm-sh/mvm/internal/treecopy"
)

// maxListed bounds a Stat listing.
const maxListed = 10000

// CheckPath checks a path of a file call: absolute, clean, at most
// PATH_MAX bytes, no NUL.
func CheckPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: empty path", errInvalidRequest)
	case len(p) > treecopy.MaxNameLen || strings.IndexByte(p, 0) >= 0:
		return fmt.Errorf("%w: bad path", errInvalidRequest)
	case !path.IsAbs(p):
		return fmt.Errorf("%w: %q is not absolute", errInvalidRequest, p)
	case path.Clean(p) != p:
		return fmt.Errorf("%w: %q is not clean (no \".\", \"..\", \"//\" or trailing \"/\")", errInvalidRequest, p)
	}
	return nil
}

// fileCallRoot resolves p's parent inside the command root, or inside
// its directory sub (CopyIn.root: a pod container's root, set up as
// Exec.root sets it up), the way a command there would (absolute symlinks
// and ".." stay in the root), and returns it as an os.Root with p's base
// name in it: what the call does below that is confined to the parent.
// With parents, the parent's missing directories are made first.
func (s *Server) fileCallRoot(sub, p string, parents bool) (*os.Root, string, error) {
	if err := CheckPath(p); err != nil {
		return nil, "", err
	}
	parent, base := path.Dir(p), path.Base(p)
	if p == "/" {
		base = "."
	}
	r := s.cmdRoot()
	if sub != "" || parents {
		if !s.opts.Mounts {
			return nil, "", fmt.Errorf("%w: files.root is not served by this agent", errInvalidRequest)
		}
	}
	if sub != "" {
		if err := CheckPath(sub); err != nil {
			return nil, "", err
		}
		var err error
		if r, _, err = s.subRoot(r, sub); err != nil {
			return nil, "", err
		}
	}
	if parents {
		if err := ensureDir(r, parent); err != nil {
			return nil, "", fmt.Errorf("%s: %w", parent, err)
		}
	}
	fd, err := r.open(parent, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", parent, err)
	}
	defer unix.Close(fd)
	real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", parent, err)
	}
	root, err := os.OpenRoot(real)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", parent, err)
	}
	return root, base, nil
}

// fileErrorCode maps a file call's failure to the protocol's code.
func fileErrorCode(err error) agentpb.Error_Code {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return agentpb.Error_CODE_NOT_FOUND
	case errors.Is(err, errInvalidRequest), errors.Is(err, treecopy.ErrLimit):
		return agentpb.Error_CODE_INVALID_ARGUMENT
	case errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.EISDIR), errors.Is(err, treecopy.ErrConflict):
		return agentpb.Error_CODE_FAILED_PRECONDITION
	}
	return errorCode(err)
}

// copyIn unpacks the FileData stream that follows the request.
func (ss *session) copyIn(st *mux.Stream, in *agentproto.Reader, req *agentpb.CopyIn) {
	data := agentproto.NewFileDataReader(in)
	root, base, err := ss.srv.fileCallRoot(req.Root, req.Path, req.Parents)
	var stats treecopy.Stats
	if err == nil {
		// Owners only as root (the agent of a VM is): anyone else
		// cannot give files away.
		stats, err = treecopy.Extract(data, root, base, treecopy.Limits{KeepOwners: req.KeepOwners && os.Geteuid() == 0})
		root.Close()
	}
	if err == nil {
		// What follows tar's end marker, up to eof.
		err = data.Drain()
	}
	if err != nil {
		ss.log.Debug("copy in", "path", req.Path, "err", err)
		_ = replyError(st, fileErrorCode(err), err.Error())
		return
	}
	_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_CopyIn{CopyIn: &agentpb.CopyInReply{
		Files: uint64(stats.Files), Dirs: uint64(stats.Dirs), Links: uint64(stats.Links), Bytes: uint64(stats.Bytes),
	}}})
}

// copyOut sends path as FileData messages.
func (ss *session) copyOut(st *mux.Stream, req *agentpb.CopyOut) {
	out := agentproto.NewFileDataWriter(st)
	root, base, err := ss.srv.fileCallRoot("", req.Path, false)
	if err == nil {
		_, err = treecopy.Write(out, root, base)
		root.Close()
	}
	if err != nil {
		ss.log.Debug("copy out", "path", req.Path, "err", err)
		_ = out.Fail(fileErrorCode(err), err)
		return
	}
	_ = out.Close()
}

// stat answers a Stat call.
func (ss *session) stat(st io.Writer, req *agentpb.Stat) {
	reply, err := ss.srv.statPath(req)
	if err != nil {
		_ = replyError(st, fileErrorCode(err), err.Error())
		return
	}
	_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Stat{Stat: reply}})
}

func (s *Server) statPath(req *agentpb.Stat) (*agentpb.StatReply, error) {
	root, base, err := s.fileCallRoot(req.Root, req.Path, false)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	fi, err := root.Lstat(base)
	if err != nil {
		return nil, err
	}
	reply := &agentpb.StatReply{Info: fileInfo(root, base, fi)}
	if req.Path == "/" {
		reply.Info.Name = "/"
	}
	if !req.List || !fi.IsDir() {
		return reply, nil
	}
	d, err := root.OpenFile(base, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_DIRECTORY, 0)
	if err != nil {
		return nil, err
	}
	names, err := d.Readdirnames(maxListed + 1)
	d.Close()
	if err != nil && err != io.EOF {
		return nil, err
	}
	if len(names) > maxListed {
		names, reply.Truncated = names[:maxListed], true
	}
	for _, n := range names {
		if efi, err := root.Lstat(path.Join(base, n)); err == nil {
			reply.Entries = append(reply.Entries, fileInfo(root, path.Join(base, n), efi))
		}
	}
	return reply, nil
}

// fileInfo is fi in the protocol's terms.
func fileInfo(root *os.Root, name string, fi fs.FileInfo) *agentpb.FileInfo {
	info := &agentpb.FileInfo{Name: fi.Name(), Size: uint64(fi.Size()), MtimeUnixNano: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		info.Mode, info.Uid, info.Gid = st.Mode, st.Uid, st.Gid
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		info.LinkTarget, _ = root.Readlink(name)
	}
	return info
}
