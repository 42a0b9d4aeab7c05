package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
	"github.com/mvm-sh/mvm/internal/helperbin"
	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/initramfs"
	"github.com/mvm-sh/mvm/internal/kernel"
)

// BootstrapOptions control how the default image is built.
type BootstrapOptions struct {
	// Kernel, when set, is a vmlinux the user brings; nothing is compiled.
	Kernel string
	// Agent and Busybox are the static binaries for the initramfs.
	Agent, Busybox string
	// Jobs is make's -j (0: one per CPU).
	Jobs int
	// NoCompile fails instead of compiling a kernel that is not cached.
	NoCompile bool
	// Progress receives human-readable progress lines.
	Progress func(Event)
	Log      *slog.Logger
}

// Event is a progress report from Bootstrap.
type Event struct {
	Step   string // "kernel", "initramfs", "image"
	Detail string
	Kernel *kernel.Progress // set during a kernel build
}

// RuntimeDeps are what running a VM needs from the host.
func RuntimeDeps() []hostdeps.Dep {
	return []hostdeps.Dep{hostdeps.Program(qemu.Binary, "qemu-system-x86")}
}

// Bootstrap builds (or finds cached) kernel and initramfs and records them
// as the default image. It is idempotent: with nothing changed it only
// verifies and returns.
func Bootstrap(ctx context.Context, s Store, opts BootstrapOptions) (Image, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	progress := func(e Event) {
		if opts.Progress != nil {
			opts.Progress(e)
		}
	}
	deps := append(RuntimeDeps(), hostdeps.File(opts.Busybox, "busybox-static"))
	if opts.Kernel == "" {
		deps = append(deps, kernel.Deps()...)
	}
	if err := hostdeps.Check("mvmctl bootstrap", deps...); err != nil {
		return Image{}, err
	}
	for name, p := range map[string]string{"mvm-agent": opts.Agent, "busybox": opts.Busybox} {
		static, err := hostdeps.IsStatic(p)
		if err != nil {
			return Image{}, fmt.Errorf("check %s: %w", name, err)
		}
		if !static {
			hint := "install busybox-static instead of busybox"
			if name == "mvm-agent" {
				hint = "build it with CGO_ENABLED=0 (make build does)"
			}
			return Image{}, fmt.Errorf("%s at %s is dynamically linked, but the guest has no shared libraries: %s", name, p, hint)
		}
	}

	img := Image{Name: DefaultName, Created: time.Now().UTC()}
	var err error
	if img.Kernel, img.KernelKey, err = ensureKernel(ctx, s, opts, progress); err != nil {
		return Image{}, err
	}
	if img.LapicTimerHz, err = kernel.TakesLapicTimerHz(img.Kernel); err != nil {
		return Image{}, err
	}
	if img.Initrd, img.InitrdKey, err = ensureInitrd(s, opts, progress); err != nil {
		return Image{}, err
	}
	if old, err := s.Load(DefaultName); err == nil && old.Kernel == img.Kernel && old.Initrd == img.Initrd && old.LapicTimerHz == img.LapicTimerHz {
		progress(Event{Step: "image", Detail: "default image is up to date"})
		return old, nil
	}
	if err := s.Save(img); err != nil {
		return Image{}, fmt.Errorf("save image: %w", err)
	}
	progress(Event{Step: "image", Detail: "default image ready"})
	return img, nil
}

func ensureKernel(ctx context.Context, s Store, opts BootstrapOptions, progress func(Event)) (path, key string, err error) {
	if opts.Kernel != "" {
		abs, err := filepath.Abs(opts.Kernel)
		if err != nil {
			return "", "", err
		}
		if _, err := os.Stat(abs); err != nil {
			return "", "", fmt.Errorf("--kernel: %w", err)
		}
		progress(Event{Step: "kernel", Detail: "using " + abs})
		return abs, UserKernelKey(abs), nil
	}
	tarball, err := kernel.FindSource()
	if err != nil {
		return "", "", err
	}
	progress(Event{Step: "kernel", Detail: "hashing " + tarball})
	key, err = kernel.Key(tarball)
	if err != nil {
		return "", "", err
	}
	path = s.KernelPath(key)
	if _, err := os.Stat(path); err == nil {
		progress(Event{Step: "kernel", Detail: "cached " + path})
		return path, key, nil
	}
	if opts.NoCompile {
		return "", "", fmt.Errorf("guest kernel %s is not built and --no-compile was given; run `mvmctl bootstrap` once without it", key)
	}
	progress(Event{Step: "kernel", Detail: fmt.Sprintf("building from %s (one time; about 5 minutes on 2 cores)", filepath.Base(tarball))})
	b := &kernel.Builder{
		Tarball:  tarball,
		WorkDir:  filepath.Join(s.BuildDir(), "kernel-"+key),
		LogFile:  filepath.Join(s.BuildDir(), "kernel-"+key+".log"),
		Jobs:     opts.Jobs,
		Progress: func(p kernel.Progress) { progress(Event{Step: "kernel", Kernel: &p}) },
		Log:      opts.Log,
	}
	if err := os.MkdirAll(s.BuildDir(), 0o755); err != nil {
		return "", "", err
	}
	if err := b.Build(ctx, path); err != nil {
		return "", "", fmt.Errorf("build guest kernel: %w", err)
	}
	_ = os.Remove(b.LogFile)
	return path, key, nil
}

func ensureInitrd(s Store, opts BootstrapOptions, progress func(Event)) (path, key string, err error) {
	applets, err := initramfs.BusyboxApplets(opts.Busybox)
	if err != nil {
		return "", "", err
	}
	if key, err = initrdKey(opts.Agent, opts.Busybox, applets); err != nil {
		return "", "", err
	}
	path = s.InitrdPath(key)
	if _, err := os.Stat(path); err == nil {
		progress(Event{Step: "initramfs", Detail: "cached " + path})
		return path, key, nil
	}
	err = atomicfile.Write(path, 0o644, func(w io.Writer) error {
		return initramfs.Write(w, initramfs.Spec{Agent: opts.Agent, Busybox: opts.Busybox, Applets: applets})
	})
	if err != nil {
		return "", "", fmt.Errorf("write initramfs: %w", err)
	}
	progress(Event{Step: "initramfs", Detail: "wrote " + path})
	return path, key, nil
}

// InitrdKey is the key of the initramfs Bootstrap makes from agent and
// busybox. An image whose InitrdKey differs was built from other binaries:
// its guest runs another agent than the one beside mvmctl.
func InitrdKey(agent, busybox string) (string, error) {
	applets, err := initramfs.BusyboxApplets(busybox)
	if err != nil {
		return "", err
	}
	return initrdKey(agent, busybox, applets)
}

func initrdKey(agent, busybox string, applets []string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "layout %s\napplets %s\n", initramfs.LayoutVersion, strings.Join(applets, " "))
	for _, f := range []string{agent, busybox} {
		if err := hashFile(h, f); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:24], nil
}

func hashFile(h io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fmt.Fprintf(h, "file %s\n", filepath.Base(path))
	_, err = io.Copy(h, f)
	return err
}

// FindAgent locates the mvm-agent binary (see helperbin.Find for the
// order; MVM_AGENT overrides it).
func FindAgent() (string, error) {
	return helperbin.Find("mvm-agent", "MVM_AGENT")
}

// DefaultBusybox is the static busybox of Debian's busybox-static package;
// MVM_BUSYBOX overrides it.
func DefaultBusybox() string {
	if p := os.Getenv("MVM_BUSYBOX"); p != "" {
		return p
	}
	return "/bin/busybox"
}
