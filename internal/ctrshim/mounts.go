package ctrshim

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/mvm-sh/mvm"
)

// The spec's mounts are what runc would make with mount(2) in the
// container's namespace on the node. The VM has no such view of the
// node's files, so the shim provides each mount in one of three ways
// (docs/kubernetes.md, "Mounts"):
//
//   - the kernel filesystems and tmpfs a container's root always has
//     (/proc, /sys, /dev and whatever the spec mounts under them, and
//     the tmpfs at /run) are the guest's own, mounted by the agent;
//   - a read-only bind mount, and the files the CRI writes for a
//     container (/etc/hosts, /etc/hostname, /etc/resolv.conf) and the
//     directories it makes for an image's VOLUMEs, are copied into the
//     container's root when it starts: what the node changes later is not
//     seen, and what the container writes stays in the VM, which loses
//     nothing the container could expect to keep;
//   - a writable bind mount of a directory, for a lone container, is one
//     of the VM's shared directories (mvm.Dir): what the container
//     changed is written back into the node's directory when the task is
//     deleted.
//
// Anything else (a writable volume of a pod, a writable file, a mount of
// another filesystem type) is refused at the container's create: silently
// leaving it out would lose what the container writes there.

// A copied mount's bounds: the tree is read on the node and written into
// the VM's disk, and a hostPath volume of "/" must fail early, not copy
// the node.
const (
	maxCopyBytes   = 1 << 30
	maxCopyEntries = 100_000
)

// copyMount is a mount copied into the container's root at its start.
type copyMount struct {
	orig     string // the spec's source
	src, dst string // src: orig resolved
	dir      bool
}

// mountPlan is how a container's spec mounts are provided.
type mountPlan struct {
	copies []copyMount
	dirs   []mvm.Dir // a lone container's writable directories
	guest  []string  // destinations the guest provides itself
}

// guestDirs are the destinations whose mounts the guest provides in every
// container root (the agent's rootMounts), with everything below them;
// /run is a tmpfs of the guest's too, but what is bound under it is
// copied.
var guestDirs = []string{"/proc", "/sys", "/dev"}

// guestBinds are the bind mounts under guestDirs that the guest's own
// filesystems stand in for: the CRI's /dev/shm (the sandbox's, a tmpfs)
// and the kubelet's termination log (the container writes its message
// there; the node does not see it). Any other bind there is refused.
var guestBinds = map[string]bool{"/dev/shm": true, "/dev/termination-log": true}

// runtimeFiles are the files the CRI writes for each container and bind
// mounts writable: the container's own, as runc's container would have
// them.
var runtimeFiles = map[string]bool{"/etc/hosts": true, "/etc/hostname": true, "/etc/resolv.conf": true}

// imageVolume matches the directories containerd's CRI makes for an
// image's VOLUMEs, one per container under its own state directory and
// removed with it: a copy keeps their lifetime.
var imageVolume = regexp.MustCompile(`/io\.containerd\.grpc\.v1\.cri/containers/[0-9a-f]{64}/volumes/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

func underAny(p string, dirs []string) bool {
	for _, d := range dirs {
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}

func hasOption(opts []string, want ...string) bool {
	for _, o := range opts {
		for _, w := range want {
			if o == w {
				return true
			}
		}
	}
	return false
}

// planMounts decides how each of the spec's mounts is provided, member
// telling a pod's container (whose VM cannot take a shared directory of
// its own) from a lone container or a pod's sandbox. Sources are checked
// on the node, and copies measured against their bounds: a mount the VM
// cannot have is an error before anything starts.
func planMounts(mounts []specs.Mount, member bool) (mountPlan, error) {
	var p mountPlan
	for _, m := range mounts {
		if !path.IsAbs(m.Destination) {
			return p, fmt.Errorf("mount at %q: the destination is not absolute", m.Destination)
		}
		dst := path.Clean(m.Destination)
		bind := m.Type == "bind" || hasOption(m.Options, "bind", "rbind")
		if (underAny(dst, guestDirs) && (!bind || guestBinds[dst])) || (dst == "/run" && !bind) {
			p.guest = append(p.guest, dst)
			continue
		}
		if bind && underAny(dst, guestDirs) {
			return p, fmt.Errorf("bind mount of %s at %s: %s are the guest's own in the VM", m.Source, dst, strings.Join(guestDirs, ", "))
		}
		if !bind {
			return p, fmt.Errorf("mount of type %q at %s: the VM has bind mounts, and the kernel filesystems and tmpfs of %s and /run",
				m.Type, dst, strings.Join(guestDirs, ", "))
		}
		if dst == "/" {
			return p, fmt.Errorf("bind mount of %s at /: the container's root is its image's", m.Source)
		}
		// mount(2) follows the source's links; so does the copy.
		src, err := filepath.EvalSymlinks(m.Source)
		if err != nil {
			return p, fmt.Errorf("bind mount at %s: its source: %w", dst, err)
		}
		fi, err := os.Stat(src)
		if err != nil {
			return p, fmt.Errorf("bind mount at %s: its source: %w", dst, err)
		}
		if !fi.IsDir() && !fi.Mode().IsRegular() {
			return p, fmt.Errorf("bind mount of %s at %s: only directories and regular files can be provided in the VM", m.Source, dst)
		}
		ro := hasOption(m.Options, "ro")
		switch {
		case ro || runtimeFiles[dst] || (fi.IsDir() && imageVolume.MatchString(src)):
			if err := measureCopy(src); err != nil {
				return p, fmt.Errorf("bind mount of %s at %s: %w", m.Source, dst, err)
			}
			p.copies = append(p.copies, copyMount{orig: m.Source, src: src, dst: dst, dir: fi.IsDir()})
		case fi.IsDir() && !member:
			p.dirs = append(p.dirs, mvm.Dir{Host: src, Guest: dst, Writable: true})
		case fi.IsDir():
			return p, fmt.Errorf("writable bind mount of %s at %s: a pod's container gets read-only volumes only (copied into the VM); "+
				"what it wrote in a writable one would not reach the node", m.Source, dst)
		default:
			return p, fmt.Errorf("writable bind mount of the file %s at %s: only read-only file mounts can be provided in the VM", m.Source, dst)
		}
	}
	// A copy landing in a writable directory (or one holding it) would
	// be written back into the node's directory at the end; two
	// writable directories in one another cannot both be shared.
	for i, d := range p.dirs {
		for _, c := range p.copies {
			if underAny(c.dst, []string{d.Guest}) || underAny(d.Guest, []string{c.dst}) {
				return p, fmt.Errorf("the mount at %s and the writable mount at %s: one is inside the other (the copy would be written back into %s)", c.dst, d.Guest, d.Host)
			}
		}
		for _, e := range p.dirs[i+1:] {
			if underAny(e.Guest, []string{d.Guest}) || underAny(d.Guest, []string{e.Guest}) {
				return p, fmt.Errorf("the writable mounts at %s and %s: one is inside the other", d.Guest, e.Guest)
			}
		}
	}
	return p, nil
}

// recheck resolves and measures the copy's source again as it is made
// (a pod's container starts long after its create): a source that now
// resolves elsewhere, or outgrew the bounds, is refused.
func (m copyMount) recheck() error {
	src, err := filepath.EvalSymlinks(m.orig)
	if err != nil {
		return fmt.Errorf("bind mount at %s: its source: %w", m.dst, err)
	}
	if src != m.src {
		return fmt.Errorf("bind mount at %s: its source %s resolved to %s at the create and to %s now", m.dst, m.orig, m.src, src)
	}
	if err := measureCopy(src); err != nil {
		return fmt.Errorf("bind mount of %s at %s: %w", m.orig, m.dst, err)
	}
	return nil
}

// measureCopy checks that the tree at src is within the copy's bounds
// and on one filesystem (a copy does not cross the node's mount points,
// as a non-recursive bind would not).
func measureCopy(src string) error {
	root, err := os.Lstat(src)
	if err != nil {
		return err
	}
	dev := root.Sys().(*syscall.Stat_t).Dev
	var bytes, entries int64
	errTooBig := errors.New("too big")
	err = filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		entries++
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Dev != dev {
			return fmt.Errorf("%s is another filesystem's mount point: a copied mount stays on one filesystem", p)
		}
		if fi.Mode().IsRegular() {
			bytes += fi.Size()
		}
		if bytes > maxCopyBytes || entries > maxCopyEntries {
			return errTooBig
		}
		return nil
	})
	if errors.Is(err, errTooBig) {
		return fmt.Errorf("over what the shim copies into a VM (%d MiB, %d entries)", maxCopyBytes>>20, maxCopyEntries)
	}
	return err
}

// copyMounts copies the planned mounts into the container's root in the
// VM (root: a pod member's; "" the VM's own), in the spec's order, so
// that a mount inside another lands over it, with the node's owners.
func (s *Service) copyMounts(ctx context.Context, sb *mvm.Sandbox, c *container, root string) error {
	start := time.Now()
	for _, m := range c.mounts.copies {
		if err := m.recheck(); err != nil {
			return err
		}
		src := m.src
		if m.dir {
			// Its contents, into the destination (made if missing).
			src += "/."
		}
		if _, err := sb.CopyIn(ctx, src, m.dst, mvm.CopyOptions{KeepOwners: true, Root: root, Parents: true}); err != nil {
			return fmt.Errorf("copy the mount at %s into the VM: %w", m.dst, err)
		}
	}
	if len(c.mounts.copies) > 0 {
		s.log.Info("mounts copied into the VM", "container", c.id, "mounts", len(c.mounts.copies), "took", time.Since(start))
	}
	return nil
}
