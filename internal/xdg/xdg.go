// Package xdg locates mvm's directories under the XDG base directory
// specification, with MVM_* overrides for tests and unusual setups.
package xdg

import (
	"fmt"
	"os"
	"path/filepath"
)

func home() (string, error) {
	h, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("locate home directory: %w", err)
	}
	return h, nil
}

// CacheDir holds what can be rebuilt: kernels, initramfs images,
// templates' converted images.
// MVM_CACHE_DIR, else $XDG_CACHE_HOME/mvm, else ~/.cache/mvm.
func CacheDir() (string, error) {
	return dir("MVM_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
}

// DataDir holds user data: templates. MVM_DATA_DIR, else
// $XDG_DATA_HOME/mvm, else ~/.local/share/mvm.
func DataDir() (string, error) {
	return dir("MVM_DATA_DIR", "XDG_DATA_HOME", ".local/share")
}

// StateDir holds what outlives a run but is not a cache: console logs of
// failed runs, and staged data a failed write-back left behind.
// MVM_STATE_DIR, else $XDG_STATE_HOME/mvm, else ~/.local/state/mvm.
func StateDir() (string, error) {
	return dir("MVM_STATE_DIR", "XDG_STATE_HOME", ".local/state")
}

// RunDir holds one private directory per live run: MVM_RUN_DIR, else
// StateDir()/runs. Not $XDG_RUNTIME_DIR, although runs are transient: it
// is a tmpfs on most desktops, where the guest's writes to a read-write
// directory's scratch image would cost RAM, and from where keeping a
// failed write-back under StateDir would be a copy instead of a rename.
// Never a shared /tmp: another user could pre-create it.
func RunDir() (string, error) {
	if d := os.Getenv("MVM_RUN_DIR"); d != "" {
		return filepath.Abs(d)
	}
	s, err := StateDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(s, "runs"), nil
}

func dir(override, xdgVar, fallback string) (string, error) {
	if d := os.Getenv(override); d != "" {
		return filepath.Abs(d)
	}
	if d := os.Getenv(xdgVar); filepath.IsAbs(d) {
		return filepath.Join(d, "mvm"), nil
	}
	h, err := home()
	if err != nil {
		return "", err
	}
	return filepath.Join(h, fallback, "mvm"), nil
}
