package agent

import (
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

// mount serves a Mount call.
func mountDevice(req *agentpb.Mount) error {
	if !path.IsAbs(req.Target) || path.Clean(req.Target) == "/" {
		return fmt.Errorf("mount target %q must be an absolute path other than /", req.Target)
	}
	dev, err := deviceBySerial(req.DeviceSerial, 2*time.Second)
	if err != nil {
		return err
	}
	if req.UpperSerial == "" {
		flags := uintptr(unix.MS_NOATIME)
		if req.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		return mountAt(dev, req.Target, "ext4", flags, "")
	}
	upperDev, err := deviceBySerial(req.UpperSerial, 2*time.Second)
	if err != nil {
		return err
	}
	layers := filepath.Join(layerRoot, req.DeviceSerial)
	lower, rw := filepath.Join(layers, "lower"), filepath.Join(layers, "rw")
	if err := mountAt(dev, lower, "ext4", unix.MS_RDONLY|unix.MS_NOATIME, ""); err != nil {
		return err
	}
	if err := mountAt(upperDev, rw, "ext4", unix.MS_NOATIME, ""); err != nil {
		return err
	}
	upper, work := filepath.Join(rw, "upper"), filepath.Join(rw, "work")
	if err := os.Mkdir(upper, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err := os.Mkdir(work, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err := copyRootAttrs(lower, upper); err != nil {
		return err
	}
	// redirect_dir and metacopy off: a renamed directory is copied up and a
	// chmod copies the file, so the upper layer always holds complete
	// files and plain directories, which is what the host writes back.
	opts := "lowerdir=" + escapeOverlay(lower) + ",upperdir=" + escapeOverlay(upper) + ",workdir=" + escapeOverlay(work) +
		",redirect_dir=off,metacopy=off,index=off,xino=off"
	return mountAt("overlay", req.Target, "overlay", unix.MS_NOATIME, opts)
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

// deviceBySerial finds /dev/vdX whose virtio-blk serial is serial.
func deviceBySerial(serial string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		entries, _ := os.ReadDir("/sys/block")
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "serial"))
			if err == nil && strings.TrimSpace(string(b)) == serial {
				return "/dev/" + e.Name(), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no block device with serial %q", serial)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
