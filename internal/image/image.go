// Package image manages what a microVM boots: a kernel and an initramfs,
// recorded in a small JSON manifest under the user's cache directory. An
// image is immutable once written: runs only read its files (the
// initramfs becomes each guest's own in-memory root), and bootstrap writes
// new files under new content keys instead of changing old ones.
package image

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/mvm-sh/mvm/internal/atomicfile"
)

// DefaultName is the image `mvmctl exec` uses unless told otherwise.
const DefaultName = "default"

// Image is one bootable image.
type Image struct {
	Name string `json:"name"`
	// Kernel is an uncompressed vmlinux with a PVH entry point.
	Kernel string `json:"kernel"`
	// KernelKey identifies how the kernel was made ("user:<path>" for a
	// kernel brought with --kernel).
	KernelKey string `json:"kernel_key"`
	// Initrd is the initramfs (newc cpio) with the agent as /init.
	// LapicTimerHz says the kernel takes lapic_timer_hz= (mvm's own
	// build does, see internal/kernel/patches): under TCG it then gets
	// a one-shot APIC timer and high-resolution timers.
	LapicTimerHz bool      `json:"lapic_timer_hz,omitempty"`
	Initrd       string    `json:"initrd"`
	InitrdKey    string    `json:"initrd_key"`
	Created      time.Time `json:"created"`
}

// userKernelPrefix starts the KernelKey of a kernel brought with --kernel.
const userKernelPrefix = "user:"

// UserKernelKey is the KernelKey of the kernel at path, brought by the
// user rather than built by mvm.
func UserKernelKey(path string) string {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	return userKernelPrefix + path
}

// ErrNotBootstrapped means the image has never been built on this machine.
var ErrNotBootstrapped = errors.New("no default image: run `mvmctl bootstrap` first (it builds the guest kernel and initramfs, about 5 minutes once)")

// Store is the cache directory holding images, kernels and initramfs files.
type Store struct {
	Root string
}

func (s Store) manifest(name string) string {
	return filepath.Join(s.Root, "images", name+".json")
}

// KernelPath is where a built kernel with the given key lives.
func (s Store) KernelPath(key string) string {
	return filepath.Join(s.Root, "kernels", key, "vmlinux")
}

// InitrdPath is where an initramfs with the given key lives.
func (s Store) InitrdPath(key string) string {
	return filepath.Join(s.Root, "initrds", key+".cpio")
}

// BuildDir is scratch space for builds.
func (s Store) BuildDir() string { return filepath.Join(s.Root, "build") }

// Load reads an image manifest and checks that its files exist.
func (s Store) Load(name string) (Image, error) {
	b, err := os.ReadFile(s.manifest(name))
	if errors.Is(err, os.ErrNotExist) {
		if name == DefaultName {
			return Image{}, ErrNotBootstrapped
		}
		return Image{}, fmt.Errorf("image %q not found in %s", name, s.Root)
	}
	if err != nil {
		return Image{}, fmt.Errorf("read image %q: %w", name, err)
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return Image{}, fmt.Errorf("image %q: corrupt manifest %s: %w", name, s.manifest(name), err)
	}
	for _, f := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return Image{}, fmt.Errorf("image %q is incomplete (%w); run `mvmctl bootstrap` to rebuild it", name, err)
		}
	}
	return img, nil
}

// Save writes an image manifest atomically.
func (s Store) Save(img Image) error {
	b, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteBytes(s.manifest(img.Name), 0o644, append(b, '\n'))
}
