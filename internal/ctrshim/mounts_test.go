package ctrshim

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestPlanMounts: each kind of spec mount is provided the one way that
// loses nothing, or refused with the mount named.
func TestPlanMounts(t *testing.T) {
	dir := t.TempDir()
	vol := filepath.Join(dir, "vol")
	file := filepath.Join(dir, "hosts")
	imgVol := filepath.Join(dir, "io.containerd.grpc.v1.cri", "containers", strings.Repeat("0a", 32), "volumes", "3f2b6c1e-5d4a-4e7b-9c8d-0123456789ab")
	likeImgVol := filepath.Join(dir, "io.containerd.grpc.v1.cri", "containers", "x", "volumes", "y")
	for _, d := range []string{vol, imgVol, likeImgVol} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file, []byte("127.0.0.1 localhost\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(vol, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	bind := func(src, dst string, opts ...string) specs.Mount {
		return specs.Mount{Type: "bind", Source: src, Destination: dst, Options: append([]string{"rbind"}, opts...)}
	}
	for _, c := range []struct {
		name   string
		m      specs.Mount
		member bool
		want   string // "copy", "dir", "guest", or an error's words
	}{
		{"proc", specs.Mount{Type: "proc", Source: "proc", Destination: "/proc"}, false, "guest"},
		{"the run tmpfs", specs.Mount{Type: "tmpfs", Source: "tmpfs", Destination: "/run"}, false, "guest"},
		{"a bind under /dev", bind(file, "/dev/termination-log"), true, "guest"},
		{"a bind at /dev/shm", bind(vol, "/dev/shm"), true, "guest"},
		{"a read-only dir", bind(vol, "/config", "ro"), true, "copy"},
		{"a read-only file", bind(file, "/etc/app.conf", "ro"), false, "copy"},
		{"the CRI's hosts file", bind(file, "/etc/hosts", "rw"), true, "copy"},
		{"a read-only dir under /run", bind(vol, "/run/secrets", "ro"), true, "copy"},
		{"an image volume", bind(imgVol, "/data", "rw"), true, "copy"},
		{"a lone container's writable dir", bind(vol, "/work", "rw"), false, "dir"},
		{"through a link", bind(filepath.Join(dir, "link"), "/work"), false, "dir"},
		{"a pod's writable dir", bind(vol, "/work", "rw"), true, "writable bind mount of"},
		{"a dir named like an image volume", bind(likeImgVol, "/data", "rw"), true, "writable bind mount of"},
		{"a volume under /dev", bind(vol, "/dev/data", "rw"), false, "the guest's own"},
		{"a writable file", bind(file, "/etc/app.conf"), false, "writable bind mount of the file"},
		{"a tmpfs elsewhere", specs.Mount{Type: "tmpfs", Source: "tmpfs", Destination: "/scratch"}, false, `type "tmpfs" at /scratch`},
		{"a missing source", bind(filepath.Join(dir, "none"), "/x", "ro"), false, "its source"},
		{"a relative destination", bind(vol, "x", "ro"), false, "not absolute"},
		{"the root", bind(vol, "/", "ro"), false, "the container's root"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, err := planMounts([]specs.Mount{c.m}, c.member)
			got := ""
			switch {
			case err != nil:
				got = err.Error()
			case len(p.copies) == 1:
				got = "copy"
				if p.copies[0].dst != filepath.Clean(c.m.Destination) {
					t.Errorf("copied to %q", p.copies[0].dst)
				}
			case len(p.dirs) == 1:
				got = "dir"
				if p.dirs[0].Host != vol || !p.dirs[0].Writable {
					t.Errorf("shared %+v, want %s writable", p.dirs[0], vol)
				}
			case len(p.guest) == 1:
				got = "guest"
			}
			if !strings.Contains(got, c.want) {
				t.Errorf("planMounts(%+v, member %v) = %q, want %q", c.m, c.member, got, c.want)
			}
		})
	}
}

// TestPlanMountsNested: a copy inside a writable directory (or holding
// one) would be written back into the node's directory, and two writable
// directories one in the other cannot both be shared: both refused.
func TestPlanMountsNested(t *testing.T) {
	dir := t.TempDir()
	bind := func(dst string, opts ...string) specs.Mount {
		return specs.Mount{Type: "bind", Source: dir, Destination: dst, Options: append([]string{"rbind"}, opts...)}
	}
	for _, ms := range [][]specs.Mount{
		{bind("/data", "rw"), bind("/data/secret", "ro")},
		{bind("/data/cache", "rw"), bind("/data", "ro")},
		{bind("/data", "rw"), bind("/data/sub", "rw")},
	} {
		if _, err := planMounts(ms, false); err == nil || !strings.Contains(err.Error(), "one is inside the other") {
			t.Errorf("planMounts(%v): %v", ms, err)
		}
	}
	if _, err := planMounts([]specs.Mount{bind("/data", "rw"), bind("/data2", "ro")}, false); err != nil {
		t.Errorf("siblings: %v", err)
	}
}

// TestMountRecheck: a source that resolves elsewhere at the start than at
// the create is refused.
func TestMountRecheck(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, d := range []string{a, b} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(a, link); err != nil {
		t.Fatal(err)
	}
	p, err := planMounts([]specs.Mount{{Type: "bind", Source: link, Destination: "/x", Options: []string{"rbind", "ro"}}}, true)
	if err != nil || len(p.copies) != 1 {
		t.Fatalf("planMounts: %+v, %v", p, err)
	}
	if err := p.copies[0].recheck(); err != nil {
		t.Errorf("recheck of an unchanged source: %v", err)
	}
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(b, link); err != nil {
		t.Fatal(err)
	}
	if err := p.copies[0].recheck(); err == nil || !strings.Contains(err.Error(), "resolved to") {
		t.Errorf("recheck of a source that now resolves elsewhere: %v", err)
	}
}

// TestMeasureCopy: a copied mount is bounded, so a hostPath of a large
// tree fails at the create instead of filling the VM.
func TestMeasureCopy(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "big"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(maxCopyBytes + 1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := measureCopy(dir); err == nil || !strings.Contains(err.Error(), "over what the shim copies") {
		t.Errorf("measureCopy of %d bytes: %v", maxCopyBytes+1, err)
	}
	if err := os.Truncate(filepath.Join(dir, "big"), 10); err != nil {
		t.Fatal(err)
	}
	if err := measureCopy(dir); err != nil {
		t.Errorf("measureCopy of 10 bytes: %v", err)
	}
}
