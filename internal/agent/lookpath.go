package agent

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultPath is the PATH a command gets when its environment has none; it
// is also the search path for argv[0] in that case.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookPath resolves argv[0] the way execvp(3) does, against the PATH of the
// command's own environment (not the agent's): a name with a slash is used
// as is; otherwise each PATH entry is tried, the first executable regular
// file wins, and if none is found the error is EACCES when some candidate
// existed but could not be executed, ENOENT otherwise. The distinction is
// what lets the host report 126 versus 127.
func lookPath(name, pathEnv string) (string, error) {
	if name == "" {
		return "", unix.ENOENT
	}
	if strings.Contains(name, "/") {
		return name, checkExecutable(name)
	}
	sawDenied := false
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		switch err := checkExecutable(p); err {
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
// exists but is a directory or lacks execute permission.
func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		if os.IsNotExist(err) {
			return unix.ENOENT
		}
		return unix.EACCES
	}
	if fi.IsDir() || fi.Mode()&fs.ModeType != 0 && !fi.Mode().IsRegular() {
		return unix.EACCES
	}
	if err := unix.Access(p, unix.X_OK); err != nil {
		return unix.EACCES
	}
	return nil
}
