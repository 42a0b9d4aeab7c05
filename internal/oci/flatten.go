package oci

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/dirimage"
)

// Limits bound what flattening reads. The zero value of a field is its
// default.
type Limits struct {
	// MaxEntries bounds the entries of one tar stream (default 2 Mi).
	MaxEntries int
	// MaxBytes bounds the file content staged for one image, blocks of
	// zeros in large files aside (default 64 GiB).
	MaxBytes int64
	// MaxStream bounds one uncompressed tar stream, and the sum of the
	// sizes of its files, holes of sparse entries included (default 256
	// GiB): what a decompression bomb of zeros can make the conversion
	// read.
	MaxStream int64
}

func (l Limits) withDefaults() Limits {
	if l.MaxEntries == 0 {
		l.MaxEntries = 2 << 20
	}
	if l.MaxBytes == 0 {
		l.MaxBytes = 64 << 30
	}
	if l.MaxStream == 0 {
		l.MaxStream = 256 << 30
	}
	return l
}

// Progress reports the reading of one layer.
type Progress struct {
	Layer, Layers int // Layer counts from 1
	Digest        string
	// Bytes of the blob read so far; Size is the blob's size, -1 when
	// not known in advance.
	Bytes, Size int64
	Done        bool
}

// Flattener applies tar streams, in order, to a Builder. Regular files'
// content goes to staging files in a directory of its own, which stay
// until Close: the Builder's entries point into them, so Close only after
// the image is written.
type Flattener struct {
	b      *dirimage.Builder
	dir    string
	limits Limits
	// Parallel is how many layers are read at once (default 3): reading
	// (download, decompression, hashing, staging) overlaps, applying
	// stays in order.
	Parallel int

	mu     sync.Mutex
	staged []*os.File
	bytes  atomic.Int64
	stats  Stats
}

// Stats counts what was flattened.
type Stats struct {
	Entries   int // tar entries read
	Whiteouts int // whiteouts and opaque markers applied
	// DroppedXattrs counts extended attributes ext4 cannot hold (a
	// namespace other than user, trusted, security and POSIX ACLs).
	DroppedXattrs int
	// Bytes is the size of the files read, Staged what of it was not
	// blocks of zeros in large files (what staging cost on disk).
	Bytes, Staged int64
}

// NewFlattener returns a Flattener adding to b, staging content in dir
// (which must exist and belong to the caller alone).
func NewFlattener(b *dirimage.Builder, dir string, l Limits) *Flattener {
	return &Flattener{b: b, dir: dir, limits: l.withDefaults(), Parallel: 3}
}

// Stats returns what has been flattened so far.
func (f *Flattener) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.stats
	s.Staged = f.bytes.Load()
	return s
}

// Close closes and removes the staging files.
func (f *Flattener) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	for _, s := range f.staged {
		errs = append(errs, s.Close(), os.Remove(s.Name()))
	}
	f.staged = nil
	return errors.Join(errs...)
}

// Image reads the layers of im and applies them in order, with OCI
// whiteouts. Each layer is verified (its blob's digest and size, and its
// uncompressed stream's diff ID) before it is applied. progress, if not
// nil, is called from one goroutine at a time.
func (f *Flattener) Image(ctx context.Context, im *Image, progress func(Progress)) error {
	ctx, cancel := context.WithCancel(ctx)
	var pmu sync.Mutex
	report := func(p Progress) {
		if progress != nil {
			pmu.Lock()
			progress(p)
			pmu.Unlock()
		}
	}
	type result struct {
		c   *changes
		err error
	}
	n := len(im.Layers)
	results := make([]chan result, n)
	sem := make(chan struct{}, max(1, f.Parallel))
	var wg sync.WaitGroup
	for i := range im.Layers {
		results[i] = make(chan result, 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				results[i] <- result{err: ctx.Err()}
				return
			}
			defer func() { <-sem }()
			c, err := f.readLayer(ctx, im.Layers[i], n, report)
			results[i] <- result{c, err}
		}()
	}
	defer func() { cancel(); wg.Wait() }()
	for i := range im.Layers {
		r := <-results[i]
		if r.err != nil {
			return r.err
		}
		if err := r.c.apply(f.b); err != nil {
			return fmt.Errorf("%s: %w", im.Layers[i], classify(err))
		}
		f.count(r.c)
	}
	return nil
}

func (f *Flattener) count(c *changes) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats.Entries += c.entries
	f.stats.Whiteouts += c.whiteouts
	f.stats.DroppedXattrs += c.dropped
	f.stats.Bytes += c.bytes
}

// Tar applies one tar stream holding a whole tree (a root filesystem
// tarball): no whiteouts, entries named ".wh.*" are files like any other.
func (f *Flattener) Tar(ctx context.Context, r io.Reader) error {
	c, err := f.read(ctx, r, false)
	if err != nil {
		return err
	}
	if err := c.apply(f.b); err != nil {
		return classify(err)
	}
	f.count(c)
	return nil
}

// readLayer opens, verifies and reads one layer.
func (f *Flattener) readLayer(ctx context.Context, l Layer, layers int, report func(Progress)) (*changes, error) {
	p := Progress{Layer: l.Index + 1, Layers: layers, Digest: l.Digest, Size: l.Size}
	if p.Digest == "" {
		p.Digest = l.DiffID
	}
	report(p)
	raw, err := l.open()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", l, notFound("blob", err))
	}
	defer raw.Close()
	stop := context.AfterFunc(ctx, func() { raw.Close() }) // unblocks a read
	defer stop()
	var blob io.Reader = &counter{r: raw, fn: func(n int64) { p.Bytes = n; report(p) }}
	var bv *verifier
	if !l.uncompressed {
		if bv, err = newVerifier(blob, "blob", l.Digest, l.Size, 0); err != nil {
			return nil, fmt.Errorf("%s: %w", l, err)
		}
		blob = bv
	}
	br := bufio.NewReaderSize(blob, 1<<20)
	dec, err := decompress(br)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", l, ErrInvalid, err)
	}
	defer dec.Close()
	dv, err := newVerifier(dec, "uncompressed stream", l.DiffID, -1, f.limits.MaxStream)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", l, err)
	}
	c, err := f.read(ctx, dv, true)
	if err == nil {
		// The tar stream ends before its blob: the digests cover all.
		if _, err = io.Copy(io.Discard, dv); err == nil && bv != nil {
			_, err = io.Copy(io.Discard, br)
		}
	}
	if err != nil && bv != nil && !errors.Is(err, ErrDigest) && ctx.Err() == nil {
		// A stream that does not decompress, or not to a tar, may be a
		// blob that is not the one the manifest names: say so if it is.
		if _, derr := io.Copy(io.Discard, br); errors.Is(derr, ErrDigest) {
			err = derr
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%s: %w", l, classify(err))
	}
	p.Done = true
	report(p)
	return c, nil
}

// classify gives errors from reading a stream their class.
func classify(err error) error {
	switch {
	case errors.Is(err, ErrDigest), errors.Is(err, ErrInvalid), errors.Is(err, ErrNotFound):
		return err
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: truncated: %w", ErrInvalid, err)
	case errors.Is(err, tar.ErrHeader), errors.Is(err, gzip.ErrHeader), errors.Is(err, gzip.ErrChecksum),
		errors.Is(err, zstd.ErrMagicMismatch), errors.Is(err, errTooBig), errors.Is(err, dirimage.ErrPath),
		errors.Is(err, dirimage.ErrTooManyFiles):
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	var perr *os.PathError
	if errors.As(err, &perr) { // the host's own trouble: staging
		return err
	}
	return fmt.Errorf("%w: %w", ErrInvalid, err)
}

// decompress returns the tar stream in r, by its first bytes: gzip,
// zstd, or a tar as it is.
func decompress(r *bufio.Reader) (io.ReadCloser, error) {
	head, err := r.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}):
		z, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		return z, nil
	case bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		z, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(128<<20), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return z.IOReadCloser(), nil
	}
	return io.NopCloser(r), nil
}

// maxXattr bounds one extended attribute (name and value): ext4 keeps a
// file's attributes in one block.
const maxXattr = 4096

type opKind uint8

const (
	opAdd opKind = iota
	opLink
	opWhiteout
	opOpaque
)

// op is one change a tar stream makes to the tree.
type op struct {
	kind   opKind
	path   string
	target string // a hard link's
	e      dirimage.Entry
}

// changes is one tar stream, read: its content staged, its entries in
// memory.
type changes struct {
	ops                         []op
	entries, whiteouts, dropped int
	bytes                       int64
}

// apply applies c: whiteouts and opaque markers first, to what the layers
// below left (a whiteout never hides its own layer's entries, whatever
// their order in the stream), then the entries in stream order.
func (c *changes) apply(b *dirimage.Builder) error {
	for _, o := range c.ops {
		var err error
		switch o.kind {
		case opWhiteout:
			err = b.Remove(o.path)
		case opOpaque:
			err = b.Clear(o.path)
		default:
			continue
		}
		if err != nil {
			return err
		}
		c.whiteouts++
	}
	for _, o := range c.ops {
		var err error
		switch o.kind {
		case opAdd:
			err = b.Add(o.path, o.e)
		case opLink:
			err = b.Link(o.path, o.target)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// cleanName turns a tar entry's name into a path of the tree: leading
// "/" and "./" go (tar files name "./usr/bin" or "/usr/bin" alike); ".."
// stays, for the Builder to refuse.
func cleanName(s string) string {
	for {
		switch {
		case strings.HasPrefix(s, "/"):
			s = s[1:]
		case strings.HasPrefix(s, "./"):
			s = s[2:]
		default:
			return strings.TrimSuffix(s, "/")
		}
	}
}

// read reads a tar stream: its entries, content staged.
func (f *Flattener) read(ctx context.Context, r io.Reader, whiteouts bool) (*changes, error) {
	sf, err := os.CreateTemp(f.dir, "stage-*")
	if err != nil {
		return nil, fmt.Errorf("staging: %w", err)
	}
	f.mu.Lock()
	f.staged = append(f.staged, sf)
	f.mu.Unlock()
	stage := newStageFile(sf, &f.bytes, f.limits.MaxBytes)
	c := &changes{}
	var logical int64
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if c.entries++; c.entries > f.limits.MaxEntries {
			return nil, fmt.Errorf("%w: more than %d entries", ErrInvalid, f.limits.MaxEntries)
		}
		if c.entries%256 == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		if logical += max(h.Size, 0); logical > f.limits.MaxStream {
			return nil, fmt.Errorf("%w: files of more than %d bytes in one layer", ErrInvalid, f.limits.MaxStream)
		}
		o, skip, err := f.entry(h, tr, stage, whiteouts, c)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", h.Name, err)
		}
		if !skip {
			c.ops = append(c.ops, o)
		}
	}
	if err := stage.finish(); err != nil {
		return nil, fmt.Errorf("staging: %w", err)
	}
	return c, nil
}

// entry turns one tar header (and its content) into an op.
func (f *Flattener) entry(h *tar.Header, tr io.Reader, stage *stageFile, whiteouts bool, c *changes) (o op, skip bool, err error) {
	p := cleanName(h.Name)
	// Bounded now, not when the layer is applied: its entries wait in
	// memory until then.
	if len(p) > dirimage.MaxPath || len(h.Linkname) > dirimage.MaxTarget {
		return op{}, false, fmt.Errorf("%w: name or link target longer than %d bytes", ErrInvalid, dirimage.MaxPath)
	}
	if whiteouts {
		dir, base := path.Split(p)
		switch {
		case base == ".wh..wh..opq":
			return op{kind: opOpaque, path: dir}, false, nil
		case strings.HasPrefix(base, ".wh..wh."): // other aufs metadata
			return op{}, true, nil
		case strings.HasPrefix(base, ".wh."):
			name := base[len(".wh."):]
			if name == "" || name == "." || name == ".." {
				return op{}, false, fmt.Errorf("%w: whiteout of %q", ErrInvalid, name)
			}
			return op{kind: opWhiteout, path: dir + name}, false, nil
		}
	}
	if h.Uid < 0 || h.Gid < 0 || h.Uid > math.MaxUint32 || h.Gid > math.MaxUint32 {
		return op{}, false, fmt.Errorf("%w: owner %d:%d", ErrInvalid, h.Uid, h.Gid)
	}
	e := dirimage.Entry{
		Mode:  uint32(h.Mode) & 0o7777,
		UID:   uint32(h.Uid),
		GID:   uint32(h.Gid),
		Mtime: h.ModTime,
		Atime: h.AccessTime,
		Ctime: h.ChangeTime,
	}
	if e.Mtime.IsZero() {
		e.Mtime = time.Unix(0, 0)
	}
	for k, v := range h.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		if !dirimage.SupportedXattr(name) {
			c.dropped++
			continue
		}
		if len(name)+len(v) > maxXattr {
			return op{}, false, fmt.Errorf("%w: extended attribute %q of %d bytes", ErrInvalid, name, len(v))
		}
		if e.Xattrs == nil {
			e.Xattrs = map[string][]byte{}
		}
		e.Xattrs[name] = []byte(v)
	}
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeRegA, tar.TypeCont, tar.TypeGNUSparse: //nolint:staticcheck // TypeRegA: old archives have it
		e.Mode |= unix.S_IFREG
		off, err := stage.add(tr, h.Size)
		if err != nil {
			return op{}, false, err
		}
		e.Data = dirimage.Data{R: stage.f, Off: off, Size: h.Size}
		c.bytes += h.Size
	case tar.TypeDir:
		e.Mode |= unix.S_IFDIR
	case tar.TypeSymlink:
		e.Mode |= unix.S_IFLNK
		e.Target = h.Linkname
	case tar.TypeLink:
		return op{kind: opLink, path: p, target: cleanName(h.Linkname)}, false, nil
	case tar.TypeChar, tar.TypeBlock:
		e.Mode |= unix.S_IFCHR
		if h.Typeflag == tar.TypeBlock {
			e.Mode = e.Mode&^unix.S_IFMT | unix.S_IFBLK
		}
		if h.Devmajor < 0 || h.Devmajor >= 1<<12 || h.Devminor < 0 || h.Devminor >= 1<<20 {
			return op{}, false, fmt.Errorf("%w: device number %d:%d", ErrInvalid, h.Devmajor, h.Devminor)
		}
		e.Major, e.Minor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeFifo:
		e.Mode |= unix.S_IFIFO
	case tar.TypeXGlobalHeader:
		return op{}, true, nil
	default:
		return op{}, false, fmt.Errorf("%w: tar entry type %q", ErrInvalid, h.Typeflag)
	}
	return op{kind: opAdd, path: p, e: e}, false, nil
}
