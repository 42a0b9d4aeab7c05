package mvm

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestPruneStaleSnapshots(t *testing.T) {
	d := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(d, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kernel, initrd, qemu := file("vmlinux", "kernel"), file("initrd", "initrd"), file("qemu", "qemu")
	id := func(p string) string {
		v, err := fileIdentity(p)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	key := func(vmm, k, i string) string {
		return strings.Join([]string{"format " + snapshotFormat, "vmm " + vmm, "kernel " + k, "initrd " + i, "cpus 2"}, "\n")
	}
	vmm := "qemu/1 " + id(qemu)
	current := key(vmm, id(kernel), id(initrd))
	root := filepath.Join(d, "snapshots")
	snap := func(name string, meta *snapshotMeta) {
		dir := filepath.Join(root, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if meta == nil {
			return
		}
		b, _ := json.Marshal(meta)
		if err := os.WriteFile(filepath.Join(dir, "snapshot.json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A kernel rebuilt in place: its identity changes.
	oldKernel := id(kernel)
	time.Sleep(10 * time.Millisecond)
	file("vmlinux", "kernel, rebuilt")
	current = key(vmm, id(kernel), id(initrd))
	snap("rebuilt-kernel", &snapshotMeta{Format: snapshotFormat, Key: key(vmm, oldKernel, id(initrd))})
	snap("current", &snapshotMeta{Format: snapshotFormat, Key: current})
	snap("other-shape", &snapshotMeta{Format: snapshotFormat, Key: strings.Replace(current, "cpus 2", "cpus 4", 1)})
	snap("other-vmm-binary", &snapshotMeta{Format: snapshotFormat, Key: key("qemu/1 /opt/qemu size=1 mtime=1.0 ino=1", id(kernel), id(initrd))})
	snap("older-vmm-build", &snapshotMeta{Format: snapshotFormat, Key: key("qemu/1 "+qemu+" size=1 mtime=1.0 ino=1", id(kernel), id(initrd))})
	snap("gone-initrd", &snapshotMeta{Format: snapshotFormat, Key: key(vmm, id(kernel), filepath.Join(d, "nothing")+" size=1")})
	snap("other-format", &snapshotMeta{Format: "0", Key: current})
	snap("no-record", nil)
	snap(".tmp-in-progress", nil)
	snap(".tmp-left-by-a-killed-run", nil)
	long := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(filepath.Join(root, ".tmp-left-by-a-killed-run"), long, long); err != nil {
		t.Fatal(err)
	}
	snap("0123.old-xyz", &snapshotMeta{Format: snapshotFormat, Key: current})
	snap("0123.discarded-xyz", &snapshotMeta{Format: snapshotFormat, Key: current})

	pruneStaleSnapshots(root, current)

	ents, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range ents {
		left = append(left, e.Name())
	}
	want := []string{".tmp-in-progress", "current", "other-shape", "other-vmm-binary"}
	if !slices.Equal(left, want) {
		t.Errorf("left %q, want %q", left, want)
	}
}

// TestDiscardChecked: discarding removes the snapshot that was checked,
// never one that replaced it since.
func TestDiscardChecked(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "0123")
	write := func(record string) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "snapshot.json"), []byte(record), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"created":"old"}`)
	if !discardChecked(&checkedSnapshot{dir: dir, record: []byte(`{"created":"old"}`)}) {
		t.Error("the checked snapshot was not discarded")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the checked snapshot is still there: %v", err)
	}
	write(`{"created":"new"}`)
	if discardChecked(&checkedSnapshot{dir: dir, record: []byte(`{"created":"old"}`)}) {
		t.Error("discarded a snapshot that replaced the one checked")
	}
	if b, err := os.ReadFile(filepath.Join(dir, "snapshot.json")); err != nil || string(b) != `{"created":"new"}` {
		t.Errorf("the new snapshot: %q %v", b, err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 1 {
		t.Errorf("left in the root: %v", ents)
	}
}
