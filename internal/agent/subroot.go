package agent

import (
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// subRoot returns the directory dir of root (Exec.root) as a command root
// of its own, with rootMounts mounted inside it the first time it is
// used, and the path a process forked in root chroots to. dir is resolved
// inside root, as the chrooted command would resolve it, so a symlink in
// the tree cannot point the command at the agent's files.
func (s *Server) subRoot(root *fsRoot, dir string) (*fsRoot, string, error) {
	if path.Clean("/"+dir) == "/" {
		return root, "", nil
	}
	real, err := resolveIn(root, dir)
	if err != nil {
		return nil, "", fmt.Errorf("root %q: %w", dir, err)
	}
	inRoot, err := inside(root, real)
	if err != nil {
		return nil, "", fmt.Errorf("root %q: %w", dir, err)
	}
	sub := &fsRoot{path: real}
	s.subMu.Lock()
	defer s.subMu.Unlock()
	s.fsMu.Lock()
	defer s.fsMu.Unlock()
	if s.subRoots[real] {
		return sub, inRoot, nil
	}
	var done []string
	for _, m := range rootMounts {
		if err := sub.mountIn(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			if m.fstype == cgroupMount.fstype && (errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)) {
				continue // a --kernel kernel without cgroup2, as in setRoot
			}
			undo(done)
			return nil, "", fmt.Errorf("root %q: %w", dir, err)
		}
		done = append(done, path.Join(real, m.target))
	}
	if s.hasBootID {
		if err := sub.bindFile(bootIDFile, bootIDProc); err != nil {
			undo(done)
			return nil, "", fmt.Errorf("root %q: %w", dir, err)
		}
		s.bootIDBound[real] = true
	}
	if s.subRoots == nil {
		s.subRoots = make(map[string]bool)
	}
	s.subRoots[real] = true
	return sub, inRoot, nil
}

// undo unmounts what a failed subRoot mounted, innermost first, never
// through a symbolic link (mountIn resolved the targets inside the root;
// a link there must not make this unmount something of the agent's).
func undo(done []string) {
	for i := len(done) - 1; i >= 0; i-- {
		_ = unix.Unmount(done[i], unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
	}
}

// inside returns real, a path in the agent's namespace, as a path of
// root, refusing root itself (its kernel filesystems would be mounted
// over the root's own) and anything outside it.
func inside(root *fsRoot, real string) (string, error) {
	if root.isHost() {
		if real == "/" {
			return "", errors.New("resolves to the root itself")
		}
		return real, nil
	}
	if !strings.HasPrefix(real, root.path+"/") {
		return "", fmt.Errorf("resolves to %q, outside the command root", real)
	}
	return strings.TrimPrefix(real, root.path), nil
}

// resolveIn returns the path in the agent's namespace of the directory
// dir of root, resolved inside root.
func resolveIn(root *fsRoot, dir string) (string, error) {
	fd, err := root.open(path.Clean("/"+dir), unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	return os.Readlink(fdPath(fd))
}

// release serves a Release call: it kills and removes the cgroup, then
// unmounts what subRoot mounted in the root and removes the root's tree.
func (s *Server) release(r *agentpb.Release) error {
	if r.Cgroup != "" {
		if err := killCgroup(r.Cgroup); err != nil {
			return err
		}
	}
	if r.Root == "" {
		return nil
	}
	root := s.cmdRoot()
	real, err := resolveIn(root, r.Root)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("root %q: %w", r.Root, err)
	}
	if _, err := inside(root, real); err != nil {
		return fmt.Errorf("root %q: %w", r.Root, err)
	}
	// One release or first use of a root at a time: a second release
	// racing the first must not remove the tree while the first is
	// still unmounting (the devtmpfs inside is the VM's own /dev).
	s.subMu.Lock()
	defer s.subMu.Unlock()
	s.fsMu.Lock()
	delete(s.subRoots, real)
	delete(s.bootIDBound, real)
	s.fsMu.Unlock()
	// Everything the agent's namespace has mounted inside, innermost
	// (latest) first. The commands' own mounts are in their spawner's
	// namespace and never show here, so once these are gone the tree
	// holds nothing but its own files; the tree is removed only if so.
	for _, m := range mountsUnder(real) {
		if err := unix.Unmount(m, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
			return fmt.Errorf("root %q: unmount %s: %w", r.Root, m, err)
		}
	}
	if left := mountsUnder(real); len(left) > 0 {
		return fmt.Errorf("root %q: %s is still mounted; the tree stays", r.Root, left[0])
	}
	if err := os.RemoveAll(real); err != nil {
		return fmt.Errorf("root %q: %w", r.Root, err)
	}
	return nil
}

// mountsUnder lists the mount points below dir in the agent's namespace,
// latest first.
func mountsUnder(dir string) []string {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil
	}
	var out []string
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		mnt := unescapeMount(f[1])
		if strings.HasPrefix(mnt, dir+"/") {
			out = append(out, mnt)
		}
	}
	slices.Reverse(out)
	return out
}
