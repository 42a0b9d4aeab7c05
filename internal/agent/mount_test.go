package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// fakeDrives is a sysfs block directory and a device directory whose
// "disks" are image files, made by the real mkfs.ext4.
type fakeDrives struct {
	t *testing.T
	d drives
}

func newFakeDrives(t *testing.T) *fakeDrives {
	t.Helper()
	root := t.TempDir()
	d := drives{sysBlock: filepath.Join(root, "sys/block"), devDir: filepath.Join(root, "dev")}
	for _, dir := range []string{d.sysBlock, d.devDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return &fakeDrives{t: t, d: d}
}

// add creates disk name: an ext4 image labelled label (none when label is
// "-"), backed by a VM device unless virtual (like a loop device), with
// virtio serial serial (none when empty).
func (f *fakeDrives) add(name, label, serial string, virtual bool) string {
	f.t.Helper()
	dev := filepath.Join(f.d.devDir, name)
	if label == "-" {
		if err := os.WriteFile(dev, make([]byte, 64<<10), 0o644); err != nil {
			f.t.Fatal(err)
		}
	} else {
		out, err := runReaped(f.t, "mkfs.ext4", "-q", "-F", "-L", label, dev, "2M")
		if err != nil {
			f.t.Fatalf("mkfs.ext4 -L %q: %v\n%s", label, err, out)
		}
	}
	sys := filepath.Join(f.d.sysBlock, name)
	if err := os.MkdirAll(sys, 0o755); err != nil {
		f.t.Fatal(err)
	}
	if !virtual {
		if err := os.Mkdir(filepath.Join(sys, "device"), 0o755); err != nil {
			f.t.Fatal(err)
		}
	}
	if serial != "" {
		if err := os.WriteFile(filepath.Join(sys, "serial"), []byte(serial+"\n"), 0o444); err != nil {
			f.t.Fatal(err)
		}
	}
	return dev
}

func TestFindDriveByLabel(t *testing.T) {
	f := newFakeDrives(t)
	vda := f.add("vda", "mvm-dir-1", "", false)
	vdb := f.add("vdb", "mvm-dir-10", "", false)
	vdc := f.add("vdc", "sixteen-bytes-xy", "", false)
	f.add("vdd", "-", "", false)
	f.add("loop0", "mvm-dir-2", "", true)
	f.add("vde", "twin", "", false)
	f.add("vdf", "twin", "", false)
	vdg := f.add("vdg", "other", "mvm-rw-0", false)

	for _, tc := range []struct {
		ref     driveRef
		want    string
		wantErr string
	}{
		{ref: driveRef{label: "mvm-dir-1"}, want: vda},
		{ref: driveRef{label: "mvm-dir-10"}, want: vdb},
		// Labels match whole, never by prefix.
		{ref: driveRef{label: "mvm-dir"}, wantErr: "no drive"},
		{ref: driveRef{label: "sixteen-bytes-xy"}, want: vdc},
		// A loop device a guest program made does not count.
		{ref: driveRef{label: "mvm-dir-2"}, wantErr: "no drive"},
		{ref: driveRef{label: "twin"}, wantErr: "2 drives"},
		// The label wins over the serial; the serial still works alone.
		{ref: driveRef{label: "mvm-dir-1", serial: "mvm-rw-0"}, want: vda},
		{ref: driveRef{serial: "mvm-rw-0"}, want: vdg},
		{ref: driveRef{serial: "mvm-rw-9"}, wantErr: "no drive"},
	} {
		got, err := f.d.find(tc.ref, 30*time.Millisecond)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: got %q, %v; want an error with %q", tc.ref, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s: got %q, %v; want %q", tc.ref, got, err, tc.want)
		}
	}
}

// A drive that shows up while the agent waits is found.
func TestFindDriveWaits(t *testing.T) {
	f := newFakeDrives(t)
	done := make(chan string, 1)
	go func() {
		got, err := f.d.find(driveRef{label: "late"}, 5*time.Second)
		if err != nil {
			got = err.Error()
		}
		done <- got
	}()
	time.Sleep(100 * time.Millisecond)
	want := f.add("vda", "late", "", false)
	if got := <-done; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestSuperblockLabel(t *testing.T) {
	sb := func(magic uint16, label string) []byte {
		b := make([]byte, sbLabelOffset+maxLabelLen)
		b[sbMagicOffset], b[sbMagicOffset+1] = byte(magic), byte(magic>>8)
		copy(b[sbLabelOffset:], label)
		return b
	}
	for _, tc := range []struct {
		name   string
		sb     []byte
		want   string
		wantOK bool
	}{
		{"label", sb(ext4Magic, "data"), "data", true},
		{"no label", sb(ext4Magic, ""), "", true},
		{"16 bytes, no NUL", sb(ext4Magic, "0123456789abcdef"), "0123456789abcdef", true},
		{"not ext4", sb(0x1234, "data"), "", false},
		{"short", sb(ext4Magic, "data")[:sbLabelOffset+4], "", false},
	} {
		got, ok := superblockLabel(tc.sb)
		if got != tc.want || ok != tc.wantOK {
			t.Errorf("%s: got %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.wantOK)
		}
	}
}

func TestMountRequestChecked(t *testing.T) {
	for _, req := range []*agentpb.Mount{
		{Target: "/data"}, // no drive named
		{Target: "/data", DeviceLabel: "seventeen-bytes-x"},
		{Target: "/data", DeviceLabel: ".."},
		{Target: "/data", DeviceLabel: "a/b"},
		{Target: "/data", DeviceSerial: "../x"},
		{Target: "/data", DeviceLabel: "ok", UpperLabel: "bad\x00"},
		{Target: "relative", DeviceLabel: "ok"},
		{Target: "/", DeviceLabel: "ok"},
	} {
		if err := NewServer(nil, "test", Options{}).mountDevice(req); !errors.Is(err, errInvalidRequest) {
			t.Errorf("%v: got %v, want an invalid-request error", req, err)
		}
	}
}

// FuzzSuperblockLabel feeds arbitrary superblock bytes to the label
// parser, seeded with the superblock of a real mkfs.ext4 image: it must
// never panic, and what it accepts is a label ext4 can hold.
func FuzzSuperblockLabel(f *testing.F) {
	img := filepath.Join(f.TempDir(), "seed.img")
	if out, err := runReaped(f, "mkfs.ext4", "-q", "-F", "-L", "mvm-dir-0", img, "2M"); err != nil {
		f.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		f.Fatal(err)
	}
	seed := b[superblockOffset : superblockOffset+sbLabelOffset+maxLabelLen]
	if got, ok := superblockLabel(seed); !ok || got != "mvm-dir-0" {
		f.Fatalf("real superblock: label %q, %v", got, ok)
	}
	f.Add(seed)
	f.Add(seed[:sbLabelOffset])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, sb []byte) {
		label, ok := superblockLabel(sb)
		if !ok {
			if label != "" {
				t.Fatalf("rejected superblock gave label %q", label)
			}
			return
		}
		if len(label) > maxLabelLen || strings.IndexByte(label, 0) >= 0 {
			t.Fatalf("label %q from %x", label, sb)
		}
	})
}
