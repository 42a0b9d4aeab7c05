package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestRootHas reads a real ext4 image, as notFoundHint reads a template's
// disk: a command in a PATH directory is found, also as a link; one only
// reachable through a linked directory, or elsewhere, is not.
func TestRootHas(t *testing.T) {
	src := t.TempDir()
	for _, d := range []string{"usr/bin", "usr/local/bin", "opt/tool"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"usr/bin/python3.11", "opt/tool/hidden", "usr/local/bin/node"} {
		if err := os.WriteFile(filepath.Join(src, f), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for link, target := range map[string]string{"usr/bin/python3": "python3.11", "bin": "opt/tool"} {
		if err := os.Symlink(target, filepath.Join(src, link)); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(t.TempDir(), "root.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", src, img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"python3", true}, {"python3.11", true}, {"node", true},
		{"hidden", false}, // only through /bin, a link
		{"perl", false}, {"tool", false},
	} {
		if got := rootHas(img, tc.name); got != tc.want {
			t.Errorf("rootHas(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
	if rootHas(filepath.Join(t.TempDir(), "missing.ext4"), "python3") {
		t.Error("a missing image has python3")
	}
}
