package helperbin

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFind(t *testing.T) {
	write := func(path string, perm os.FileMode) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte("#!/bin/sh\n"), perm); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, perm); err != nil {
			t.Fatal(err)
		}
		return path
	}
	old := Dirs
	t.Cleanup(func() { Dirs = old })
	tests := []struct {
		name  string
		setup func(root string) (want string)
		env   string
	}{
		{"the variable wins", func(root string) string {
			write(filepath.Join(root, "bin", "mvmctl"), 0o755)
			write(filepath.Join(root, "bin", "mvm-test-helper"), 0o755)
			return filepath.Join(root, "given")
		}, "given"},
		{"beside mvmctl on PATH", func(root string) string {
			write(filepath.Join(root, "bin", "mvmctl"), 0o755)
			return write(filepath.Join(root, "bin", "mvm-test-helper"), 0o755)
		}, ""},
		{"in the libexec of mvmctl's prefix", func(root string) string {
			write(filepath.Join(root, "bin", "mvmctl"), 0o755)
			return write(filepath.Join(root, "libexec", "mvm", "mvm-test-helper"), 0o755)
		}, ""},
		{"in the install directories", func(root string) string {
			Dirs = []string{filepath.Join(root, "nothing"), filepath.Join(root, "usr", "libexec", "mvm")}
			return write(filepath.Join(root, "usr", "libexec", "mvm", "mvm-test-helper"), 0o755)
		}, ""},
		{"nowhere", func(root string) string { return "" }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			Dirs = nil
			want := tt.setup(root)
			t.Setenv("PATH", filepath.Join(root, "bin"))
			t.Setenv("MVM_TEST_HELPER", "")
			if tt.env != "" {
				t.Setenv("MVM_TEST_HELPER", want)
			}
			got, err := Find("mvm-test-helper", "MVM_TEST_HELPER")
			if want == "" {
				if err == nil || !strings.Contains(err.Error(), "MVM_TEST_HELPER") {
					t.Fatalf("found %q (%v); want an error naming the variable", got, err)
				}
				return
			}
			if err != nil || got != want {
				t.Fatalf("Find = %q, %v; want %q", got, err, want)
			}
		})
	}
}

// TestFindRefusesWritableAsRoot: root never runs a helper that another
// user could have replaced.
func TestFindRefusesWritableAsRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the check applies to root only")
	}
	root := t.TempDir()
	Dirs = []string{root}
	t.Cleanup(func() { Dirs = nil })
	t.Setenv("PATH", "")
	p := filepath.Join(root, "mvm-test-helper")
	if err := os.WriteFile(p, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o757); err != nil {
		t.Fatal(err)
	}
	if got, err := Find("mvm-test-helper", "MVM_TEST_HELPER"); err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("Find = %q, %v; want it refused", got, err)
	}
}
