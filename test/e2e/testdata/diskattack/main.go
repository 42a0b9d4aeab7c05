// Command diskattack runs as root inside a test VM and rewrites the raw
// scratch disk of a read-write shared directory, as a hostile guest
// would, behind the back of the filesystem mounted on it: it finds the
// scratch device through /proc/mounts (the read-write ext4 mount; the
// directory images are read-only), flushes the filesystem and its journal
// to the disk, drops the kernel's caches, and edits the device with
// ext4craft, checksums kept valid.
//
//	diskattack OP ARGS... [-- OP ARGS...]
//
//	rename DIR OLD NEW    give entry OLD of DIR the name NEW (Go-quoted: "" and "\x00" work)
//	setino DIR NAME PATH  make entry NAME of DIR point at the inode of PATH
//	size PATH BYTES       make PATH's inode claim BYTES
//	endless PATH          make PATH's extent tree endless
//
// Paths are relative to the scratch filesystem's root (the overlay's
// upper layer is "upper").
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4/ext4craft"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "diskattack:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	dev, mnt, err := scratch()
	if err != nil {
		return err
	}
	// Everything the filesystem has, journal checkpointed, on the disk;
	// then nothing of it cached, so the kernel neither holds nor later
	// writes back an old copy of what is edited below.
	unix.Sync()
	if fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
		const fifreeze, fithaw = 0xC0045877, 0xC0045878
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fifreeze, 0); e != 0 {
			return fmt.Errorf("freeze %s: %v", mnt, e)
		}
		_, _, _ = unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fithaw, 0)
		unix.Close(fd)
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	im, err := ext4craft.Open(f)
	if err != nil {
		return err
	}
	for len(args) > 0 {
		n := len(args)
		for i, a := range args {
			if a == "--" {
				n = i
				break
			}
		}
		if err := op(im, args[:n]); err != nil {
			return fmt.Errorf("%q: %w", args[:n], err)
		}
		args = args[min(n+1, len(args)):]
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0)
}

func op(im *ext4craft.Image, a []string) error {
	need := map[string]int{"rename": 4, "setino": 4, "size": 3, "endless": 2}
	if len(a) == 0 || need[a[0]] != len(a) {
		return fmt.Errorf("usage: rename DIR OLD NEW | setino DIR NAME PATH | size PATH BYTES | endless PATH")
	}
	switch a[0] {
	case "rename":
		dir, err := im.Lookup(a[1])
		if err != nil {
			return err
		}
		name, err := strconv.Unquote(a[3])
		if err != nil {
			return fmt.Errorf("NEW must be Go-quoted: %w", err)
		}
		return im.Rename(dir, a[2], []byte(name))
	case "setino":
		dir, err := im.Lookup(a[1])
		if err != nil {
			return err
		}
		target, err := im.Lookup(a[3])
		if err != nil {
			return err
		}
		return im.SetEntryIno(dir, a[2], target)
	case "size":
		ino, err := im.Lookup(a[1])
		if err != nil {
			return err
		}
		n, err := strconv.ParseInt(a[2], 10, 64)
		if err != nil {
			return err
		}
		return im.SetSize(ino, n)
	case "endless":
		ino, err := im.Lookup(a[1])
		if err != nil {
			return err
		}
		return im.EndlessExtents(ino)
	}
	return nil
}

// scratch finds the device and mount point of the read-write ext4
// filesystem: the scratch image of a read-write shared directory.
func scratch() (dev, mnt string, err error) {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || fields[2] != "ext4" || !strings.HasPrefix(fields[0], "/dev/") {
			continue
		}
		if opts := strings.Split(fields[3], ","); len(opts) > 0 && opts[0] == "rw" {
			if dev != "" {
				return "", "", fmt.Errorf("more than one read-write ext4 mount (%s, %s)", dev, fields[0])
			}
			dev, mnt = fields[0], fields[1]
		}
	}
	if dev == "" {
		return "", "", fmt.Errorf("no read-write ext4 mount in /proc/mounts")
	}
	return dev, mnt, sc.Err()
}
