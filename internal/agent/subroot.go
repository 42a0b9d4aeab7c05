package agent

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// subRoot returns the directory dir of root (Exec.root) as a command root
// of its own, with rootMounts mounted inside it the first time it is
// used, and the path a process forked in root chroots to. dir is resolved
// inside root, as the chrooted command would resolve it, so a symlink in
// the tree cannot point the command at the agent's files.
func (s *Server) subRoot(root *fsRoot, dir string) (*fsRoot, string, error) {
	clean := path.Clean("/" + dir)
	if clean == "/" {
		return root, "", nil
	}
	fd, err := root.open(clean, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", fmt.Errorf("root %q: %w", dir, err)
	}
	real, err := os.Readlink(fdPath(fd))
	unix.Close(fd)
	if err != nil {
		return nil, "", fmt.Errorf("root %q: %w", dir, err)
	}
	inRoot := real
	if !root.isHost() {
		if !strings.HasPrefix(real, root.path+"/") {
			return nil, "", fmt.Errorf("root %q: resolves to %q, outside the command root", dir, real)
		}
		inRoot = strings.TrimPrefix(real, root.path)
	}
	sub := &fsRoot{path: real}
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

// undo unmounts what a failed subRoot mounted, innermost first.
func undo(done []string) {
	for i := len(done) - 1; i >= 0; i-- {
		_ = unix.Unmount(done[i], unix.MNT_DETACH)
	}
}
