package ocitest

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
)

// Xattrs are the extended attributes Describe looks for in an image
// (internal/ext4 reads attributes by name only).
var Xattrs = []string{"security.capability", "user.note", "user.rootlesscontainers"}

func describeContent(b []byte) string {
	if len(b) <= 100 {
		return fmt.Sprintf("%q", b)
	}
	return fmt.Sprintf("%d bytes ending %q", len(b), b[len(b)-3:])
}

func describeXattrs(get func(name string) ([]byte, bool)) string {
	var parts []string
	for _, n := range Xattrs {
		if v, ok := get(n); ok && n != "user.rootlesscontainers" {
			parts = append(parts, fmt.Sprintf("%s=%q", n, v))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return " xattrs " + strings.Join(parts, " ")
}

func permBits(m fs.FileMode) uint32 {
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

// DescribeImage describes every path of an ext4 image, through
// internal/ext4, as SampleTree does: type, permission bits, owner,
// modification time, then a file's link count and content, a symlink's
// target, a device's numbers, and the extended attributes named in
// Xattrs.
func DescribeImage(img string) (map[string]string, error) {
	f, err := os.Open(img)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	fsys, err := ext4.Open(f, fi.Size())
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	var walk func(rel string, in *ext4.Inode) error
	walk = func(rel string, in *ext4.Inode) error {
		typ := "file"
		switch {
		case in.Mode.IsDir():
			typ = "dir"
		case in.Mode&fs.ModeSymlink != 0:
			typ = "symlink"
		case in.Mode&fs.ModeCharDevice != 0:
			typ = "chardev"
		case in.Mode&fs.ModeDevice != 0:
			typ = "blockdev"
		case in.Mode&fs.ModeNamedPipe != 0:
			typ = "fifo"
		case in.Mode&fs.ModeSocket != 0:
			typ = "socket"
		}
		d := fmt.Sprintf("%s %o %d:%d mtime %d.%09d", typ, permBits(in.Mode), in.UID, in.GID, in.Mtime.Unix(), in.Mtime.Nanosecond())
		switch typ {
		case "file":
			var b bytes.Buffer
			if err := fsys.CopyFile(context.Background(), in, &b); err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
			d += fmt.Sprintf(" links %d %s", in.Nlink, describeContent(b.Bytes()))
		case "symlink":
			t, err := fsys.Readlink(in)
			if err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
			d += " -> " + t
		case "chardev", "blockdev":
			d += fmt.Sprintf(" %d:%d", in.Major, in.Minor)
		}
		var xerr error
		d += describeXattrs(func(n string) ([]byte, bool) {
			v, ok, err := fsys.Xattr(in, n)
			if err != nil {
				xerr = err
			}
			return v, ok
		})
		if xerr != nil {
			return fmt.Errorf("%s: %w", rel, xerr)
		}
		out[rel] = d
		if typ != "dir" {
			return nil
		}
		ents, err := fsys.ReadDir(in)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		for _, e := range ents {
			child, err := fsys.Inode(e.Ino)
			if err != nil {
				return err
			}
			if err := walk(filepath.Join(rel, e.Name), child); err != nil {
				return err
			}
		}
		return nil
	}
	root, err := fsys.Inode(ext4.RootIno)
	if err != nil {
		return nil, err
	}
	return out, walk(".", root)
}

// DescribeHost describes a tree on the host the same way.
func DescribeHost(root string) (map[string]string, error) {
	out := map[string]string{}
	err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		typ := map[uint32]string{unix.S_IFREG: "file", unix.S_IFDIR: "dir", unix.S_IFLNK: "symlink", unix.S_IFCHR: "chardev",
			unix.S_IFBLK: "blockdev", unix.S_IFIFO: "fifo", unix.S_IFSOCK: "socket"}[st.Mode&unix.S_IFMT]
		d := fmt.Sprintf("%s %o %d:%d mtime %d.%09d", typ, permBits(fi.Mode()), st.Uid, st.Gid, st.Mtim.Sec, st.Mtim.Nsec)
		switch typ {
		case "file":
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			d += fmt.Sprintf(" links %d %s", st.Nlink, describeContent(b))
		case "symlink":
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			d += " -> " + t
		case "chardev", "blockdev":
			d += fmt.Sprintf(" %d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		d += describeXattrs(func(n string) ([]byte, bool) {
			buf := make([]byte, 4096)
			k, err := unix.Lgetxattr(p, n, buf)
			return buf[:max(k, 0)], err == nil
		})
		out[rel] = d
		return nil
	})
	return out, err
}

// Diff lists the differences between two descriptions, one per line.
func Diff(want, got map[string]string) string {
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		if want[k] != got[k] {
			fmt.Fprintf(&b, "%s:\n  want %s\n  got  %s\n", k, want[k], got[k])
		}
	}
	return b.String()
}
