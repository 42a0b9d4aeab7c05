// Package writeback applies what a guest changed in a read-write shared
// directory to the host directory. The guest's view is an overlay: the
// host directory's content as a read-only lower image, and an upper layer
// on a scratch image that receives every change (new and modified files
// whole, deletions as whiteouts, replaced directories marked opaque). So
// the upper layer is exactly the change set: writing it back touches only
// what the guest changed, and host files the guest never touched keep
// whatever the host has, including edits made while the VM ran.
//
// Both images are read with internal/ext4 after the VM has stopped: no
// root, no mount.
package writeback

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/ext4"
)

// UpperDir is the directory of the scratch image that holds the overlay's
// upper layer (the guest agent creates it, with "work" beside it).
const UpperDir = "upper"

// Stats counts what a write-back did.
type Stats struct {
	Written, Deleted, Dirs, Links, Skipped int
	Bytes                                  int64
}

// Apply writes the changes recorded in the upper layer of upper (an
// opened scratch image) into hostDir. lower is the image of hostDir the
// guest started from, used to tell changed directory attributes from
// unchanged ones. Ownership is applied only when running as root.
func Apply(upper, lower *ext4.FS, hostDir string) (Stats, error) {
	root, err := upper.Lookup(UpperDir)
	if err != nil {
		return Stats{}, fmt.Errorf("upper layer: %w", err)
	}
	lowerRoot, err := lower.Inode(ext4.RootIno)
	if err != nil {
		return Stats{}, fmt.Errorf("lower image: %w", err)
	}
	a := &applier{upper: upper, lower: lower, root: os.Geteuid() == 0, links: map[uint32]string{}}
	if err := a.dir(root, lowerRoot, hostDir); err != nil {
		return a.stats, err
	}
	if err := a.dirAttrs(root, lowerRoot, hostDir); err != nil {
		return a.stats, err
	}
	return a.stats, nil
}

type applier struct {
	upper, lower *ext4.FS
	root         bool
	links        map[uint32]string // inode -> host path already written
	stats        Stats
}

// dir applies the entries of upper directory u onto host directory h. l is
// the matching lower directory, nil when there is none (a new or opaque
// directory).
func (a *applier) dir(u, l *ext4.Inode, h string) error {
	ents, err := a.upper.ReadDir(u)
	if err != nil {
		return err
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	var lowerEnts map[string]uint32
	if l != nil {
		le, err := a.lower.ReadDir(l)
		if err != nil {
			return err
		}
		lowerEnts = make(map[string]uint32, len(le))
		for _, e := range le {
			lowerEnts[e.Name] = e.Ino
		}
	}
	for _, e := range ents {
		in, err := a.upper.Inode(e.Ino)
		if err != nil {
			return err
		}
		hp := filepath.Join(h, e.Name)
		var lin *ext4.Inode
		if ino, ok := lowerEnts[e.Name]; ok {
			if lin, err = a.lower.Inode(ino); err != nil {
				return err
			}
		}
		if err := a.entry(in, lin, hp); err != nil {
			return fmt.Errorf("write back %s: %w", hp, err)
		}
	}
	return nil
}

func (a *applier) entry(in, lin *ext4.Inode, hp string) error {
	switch {
	case in.IsWhiteout():
		a.stats.Deleted++
		return os.RemoveAll(hp)
	case in.Mode.IsDir():
		opaque, _, err := a.upper.Xattr(in, "trusted.overlay.opaque")
		if err != nil {
			return err
		}
		if fi, err := os.Lstat(hp); err == nil && !fi.IsDir() {
			if err := os.Remove(hp); err != nil {
				return err
			}
		}
		created := true
		if err := os.Mkdir(hp, 0o700); errors.Is(err, fs.ErrExist) {
			created = false
		} else if err != nil {
			return err
		}
		if string(opaque) == "y" || lin == nil || !lin.Mode.IsDir() {
			// A directory the guest created or replaced: whatever the
			// host has there beyond the guest's entries goes.
			lin = nil
			if err := a.pruneExtra(in, hp); err != nil {
				return err
			}
		}
		a.stats.Dirs++
		if err := a.dir(in, lin, hp); err != nil {
			return err
		}
		if created {
			// The host had no directory here (the host deleted it during
			// the run): it gets all of the guest's attributes.
			lin = nil
		}
		return a.dirAttrs(in, lin, hp)
	}
	if prev, ok := a.links[in.Ino]; ok && in.Nlink > 1 {
		if err := removeNonDir(hp); err != nil {
			return err
		}
		a.stats.Links++
		return os.Link(prev, hp)
	}
	var err error
	switch {
	case in.Mode.IsRegular():
		err = a.file(in, hp)
	case in.Mode&fs.ModeSymlink != 0:
		err = a.symlink(in, hp)
	case in.Mode&fs.ModeNamedPipe != 0:
		if err = removeNonDir(hp); err == nil {
			err = unix.Mkfifo(hp, uint32(in.Mode.Perm()))
		}
	case in.Mode&fs.ModeDevice != 0:
		if err = removeNonDir(hp); err == nil {
			typ := uint32(unix.S_IFBLK)
			if in.Mode&fs.ModeCharDevice != 0 {
				typ = unix.S_IFCHR
			}
			err = unix.Mknod(hp, typ|uint32(in.Mode.Perm()), int(unix.Mkdev(in.Major, in.Minor)))
			if errors.Is(err, unix.EPERM) {
				a.stats.Skipped++ // device nodes need root on the host
				return nil
			}
		}
	default:
		a.stats.Skipped++ // sockets
		return nil
	}
	if err != nil {
		return err
	}
	if in.Nlink > 1 {
		a.links[in.Ino] = hp
	}
	return a.attrs(in, hp, in.Mode&fs.ModeSymlink != 0)
}

// file writes a regular file atomically: to a temporary name beside it,
// then renamed over whatever was there.
func (a *applier) file(in *ext4.Inode, hp string) error {
	if fi, err := os.Lstat(hp); err == nil && fi.IsDir() {
		if err := os.RemoveAll(hp); err != nil {
			return err
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(hp), ".mvm-writeback-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := a.upper.CopyFile(in, tmp); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(in.Mode.Perm() | in.Mode&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), hp); err != nil {
		return err
	}
	a.stats.Written++
	a.stats.Bytes += in.Size
	return nil
}

func (a *applier) symlink(in *ext4.Inode, hp string) error {
	target, err := a.upper.Readlink(in)
	if err != nil {
		return err
	}
	if err := removeNonDir(hp); err != nil {
		return err
	}
	a.stats.Written++
	return os.Symlink(target, hp)
}

// attrs sets owner (as root only) and times; mode was set on creation
// (symlinks have none).
func (a *applier) attrs(in *ext4.Inode, hp string, symlink bool) error {
	if a.root {
		if err := os.Lchown(hp, int(in.UID), int(in.GID)); err != nil {
			return err
		}
	}
	if !symlink {
		// chown may clear set-id bits, and the umask trims what mkfifo
		// and mknod create: set the mode last.
		if err := os.Chmod(hp, in.Mode.Perm()|in.Mode&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)); err != nil {
			return err
		}
	}
	return setTimes(hp, in)
}

// dirAttrs applies a directory's mode, owner and mtime when they differ
// from the lower directory's (or always, for a directory the guest made),
// after its entries, whose writing changed the host's mtime.
func (a *applier) dirAttrs(in, lin *ext4.Inode, hp string) error {
	if lin != nil && lin.Mode == in.Mode && lin.UID == in.UID && lin.GID == in.GID && lin.Mtime.Equal(in.Mtime) {
		return nil
	}
	if a.root && (lin == nil || lin.UID != in.UID || lin.GID != in.GID) {
		if err := os.Lchown(hp, int(in.UID), int(in.GID)); err != nil {
			return err
		}
	}
	if lin == nil || lin.Mode != in.Mode {
		if err := os.Chmod(hp, in.Mode.Perm()|in.Mode&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)); err != nil {
			return err
		}
	}
	return setTimes(hp, in)
}

// pruneExtra removes host entries of hp that the upper directory u does
// not have.
func (a *applier) pruneExtra(u *ext4.Inode, hp string) error {
	ents, err := a.upper.ReadDir(u)
	if err != nil {
		return err
	}
	keep := make(map[string]bool, len(ents))
	for _, e := range ents {
		keep[e.Name] = true
	}
	host, err := os.ReadDir(hp)
	if err != nil {
		return err
	}
	for _, e := range host {
		if !keep[e.Name()] {
			if err := os.RemoveAll(filepath.Join(hp, e.Name())); err != nil {
				return err
			}
			a.stats.Deleted++
		}
	}
	return nil
}

func removeNonDir(p string) error {
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return os.RemoveAll(p)
	}
	return os.Remove(p)
}

func setTimes(p string, in *ext4.Inode) error {
	ts := []unix.Timespec{unix.NsecToTimespec(in.Atime.UnixNano()), unix.NsecToTimespec(in.Mtime.UnixNano())}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times of %s: %w", p, err)
	}
	return nil
}

// String summarises stats for logs.
func (s Stats) String() string {
	return strconv.Itoa(s.Written) + " written (" + strconv.FormatInt(s.Bytes, 10) + " bytes), " +
		strconv.Itoa(s.Deleted) + " deleted, " + strconv.Itoa(s.Dirs) + " directories, " +
		strconv.Itoa(s.Links) + " hard links, " + strconv.Itoa(s.Skipped) + " skipped"
}

// Commit makes the scratch image consistent (replaying its journal if the
// guest did not unmount it) and applies its changes to hostDir.
func Commit(ctx context.Context, lowerImg, upperImg, hostDir string) (Stats, error) {
	if err := dirimage.Repair(ctx, upperImg); err != nil {
		return Stats{}, err
	}
	uf, err := os.Open(upperImg)
	if err != nil {
		return Stats{}, err
	}
	defer uf.Close()
	lf, err := os.Open(lowerImg)
	if err != nil {
		return Stats{}, err
	}
	defer lf.Close()
	upper, err := ext4.Open(uf)
	if err != nil {
		return Stats{}, fmt.Errorf("scratch image: %w", err)
	}
	lower, err := ext4.Open(lf)
	if err != nil {
		return Stats{}, fmt.Errorf("directory image: %w", err)
	}
	st, err := Apply(upper, lower, hostDir)
	if err != nil {
		return st, err
	}
	// The images go away after this; make sure what replaced them is on
	// disk first.
	if err := syncDir(hostDir); err != nil {
		return st, fmt.Errorf("sync %s: %w", hostDir, err)
	}
	return st, nil
}

// syncDir flushes the filesystem holding dir.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

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
}

// PendingFile is the name of the record in a write-back's directory.
const PendingFile = "writeback.json"

// SavePending writes p into dir.
func SavePending(dir string, p Pending) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, PendingFile), append(b, '\n'), 0o600)
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

// Stage moves the write-back directory src (images and record) to dst, a
// place that outlives the run, and returns dst.
func Stage(src, dst string) (string, error) {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return "", err
	}
	if err := os.Rename(src, dst); err != nil {
		return "", fmt.Errorf("keep %s: %w", src, err)
	}
	return dst, nil
}
