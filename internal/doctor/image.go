package doctor

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/units"
)

const bootstrapCmd = "mvmctl bootstrap"

// xenElfnotePhys32Entry is the ELF note (owner "Xen") that holds a
// kernel's PVH entry point, through which QEMU boots an uncompressed
// vmlinux.
const xenElfnotePhys32Entry = 18

// checkPVH reports whether kernel is an x86-64 ELF with a PVH entry note.
func checkPVH(kernel string) error {
	f, err := elf.Open(kernel)
	if err != nil {
		return fmt.Errorf("not an ELF vmlinux: %w", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("built for %s, not x86-64", f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE || p.Filesz > 1<<20 {
			continue
		}
		b, err := io.ReadAll(io.LimitReader(p.Open(), int64(p.Filesz)))
		if err != nil {
			return fmt.Errorf("read ELF notes: %w", err)
		}
		if hasNote(b, f.ByteOrder, "Xen", xenElfnotePhys32Entry) {
			return nil
		}
	}
	return errors.New("no PVH entry point (CONFIG_PVH): QEMU cannot boot it")
}

// hasNote walks an ELF note segment for a note of the given owner and
// type.
func hasNote(b []byte, bo binary.ByteOrder, owner string, typ uint32) bool {
	align := func(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
	for len(b) >= 12 {
		namesz, descsz, t := bo.Uint32(b), bo.Uint32(b[4:]), bo.Uint32(b[8:])
		b = b[12:]
		if align(namesz)+align(descsz) > uint64(len(b)) {
			return false
		}
		name := string(bytes.TrimRight(b[:namesz], "\x00"))
		if name == owner && t == typ {
			return true
		}
		b = b[align(namesz)+align(descsz):]
	}
	return false
}

// checkCPIO reports whether initrd starts like a newc cpio archive, the
// format bootstrap writes.
func checkCPIO(initrd string) error {
	f, err := os.Open(initrd)
	if err != nil {
		return err
	}
	defer f.Close()
	magic := make([]byte, 6)
	if _, err := io.ReadFull(f, magic); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if string(magic) != "070701" {
		return errors.New("not a newc cpio archive")
	}
	return nil
}

func sizeOf(path string) string {
	fi, err := os.Stat(path)
	if err != nil {
		return "?"
	}
	return units.FormatBytes(fi.Size())
}

func checkImage(h *Host, f *facts) Result {
	r := Result{ID: "image"}
	if f.imgErr != nil {
		r.Status, r.Fix = Fail, bootstrapCmd
		if errors.Is(f.imgErr, image.ErrNotBootstrapped) {
			r.Message = "no default image in " + h.CacheDir
		} else {
			r.Message = f.imgErr.Error()
		}
		return r
	}
	img := f.img
	if err := checkPVH(img.Kernel); err != nil {
		r.Status, r.Fix = Fail, bootstrapCmd
		r.Message = fmt.Sprintf("the default image's kernel %s: %v", img.Kernel, err)
		return r
	}
	if err := checkCPIO(img.Initrd); err != nil {
		r.Status, r.Fix = Fail, bootstrapCmd
		r.Message = fmt.Sprintf("the default image's initramfs %s: %v", img.Initrd, err)
		return r
	}
	if f.qemu.dryRan && f.qemu.dry.err != nil {
		r.Status, r.Fix = Fail, bootstrapCmd
		r.Message = fmt.Sprintf("QEMU cannot load the default image (%s, %s): %v", img.Kernel, img.Initrd, f.qemu.dry.err)
		return r
	}
	r.Status = OK
	r.Message = fmt.Sprintf("default image in %s: kernel %s, initramfs %s", h.CacheDir, sizeOf(img.Kernel), sizeOf(img.Initrd))
	if f.qemu.dryRan {
		r.Message += fmt.Sprintf("; QEMU loads it (%s)", f.accel.Kind)
	}
	return r
}

func checkKernel(h *Host, f *facts) Result {
	r := Result{ID: "kernel"}
	src, srcErr := h.kernelSource()
	if f.imgErr == nil {
		r.Status = OK
		if user, ok := strings.CutPrefix(f.img.KernelKey, "user:"); ok {
			r.Message = "the default image boots " + user + " (mvmctl bootstrap --kernel)"
			return r
		}
		r.Message = "cached " + f.img.Kernel
		if srcErr == nil {
			r.Message += "; the kernel source for rebuilds is " + src
		} else {
			r.Message += "; no kernel source installed (needed only to build it again)"
		}
		return r
	}
	if m := h.missing("building the guest kernel", h.kernelDeps()...); m != nil {
		r.Status, r.Fix = Fail, h.install(m.Packages()...)
		r.Message = "no guest kernel built, and building one needs what is missing: " + describeMissing(m)
		return r
	}
	r.Status = OK
	if srcErr == nil {
		r.Message = "not built yet: mvmctl bootstrap compiles it from " + src + " (about 5 minutes on 2 cores, once)"
	} else {
		r.Message = "not built yet: mvmctl bootstrap compiles it from the kernel source"
	}
	return r
}

func describeMissing(m *hostdeps.MissingError) string {
	var what []string
	for _, d := range m.Missing {
		what = append(what, d.What+" ("+d.Package+")")
	}
	return strings.Join(what, ", ")
}

// neededByBootstrap is the status of something only bootstrap needs:
// a failure when there is no image yet, a warning otherwise.
func neededByBootstrap(f *facts) Status {
	if f.imgErr != nil {
		return Fail
	}
	return Warn
}

func checkAgent(h *Host, f *facts) Result {
	r := Result{ID: "agent"}
	switch {
	case h.AgentErr != nil:
		r.Status, r.Fix = neededByBootstrap(f), "make build"
		r.Message = h.AgentErr.Error()
	case f.agentErr != nil:
		r.Status, r.Fix = neededByBootstrap(f), "make build"
		r.Message = fmt.Sprintf("mvm-agent at %s: %v", h.Agent, f.agentErr)
	case !f.agentStatic:
		r.Status, r.Fix = neededByBootstrap(f), "make build"
		r.Message = fmt.Sprintf("mvm-agent at %s is dynamically linked, but the guest has no shared libraries (make build links it statically)", h.Agent)
	case f.imgErr == nil && f.agentKey != "" && f.agentKey != f.img.InitrdKey:
		// The guest runs the agent the initramfs holds: an mvmctl built
		// later may speak a protocol it does not.
		r.Status, r.Fix = Warn, bootstrapCmd
		r.Message = fmt.Sprintf("the default image was built from another mvm-agent or busybox than %s and %s: its guest may not speak this mvmctl's protocol", h.Agent, h.Busybox)
	default:
		r.Status, r.Message = OK, "mvm-agent at "+h.Agent+" (static)"
		if f.imgErr == nil && f.agentKey == f.img.InitrdKey {
			r.Message += ", the one in the default image"
		}
	}
	return r
}

func checkBusybox(h *Host, f *facts) Result {
	r := Result{ID: "busybox"}
	if m := h.missing("mvmctl bootstrap", hostdeps.File(h.Busybox, "busybox-static")); m != nil {
		r.Status, r.Fix = neededByBootstrap(f), h.install("busybox-static")
		r.Message = h.Busybox + " is missing: mvmctl bootstrap puts busybox in the guest"
		return r
	}
	static, err := hostdeps.IsStatic(h.Busybox)
	switch {
	case err != nil:
		r.Status, r.Fix = neededByBootstrap(f), h.install("busybox-static")
		r.Message = err.Error()
	case !static:
		r.Status, r.Fix = neededByBootstrap(f), h.install("busybox-static")
		r.Message = h.Busybox + " is dynamically linked, but the guest has no shared libraries: install busybox-static instead of busybox"
	default:
		r.Status, r.Message = OK, h.Busybox+" (static)"
	}
	return r
}
