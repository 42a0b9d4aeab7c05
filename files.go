package mvm

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/treecopy"
)

// DefaultCopyLimit bounds what one copy out of a guest may write on the
// host when CopyOptions gives no limit. Whatever the limit, a copy also
// stops before it would leave less than copyReserve free on the host's
// filesystem: the guest decides how much it sends.
const DefaultCopyLimit int64 = 16 << 30

// copyReserve is the free space a copy out never eats into.
const copyReserve int64 = 256 << 20

// ErrCopyLimit is wrapped by the error of a copy out that went over its
// limit or the host's free space; nothing of it is left on the host.
var ErrCopyLimit = treecopy.ErrLimit

// CopyOptions tune a copy between the host and a sandbox.
type CopyOptions struct {
	// Limit bounds the bytes a copy out of the guest writes on the host
	// (0: DefaultCopyLimit).
	Limit int64
	// Progress, when set, is called from time to time (at most every
	// 100 ms, and once at the end) with the bytes of the copy's stream
	// moved so far, for a progress display.
	Progress func(bytes int64)
	// KeepOwners, for a copy in, gives the guest's copies the host
	// files' owners and groups (numeric ids) instead of root: what a
	// container's root filesystem needs.
	KeepOwners bool
	// Root, for a copy in, is a directory of the guest that dst is
	// resolved in as its root, as Cmd.Root runs a command there:
	// symbolic links in dst resolve inside it, and its kernel filesystems
	// (its /run tmpfs among them) are mounted first, so that the copy
	// lands where its commands see it. What a pod's container's volumes
	// need; "" is the command root.
	Root string
	// Parents, for a copy in, makes dst's missing parent directories
	// (0755, root's) first, as mkdir -p.
	Parents bool
}

// progressReader counts what is read through it for CopyOptions.Progress.
type progressReader struct {
	r    io.Reader
	fn   func(int64)
	n    int64
	last time.Time
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	if now := time.Now(); err != nil || now.Sub(p.last) >= 100*time.Millisecond {
		p.last = now
		p.fn(p.n)
	}
	return n, err
}

// withProgress wraps r when opts asks for progress.
func withProgress(r io.Reader, opts CopyOptions) io.Reader {
	if opts.Progress == nil {
		return r
	}
	return &progressReader{r: r, fn: opts.Progress, last: time.Now()}
}

// CopyStats says what a copy moved.
type CopyStats struct {
	Files, Dirs, Links int
	Bytes              int64
	Duration           time.Duration
}

// FileInfo describes a file in a sandbox's guest. It is an fs.FileInfo.
type FileInfo struct {
	name    string
	size    int64
	mode    fs.FileMode
	modTime time.Time
	// UID and GID own the file in the guest.
	UID, GID uint32
	// LinkTarget is a symbolic link's target.
	LinkTarget string
}

func (fi FileInfo) Name() string       { return fi.name }
func (fi FileInfo) Size() int64        { return fi.size }
func (fi FileInfo) Mode() fs.FileMode  { return fi.mode }
func (fi FileInfo) ModTime() time.Time { return fi.modTime }
func (fi FileInfo) IsDir() bool        { return fi.mode.IsDir() }
func (fi FileInfo) Sys() any           { return nil }

func guestFileInfo(a agentclient.FileInfo) FileInfo {
	m := fs.FileMode(a.Mode & 0o777)
	switch a.Mode & syscall.S_IFMT {
	case syscall.S_IFDIR:
		m |= fs.ModeDir
	case syscall.S_IFLNK:
		m |= fs.ModeSymlink
	case syscall.S_IFIFO:
		m |= fs.ModeNamedPipe
	case syscall.S_IFSOCK:
		m |= fs.ModeSocket
	case syscall.S_IFCHR:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case syscall.S_IFBLK:
		m |= fs.ModeDevice
	}
	if a.Mode&syscall.S_ISUID != 0 {
		m |= fs.ModeSetuid
	}
	if a.Mode&syscall.S_ISGID != 0 {
		m |= fs.ModeSetgid
	}
	if a.Mode&syscall.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	return FileInfo{name: a.Name, size: a.Size, mode: m, modTime: a.ModTime, UID: a.UID, GID: a.GID, LinkTarget: a.LinkTarget}
}

// files is what the file operations need of a sandbox: its agent client,
// once it is usable. Sandbox and Attached both serve them.
type files interface {
	agent() (*agentclient.Client, func(), error)
}

// agent is the sandbox's agent client, if the sandbox can take calls,
// and the func that ends the call: a file call in flight keeps Pause
// away, as a command does.
func (sb *Sandbox) agent() (*agentclient.Client, func(), error) {
	if sb.closingOrClosed() {
		return nil, nil, ErrClosed
	}
	if err := sb.Err(); err != nil {
		return nil, nil, err
	}
	sb.act.begin()
	if err := sb.paused(); err != nil {
		sb.act.end()
		return nil, nil, err
	}
	if h := sb.helloReply(); !h.Has(agentproto.CapFiles) {
		sb.act.end()
		return nil, nil, &VMError{Op: "files", Err: fmt.Errorf("the guest agent (%s) cannot move files", h.AgentVersion)}
	}
	return sb.agentClient(), sb.act.end, nil
}

// Stat describes the guest's path (a symbolic link itself, not what it
// points to). A missing file's error wraps fs.ErrNotExist.
func (sb *Sandbox) Stat(ctx context.Context, guestPath string) (FileInfo, error) {
	return statFile(ctx, sb, guestPath)
}

// ReadDir lists the guest's directory (at most 10000 entries).
func (sb *Sandbox) ReadDir(ctx context.Context, guestPath string) ([]FileInfo, error) {
	return readDir(ctx, sb, guestPath)
}

// WriteFile writes what r holds as the guest's file guestPath, with mode's
// permission bits, replacing a file there whole (the guest sees the old
// file or the new one, never part of it). The parent directory must
// exist.
func (sb *Sandbox) WriteFile(ctx context.Context, guestPath string, r io.Reader, mode fs.FileMode) error {
	return writeGuestFile(ctx, sb, guestPath, r, mode)
}

// ReadFile writes the guest's regular file guestPath to w and returns its
// size. It reads at most opts.Limit bytes (DefaultCopyLimit).
func (sb *Sandbox) ReadFile(ctx context.Context, guestPath string, w io.Writer, opts CopyOptions) (int64, error) {
	return readGuestFile(ctx, sb, guestPath, w, opts)
}

// CopyIn copies the host's file, link or directory tree src into the
// guest with docker cp's rules: to dst itself when dst does not exist,
// into it when it is a directory, over it when it is a file; src ending
// in "/." copies a directory's contents. Modes and modification times are
// kept; the guest's copies belong to root (or, with opts.KeepOwners, to
// the host files' owners). opts.Progress follows it; its
// Limit is for copies out.
func (sb *Sandbox) CopyIn(ctx context.Context, src, dst string, opts CopyOptions) (CopyStats, error) {
	return copyIn(ctx, sb, src, dst, opts)
}

// CopyOut copies the guest's file, link or directory tree src to the
// host's dst with docker cp's rules (see CopyIn). Nothing appears at dst
// until the whole copy has arrived; a copy over opts.Limit or over the
// free space of dst's filesystem is refused (ErrCopyLimit) and leaves
// nothing. A dst that is a symbolic link is refused, and what the guest
// sends is never written through a link: setuid and setgid bits are
// dropped.
func (sb *Sandbox) CopyOut(ctx context.Context, src, dst string, opts CopyOptions) (CopyStats, error) {
	return copyOut(ctx, sb, src, dst, opts)
}

// checkGuestPath checks a guest path given to a file operation: absolute
// and free of "..". A trailing "/" (a directory is meant) is reported and
// dropped.
func checkGuestPath(field, p string) (clean string, dirMeant bool, err error) {
	if p == "" {
		return "", false, invalid(field, p, "empty guest path")
	}
	if !strings.HasPrefix(p, "/") {
		return "", false, invalid(field, p, "guest paths are absolute")
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return "", false, invalid(field, p, "guest paths may not contain \"..\"")
		}
	}
	if len(p) > treecopy.MaxNameLen || strings.IndexByte(p, 0) >= 0 {
		return "", false, invalid(field, p, "bad guest path")
	}
	return path.Clean(p), len(p) > 1 && strings.HasSuffix(p, "/"), nil
}

// guestError gives an agent's refusal the SDK's typed errors.
func guestError(op, p string, err error) error {
	var re *agentclient.RemoteError
	if errors.As(err, &re) {
		switch re.Code {
		case "CODE_NOT_FOUND":
			return &fs.PathError{Op: op, Path: p, Err: fs.ErrNotExist}
		case "CODE_INVALID_ARGUMENT":
			return fmt.Errorf("%s %s: %s: %w", op, p, printable(re.Message), ErrInvalid)
		}
		return fmt.Errorf("%s %s: %s", op, p, printable(re.Message))
	}
	if errors.Is(err, agentproto.ErrClosed) {
		return &VMError{Op: op, Err: err}
	}
	return fmt.Errorf("%s %s: %w", op, p, err)
}

// printable is a guest's text made safe to print on a terminal: one with
// control characters (or invalid UTF-8) is quoted, escapes shown.
func printable(s string) string {
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError || !unicode.IsPrint(r) && r != ' ' {
			return strconv.QuoteToGraphic(s)
		}
	}
	return s
}

func statFile(ctx context.Context, f files, guestPath string) (FileInfo, error) {
	p, _, err := checkGuestPath("path", guestPath)
	if err != nil {
		return FileInfo{}, err
	}
	c, done, err := f.agent()
	if err != nil {
		return FileInfo{}, err
	}
	defer done()
	info, _, _, err := c.Stat(ctx, p, false)
	if err != nil {
		return FileInfo{}, guestError("stat", p, err)
	}
	return guestFileInfo(info), nil
}

func readDir(ctx context.Context, f files, guestPath string) ([]FileInfo, error) {
	p, _, err := checkGuestPath("path", guestPath)
	if err != nil {
		return nil, err
	}
	c, done, err := f.agent()
	if err != nil {
		return nil, err
	}
	defer done()
	info, entries, _, err := c.Stat(ctx, p, true)
	if err != nil {
		return nil, guestError("read dir", p, err)
	}
	if !info.IsDir() {
		return nil, &fs.PathError{Op: "read dir", Path: p, Err: syscall.ENOTDIR}
	}
	out := make([]FileInfo, 0, len(entries))
	for _, e := range entries {
		out = append(out, guestFileInfo(e))
	}
	return out, nil
}

func writeGuestFile(ctx context.Context, f files, guestPath string, r io.Reader, mode fs.FileMode) error {
	p, _, err := checkGuestPath("path", guestPath)
	if err != nil {
		return err
	}
	c, done, err := f.agent()
	if err != nil {
		return err
	}
	defer done()
	// tar needs the size first: a reader that does not know it is
	// spooled to a temporary file.
	size, body, cleanup, err := sized(r)
	if err != nil {
		return err
	}
	defer cleanup()
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		err := tw.WriteHeader(&tar.Header{Name: ".", Typeflag: tar.TypeReg, Size: size, Mode: int64(mode.Perm()), ModTime: time.Now(), Format: tar.FormatPAX})
		if err == nil {
			_, err = io.Copy(tw, io.LimitReader(body, size))
		}
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	_, err = c.CopyIn(ctx, p, pr, false)
	pr.CloseWithError(io.ErrClosedPipe)
	if err != nil {
		return guestError("write", p, err)
	}
	return nil
}

// sized returns r's size and a reader of exactly that, spooling r to a
// temporary file when its size is not known.
func sized(r io.Reader) (int64, io.Reader, func(), error) {
	switch v := r.(type) {
	case *bytes.Reader:
		return int64(v.Len()), v, func() {}, nil
	case *strings.Reader:
		return int64(v.Len()), v, func() {}, nil
	case *bytes.Buffer:
		return int64(v.Len()), v, func() {}, nil
	case *os.File:
		if fi, err := v.Stat(); err == nil && fi.Mode().IsRegular() {
			if off, err := v.Seek(0, io.SeekCurrent); err == nil {
				return fi.Size() - off, v, func() {}, nil
			}
		}
	}
	tmp, err := os.CreateTemp("", "mvm-write-*")
	if err != nil {
		return 0, nil, nil, err
	}
	os.Remove(tmp.Name())
	n, err := io.Copy(tmp, r)
	if err == nil {
		_, err = tmp.Seek(0, io.SeekStart)
	}
	if err != nil {
		tmp.Close()
		return 0, nil, nil, err
	}
	return n, tmp, func() { tmp.Close() }, nil
}

func readGuestFile(ctx context.Context, f files, guestPath string, w io.Writer, opts CopyOptions) (int64, error) {
	p, _, err := checkGuestPath("path", guestPath)
	if err != nil {
		return 0, err
	}
	c, done, err := f.agent()
	if err != nil {
		return 0, err
	}
	defer done()
	limit := opts.Limit
	if limit <= 0 {
		limit = DefaultCopyLimit
	}
	rc, err := c.CopyOut(ctx, p)
	if err != nil {
		return 0, guestError("read", p, err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	hdr, err := tr.Next()
	if err != nil {
		return 0, guestError("read", p, err)
	}
	switch {
	case hdr.Name != "." && hdr.Name != "./":
		return 0, fmt.Errorf("read %s: the guest sent %q first", p, hdr.Name)
	case hdr.Typeflag == tar.TypeDir:
		return 0, &fs.PathError{Op: "read", Path: p, Err: syscall.EISDIR}
	case hdr.Typeflag != tar.TypeReg:
		return 0, fmt.Errorf("read %s: not a regular file", p)
	case hdr.Size > limit:
		return 0, fmt.Errorf("read %s: %d bytes is over the %d byte limit: %w", p, hdr.Size, limit, ErrCopyLimit)
	}
	n, err := io.Copy(w, tr)
	if err != nil {
		return n, guestError("read", p, err)
	}
	return n, nil
}

func copyIn(ctx context.Context, f files, src, dst string, opts CopyOptions) (CopyStats, error) {
	start := time.Now()
	contents := strings.HasSuffix(src, "/.")
	sfi, err := os.Lstat(src)
	if err != nil {
		return CopyStats{}, &RequestError{Field: "src", Value: src, Err: errors.Unwrap(err)}
	}
	if contents && !sfi.IsDir() {
		return CopyStats{}, invalid("src", src, "not a directory")
	}
	p, dirMeant, err := checkGuestPath("dst", dst)
	if err != nil {
		return CopyStats{}, err
	}
	c, done, err := f.agent()
	if err != nil {
		return CopyStats{}, err
	}
	defer done()
	if opts.KeepOwners {
		if ok, err := c.HasCapability(ctx, agentproto.CapFilesOwners); err != nil || !ok {
			return CopyStats{}, invalid("CopyOptions.KeepOwners", "", "the guest agent cannot give files their owners")
		}
	}
	if opts.Root != "" || opts.Parents {
		if ok, err := c.HasCapability(ctx, agentproto.CapFilesRoot); err != nil || !ok {
			field := "CopyOptions.Root"
			if opts.Root == "" {
				field = "CopyOptions.Parents"
			}
			return CopyStats{}, invalid(field, opts.Root, "the guest agent cannot resolve a copy in a root of its own nor make its parents")
		}
	}
	if opts.Root != "" {
		if opts.Root, _, err = checkGuestPath("CopyOptions.Root", opts.Root); err != nil {
			return CopyStats{}, err
		}
	}
	target := p
	info, _, _, err := c.StatIn(ctx, opts.Root, p, false)
	switch {
	case err == nil && info.IsDir():
		if !contents {
			target = path.Join(p, filepath.Base(filepath.Clean(src)))
		}
	case err == nil:
		if sfi.IsDir() {
			return CopyStats{}, fmt.Errorf("copy %s to %s: cannot copy a directory to a file: %w", src, dst, ErrInvalid)
		}
		if dirMeant {
			return CopyStats{}, &fs.PathError{Op: "copy", Path: dst, Err: syscall.ENOTDIR}
		}
	case isNotFound(err):
		if dirMeant && !sfi.IsDir() {
			return CopyStats{}, fmt.Errorf("copy %s to %s: the destination directory does not exist: %w", src, dst, fs.ErrNotExist)
		}
	default:
		return CopyStats{}, guestError("stat", p, err)
	}

	root, name := src, "."
	if !contents {
		root, name = filepath.Dir(filepath.Clean(src)), filepath.Base(filepath.Clean(src))
	}
	r, err := os.OpenRoot(root)
	if err != nil {
		return CopyStats{}, err
	}
	defer r.Close()
	pr, pw := io.Pipe()
	go func() {
		write := treecopy.Write
		if opts.KeepOwners {
			write = treecopy.WriteWithOwners
		}
		_, err := write(pw, r, name)
		pw.CloseWithError(err)
	}()
	req := &agentpb.CopyIn{Path: target, KeepOwners: opts.KeepOwners, Root: opts.Root, Parents: opts.Parents}
	st, err := c.CopyInWith(ctx, req, withProgress(pr, opts))
	pr.CloseWithError(io.ErrClosedPipe)
	if err != nil {
		return CopyStats{}, guestError("copy to", target, err)
	}
	return CopyStats{Files: st.Files, Dirs: st.Dirs, Links: st.Links, Bytes: st.Bytes, Duration: time.Since(start)}, nil
}

func isNotFound(err error) bool {
	var re *agentclient.RemoteError
	return errors.As(err, &re) && re.Code == "CODE_NOT_FOUND"
}

func copyOut(ctx context.Context, f files, src, dst string, opts CopyOptions) (CopyStats, error) {
	start := time.Now()
	p, _, err := checkGuestPath("src", strings.TrimSuffix(src, "/."))
	if err != nil {
		return CopyStats{}, err
	}
	contents := strings.HasSuffix(src, "/.")
	if dst == "" {
		return CopyStats{}, invalid("dst", dst, "empty destination")
	}
	c, done, err := f.agent()
	if err != nil {
		return CopyStats{}, err
	}
	defer done()
	info, _, _, err := c.Stat(ctx, p, false)
	if err != nil {
		return CopyStats{}, guestError("stat", p, err)
	}
	if contents && !info.IsDir() {
		return CopyStats{}, invalid("src", src, "not a directory in the guest")
	}

	// Where it lands, by docker cp's rules; a link is never followed.
	dirMeant := strings.HasSuffix(dst, "/")
	dst = filepath.Clean(dst)
	target := dst
	dfi, err := os.Lstat(dst)
	switch {
	case err == nil && dfi.Mode()&fs.ModeSymlink != 0:
		return CopyStats{}, invalid("dst", dst, "is a symbolic link; name the directory it points to")
	case err == nil && dfi.IsDir():
		if !contents {
			target = filepath.Join(dst, path.Base(p))
		}
	case err == nil:
		if info.IsDir() {
			return CopyStats{}, invalid("dst", dst, "cannot copy a directory to a file")
		}
		if dirMeant {
			return CopyStats{}, &fs.PathError{Op: "copy", Path: dst, Err: syscall.ENOTDIR}
		}
	case errors.Is(err, fs.ErrNotExist):
		if dirMeant && !info.IsDir() {
			return CopyStats{}, &fs.PathError{Op: "copy", Path: dst, Err: fs.ErrNotExist}
		}
		pfi, perr := os.Stat(filepath.Dir(dst))
		if perr != nil || !pfi.IsDir() {
			return CopyStats{}, &RequestError{Field: "dst", Value: dst, Err: errors.New("its parent directory does not exist")}
		}
	default:
		return CopyStats{}, err
	}
	if p == "/" && !contents {
		target = dst // "/" has no base name to copy as
	}

	limit := opts.Limit
	if limit <= 0 {
		limit = DefaultCopyLimit
	}
	parent := filepath.Dir(target)
	var sfs unix.Statfs_t
	if err := unix.Statfs(parent, &sfs); err == nil {
		free := int64(sfs.Bavail)*sfs.Bsize - copyReserve
		limit = min(limit, free)
	}
	if limit <= 0 {
		return CopyStats{}, fmt.Errorf("copy %s from the guest: %s has less than %d MiB free: %w", p, parent, copyReserve>>20, ErrCopyLimit)
	}

	staging, err := os.MkdirTemp(parent, ".mvm-cp-*")
	if err != nil {
		return CopyStats{}, err
	}
	defer forceRemoveAll(staging)
	root, err := os.OpenRoot(parent)
	if err != nil {
		return CopyStats{}, err
	}
	defer root.Close()
	stg := filepath.Base(staging)
	// The guest's stream is unpacked in a root of its own: nothing in
	// it, not even a link it makes, can reach beside the staging
	// directory.
	sroot, err := os.OpenRoot(staging)
	if err != nil {
		return CopyStats{}, err
	}
	defer sroot.Close()

	rc, err := c.CopyOut(ctx, p)
	if err != nil {
		return CopyStats{}, guestError("copy from", p, err)
	}
	st, err := treecopy.Extract(withProgress(rc, opts), sroot, "x", treecopy.Limits{MaxBytes: limit, StripSetID: true})
	rc.Close()
	if err != nil {
		if errors.Is(err, treecopy.ErrLimit) {
			return CopyStats{}, fmt.Errorf("copy %s from the guest: %w (limit %d bytes: the copy limit or the free space of %s)", p, err, limit, parent)
		}
		return CopyStats{}, guestError("copy from", p, err)
	}
	if err := place(root, stg+"/x", filepath.Base(target)); err != nil {
		return CopyStats{}, fmt.Errorf("copy %s to %s: %w", p, target, err)
	}
	return CopyStats{Files: st.Files, Dirs: st.Dirs, Links: st.Links, Bytes: st.Bytes, Duration: time.Since(start)}, nil
}

// forceRemoveAll removes the staging directory dir, whatever modes the
// guest gave what is in it: each directory is made searchable and
// writable first (before it is read), so a mode 0000 cannot keep it.
func forceRemoveAll(dir string) {
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
	_ = os.RemoveAll(dir)
}

// place moves the staged from to to, both inside root: renamed over a
// file, merged into a directory (entry by entry, never through a link).
// An existing directory keeps its own mode and times: a guest does not
// get to loosen (or lock) a directory of the host's.
func place(root *os.Root, from, to string) error {
	sfi, err := root.Lstat(from)
	if err != nil {
		return err
	}
	tfi, err := root.Lstat(to)
	if err != nil || !sfi.IsDir() || !tfi.IsDir() {
		if err == nil && tfi.IsDir() != sfi.IsDir() {
			return fmt.Errorf("%s: %w", to, treecopy.ErrConflict)
		}
		return root.Rename(from, to)
	}
	d, err := root.Open(from)
	if err != nil {
		return err
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := place(root, from+"/"+n, to+"/"+n); err != nil {
			return err
		}
	}
	return nil
}

// Console returns what the guest's console printed so far: its last MiB
// (the kernel's messages; commands' output goes to their own streams).
// On an attached sandbox it asks the process that owns the VM.
func (sb *Sandbox) Console(ctx context.Context) ([]byte, error) {
	if sb.attached {
		rc, err := sb.agentClient().Console(ctx)
		if err != nil {
			return nil, guestError("console", sb.name, err)
		}
		defer rc.Close()
		return io.ReadAll(io.LimitReader(rc, backend.ConsoleLogLimit+1))
	}
	if t, ok := sb.m.(backend.ConsoleTailer); ok {
		b, _ := t.ConsoleTail()
		return b, nil
	}
	return nil, errors.New("this VM keeps no console log")
}
