// Package dirimage turns host directories into ext4 disk images for the
// guest, without root and without mounting anything: mke2fs copies the
// tree in (`mkfs.ext4 -d`). A directory shared read-only becomes one such
// image, attached read-only; a read-write one gets, in addition, an empty
// sparse scratch image that holds the guest's overlay upper layer.
package dirimage

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"

	"github.com/mvm-sh/mvm/internal/hostdeps"
)

// Deps are the host programs this package runs.
func Deps() []hostdeps.Dep {
	return []hostdeps.Dep{
		hostdeps.Program("mkfs.ext4", "e2fsprogs"),
		hostdeps.Program("e2fsck", "e2fsprogs"),
		hostdeps.Program("debugfs", "e2fsprogs"),
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
}

// Measure walks dir. It does not follow symlinks.
func Measure(dir string) (Stats, error) {
	var s Stats
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			s.Dirs++
			s.Bytes += 4096
		case d.Type().IsRegular():
			s.Files++
			fi, err := d.Info()
			if err != nil {
				return err
			}
			s.Bytes += (fi.Size() + 4095) &^ 4095
		default:
			s.Others++
			s.Bytes += 4096 // a long symlink target takes a block
		}
		return nil
	})
	if err != nil {
		return Stats{}, fmt.Errorf("measure %s: %w", dir, err)
	}
	return s, nil
}

// sizeFor picks an image size for a tree: its blocks, inode tables and
// ext4's own metadata, with room to spare. The image file is sparse, so a
// generous size costs nothing.
func sizeFor(s Stats) (size int64, inodes int) {
	inodes = s.Files + s.Dirs + s.Others + 64
	size = s.Bytes + s.Bytes/8 + int64(inodes)*256 + 16<<20
	return (size + 1<<20 - 1) &^ (1<<20 - 1), inodes
}

// Build writes an ext4 image of dir's content (the root directory's owner
// and mode included) to img. It has no journal: the guest mounts it
// read-only.
func Build(ctx context.Context, dir, img, label string) (Stats, error) {
	st, err := Measure(dir)
	if err != nil {
		return Stats{}, err
	}
	size, inodes := sizeFor(st)
	// A tree whose metadata outgrows the estimate (very many tiny files
	// in deep directories) gets a larger image; the file stays sparse.
	for attempt := 0; ; attempt++ {
		err := mkfs(ctx, img, size, label,
			"-d", dir, "-N", strconv.Itoa(inodes*(1<<attempt)),
			"-O", "^has_journal,^resize_inode")
		if err == nil {
			return st, dropLostFound(ctx, dir, img)
		}
		if attempt == 2 || ctx.Err() != nil {
			return Stats{}, fmt.Errorf("build image of %s: %w", dir, err)
		}
		size *= 2
	}
}

// dropLostFound removes the lost+found directory mke2fs adds, unless the
// host directory has one of its own: the guest should see the host's
// tree, nothing more.
func dropLostFound(ctx context.Context, dir, img string) error {
	if _, err := os.Lstat(filepath.Join(dir, "lost+found")); err == nil {
		return nil
	}
	cmd := exec.CommandContext(ctx, "debugfs", "-w", "-R", "rmdir /lost+found", img)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("debugfs rmdir /lost+found: %w: %s", err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
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
	size, _ := sizeFor(s)
	return size + ScratchSpace + ScratchSpace/8
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
	cmd := exec.CommandContext(ctx, "mkfs.ext4", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}
