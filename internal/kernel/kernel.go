// Package kernel builds the guest kernel from the distribution's kernel
// source package: tinyconfig plus the fragment in microvm.config (virtio
// over MMIO, virtio-serial, virtio-blk, ext4 and overlayfs built in; no
// ACPI, PCI or modules), producing an uncompressed vmlinux that QEMU boots
// through its PVH entry point. The result is cached under a key derived
// from every input, so a rebuild happens only when something changed.
package kernel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/hostdeps"
)

// Fragment is the config fragment merged over tinyconfig.
//
//go:embed microvm.config
var Fragment []byte

// patches are applied to the source, in name order, before it is
// configured. Each says in its own comment why it is carried; a patch
// that does not apply fails the build (a kernel without it would be
// configured for what it cannot do, see docs/kernel.md).
//
//go:embed patches/*.patch
var patches embed.FS

// recipeVersion changes whenever Build changes what it produces from the
// same source and fragment.
const recipeVersion = "2"

// expectedSteps approximates the number of build steps make prints for
// this config, for a progress estimate only.
const expectedSteps = 1650

// Deps are the host packages a kernel build needs.
func Deps() []hostdeps.Dep {
	return []hostdeps.Dep{
		hostdeps.Program("make", "make"),
		hostdeps.Program("gcc", "gcc"),
		hostdeps.Program("flex", "flex"),
		hostdeps.Program("bison", "bison"),
		hostdeps.Program("bc", "bc"),
		hostdeps.Program("tar", "tar"),
		hostdeps.Program("patch", "patch"),
		hostdeps.Program("xz", "xz-utils"),
		hostdeps.Program("bzip2", "bzip2"),
		hostdeps.File("/usr/include/libelf.h", "libelf-dev"),
		sourceDep(),
	}
}

// sourceDep is satisfied by either layout of the kernel source package.
func sourceDep() hostdeps.Dep {
	return hostdeps.Dep{What: sourceGlob, Package: sourcePackage(), Present: func() bool {
		_, err := FindSource()
		return err == nil
	}}
}

// sourceGlob matches Debian's kernel source tarball; ubuntuSourceGlob
// Ubuntu's, which sits in a directory of its own.
const (
	sourceGlob       = "/usr/src/linux-source-*.tar.xz"
	ubuntuSourceGlob = "/usr/src/linux-source-*/linux-source-*.tar.bz2"
)

// sourcePackage names the source package to suggest: Debian 12 ships
// linux-source-6.1; elsewhere the unversioned linux-source meta package
// pulls the current one.
func sourcePackage() string {
	if b, err := os.ReadFile("/etc/debian_version"); err == nil && strings.HasPrefix(string(b), "12") {
		return "linux-source-6.1"
	}
	return "linux-source"
}

// FindSource returns the newest kernel source tarball in /usr/src.
func FindSource() (string, error) {
	m, _ := filepath.Glob(sourceGlob)
	u, _ := filepath.Glob(ubuntuSourceGlob)
	m = append(m, u...)
	if len(m) == 0 {
		return "", &hostdeps.MissingError{Purpose: "building the guest kernel", Missing: []hostdeps.Dep{{What: sourceGlob, Package: sourcePackage()}}}
	}
	slices.SortFunc(m, compareVersions)
	return m[len(m)-1], nil
}

// compareVersions orders linux-source-6.1.tar.xz before
// linux-source-6.10.tar.xz.
func compareVersions(a, b string) int {
	num := regexp.MustCompile(`\d+`)
	as, bs := num.FindAllString(a, -1), num.FindAllString(b, -1)
	for i := 0; i < len(as) && i < len(bs); i++ {
		if d := len(as[i]) - len(bs[i]); d != 0 {
			return d
		}
		if c := strings.Compare(as[i], bs[i]); c != 0 {
			return c
		}
	}
	return len(as) - len(bs)
}

// Key identifies a build: the recipe, the fragment, and the content of the
// source tarball.
func Key(tarball string) (string, error) {
	f, err := os.Open(tarball)
	if err != nil {
		return "", fmt.Errorf("hash kernel source: %w", err)
	}
	defer f.Close()
	src := sha256.New()
	if _, err := io.Copy(src, f); err != nil {
		return "", fmt.Errorf("hash kernel source %s: %w", tarball, err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "recipe %s\nsource %x\nfragment %x\n", recipeVersion, src.Sum(nil), sha256.Sum256(Fragment))
	names, err := patchNames()
	if err != nil {
		return "", err
	}
	for _, n := range names {
		b, err := patches.ReadFile(n)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "patch %s %x\n", n, sha256.Sum256(b))
	}
	return hex.EncodeToString(h.Sum(nil))[:24], nil
}

// Progress is a build status update.
type Progress struct {
	Phase   string // "extract", "configure", "compile", "done"
	Step    int    // compile steps so far
	Total   int    // expected compile steps (an estimate)
	Elapsed time.Duration
}

// Builder builds one kernel.
type Builder struct {
	Tarball string
	// WorkDir is created for the build and removed after a success.
	WorkDir string
	// LogFile receives the build's full output.
	LogFile string
	Jobs    int
	// Progress, if set, is called from the build goroutine.
	Progress func(Progress)
	Log      *slog.Logger
}

// Build compiles the kernel and writes the vmlinux to dst (atomically).
func (b *Builder) Build(ctx context.Context, dst string) error {
	if err := hostdeps.Check("building the guest kernel", Deps()...); err != nil {
		return err
	}
	if b.Jobs < 1 {
		b.Jobs = runtime.NumCPU()
	}
	if b.Log == nil {
		b.Log = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	report := func(p Progress) {
		p.Elapsed = time.Since(start)
		if b.Progress != nil {
			b.Progress(p)
		}
	}
	if err := os.RemoveAll(b.WorkDir); err != nil {
		return err
	}
	if err := os.MkdirAll(b.WorkDir, 0o755); err != nil {
		return err
	}
	logf, err := os.Create(b.LogFile)
	if err != nil {
		return fmt.Errorf("create build log: %w", err)
	}
	defer logf.Close()

	run := func(onLine func(string), name string, args ...string) error {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Dir = b.WorkDir
		cmd.Env = append(os.Environ(),
			"KBUILD_BUILD_USER=mvm", "KBUILD_BUILD_HOST=mvm",
			"KBUILD_BUILD_TIMESTAMP=2000-01-01", "LC_ALL=C")
		pr, pw := io.Pipe()
		cmd.Stdout = pw
		cmd.Stderr = pw
		fmt.Fprintf(logf, "$ %s %s\n", name, strings.Join(args, " "))
		done := make(chan struct{})
		go func() {
			defer close(done)
			sc := bufio.NewScanner(pr)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				fmt.Fprintln(logf, sc.Text())
				if onLine != nil {
					onLine(sc.Text())
				}
			}
			_, _ = io.Copy(io.Discard, pr)
		}()
		err := cmd.Run()
		pw.Close()
		<-done
		if err != nil {
			return fmt.Errorf("%s %s: %w (see %s)", name, strings.Join(args, " "), err, b.LogFile)
		}
		return nil
	}

	report(Progress{Phase: "extract"})
	if err := run(nil, "tar", "-xf", b.Tarball, "-C", b.WorkDir); err != nil {
		return err
	}
	src, err := sourceDir(b.WorkDir)
	if err != nil {
		return err
	}
	if err := applyPatches(ctx, run, src); err != nil {
		return err
	}
	out := filepath.Join(b.WorkDir, "out")
	frag := filepath.Join(b.WorkDir, "microvm.config")
	if err := os.WriteFile(frag, Fragment, 0o644); err != nil {
		return err
	}

	report(Progress{Phase: "configure"})
	mk := func(onLine func(string), args ...string) error {
		return run(onLine, "make", append([]string{"-C", src, "O=" + out}, args...)...)
	}
	if err := mk(nil, "tinyconfig"); err != nil {
		return err
	}
	if err := run(nil, filepath.Join(src, "scripts/kconfig/merge_config.sh"), "-m", "-O", out, filepath.Join(out, ".config"), frag); err != nil {
		return err
	}
	if err := mk(nil, "olddefconfig"); err != nil {
		return err
	}
	if err := VerifyConfig(filepath.Join(out, ".config"), Fragment); err != nil {
		return err
	}

	steps := 0
	last := time.Now()
	report(Progress{Phase: "compile", Total: expectedSteps})
	err = mk(func(line string) {
		if len(line) > 2 && line[0] == ' ' && line[1] == ' ' && line[2] != ' ' {
			steps++
			if time.Since(last) > 250*time.Millisecond {
				last = time.Now()
				report(Progress{Phase: "compile", Step: steps, Total: max(expectedSteps, steps)})
			}
		}
	}, "-j"+fmt.Sprint(b.Jobs), "vmlinux")
	if err != nil {
		return err
	}
	if err := atomicfile.Copy(filepath.Join(out, "vmlinux"), dst, 0o644); err != nil {
		return err
	}
	report(Progress{Phase: "done", Step: steps, Total: steps})
	b.Log.Debug("kernel built", "dst", dst, "elapsed", time.Since(start))
	return os.RemoveAll(b.WorkDir)
}

// patchNames lists the embedded patches in the order they apply.
func patchNames() ([]string, error) {
	m, err := fs.Glob(patches, "patches/*.patch")
	if err != nil {
		return nil, err
	}
	slices.Sort(m)
	return m, nil
}

// applyPatches applies every embedded patch to the source tree at src.
func applyPatches(ctx context.Context, run func(func(string), string, ...string) error, src string) error {
	names, err := patchNames()
	if err != nil {
		return err
	}
	for _, n := range names {
		b, err := patches.ReadFile(n)
		if err != nil {
			return err
		}
		f := filepath.Join(filepath.Dir(src), path.Base(n))
		if err := os.WriteFile(f, b, 0o644); err != nil {
			return err
		}
		if err := run(nil, "patch", "-d", src, "-p1", "--forward", "--batch", "-i", f); err != nil {
			return fmt.Errorf("kernel patch %s does not apply to this source: %w", path.Base(n), err)
		}
	}
	return ctx.Err()
}

func sourceDir(work string) (string, error) {
	m, _ := filepath.Glob(filepath.Join(work, "linux-source-*"))
	for _, d := range m {
		if fi, err := os.Stat(filepath.Join(d, "Makefile")); err == nil && fi.Mode().IsRegular() {
			return d, nil
		}
	}
	return "", errors.New("kernel source tarball did not unpack to a linux-source-* directory")
}

// VerifyConfig checks that every line of the fragment survived olddefconfig
// in the final .config: a "=y" the kernel dropped for an unmet dependency
// would otherwise surface only as a guest that cannot find its devices.
func VerifyConfig(configPath string, fragment []byte) error {
	b, err := os.ReadFile(configPath)
	if err != nil {
		return err
	}
	have := make(map[string]string)
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			have[k] = v
		}
	}
	var lost []string
	for _, l := range strings.Split(string(fragment), "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "CONFIG_"):
			k, v, _ := strings.Cut(l, "=")
			if have[k] != v {
				lost = append(lost, fmt.Sprintf("%s (got %q)", l, have[k]))
			}
		case strings.HasPrefix(l, "# CONFIG_") && strings.HasSuffix(l, " is not set"):
			k := strings.TrimSuffix(strings.TrimPrefix(l, "# "), " is not set")
			if v, ok := have[k]; ok && v != "n" {
				lost = append(lost, fmt.Sprintf("%s (got %s=%s)", l, k, v))
			}
		}
	}
	if len(lost) > 0 {
		return fmt.Errorf("kernel config lost fragment settings (unmet dependencies in this kernel version?): %s", strings.Join(lost, "; "))
	}
	return nil
}

// lapicParam is the boot parameter patches/0001 adds.
var lapicParam = []byte("lapic_timer_hz")

// TakesLapicTimerHz reports whether the uncompressed kernel at path knows
// the lapic_timer_hz= parameter (it carries patches/0001, as mvm's own
// build does): it is then given the APIC timer's rate instead of
// noapictimer under TCG. The parameter's name is in the image's
// .init.setup strings; a compressed kernel (bzImage) reads as one without.
func TakesLapicTimerHz(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20+len(lapicParam))
	keep := 0
	for {
		n, err := io.ReadFull(f, buf[keep:])
		if bytes.Contains(buf[:keep+n], lapicParam) {
			return true, nil
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("read kernel %s: %w", path, err)
		}
		keep = copy(buf, buf[keep+n-len(lapicParam)+1:keep+n])
	}
}
