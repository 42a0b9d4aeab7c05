// Package dirimage turns host directories into ext4 disk images for the
// guest, without root and without mounting anything. A directory shared
// read-only becomes one such image, written by this package (see
// ext4.go), attached read-only; a read-write one gets, in addition, an
// empty sparse scratch image (`mkfs.ext4`) that holds the guest's overlay
// upper layer.
package dirimage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/mvm-sh/mvm/internal/hostdeps"
)

// Deps are the host programs this package runs.
func Deps() []hostdeps.Dep {
	return []hostdeps.Dep{
		hostdeps.Program("mkfs.ext4", "e2fsprogs"),
		hostdeps.Program("e2fsck", "e2fsprogs"),
	}
}

// ScratchSpace is how much the guest may write to a read-write directory
// beyond rewriting everything in it. The image is sparse: the space costs
// nothing on the host until the guest uses it.
const ScratchSpace = 1 << 30

// Stats describes a directory tree.
type Stats struct {
	Files, Dirs, Others int
	// Bytes is the content size rounded up to 4 KiB blocks.
	Bytes int64
	// Digest is the tree's digest ("sha256:" and 64 hex digits), when
	// Options.Digest asked for it.
	Digest string
}

// Options control how an image is written.
type Options struct {
	// Label is the filesystem label (at most 16 bytes).
	Label string
	// Digest computes the tree's digest while the image is written: a
	// SHA-256 over every file's metadata (type, mode, owner, modification
	// time, device numbers, size, extended attributes, symlink target),
	// every directory's entries and every file's content, in inode
	// order. It identifies what the guest sees of the tree (access and
	// change times aside), whether the tree came from a host directory
	// or a Builder, and costs a hash of the content.
	Digest bool
	// RootTime, when set, is the root directory's time (access,
	// modification, change) instead of the directory's own. A container
	// runtime's mount of an image has a root that was made with the mount
	// (an overlay's upper directory): its time is when, not what, and
	// would give every container of one image a tree of its own.
	RootTime *time.Time
}

// sizeFor picks an image size for a tree: its blocks, inode tables and
// ext4's own metadata, with room to spare. The image file is sparse, so a
// generous size costs nothing.
func sizeFor(s Stats) int64 {
	inodes := s.Files + s.Dirs + s.Others + 64
	size := s.Bytes + s.Bytes/8 + int64(inodes)*256 + 16<<20
	return (size + 1<<20 - 1) &^ (1<<20 - 1)
}

// Build writes an ext4 image of dir's content (the root directory's owner,
// mode and times included) to img, with the filesystem label label.
// Everything the guest can see of the tree is kept: names (any bytes),
// modes, owners, timestamps to the nanosecond, symlinks, hard links
// within the tree, fifos, sockets and device nodes, and holes in sparse
// files. Extended attributes are not copied. It has no journal: the guest
// mounts it read-only. A cancelled ctx stops it within milliseconds.
func Build(ctx context.Context, dir, img, label string) (Stats, error) {
	return BuildDir(ctx, dir, img, Options{Label: label})
}

// BuildDir is Build with options.
func BuildDir(ctx context.Context, dir, img string, o Options) (Stats, error) {
	t, err := scan(ctx, dir)
	if err != nil {
		return Stats{}, fmt.Errorf("build image of %s: %w", dir, err)
	}
	if o.RootTime != nil {
		ts := timespec(*o.RootTime)
		t.nodes[0].atime, t.nodes[0].mtime, t.nodes[0].ctime = ts, ts, ts
	}
	if err := t.write(ctx, img, o); err != nil {
		return Stats{}, fmt.Errorf("build image of %s: %w", dir, err)
	}
	return t.stats, nil
}

// write writes the image of a tree; a failed write leaves no file. The
// layout is planned from the sizes the scan saw; a tree that needs more
// (it grew meanwhile, or its filesystem compresses, so that allocation
// undercounts) gets a larger layout.
func (t *tree) write(ctx context.Context, img string, o Options) error {
	var extra uint64
	for attempt := 0; ; attempt++ {
		digest, err := writeImage(ctx, t, img, o, extra)
		if err == nil {
			t.stats.Digest = digest
			return nil
		}
		if !errors.Is(err, errImageFull) || attempt == 2 {
			os.Remove(img)
			return err
		}
		extra = extra*2 + uint64(t.stats.Bytes/blockSize) + 1024
	}
}

// Scratch writes an empty ext4 image of the given size to img, for an
// overlay upper layer. It keeps its journal, so that a guest that dies
// mid-write leaves a filesystem e2fsck can bring back to a consistent
// state.
func Scratch(ctx context.Context, img string, size int64, label string) error {
	if err := mkfs(ctx, img, size, label, "-i", "8192"); err != nil {
		return fmt.Errorf("create scratch image: %w", err)
	}
	return nil
}

// ScratchSize is the scratch image size for a tree: room to rewrite all of
// it plus ScratchSpace, plus what ext4 keeps for itself (journal, inode
// tables), so the guest really sees ScratchSpace free.
func ScratchSize(s Stats) int64 {
	return sizeFor(s) + ScratchSpace + ScratchSpace/8
}

func mkfs(ctx context.Context, img string, size int64, label string, extra ...string) error {
	if err := os.Remove(img); err != nil && !os.IsNotExist(err) {
		return err
	}
	// Create the file sparse; mke2fs then writes only metadata.
	f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	f.Close()
	args := []string{"-q", "-F", "-b", "4096", "-m", "0", "-L", label,
		"-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"}
	args = append(args, extra...)
	args = append(args, img)
	bin, err := hostdeps.LookPath("mkfs.ext4")
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// On cancellation mke2fs is killed; do not wait long for its output.
	cmd.WaitDelay = 100 * time.Millisecond
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}
