// Package hostdeps checks for the host programs and files mvm needs and,
// when some are missing, says which distribution packages provide them and
// the one command that installs them.
package hostdeps

import (
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
)

// Dep is one thing mvm needs from the host.
type Dep struct {
	// What names it in messages: a program or a file.
	What string
	// Package is the Debian/Ubuntu package that provides it.
	Package string
	// Present reports whether the host has it.
	Present func() bool
}

// Program is a dependency on an executable found by LookPath.
func Program(name, pkg string) Dep {
	return Dep{What: name, Package: pkg, Present: func() bool {
		_, err := LookPath(name)
		return err == nil
	}}
}

// sbinDirs are where Debian and Ubuntu install system programs (mkfs.ext4,
// e2fsck), which an ordinary user's PATH often leaves out.
var sbinDirs = []string{"/usr/sbin", "/sbin"}

// LookPath finds a program in PATH and, failing that, in the system
// program directories: an ordinary user can run mkfs.ext4 on an image of
// their own, whatever their PATH says.
func LookPath(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, d := range sbinDirs {
		c := d + "/" + name
		if fi, serr := os.Stat(c); serr == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return c, nil
		}
	}
	return "", err
}

// File is a dependency on a file at a fixed path.
func File(path, pkg string) Dep {
	return Dep{What: path, Package: pkg, Present: func() bool {
		_, err := os.Stat(path)
		return err == nil
	}}
}

// MissingError lists missing dependencies with the command that installs
// them.
type MissingError struct {
	Purpose string
	Missing []Dep
}

func (e *MissingError) Error() string {
	var what []string
	for _, d := range e.Missing {
		what = append(what, fmt.Sprintf("%s (package %s)", d.What, d.Package))
	}
	return fmt.Sprintf("%s needs host packages that are missing: %s\ninstall them with:\n  %s",
		e.Purpose, strings.Join(what, ", "), e.InstallCommand())
}

// Packages returns the distinct packages to install, sorted.
func (e *MissingError) Packages() []string {
	var pkgs []string
	for _, d := range e.Missing {
		if !slices.Contains(pkgs, d.Package) {
			pkgs = append(pkgs, d.Package)
		}
	}
	slices.Sort(pkgs)
	return pkgs
}

// InstallCommand is the apt-get line for the missing packages, with sudo
// unless already root.
func (e *MissingError) InstallCommand() string {
	cmd := "apt-get install -y --no-install-recommends " + strings.Join(e.Packages(), " ")
	if os.Geteuid() != 0 {
		cmd = "sudo " + cmd
	}
	return cmd
}

// Check returns a *MissingError naming every absent dependency, or nil.
func Check(purpose string, deps ...Dep) error {
	var missing []Dep
	for _, d := range deps {
		if !d.Present() {
			missing = append(missing, d)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return &MissingError{Purpose: purpose, Missing: missing}
}

// IsStatic reports whether path is an ELF executable with no program
// interpreter, i.e. one that runs in a guest with no shared libraries.
func IsStatic(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false, nil
		}
	}
	return true, nil
}
