package snapshot

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
		v, err := FileIdentity(p)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	key := func(vmm, k, i string) string {
		return strings.Join([]string{"format " + Format, "vmm " + vmm, "kernel " + k, "initrd " + i, "cpus 2"}, "\n")
	}
	vmm := "qemu/1 " + id(qemu)
	current := key(vmm, id(kernel), id(initrd))
	root := filepath.Join(d, "snapshots")
	snap := func(name string, meta *Meta) {
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
	snap("rebuilt-kernel", &Meta{Format: Format, Key: key(vmm, oldKernel, id(initrd))})
	snap("current", &Meta{Format: Format, Key: current})
	snap("other-shape", &Meta{Format: Format, Key: strings.Replace(current, "cpus 2", "cpus 4", 1)})
	snap("other-vmm-binary", &Meta{Format: Format, Key: key("qemu/1 /opt/qemu size=1 mtime=1.0 ino=1", id(kernel), id(initrd))})
	snap("older-vmm-build", &Meta{Format: Format, Key: key("qemu/1 "+qemu+" size=1 mtime=1.0 ino=1", id(kernel), id(initrd))})
	snap("gone-initrd", &Meta{Format: Format, Key: key(vmm, id(kernel), filepath.Join(d, "nothing")+" size=1")})
	snap("other-format", &Meta{Format: "0", Key: current})
	snap("no-record", nil)
	snap(".tmp-in-progress", nil)
	snap(".tmp-left-by-a-killed-run", nil)
	long := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(filepath.Join(root, ".tmp-left-by-a-killed-run"), long, long); err != nil {
		t.Fatal(err)
	}
	snap("0123.old-xyz", &Meta{Format: Format, Key: current})
	snap("0123.discarded-xyz", &Meta{Format: Format, Key: current})

	Store{Root: root}.PruneStale(current)

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
	if !(&Checked{Dir: dir, record: []byte(`{"created":"old"}`)}).Discard() {
		t.Error("the checked snapshot was not discarded")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the checked snapshot is still there: %v", err)
	}
	write(`{"created":"new"}`)
	if (&Checked{Dir: dir, record: []byte(`{"created":"old"}`)}).Discard() {
		t.Error("discarded a snapshot that replaced the one checked")
	}
	if b, err := os.ReadFile(filepath.Join(dir, "snapshot.json")); err != nil || string(b) != `{"created":"new"}` {
		t.Errorf("the new snapshot: %q %v", b, err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 1 {
		t.Errorf("left in the root: %v", ents)
	}
}

// TestSaveAndFind: a committed snapshot is found for its key only, and
// every kind of damage to its files is told apart from a snapshot that
// is simply not there.
func TestSaveAndFind(t *testing.T) {
	d := t.TempDir()
	kernel := filepath.Join(d, "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	key, err := Key(KeyParts{VMM: "qemu/1 x", Kernel: kernel, Initrd: kernel, CPUs: 2, MemoryMiB: 512, Accel: "tcg", Slots: 2})
	if err != nil {
		t.Fatal(err)
	}
	st := Store{Root: filepath.Join(d, "snapshots")}
	if _, err := st.Find(key); err != ErrNone {
		t.Fatalf("empty store: %v, want ErrNone", err)
	}
	save := func() string {
		sv, err := st.Begin(key)
		if err != nil {
			t.Fatal(err)
		}
		defer sv.Close()
		for name, data := range map[string]string{ramFile: "guest memory", stateFile: "device state"} {
			if err := os.WriteFile(filepath.Join(sv.Dir, name), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		dir, err := sv.Commit(Meta{CPUs: 2})
		if err != nil {
			t.Fatal(err)
		}
		return dir
	}
	dir := save()
	if fi, err := os.Stat(filepath.Join(dir, PlaceholderFile)); err != nil || fi.Size() != PlaceholderSize {
		t.Errorf("placeholder: %v %v", fi, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "run-")); err == nil {
		t.Error("the saving machine's run directory was kept")
	}
	c, err := st.Find(key)
	if err != nil || c.Dir != dir || c.Change() != Same {
		t.Fatalf("find: %+v %v", c, err)
	}
	if _, err := st.Find(strings.Replace(key, "cpus 2", "cpus 4", 1)); err != ErrNone {
		t.Errorf("another shape: %v, want ErrNone", err)
	}
	tests := []struct {
		name   string
		damage func(dir string) error
		change Change
	}{
		{"ram truncated", func(dir string) error { return os.Truncate(filepath.Join(dir, ramFile), 3) }, Written},
		{"ram rewritten", func(dir string) error {
			time.Sleep(10 * time.Millisecond)
			return os.WriteFile(filepath.Join(dir, ramFile), []byte("guest MEMORY"), 0o644)
		}, Written},
		{"state changed", func(dir string) error {
			time.Sleep(10 * time.Millisecond)
			return os.WriteFile(filepath.Join(dir, stateFile), []byte("device STATE"), 0o644)
		}, Written},
		{"record garbage", func(dir string) error { return os.WriteFile(filepath.Join(dir, recordFile), []byte("{"), 0o644) }, Replaced},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := save()
			c, err := st.Find(key)
			if err != nil {
				t.Fatal(err)
			}
			if err := tt.damage(dir); err != nil {
				t.Fatal(err)
			}
			if got := c.Change(); got != tt.change {
				t.Errorf("change %v, want %v", got, tt.change)
			}
			bad, err := st.Find(key)
			if !errors.Is(err, ErrCorrupt) || bad == nil || bad.Dir != dir {
				t.Fatalf("find after damage: %+v %v, want ErrCorrupt", bad, err)
			}
			if !bad.Discard() {
				t.Error("not discarded")
			}
			if _, err := st.Find(key); err != ErrNone {
				t.Errorf("after discard: %v", err)
			}
		})
	}
}

// TestRootLayer: a template's snapshot keeps the root layer its guest had
// mounted, read-only and checked like the RAM file; a restore's copy has
// the same bytes and holes; a key of another root space is another key.
func TestRootLayer(t *testing.T) {
	d := t.TempDir()
	kernel := filepath.Join(d, "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	parts := KeyParts{VMM: "qemu/1 x", Kernel: kernel, Initrd: kernel, Template: "r1 sha256:a sha256:b", CPUs: 2, MemoryMiB: 512, Accel: "tcg", Slots: 2}
	plain, _ := Key(parts)
	parts.Root = 1 << 30
	key, err := Key(parts)
	if err != nil {
		t.Fatal(err)
	}
	parts.Root = 2 << 30
	other, _ := Key(parts)
	if key == plain || key == other {
		t.Fatalf("keys of other root layers are equal: %q %q %q", plain, key, other)
	}
	st := Store{Root: filepath.Join(d, "snapshots")}
	save := func(withRoot bool) string {
		sv, err := st.Begin(key)
		if err != nil {
			t.Fatal(err)
		}
		defer sv.Close()
		for name, data := range map[string]string{ramFile: "guest memory", stateFile: "device state"} {
			if err := os.WriteFile(filepath.Join(sv.Dir, name), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if withRoot {
			f, err := os.OpenFile(sv.Root(), os.O_CREATE|os.O_WRONLY, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			// A superblock, a hole of 100 MiB, a journal block, a
			// hole to the end.
			if _, err := f.WriteAt([]byte("superblock"), 1024); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte("journal"), 100<<20); err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(1 << 30); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
		dir, err := sv.Commit(Meta{CPUs: 2})
		if err != nil {
			t.Fatal(err)
		}
		return dir
	}
	save(false)
	if c, err := st.Find(key); err != nil || c.Root() != "" {
		t.Fatalf("a snapshot without a root layer: %+v %v", c, err)
	}
	dir := save(true)
	c, err := st.Find(key)
	if err != nil || c.Root() != filepath.Join(dir, RootFile) {
		t.Fatalf("find: %+v %v", c, err)
	}
	if fi, err := os.Stat(c.Root()); err != nil || fi.Mode().Perm() != 0o444 {
		t.Errorf("the saved layer: %v %v, want read-only", fi, err)
	}
	dst := filepath.Join(d, "run-root.img")
	if err := os.WriteFile(dst, []byte("an older, longer file of the run's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CopyRoot(c.Root(), dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(c.Root())
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Error("the copy's bytes differ")
	}
	var s unix.Stat_t
	if err := unix.Stat(dst, &s); err != nil || s.Blocks*512 > 1<<20 {
		t.Errorf("the copy is not sparse: %d bytes allocated (%v)", s.Blocks*512, err)
	}
	if fi, _ := os.Stat(dst); fi.Mode().Perm() != 0o600 {
		t.Errorf("the copy's mode %v, want 0600", fi.Mode())
	}
	time.Sleep(10 * time.Millisecond)
	if err := os.Chmod(c.Root(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.Root(), []byte("a guest's write"), 0o644); err != nil {
		t.Fatal(err)
	}
	if c.Change() != Written {
		t.Errorf("change after the layer was written: %v", c.Change())
	}
	if _, err := st.Find(key); !errors.Is(err, ErrCorrupt) {
		t.Errorf("find after the layer was written: %v, want ErrCorrupt", err)
	}
}
