// Package treecopy moves files and directory trees between the host and a
// guest as a tar stream, the format docker cp uses and every language can
// write. Both ends use it: the host to send a tree in and to unpack what a
// guest sends out, the guest agent to unpack and to send.
//
// The stream names its entries relative to the copied path: "." is the
// path itself (a regular file, a directory or a symbolic link), and a
// directory's contents follow as "./a", "./a/b", .... Only regular files,
// directories and symbolic links travel; modes (permission bits) and
// modification times are kept, owners are not (what is written belongs to
// whoever writes it, as with docker cp).
//
// What is unpacked may come from a hostile guest, so Extract trusts no
// byte of it: names are checked before use, every file is written through
// an os.Root (no symlink, absolute or "..", leads out of it), a stream is
// bounded in bytes and entries, setuid and setgid bits are dropped on
// request, and a file is written to a temporary name and renamed into
// place, so an existing file is replaced whole or not at all.
package treecopy

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Limits bound what Extract accepts.
type Limits struct {
	// MaxBytes bounds the total size of the regular files; 0 means no
	// bound.
	MaxBytes int64
	// MaxEntries bounds the number of entries; 0 means DefaultMaxEntries.
	MaxEntries int
	// StripSetID drops setuid, setgid and sticky bits from what is
	// written (the host does: a guest's file must not become a setuid
	// program of the host's user).
	StripSetID bool
	// KeepOwners gives each entry the owner and group the stream has
	// (a caller that is root: a container's root filesystem copied into
	// a pod's VM); otherwise everything belongs to the caller.
	KeepOwners bool
}

// maxID bounds the owner and group ids KeepOwners sets: (uid_t)-1 means
// "unchanged" to chown.
const maxID = 1<<32 - 2

// DefaultMaxEntries is Extract's entry bound when Limits gives none.
const DefaultMaxEntries = 1 << 20

// MaxNameLen bounds one entry's name (Linux's PATH_MAX).
const MaxNameLen = 4096

// MaxDepth bounds how deep an entry may be below the copy's top: every
// lookup through an os.Root walks the name component by component, so
// depth is what a stream could make Extract pay per entry.
const MaxDepth = 128

// entryCost is what each entry is charged against Limits.MaxBytes beside
// its data: its inode and directory entry, so that a stream of a million
// empty files or long links is bounded too.
const entryCost = 512

// ErrLimit is wrapped by Extract's error when the stream goes over a
// limit.
var ErrLimit = errors.New("over the copy limit")

// ErrConflict is wrapped by Extract's error when an entry would replace a
// directory with a non-directory or the other way round.
var ErrConflict = errors.New("a file and a directory of the same name")

// Stats says what a copy moved.
type Stats struct {
	Files, Dirs, Links int
	Bytes              int64
}

// Entries is the number of entries.
func (s Stats) Entries() int { return s.Files + s.Dirs + s.Links }

// Write sends name (inside root) to w as a tar stream: "." for name
// itself, then, for a directory, its contents. Symbolic links are sent as
// links, never followed; other kinds of files (devices, sockets, fifos)
// are skipped. It ends the stream with tar's end marker.
func Write(w io.Writer, root *os.Root, name string) (Stats, error) {
	return write(w, root, name, false)
}

// WriteWithOwners is Write with each entry's owner and group in its
// header, for an Extract with KeepOwners; Write leaves them 0, so that a
// copy tells the other side nothing of who owns the files.
func WriteWithOwners(w io.Writer, root *os.Root, name string) (Stats, error) {
	return write(w, root, name, true)
}

func write(w io.Writer, root *os.Root, name string, owners bool) (Stats, error) {
	tw := tar.NewWriter(w)
	var st Stats
	if err := writeEntry(tw, root, name, ".", &st, owners); err != nil {
		return st, err
	}
	return st, tw.Close()
}

func writeEntry(tw *tar.Writer, root *os.Root, name, entry string, st *Stats, owners bool) error {
	fi, err := root.Lstat(name)
	if err != nil {
		return err
	}
	hdr := &tar.Header{
		Name:    entry,
		Mode:    int64(unixMode(fi.Mode())),
		ModTime: fi.ModTime(),
		Format:  tar.FormatPAX,
	}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok && owners {
		hdr.Uid, hdr.Gid = int(sys.Uid), int(sys.Gid)
	}
	switch {
	case fi.Mode().IsRegular():
		hdr.Typeflag, hdr.Size = tar.TypeReg, fi.Size()
		f, err := root.OpenFile(name, os.O_RDONLY|noFollow, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		// A file that grows while it is read is cut at the size its
		// header gave; one that shrinks is an error (tar cannot say so).
		n, err := io.Copy(tw, io.LimitReader(f, hdr.Size))
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if n != hdr.Size {
			return fmt.Errorf("%s: shrank from %d to %d bytes while it was copied", name, hdr.Size, n)
		}
		st.Files++
		st.Bytes += n
		return nil
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := root.Readlink(name)
		if err != nil {
			return err
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		st.Links++
		return tw.WriteHeader(hdr)
	case fi.IsDir():
		hdr.Typeflag = tar.TypeDir
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		st.Dirs++
		d, err := root.OpenFile(name, os.O_RDONLY|noFollow, 0)
		if err != nil {
			return err
		}
		names, err := d.Readdirnames(-1)
		d.Close()
		if err != nil {
			return err
		}
		slices.Sort(names)
		for _, n := range names {
			if err := writeEntry(tw, root, path.Join(name, n), entry+"/"+n, st, owners); err != nil {
				return err
			}
		}
		return nil
	}
	return nil // devices, sockets, fifos: not copied
}

// Extract unpacks the tar stream r as name inside root: the entry "." is
// name itself, "./a" is name/a. name's parent must exist. An existing
// file is replaced; an existing directory is merged into (as docker cp
// does), and a file cannot replace a directory nor a directory a file.
// Directory modes and times are set once their contents are written.
//
// On an error, what was written so far stays: a caller that wants all or
// nothing extracts into a directory of its own first (the host does).
func Extract(r io.Reader, root *os.Root, name string, lim Limits) (Stats, error) {
	if lim.MaxEntries <= 0 {
		lim.MaxEntries = DefaultMaxEntries
	}
	tr := tar.NewReader(r)
	var st Stats
	type dirTime struct {
		name  string
		mode  fs.FileMode
		mtime time.Time
	}
	var dirs []dirTime
	topDir := false
	// Every entry's parent must be a directory of this stream (parents
	// come first): nothing is ever written through a symbolic link,
	// not even one the stream itself made, and no entry comes twice.
	seen := map[string]bool{}
	isDir := map[string]bool{}
	var charged int64
	for i := 0; ; i++ {
		hdr, err := tr.Next()
		if err == io.EOF {
			if i == 0 {
				return st, errors.New("empty copy stream")
			}
			break
		}
		if err != nil {
			return st, fmt.Errorf("read copy stream: %w", err)
		}
		if i >= lim.MaxEntries {
			return st, fmt.Errorf("more than %d entries: %w", lim.MaxEntries, ErrLimit)
		}
		rel, err := entryName(hdr.Name)
		if err != nil {
			return st, err
		}
		if i == 0 {
			if rel != "." {
				return st, fmt.Errorf("copy stream starts with %q, not \".\"", hdr.Name)
			}
			topDir = hdr.Typeflag == tar.TypeDir
		} else if rel == "." || !topDir {
			return st, fmt.Errorf("copy stream entry %q after its top entry", hdr.Name)
		}
		if seen[rel] {
			return st, fmt.Errorf("entry %q comes twice", hdr.Name)
		}
		seen[rel] = true
		if rel != "." {
			if strings.Count(rel, "/") >= MaxDepth {
				return st, fmt.Errorf("entry %q is more than %d levels deep: %w", hdr.Name, MaxDepth, ErrLimit)
			}
			if parent := path.Dir(rel); !isDir[parent] {
				return st, fmt.Errorf("entry %q: its parent is not a directory of the stream", hdr.Name)
			}
		}
		if hdr.Typeflag == tar.TypeDir {
			isDir[rel] = true
		}
		charged += entryCost + int64(len(hdr.Linkname))
		if lim.MaxBytes > 0 && charged > lim.MaxBytes-st.Bytes {
			return st, fmt.Errorf("the entries' metadata brings the copy over %d bytes: %w", lim.MaxBytes, ErrLimit)
		}
		target := name
		if rel != "." {
			target = path.Join(name, rel)
		}
		mode := fs.FileMode(hdr.Mode) & fs.ModePerm
		if !lim.StripSetID {
			mode |= goModeBits(hdr.Mode)
		}
		if lim.KeepOwners && (hdr.Uid < 0 || hdr.Gid < 0 || hdr.Uid > maxID || hdr.Gid > maxID) {
			return st, fmt.Errorf("%q: bad owner %d:%d", hdr.Name, hdr.Uid, hdr.Gid)
		}
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
			if hdr.Size < 0 {
				return st, fmt.Errorf("%q: negative size", hdr.Name)
			}
			if lim.MaxBytes > 0 && hdr.Size > lim.MaxBytes-st.Bytes-charged {
				return st, fmt.Errorf("%q: %d bytes would bring the copy over %d bytes: %w", hdr.Name, hdr.Size, lim.MaxBytes, ErrLimit)
			}
			if err := writeFile(root, target, tr, hdr.Size, mode, hdr.ModTime); err != nil {
				return st, err
			}
			if lim.KeepOwners {
				if err := root.Lchown(target, hdr.Uid, hdr.Gid); err != nil {
					return st, err
				}
				// chown cleared the setuid and setgid bits.
				if mode&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
					if err := root.Chmod(target, mode); err != nil {
						return st, err
					}
				}
			}
			st.Files++
			st.Bytes += hdr.Size
		case tar.TypeDir:
			if err := makeDir(root, target); err != nil {
				return st, err
			}
			if lim.KeepOwners {
				if err := root.Lchown(target, hdr.Uid, hdr.Gid); err != nil {
					return st, err
				}
			}
			dirs = append(dirs, dirTime{target, mode, hdr.ModTime})
			st.Dirs++
		case tar.TypeSymlink:
			if hdr.Linkname == "" || len(hdr.Linkname) > MaxNameLen || strings.IndexByte(hdr.Linkname, 0) >= 0 {
				return st, fmt.Errorf("%q: bad link target", hdr.Name)
			}
			if err := replaceWith(root, target, func(tmp string) error { return root.Symlink(hdr.Linkname, tmp) }); err != nil {
				return st, err
			}
			if lim.KeepOwners {
				if err := root.Lchown(target, hdr.Uid, hdr.Gid); err != nil {
					return st, err
				}
			}
			st.Links++
		default:
			return st, fmt.Errorf("%q: entry type %q is not copied (only files, directories and symbolic links)", hdr.Name, hdr.Typeflag)
		}
	}
	// Innermost first: setting a directory's mode could make it
	// unwritable before its contents are in.
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := root.Chmod(d.name, d.mode); err != nil {
			return st, err
		}
		if !d.mtime.IsZero() {
			if err := root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
				return st, err
			}
		}
	}
	return st, nil
}

// entryName checks a stream entry's name and returns it cleaned, relative
// to the copy's top ("." for the top itself).
func entryName(n string) (string, error) {
	if n == "" || len(n) > MaxNameLen || strings.IndexByte(n, 0) >= 0 {
		return "", fmt.Errorf("bad entry name %q", n)
	}
	if strings.HasPrefix(n, "/") {
		return "", fmt.Errorf("entry name %q is absolute", n)
	}
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", fmt.Errorf("entry name %q has \"..\"", n)
		}
	}
	return path.Clean(n), nil
}

// writeFile writes size bytes of r as target, through a temporary name in
// the same directory, then renamed over what was there.
func writeFile(root *os.Root, target string, r io.Reader, size int64, mode fs.FileMode, mtime time.Time) error {
	if fi, err := root.Lstat(target); err == nil && fi.IsDir() {
		return fmt.Errorf("%q: cannot replace a directory with a file: %w", target, ErrConflict)
	}
	tmp := tempName(target)
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, 0o600)
	if err != nil {
		return err
	}
	n, err := io.Copy(f, io.LimitReader(r, size))
	if err == nil && n != size {
		err = io.ErrUnexpectedEOF
	}
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && !mtime.IsZero() {
		err = root.Chtimes(tmp, mtime, mtime)
	}
	if err == nil {
		err = root.Rename(tmp, target)
	}
	if err != nil {
		_ = root.Remove(tmp)
		return fmt.Errorf("write %q: %w", target, err)
	}
	return nil
}

// replaceWith makes a new non-directory at target: make creates it at a
// temporary name, which is then renamed over target.
func replaceWith(root *os.Root, target string, make func(tmp string) error) error {
	if fi, err := root.Lstat(target); err == nil && fi.IsDir() {
		return fmt.Errorf("%q: cannot replace a directory: %w", target, ErrConflict)
	}
	tmp := tempName(target)
	if err := make(tmp); err != nil {
		return err
	}
	if err := root.Rename(tmp, target); err != nil {
		_ = root.Remove(tmp)
		return err
	}
	return nil
}

// makeDir makes target a directory unless it is one (not a link to one:
// a symbolic link in the way is an error, never followed).
func makeDir(root *os.Root, target string) error {
	fi, err := root.Lstat(target)
	switch {
	case err == nil && fi.IsDir():
		return nil
	case err == nil:
		return fmt.Errorf("%q: cannot replace a non-directory with a directory: %w", target, ErrConflict)
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	// Owner-writable until Extract sets its mode at the end.
	return root.Mkdir(target, 0o700)
}

var tempSeq atomic.Uint64

// tempName is a name beside target for writing it.
func tempName(target string) string {
	return path.Join(path.Dir(target), fmt.Sprintf(".mvm-cp-%d-%d.tmp", os.Getpid(), tempSeq.Add(1)))
}

// noFollow keeps an open from following a symbolic link that replaced a
// file after it was looked at.
const noFollow = syscall.O_NOFOLLOW

// unixMode is fi's mode as tar's (and stat's) permission bits.
func unixMode(m fs.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		u |= 0o1000
	}
	return u
}

// goModeBits is the setuid, setgid and sticky bits of a tar mode.
func goModeBits(m int64) fs.FileMode {
	var f fs.FileMode
	if m&0o4000 != 0 {
		f |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		f |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		f |= fs.ModeSticky
	}
	return f
}
