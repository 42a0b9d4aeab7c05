// Package helperbin finds mvm's helper programs (mvm-agent, which goes
// into the guest image, and mvm-jailer, which confines QEMU when mvm runs
// as root) for mvmctl and for any program built on the SDK, wherever
// `make install` or a build put them.
package helperbin

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// Dirs are the directories searched after the program's own, in order:
// the install layout of `make install` under the usual prefixes.
var Dirs = []string{"/usr/local/libexec/mvm", "/usr/libexec/mvm"}

// Find returns the path of helper name. The order:
//
//  1. the environment variable env, when set (taken as given);
//  2. next to the running program, then in its ../libexec/mvm;
//  3. next to the mvmctl found on PATH, then in its ../libexec/mvm
//     (an SDK program built anywhere finds what `make install` put
//     beside mvmctl);
//  4. Dirs.
//
// When the process runs as root, a candidate found by searching must be
// owned by root and writable by nobody else: root runs it, and a helper
// another user could replace would be theirs to run as root.
func Find(name, env string) (string, error) {
	if p := os.Getenv(env); p != "" {
		return p, nil
	}
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
		dirs = append(dirs, besides(exe)...)
	}
	if ctl, err := exec.LookPath("mvmctl"); err == nil {
		if abs, err := filepath.Abs(ctl); err == nil {
			if real, err := filepath.EvalSymlinks(abs); err == nil {
				abs = real
			}
			dirs = append(dirs, besides(abs)...)
		}
	}
	dirs = append(dirs, Dirs...)
	var refused []string
	for _, d := range dirs {
		p := filepath.Join(d, name)
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		if why := unsafeForRoot(fi); why != "" {
			refused = append(refused, p+" ("+why+")")
			continue
		}
		return p, nil
	}
	msg := fmt.Sprintf("%s not found next to the program, in its ../libexec/mvm, beside mvmctl on PATH, or in %v (build it with `make build`, install it with `make install`, or set %s)", name, Dirs, env)
	if len(refused) > 0 {
		msg += fmt.Sprintf("; refused as root: %v", refused)
	}
	return "", errors.New(msg)
}

// besides is where helpers of the program at exe live: its directory and
// ../libexec/mvm.
func besides(exe string) []string {
	dir := filepath.Dir(exe)
	return []string{dir, filepath.Join(dir, "..", "libexec", "mvm")}
}

// unsafeForRoot says why root must not run the file fi, or "".
func unsafeForRoot(fi os.FileInfo) string {
	if os.Geteuid() != 0 {
		return ""
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !ok:
		return ""
	case st.Uid != 0:
		return fmt.Sprintf("owned by uid %d", st.Uid)
	case fi.Mode().Perm()&0o022 != 0:
		return "writable by others"
	}
	return ""
}
