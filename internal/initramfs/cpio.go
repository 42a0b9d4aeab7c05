// Package initramfs writes the guest's initramfs: a newc cpio archive
// (the format the kernel unpacks into its root filesystem) built entirely
// in-process, so that device nodes and root ownership need no root on the
// host and no cpio binary.
package initramfs

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// Entry kinds, as the mode's file type bits of the newc header.
const (
	typeDir     = 0o040000
	typeRegular = 0o100000
	typeSymlink = 0o120000
	typeChar    = 0o020000
)

// Writer writes a newc ("070701") cpio archive. Every entry is owned by
// root; inode numbers are assigned in order; mtimes are all zero, so that
// the same inputs give the same bytes (the archive is cached by a hash of
// its inputs, and reproducible bytes keep that honest).
type Writer struct {
	w     *bufio.Writer
	off   int64
	ino   uint32
	mtime uint32
	seen  map[string]bool
	err   error
}

// NewWriter starts an archive on w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: bufio.NewWriterSize(w, 1<<16), ino: 1, seen: make(map[string]bool)}
}

// Dir adds a directory.
func (cw *Writer) Dir(name string, perm fs.FileMode) error {
	return cw.entry(name, typeDir|unixPerm(perm), 0, 0, nil, nil)
}

// File adds a regular file with the given content.
func (cw *Writer) File(name string, perm fs.FileMode, data []byte) error {
	return cw.entry(name, typeRegular|unixPerm(perm), 0, 0, data, nil)
}

// FileFrom adds a regular file of size bytes read from r.
func (cw *Writer) FileFrom(name string, perm fs.FileMode, size int64, r io.Reader) error {
	return cw.entry(name, typeRegular|unixPerm(perm), 0, 0, nil, &sizedReader{r: r, n: size})
}

// Symlink adds a symbolic link name -> target.
func (cw *Writer) Symlink(name, target string) error {
	return cw.entry(name, typeSymlink|0o777, 0, 0, []byte(target), nil)
}

// CharDev adds a character device node; this is what lets an unprivileged
// host give the guest a /dev/console before devtmpfs is mounted.
func (cw *Writer) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return cw.entry(name, typeChar|unixPerm(perm), major, minor, nil, nil)
}

// Close writes the trailer and flushes. It does not close the underlying
// writer.
func (cw *Writer) Close() error {
	if cw.err != nil {
		return cw.err
	}
	cw.writeHeader("TRAILER!!!", 0, 0, 0, 0, 0)
	cw.pad()
	if cw.err != nil {
		return cw.err
	}
	return cw.w.Flush()
}

type sizedReader struct {
	r io.Reader
	n int64
}

func (cw *Writer) entry(name string, mode, rmajor, rminor uint32, data []byte, sr *sizedReader) error {
	if cw.err != nil {
		return cw.err
	}
	name, err := cleanName(name)
	if err != nil {
		return err
	}
	if cw.seen[name] {
		return fmt.Errorf("cpio: duplicate entry %q", name)
	}
	size := int64(len(data))
	if sr != nil {
		size = sr.n
	}
	if size < 0 || size > 0xffffffff {
		return fmt.Errorf("cpio: %q has size %d, outside what newc can hold", name, size)
	}
	cw.seen[name] = true
	cw.writeHeader(name, mode, uint32(size), rmajor, rminor, cw.ino)
	cw.ino++
	cw.pad()
	if sr != nil {
		n, err := io.CopyN(cw, sr.r, sr.n)
		if err != nil && cw.err == nil {
			cw.err = fmt.Errorf("cpio: %q: copied %d of %d bytes: %w", name, n, sr.n, err)
		}
	} else {
		_, _ = cw.Write(data)
	}
	cw.pad()
	return cw.err
}

func (cw *Writer) writeHeader(name string, mode, size, rmajor, rminor, ino uint32) {
	nlink := uint32(1)
	if mode&0o170000 == typeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, cw.mtime, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	_, _ = io.WriteString(cw, hdr)
	_, _ = io.WriteString(cw, name)
	_, _ = cw.Write([]byte{0})
}

// Write implements io.Writer for the entry bodies, tracking the offset for
// the 4-byte alignment newc requires.
func (cw *Writer) Write(p []byte) (int, error) {
	if cw.err != nil {
		return 0, cw.err
	}
	n, err := cw.w.Write(p)
	cw.off += int64(n)
	if err != nil {
		cw.err = err
	}
	return n, err
}

func (cw *Writer) pad() {
	if rem := cw.off % 4; rem != 0 {
		_, _ = cw.Write(make([]byte, 4-rem))
	}
}

// cleanName turns "/bin/sh" or "bin//sh" into "bin/sh" and refuses names
// that would escape the archive root.
func cleanName(name string) (string, error) {
	c := strings.TrimPrefix(path.Clean("/"+name), "/")
	if c == "" || c == "." {
		return "", fmt.Errorf("cpio: invalid entry name %q", name)
	}
	return c, nil
}

// unixPerm converts Go's permission and special bits to the octal mode bits
// of a cpio header.
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
}
