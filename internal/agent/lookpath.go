package agent

import (
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultPath is the PATH a command gets when its environment has none; it
// is also the search path for argv[0] in that case. It is Debian's default
// PATH for root (and what login(1) gives root on most distributions).
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookPath resolves argv[0] the way execvp(3) does, against the PATH of the
// command's own environment (not the agent's), inside the command's root
// and for the identity it will run as: a name with a slash is used as is;
// otherwise each PATH entry is tried, the first executable regular file
// wins, and if none is found the error is EACCES when some candidate
// existed but could not be executed, ENOENT otherwise. The distinction is
// what lets the host report 126 versus 127. Relative names and PATH
// entries are relative to cwd, the command's working directory, as they
// are for execvp in the command itself.
func lookPath(root *fsRoot, name, pathEnv, cwd string, id *identity) (string, error) {
	if name == "" {
		return "", unix.ENOENT
	}
	inRoot := func(p string) string {
		if path.IsAbs(p) {
			return p
		}
		return path.Join(cwd, p)
	}
	if strings.Contains(name, "/") {
		return name, checkExecutable(root, inRoot(name), id)
	}
	sawDenied := false
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		switch err := checkExecutable(root, inRoot(p), id); err {
		case nil:
			return p, nil
		case unix.EACCES:
			sawDenied = true
		}
	}
	if sawDenied {
		return "", unix.EACCES
	}
	return "", unix.ENOENT
}

// checkExecutable reports ENOENT for a missing file and EACCES for one that
// exists but is not a regular file or that id may not execute.
func checkExecutable(root *fsRoot, p string, id *identity) error {
	st, err := root.stat(p)
	if err != nil {
		if err == unix.ENOENT || err == unix.ENOTDIR || err == unix.ELOOP {
			return unix.ENOENT
		}
		return unix.EACCES
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || !id.mayExecute(&st) {
		return unix.EACCES
	}
	return nil
}
