package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// layerRoot is where the agent mounts the layers of overlay mounts; the
// host refuses --add-dir targets under it.
const layerRoot = "/run/mvm/layers"

// driveWait bounds how long a Mount waits for its drives to show up:
// they are attached before boot, so only a slow probe makes it wait.
const driveWait = 2 * time.Second

// errInvalidRequest marks a request (Mount, Root, a hello field) the agent
// cannot act on at all (answered with CODE_INVALID_ARGUMENT).
var errInvalidRequest = errors.New("invalid request")

// mountDevice serves a Mount call. The target is a path inside the
// commands' root (the agent's own root until a Root call).
func (s *Server) mountDevice(req *agentpb.Mount) error {
	if !path.IsAbs(req.Target) || path.Clean(req.Target) == "/" {
		return fmt.Errorf("%w: target %q must be an absolute path other than /", errInvalidRequest, req.Target)
	}
	lowerRef := driveRef{label: req.DeviceLabel, serial: req.DeviceSerial}
	if err := lowerRef.check(); err != nil {
		return err
	}
	upperRef := driveRef{label: req.UpperLabel, serial: req.UpperSerial}
	overlay := !upperRef.empty()
	if overlay {
		if err := upperRef.check(); err != nil {
			return err
		}
	}
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	root := s.root
	dev, err := s.drives.find(lowerRef, driveWait)
	if err != nil {
		return err
	}
	if !overlay {
		flags := uintptr(unix.MS_NOATIME)
		if req.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if err := root.mountIn(dev, req.Target, "ext4", flags, ""); err != nil {
			return err
		}
		s.mounted[dev] = true
		return nil
	}
	upperDev, err := s.drives.find(upperRef, driveWait)
	if err != nil {
		return err
	}
	if upperDev == dev {
		return fmt.Errorf("%w: %s and %s are the same drive", errInvalidRequest, lowerRef, upperRef)
	}
	layers := filepath.Join(layerRoot, lowerRef.name())
	lower, rw := filepath.Join(layers, "lower"), filepath.Join(layers, "rw")
	if err := mountAt(dev, lower, "ext4", unix.MS_RDONLY|unix.MS_NOATIME, ""); err != nil {
		return err
	}
	s.mounted[dev] = true
	if err := mountAt(upperDev, rw, "ext4", unix.MS_NOATIME, ""); err != nil {
		return err
	}
	s.mounted[upperDev] = true
	upper, work, err := prepareUpper(lower, rw)
	if err != nil {
		return err
	}
	// redirect_dir and metacopy off: a renamed directory is copied up and a
	// chmod copies the file, so the upper layer always holds complete
	// files and plain directories, which is what the host writes back.
	// xino=on, as for the root: equal d_ino and st_ino across layers.
	opts := "lowerdir=" + escapeOverlay(lower) + ",upperdir=" + escapeOverlay(upper) + ",workdir=" + escapeOverlay(work) +
		",redirect_dir=off,metacopy=off,index=off,xino=on"
	return root.mountIn("overlay", req.Target, "overlay", unix.MS_NOATIME, opts)
}

// copyRootAttrs gives the upper layer's root the owner, mode and times of
// the lower root, so the host can tell a guest chmod of the shared
// directory itself from no change.
func copyRootAttrs(lower, upper string) error {
	var st unix.Stat_t
	if err := unix.Stat(lower, &st); err != nil {
		return err
	}
	if err := unix.Chown(upper, int(st.Uid), int(st.Gid)); err != nil {
		return err
	}
	if err := unix.Chmod(upper, st.Mode&0o7777); err != nil {
		return err
	}
	ts := []unix.Timespec{st.Atim, st.Mtim}
	return unix.UtimesNano(upper, ts)
}

func mountAt(source, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("create mount point %s: %w", target, err)
	}
	if err := unix.Mount(source, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", source, target, err)
	}
	return nil
}

// escapeOverlay escapes the characters overlayfs options treat specially.
func escapeOverlay(p string) string {
	r := strings.NewReplacer(`\`, `\\`, `,`, `\,`, `:`, `\:`)
	return r.Replace(p)
}

// driveRef names a drive the way a Mount request does: by filesystem
// label or, from older hosts, by virtio-blk serial. The label wins when
// both are set.
type driveRef struct{ label, serial string }

func (r driveRef) empty() bool { return r.label == "" && r.serial == "" }

func (r driveRef) String() string {
	if r.label != "" {
		return fmt.Sprintf("label %q", r.label)
	}
	return fmt.Sprintf("serial %q", r.serial)
}

// name is what the drive is called in paths under layerRoot.
func (r driveRef) name() string {
	if r.label != "" {
		return r.label
	}
	return r.serial
}

// check rejects names that cannot identify a drive or that would escape
// layerRoot.
func (r driveRef) check() error {
	n := r.name()
	switch {
	case n == "":
		return fmt.Errorf("%w: no drive label or serial", errInvalidRequest)
	case r.label != "" && len(r.label) > maxLabelLen:
		return fmt.Errorf("%w: label %q is longer than %d bytes", errInvalidRequest, r.label, maxLabelLen)
	case n == "." || n == ".." || strings.ContainsAny(n, "/\x00"):
		return fmt.Errorf("%w: drive name %q", errInvalidRequest, n)
	}
	return nil
}

// drives is where the agent looks for disks: sysfs's block directory and
// the directory of their device nodes.
type drives struct {
	sysBlock, devDir string
	// flush, if set, is called for each disk before its superblock is
	// read, and for the disk a serial names: a restored snapshot may
	// have swapped the image behind it.
	flush func(dev string)
}

var guestDrives = drives{sysBlock: "/sys/block", devDir: "/dev"}

// find waits up to timeout for the drive ref names to show up and returns
// its device path. More than one drive matching is an error: the host
// named one.
func (d drives) find(ref driveRef, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		var devs []string
		var err error
		if ref.label != "" {
			devs, err = d.byLabel(ref.label)
		} else {
			devs = d.bySerial(ref.serial)
			if len(devs) == 1 && d.flush != nil {
				d.flush(devs[0])
			}
		}
		switch {
		case err != nil:
			return "", err
		case len(devs) == 1:
			return devs[0], nil
		case len(devs) > 1:
			return "", fmt.Errorf("%d drives (%s) have %s", len(devs), strings.Join(devs, ", "), ref)
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no drive with %s after %s (the VM has %s)", ref, timeout, d.inventory())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inventory describes the VM's disks and their labels, for errors that
// say a drive was not found: a drive that holds no ext2/3/4 filesystem
// shows up as such.
func (d drives) inventory() string {
	entries, _ := os.ReadDir(d.sysBlock)
	var out []string
	for _, e := range entries {
		if _, err := os.Stat(filepath.Join(d.sysBlock, e.Name(), "device")); err != nil {
			continue
		}
		if label, ok := readLabel(filepath.Join(d.devDir, e.Name())); ok {
			out = append(out, fmt.Sprintf("%s: ext4 %q", e.Name(), label))
		} else {
			out = append(out, e.Name()+": no ext2/3/4 filesystem")
		}
	}
	if len(out) == 0 {
		return "no disks"
	}
	return strings.Join(out, ", ")
}

// bySerial lists the disks whose virtio-blk serial is serial.
func (d drives) bySerial(serial string) []string {
	var out []string
	entries, _ := os.ReadDir(d.sysBlock)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(d.sysBlock, e.Name(), "serial"))
		if err == nil && strings.TrimSpace(string(b)) == serial {
			out = append(out, filepath.Join(d.devDir, e.Name()))
		}
	}
	return out
}

// ext4 superblock layout: the superblock starts 1024 bytes into the
// device; these offsets are within it.
const (
	superblockOffset = 1024
	sbMagicOffset    = 0x38
	sbLabelOffset    = 0x78
	ext4Magic        = 0xEF53
	maxLabelLen      = 16
)

// byLabel lists the whole disks that hold an ext2/3/4 filesystem labelled
// label. Only disks
// backed by a device of the VM count (sysfs gives them a "device" link):
// loop and RAM disks, which guest programs can create and fill, do not.
// Partitions are not disks of their own under /sys/block.
func (d drives) byLabel(label string) ([]string, error) {
	entries, err := os.ReadDir(d.sysBlock)
	if err != nil {
		return nil, fmt.Errorf("list drives: %w", err)
	}
	var out []string
	for _, e := range entries {
		if _, err := os.Stat(filepath.Join(d.sysBlock, e.Name(), "device")); err != nil {
			continue
		}
		dev := filepath.Join(d.devDir, e.Name())
		if d.flush != nil {
			d.flush(dev)
		}
		got, ok := readLabel(dev)
		if ok && got == label {
			out = append(out, dev)
		}
	}
	return out, nil
}

// readLabel returns the label of the ext2/3/4 filesystem on dev; ok is
// false when dev cannot be read or holds no such filesystem.
func readLabel(dev string) (label string, ok bool) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return "", false
	}
	defer f.Close()
	var sb [sbLabelOffset + maxLabelLen]byte
	if _, err := f.ReadAt(sb[:], superblockOffset); err != nil {
		return "", false
	}
	return superblockLabel(sb[:])
}

// superblockLabel parses the label out of the start of an ext2/3/4
// superblock: the volume name is NUL-padded, and a 16-byte one has no NUL
// at all.
func superblockLabel(sb []byte) (string, bool) {
	if len(sb) < sbLabelOffset+maxLabelLen || binary.LittleEndian.Uint16(sb[sbMagicOffset:]) != ext4Magic {
		return "", false
	}
	name := sb[sbLabelOffset : sbLabelOffset+maxLabelLen]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return string(name), true
}
