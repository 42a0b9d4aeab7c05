package writeback

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/diskusage"
)

// Pending describes a write-back that has not happened yet: its images and
// where they go. It is saved beside the images (PendingFile) so that data
// outlives a crash of mvmctl and can be applied later with `mvmctl
// recover`.
type Pending struct {
	Host    string    `json:"host"`
	Guest   string    `json:"guest"`
	Lower   string    `json:"lower"`
	Upper   string    `json:"upper"`
	Created time.Time `json:"created"`
	// HostDev and HostIno identify the host directory when the run
	// started; Commit refuses to write into another one found at Host
	// (ErrHostDirReplaced). Zero: not recorded.
	HostDev uint64 `json:"host_dev,omitempty"`
	HostIno uint64 `json:"host_ino,omitempty"`
}

// PendingFile is the name of the record in a write-back's directory.
const PendingFile = "writeback.json"

// SavePending writes p into dir, durably. When p does not identify its
// host directory yet (HostIno zero), the directory now at p.Host is
// recorded.
func SavePending(dir string, p Pending) error {
	if p.HostIno == 0 {
		var st unix.Stat_t
		if err := unix.Stat(p.Host, &st); err == nil {
			p.HostDev, p.HostIno = uint64(st.Dev), st.Ino
		}
	}
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return writeFileSync(filepath.Join(dir, PendingFile), append(b, '\n'))
}

func writeFileSync(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// LoadPending reads the record of dir; image paths in it are resolved
// relative to dir, so a staged directory can be moved.
func LoadPending(dir string) (Pending, error) {
	b, err := os.ReadFile(filepath.Join(dir, PendingFile))
	if err != nil {
		return Pending{}, err
	}
	var p Pending
	if err := json.Unmarshal(b, &p); err != nil {
		return Pending{}, fmt.Errorf("%s: %w", filepath.Join(dir, PendingFile), err)
	}
	p.Lower = filepath.Join(dir, filepath.Base(p.Lower))
	p.Upper = filepath.Join(dir, filepath.Base(p.Upper))
	return p, nil
}

// partialPrefix names a copy Stage has not finished; PruneStaged removes
// old ones (the source of such a copy is still in place).
const partialPrefix = ".partial-"

// Stage moves the write-back directory src (images and record) to dst, a
// place that outlives the run, and returns dst. Within one filesystem
// that is a rename. Across filesystems (the run directory on a tmpfs, the
// state directory on disk) it copies: sparse files stay sparse, every
// file and directory is fsynced, and the copy is read back and compared
// (sizes and a checksum of the content) before src is removed. Whatever
// fails, src is left in place and a partial copy is not: src is never
// removed while it holds the only copy.
func Stage(src, dst string) (string, error) {
	parent := filepath.Dir(dst)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return "", fmt.Errorf("keep %s: %w", src, err)
	}
	err := os.Rename(src, dst)
	if err == nil {
		if err := syncPath(parent); err != nil {
			return dst, fmt.Errorf("keep %s: sync %s: %w", src, parent, err)
		}
		return dst, nil
	}
	if !errors.Is(err, unix.EXDEV) {
		return "", fmt.Errorf("keep %s: %w", src, err)
	}
	if err := stageCopy(src, dst); err != nil {
		return "", fmt.Errorf("keep %s (copying it to %s): %w", src, dst, err)
	}
	// The copy is complete and durable: a failure to remove src only
	// leaves the run directory's cleanup to do.
	_ = os.RemoveAll(src)
	return dst, nil
}

func stageCopy(src, dst string) error {
	if entries, err := os.ReadDir(dst); err == nil && len(entries) > 0 {
		return fmt.Errorf("%s exists and is not empty", dst)
	} else if err == nil {
		if err := os.Remove(dst); err != nil {
			return err
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	parent := filepath.Dir(dst)
	tmp, err := os.MkdirTemp(parent, partialPrefix+filepath.Base(dst)+"-")
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	if err := copyDir(src, tmp); err != nil {
		return err
	}
	if err := verifyDir(src, tmp); err != nil {
		return fmt.Errorf("the copy differs from the original: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return err
	}
	ok = true
	return syncPath(parent)
}

// copyDir copies the tree src into the existing directory dst: regular
// files and directories only (a write-back directory holds nothing else).
func copyDir(src, dst string) error {
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		s, d := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		switch {
		case e.IsDir():
			if err := os.Mkdir(d, 0o700); err != nil {
				return err
			}
			if err := copyDir(s, d); err != nil {
				return err
			}
		case e.Type().IsRegular():
			if err := copyFile(s, d); err != nil {
				return fmt.Errorf("copy %s: %w", s, err)
			}
		default:
			return fmt.Errorf("%s: not a regular file or directory", s)
		}
	}
	return syncPath(dst)
}

// copyFile copies one file sparsely: only the data regions (SEEK_DATA /
// SEEK_HOLE) are read, and blocks of zeros in them are not written.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return err
	}
	defer out.Close()
	err = eachDataBlock(in, fi.Size(), func(off int64, b []byte) error {
		_, err := out.WriteAt(b, off)
		return err
	})
	if err != nil {
		return err
	}
	if err := out.Truncate(fi.Size()); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	_ = os.Chtimes(dst, fi.ModTime(), fi.ModTime())
	return out.Close()
}

const sparseBlock = 4096

// eachDataBlock calls fn with the content of f (size bytes) that is not
// zeros: runs of whole 4 KiB blocks (the tail block may be short) at their
// offsets, in order. Holes are skipped without being read.
func eachDataBlock(f *os.File, size int64, fn func(off int64, b []byte) error) error {
	fd := int(f.Fd())
	buf := make([]byte, 1<<20)
	zero := make([]byte, sparseBlock)
	for pos := int64(0); pos < size; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return nil // only a hole after pos
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		// Align to whole blocks so that the same content always gives
		// the same blocks, whatever the filesystem's own allocation.
		data &^= sparseBlock - 1
		hole = min(size, (hole+sparseBlock-1)&^(sparseBlock-1))
		for off := data; off < hole; {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-off)], off)
			if n == 0 && err != nil {
				if err == io.EOF {
					return nil
				}
				return err
			}
			c := buf[:n]
			for start := 0; start < len(c); {
				// Skip zero blocks, then pass on the run of non-zero
				// ones that follows.
				for start < len(c) && bytes.Equal(c[start:min(start+sparseBlock, len(c))], zero[:min(sparseBlock, len(c)-start)]) {
					start += sparseBlock
				}
				end := start
				for end < len(c) && !bytes.Equal(c[end:min(end+sparseBlock, len(c))], zero[:min(sparseBlock, len(c)-end)]) {
					end += sparseBlock
				}
				end = min(end, len(c))
				if end > start {
					if err := fn(off+int64(start), c[start:end]); err != nil {
						return err
					}
				}
				start = end
			}
			off += int64(n)
		}
		pos = hole
	}
	return nil
}

// digest is a checksum of a file's content that does not depend on how it
// is stored: its size, and each non-zero 4 KiB block with its offset.
func digest(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	var hdr [8]byte
	err = eachDataBlock(f, fi.Size(), func(off int64, b []byte) error {
		for i := 0; i < len(b); i += sparseBlock {
			blk := b[i:min(i+sparseBlock, len(b))]
			binary.LittleEndian.PutUint64(hdr[:], uint64(off+int64(i)))
			h.Write(hdr[:])
			h.Write(blk)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	binary.LittleEndian.PutUint64(hdr[:], uint64(fi.Size()))
	h.Write(hdr[:])
	return h.Sum(nil), nil
}

// verifyDir compares the trees src and dst: the same names, and files of
// the same size and digest.
func verifyDir(src, dst string) error {
	se, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	de, err := os.ReadDir(dst)
	if err != nil {
		return err
	}
	if len(se) != len(de) {
		return fmt.Errorf("%s: %d entries, the copy has %d", src, len(se), len(de))
	}
	for i, e := range se {
		s, d := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		if de[i].Name() != e.Name() {
			return fmt.Errorf("%s: missing from the copy", s)
		}
		if e.IsDir() {
			if err := verifyDir(s, d); err != nil {
				return err
			}
			continue
		}
		sd, err := digest(s)
		if err != nil {
			return err
		}
		dd, err := digest(d)
		if err != nil {
			return err
		}
		if !bytes.Equal(sd, dd) {
			return fmt.Errorf("%s: content differs", s)
		}
	}
	return nil
}

// syncPath fsyncs a file or directory.
func syncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// Caps on staged/ that mvmctl applies by default: the oldest change sets
// go first once there are more than DefaultMaxStaged, or once they take
// more than DefaultMaxStagedBytes on disk.
const (
	DefaultMaxStaged      = 20
	DefaultMaxStagedBytes = 10 << 30
)

// Staged is one change set kept in a staged directory.
type Staged struct {
	Dir     string
	Pending Pending
	// Size is what it takes on disk (allocated blocks: sparse images
	// count for what they hold).
	Size int64
	// Err is set when its record cannot be read; Pending is then zero.
	Err error
	// mtime orders entries without a readable record.
	mtime time.Time
}

// Created is when the change set's run started (its directory's time when
// the record is unreadable).
func (s Staged) Created() time.Time {
	if s.Err == nil {
		return s.Pending.Created
	}
	return s.mtime
}

// ListStaged lists the change sets in dir (each a directory with a
// PendingFile, or one whose record is damaged), oldest first. A missing
// dir holds none.
func ListStaged(dir string) ([]Staged, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Staged
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		d := filepath.Join(dir, e.Name())
		s := Staged{Dir: d}
		s.Pending, s.Err = LoadPending(d)
		if fi, err := os.Lstat(d); err == nil {
			s.mtime = fi.ModTime()
		}
		s.Size = diskusage.Of(d)
		out = append(out, s)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if ci, cj := out[i].Created(), out[j].Created(); !ci.Equal(cj) {
			return ci.Before(cj)
		}
		return out[i].Dir < out[j].Dir
	})
	return out, nil
}

// PruneStaged drops the oldest change sets in dir until at most
// maxEntries remain and they take at most maxBytes (a cap of zero or less
// is no cap), and returns the directories it removed, for the caller to
// report. The newest change set is never dropped, so one just staged
// survives even when it alone is over the cap. Copies Stage left
// unfinished more than an hour ago are removed too (their source was
// kept).
func PruneStaged(dir string, maxEntries int, maxBytes int64) (dropped []string, err error) {
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if !strings.HasPrefix(e.Name(), partialPrefix) {
				continue
			}
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				_ = os.RemoveAll(filepath.Join(dir, e.Name()))
			}
		}
	}
	list, err := ListStaged(dir)
	if err != nil {
		return nil, err
	}
	var total int64
	for _, s := range list {
		total += s.Size
	}
	count := len(list)
	var errs []error
	for i := 0; i < len(list)-1; i++ {
		if (maxEntries <= 0 || count <= maxEntries) && (maxBytes <= 0 || total <= maxBytes) {
			break
		}
		if err := os.RemoveAll(list[i].Dir); err != nil {
			errs = append(errs, err)
			continue
		}
		dropped = append(dropped, list[i].Dir)
		count--
		total -= list[i].Size
	}
	return dropped, errors.Join(errs...)
}

// Discard removes the staged change set dir. It refuses a directory that
// is not one (no PendingFile in it), so that a mistyped path does not
// remove something else.
func Discard(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a staged change set (not a directory)", dir)
	}
	if _, err := os.Lstat(filepath.Join(dir, PendingFile)); err != nil {
		return fmt.Errorf("%s is not a staged change set (no %s): %w", dir, PendingFile, err)
	}
	return os.RemoveAll(dir)
}
