// Package accel decides how the VMM runs guest code: with hardware
// virtualisation (KVM) or with QEMU's software emulator (TCG).
//
// "auto" must not simply test for /dev/kvm. Some hosts expose a KVM that
// cannot run a standard guest kernel: PVM ("pagetable virtual machine",
// kvm_pvm) runs only PVM-aware guests, and a normal kernel under it crawls
// and never boots. So auto picks KVM only when /dev/kvm opens read-write
// and a standard KVM vendor module (kvm_intel or kvm_amd) is loaded.
package accel

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Mode is what the user asked for.
type Mode string

// Modes accepted by --accel and MVM_ACCEL.
const (
	Auto Mode = "auto"
	KVM  Mode = "kvm"
	TCG  Mode = "tcg"
)

// ParseMode validates a --accel / MVM_ACCEL value. Empty means auto.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case "":
		return Auto, nil
	case Auto, KVM, TCG:
		return m, nil
	}
	return "", fmt.Errorf("invalid accelerator %q: use auto, kvm or tcg", s)
}

// Choice is the accelerator a run will use and why, for -v output and
// error messages.
type Choice struct {
	Kind   Mode // KVM or TCG, never Auto
	Reason string
}

// Host is what the decision looks at; tests substitute a fake tree.
type Host struct {
	// Root prefixes /dev/kvm and /sys/module; "" means the real root.
	Root string
}

// Resolve turns a mode into a concrete accelerator. An explicit kvm on a
// host whose /dev/kvm cannot be opened is an error (before any VM boots); an
// explicit kvm on a PVM-only host is honoured, since the user may run a
// PVM-aware kernel.
func (h Host) Resolve(m Mode) (Choice, error) {
	kvmErr := h.openKVM()
	vendor := h.vendorModule()
	switch m {
	case TCG:
		return Choice{Kind: TCG, Reason: "requested"}, nil
	case KVM:
		if kvmErr != nil {
			return Choice{}, fmt.Errorf("--accel kvm: %w", kvmErr)
		}
		if vendor == "" {
			return Choice{Kind: KVM, Reason: "requested (no kvm_intel/kvm_amd module: only PVM-aware guest kernels will boot)"}, nil
		}
		return Choice{Kind: KVM, Reason: "requested (" + vendor + ")"}, nil
	case Auto, "":
	default:
		return Choice{}, fmt.Errorf("invalid accelerator %q: use auto, kvm or tcg", m)
	}
	switch {
	case kvmErr != nil:
		return Choice{Kind: TCG, Reason: "software emulation: " + kvmErr.Error()}, nil
	case vendor == "" && h.hasModule("kvm_pvm"):
		return Choice{Kind: TCG, Reason: "software emulation: host KVM is PVM-only (kvm_pvm), which cannot run a standard guest kernel"}, nil
	case vendor == "":
		return Choice{Kind: TCG, Reason: "software emulation: no kvm_intel or kvm_amd module loaded"}, nil
	}
	return Choice{Kind: KVM, Reason: "hardware virtualisation (" + vendor + ")"}, nil
}

func (h Host) path(p string) string { return filepath.Join(h.Root, p) }

func (h Host) openKVM() error {
	f, err := os.OpenFile(h.path("/dev/kvm"), os.O_RDWR, 0)
	if err != nil {
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return errors.New("/dev/kvm does not exist (no KVM on this host)")
		case errors.Is(err, fs.ErrPermission):
			return errors.New("/dev/kvm is not accessible: add your user to the kvm group (sudo usermod -aG kvm $USER) and log in again")
		}
		return fmt.Errorf("open /dev/kvm: %w", err)
	}
	f.Close()
	return nil
}

func (h Host) vendorModule() string {
	for _, m := range []string{"kvm_intel", "kvm_amd"} {
		if h.hasModule(m) {
			return m
		}
	}
	return ""
}

func (h Host) hasModule(name string) bool {
	_, err := os.Stat(h.path("/sys/module/" + name))
	return err == nil
}
