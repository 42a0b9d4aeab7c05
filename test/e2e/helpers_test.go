package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
)

type execCmd struct {
	*exec.Cmd
	stderr *bytes.Buffer
}

// machineConfig is a backend configuration for the suite's default image:
// for tests that drive a VM's agent directly rather than through mvmctl.
func machineConfig(t *testing.T, name string) backend.Config {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cacheDir, "images", "default.json"))
	if err != nil {
		t.Fatal(err)
	}
	var img struct{ Kernel, Initrd string }
	if err := json.Unmarshal(b, &img); err != nil {
		t.Fatal(err)
	}
	choice, err := accel.Host{}.Resolve(accel.Auto)
	if err != nil {
		t.Fatal(err)
	}
	return backend.Config{
		Name: name, RunDir: t.TempDir(), Kernel: img.Kernel, Initrd: img.Initrd,
		CPUs: 2, MemoryMiB: 256, Accel: choice.Kind,
	}
}

// startMachine starts cfg with the QEMU backend and stops it when the
// test ends.
func startMachine(t *testing.T, cfg backend.Config) backend.Machine {
	t.Helper()
	m, err := qemu.New(nil).Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	return m
}

// tail is the end of a long output, for a failure message.
func tail(s string) string {
	const max = 4000
	if len(s) > max {
		return "..." + s[len(s)-max:]
	}
	return s
}
