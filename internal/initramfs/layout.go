package initramfs

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"sort"
	"strings"
)

// LayoutVersion changes whenever Write lays the archive out differently, so
// that caches keyed on the inputs notice.
const LayoutVersion = "1"

// Spec names the binaries that go into the default guest root.
type Spec struct {
	// Agent is the static mvm-agent binary; it becomes /init.
	Agent string
	// Busybox is a static busybox; every applet it lists is linked to it.
	Busybox string
	// Applets are paths such as "bin/sh" from `busybox --list-full`.
	Applets []string
}

// dirs of the guest root, with their modes.
var dirs = []struct {
	name string
	perm fs.FileMode
}{
	{"bin", 0o755}, {"sbin", 0o755}, {"usr", 0o755}, {"usr/bin", 0o755},
	{"usr/sbin", 0o755}, {"usr/local", 0o755}, {"usr/local/bin", 0o755},
	{"etc", 0o755}, {"root", 0o700}, {"home", 0o755}, {"mnt", 0o755},
	{"proc", 0o555}, {"sys", 0o555}, {"dev", 0o755}, {"run", 0o755},
	{"tmp", 0o777 | fs.ModeSticky}, {"var", 0o755}, {"var/tmp", 0o777 | fs.ModeSticky},
}

// etcFiles are the few files programs expect to find.
var etcFiles = []struct{ name, data string }{
	{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
	{"etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"},
	{"etc/hostname", "mvm\n"},
	{"etc/hosts", "127.0.0.1\tlocalhost mvm\n::1\tlocalhost ip6-localhost\n"},
	{"etc/os-release", "NAME=mvm\nID=mvm\nPRETTY_NAME=\"mvm microVM (busybox)\"\n"},
}

// Write lays out the default guest root as a newc archive on w: the agent
// as /init, busybox with its applet links, device nodes the kernel needs
// before devtmpfs is mounted, and a minimal /etc.
func Write(w io.Writer, spec Spec) error {
	cw := NewWriter(w)
	for _, d := range dirs {
		if err := cw.Dir(d.name, d.perm); err != nil {
			return err
		}
	}
	// The kernel opens /dev/console for init's stdio before any mount.
	if err := cw.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := cw.CharDev("dev/null", 0o666, 1, 3); err != nil {
		return err
	}
	for _, f := range etcFiles {
		if err := cw.File(f.name, 0o644, []byte(f.data)); err != nil {
			return err
		}
	}
	if err := addFile(cw, "init", spec.Agent); err != nil {
		return err
	}
	if err := cw.Symlink("sbin/mvm-agent", "/init"); err != nil {
		return err
	}
	if err := addFile(cw, "bin/busybox", spec.Busybox); err != nil {
		return err
	}
	taken := map[string]bool{"init": true, "bin/busybox": true, "sbin/mvm-agent": true}
	for _, d := range dirs {
		taken[d.name] = true
	}
	applets := append([]string(nil), spec.Applets...)
	sort.Strings(applets)
	for _, a := range applets {
		a, err := cleanName(a)
		if err != nil || taken[a] || a == "linuxrc" {
			continue
		}
		taken[a] = true
		if err := cw.Symlink(a, "/bin/busybox"); err != nil {
			return err
		}
	}
	return cw.Close()
}

func addFile(cw *Writer, name, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("initramfs: %s is not a regular file", src)
	}
	return cw.FileFrom(name, 0o755, fi.Size(), f)
}

// BusyboxApplets asks a busybox binary for its applets' install paths.
func BusyboxApplets(busybox string) ([]string, error) {
	out, err := exec.Command(busybox, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("list busybox applets with %s --list-full: %w", busybox, err)
	}
	var applets []string
	for _, l := range bytes.Split(out, []byte("\n")) {
		if s := strings.TrimSpace(string(l)); s != "" {
			applets = append(applets, s)
		}
	}
	if len(applets) == 0 {
		return nil, fmt.Errorf("%s --list-full printed no applets", busybox)
	}
	return applets, nil
}
