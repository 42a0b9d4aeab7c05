// Package writeback applies what a guest changed in a read-write shared
// directory to the host directory. The guest's view is an overlay: the
// host directory's content as a read-only lower image, and an upper layer
// on a scratch image that receives every change (new and modified files
// whole, deletions as whiteouts, replaced directories marked opaque). So
// the upper layer is exactly the change set: writing it back touches only
// what the guest changed, and host files the guest never touched keep
// whatever the host has, including edits made while the VM ran.
//
// The guest may be hostile and the scratch image is its to write, raw
// bytes included. So a write-back:
//
//   - checks the image with a full e2fsck (see checkImage), then reads it
//     with internal/ext4, which bounds-checks everything;
//   - validates the whole change set before touching the host (names that
//     are not single file names, duplicates, directories reached twice,
//     too many entries or levels): an invalid one is not applied at all
//     and yields *InvalidChangeSetError;
//   - refuses, with *NoSpaceError, one that would not fit on the host;
//   - works only through directory descriptors of the share, never
//     following a symlink at any depth (see hostfs.go), so nothing outside
//     the share is written, deleted or linked to;
//   - grants no privilege: device nodes and sockets are not written back,
//     set-user-ID and set-group-ID bits are dropped, no extended attribute
//     (file capabilities, ACLs) is written, and what it creates belongs to
//     the user running it, or, when that is root, to the owner of the
//     shared directory;
//   - keeps holes: only the data the image stores is written;
//   - stops promptly when its context is cancelled, leaving no temporary
//     file behind; the error then wraps the context's error.
//
// A failed write-back leaves its change set where it was (Stage moves it
// somewhere durable), and Commit may be run on it again: it is
// idempotent, re-applying the same set of changes.
package writeback

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
)

// UpperDir is the directory of the scratch image that holds the overlay's
// upper layer (the guest agent creates it, with "work" beside it).
const UpperDir = "upper"

// ErrHostDirReplaced means the shared directory is no longer the
// directory the run started with (its path now leads elsewhere, a symlink
// or another directory in its place): the write-back is refused.
var ErrHostDirReplaced = errors.New("the shared directory was replaced since the run started")

// Stats counts what a write-back did.
type Stats struct {
	// Written counts files, symlinks and fifos written; Bytes the file
	// data written (holes excluded).
	Written, Deleted, Dirs, Links int
	Bytes                         int64
	// Devices and Sockets count the device nodes and sockets of the
	// change set, which are never written back (the host path is left as
	// it is). SetIDDropped counts the entries whose set-user-ID or
	// set-group-ID bits were dropped.
	Devices, Sockets, SetIDDropped int
}

// String summarises stats for logs.
func (s Stats) String() string {
	out := strconv.Itoa(s.Written) + " written (" + strconv.FormatInt(s.Bytes, 10) + " bytes), " +
		strconv.Itoa(s.Deleted) + " deleted, " + strconv.Itoa(s.Dirs) + " directories, " +
		strconv.Itoa(s.Links) + " hard links"
	var dropped []string
	if s.Devices > 0 {
		dropped = append(dropped, strconv.Itoa(s.Devices)+" device nodes")
	}
	if s.Sockets > 0 {
		dropped = append(dropped, strconv.Itoa(s.Sockets)+" sockets")
	}
	if len(dropped) > 0 {
		out += "; not written back: " + strings.Join(dropped, ", ")
	}
	if s.SetIDDropped > 0 {
		out += "; set-id bits dropped on " + strconv.Itoa(s.SetIDDropped)
	}
	return out
}

// Apply writes the changes recorded in the upper layer of upper (an
// opened scratch image) into hostDir. lower is the image of hostDir the
// guest started from, used to tell changed directory attributes from
// unchanged ones. It validates the whole change set first and checks that
// it fits; see the package documentation for what it guarantees.
func Apply(ctx context.Context, upper, lower *ext4.FS, hostDir string) (Stats, error) {
	root, err := openShare(hostDir, 0, 0)
	if err != nil {
		return Stats{}, err
	}
	defer unix.Close(root)
	return apply(ctx, upper, lower, root)
}

func apply(ctx context.Context, upper, lower *ext4.FS, root int) (Stats, error) {
	cs, err := plan(ctx, upper, lower)
	if err != nil {
		return Stats{}, err
	}
	if err := checkSpace(root, cs); err != nil {
		return Stats{}, err
	}
	a := &applier{ctx: ctx, upper: upper, cs: cs, root: root, written: map[int32]devIno{}}
	if unix.Geteuid() == 0 {
		var st unix.Stat_t
		if err := unix.Fstat(root, &st); err != nil {
			return Stats{}, err
		}
		a.chown, a.uid, a.gid = true, int(st.Uid), int(st.Gid)
	}
	err = a.apply()
	return a.stats, err
}

// openShare opens the shared directory. The path is the user's (it may
// go through symlinks of theirs); when dev and ino are set, it must still
// lead to that directory.
func openShare(hostDir string, dev, ino uint64) (int, error) {
	fd, err := unix.Open(hostDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", hostDir, err)
	}
	if ino != 0 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return -1, err
		}
		if uint64(st.Dev) != dev || st.Ino != ino {
			unix.Close(fd)
			return -1, fmt.Errorf("%s: %w", hostDir, ErrHostDirReplaced)
		}
	}
	return fd, nil
}

// Commit checks the scratch image of p (replaying its journal if the
// guest did not unmount it), validates its change set and applies it to
// p.Host, then flushes the host filesystem. On error nothing of an
// invalid or oversized change set was applied (*InvalidChangeSetError,
// *NoSpaceError); an error wrapping context.Canceled means ctx ended it
// part way. Either way the images are left as they are, for Stage.
func Commit(ctx context.Context, p Pending) (Stats, error) {
	if err := ctx.Err(); err != nil {
		return Stats{}, fmt.Errorf("write-back not started: %w", err)
	}
	root, err := openShare(p.Host, p.HostDev, p.HostIno)
	if err != nil {
		return Stats{}, err
	}
	defer unix.Close(root)
	if err := checkImage(ctx, p.Upper); err != nil {
		return Stats{}, err
	}
	upper, closeUpper, err := ext4.OpenFile(p.Upper)
	if err != nil {
		if errors.Is(err, ext4.ErrCorrupt) || errors.Is(err, ext4.ErrUnsupported) || errors.Is(err, ext4.ErrNeedsRecovery) {
			return Stats{}, &InvalidChangeSetError{Reason: "unreadable scratch image", Err: err}
		}
		return Stats{}, fmt.Errorf("scratch image: %w", err)
	}
	defer closeUpper()
	lower, closeLower, err := ext4.OpenFile(p.Lower)
	if err != nil {
		return Stats{}, fmt.Errorf("directory image: %w", err)
	}
	defer closeLower()
	st, err := apply(ctx, upper, lower, root)
	if err != nil {
		return st, err
	}
	// The images go away after this; make sure what replaced them is on
	// disk first.
	if err := unix.Syncfs(root); err != nil {
		return st, fmt.Errorf("sync %s: %w", p.Host, err)
	}
	return st, nil
}

func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
