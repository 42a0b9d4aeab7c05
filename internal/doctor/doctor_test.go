package doctor

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/image"
	"github.com/mvm-sh/mvm/internal/writeback"
)

// allIDs is every check, in report order (docs/doctor.md lists them).
var allIDs = []string{
	"accel", "kvm", "qemu", "qemu-features", "qemu-sandbox", "qemu-confine", "jailer",
	"image", "kernel", "agent", "busybox", "e2fsprogs", "mmdebstrap", "templates", "snapshots", "pool",
	"disk-cache", "disk-state", "state-dir", "run-dir", "staged", "logs",
}

func TestHealthyHost(t *testing.T) {
	f := newFakeHost(t)
	r := f.run(t)
	var ids []string
	for _, c := range r.Checks {
		ids = append(ids, c.ID)
		want := OK
		if c.ID == "qemu-confine" || c.ID == "jailer" {
			want = Skip // not root
		}
		if c.Status != want {
			t.Errorf("%s: %s (%s), want %s", c.ID, c.Status, c.Message, want)
		}
		if c.Fix != "" {
			t.Errorf("%s: a fix (%q) for a healthy host", c.ID, c.Fix)
		}
	}
	if !slices.Equal(ids, allIDs) {
		t.Errorf("checks %v, want %v", ids, allIDs)
	}
	if !r.OK || r.Accel != "kvm" || r.Schema != SchemaVersion {
		t.Errorf("report ok=%v accel=%q schema=%d, want true, kvm, %d", r.OK, r.Accel, r.Schema, SchemaVersion)
	}
	expect(t, r, "qemu", OK, "QEMU 7.2.22 at "+f.QEMU, "-")
	expect(t, r, "image", OK, "QEMU loads it (kvm)", "-")
	expect(t, r, "agent", OK, "the one in the default image", "-")
	expect(t, r, "kernel", OK, "linux-source-6.1.tar.xz", "-")
}

func TestRootConfinement(t *testing.T) {
	f := newFakeHost(t)
	f.Euid = 0
	r := f.run(t)
	expect(t, r, "qemu-confine", OK, "-runas", "-")
	expect(t, r, "jailer", OK, f.Jailer, "-")

	f.JailerErr, f.Jailer = errors.New("mvm-jailer not found next to the program"), ""
	r = f.run(t)
	expect(t, r, "jailer", Fail, "not found", "make build")

	f = newFakeHost(t)
	f.Euid = 0
	if err := os.Chmod(f.Jailer, 0o777); err != nil {
		t.Fatal(err)
	}
	expect(t, f.run(t), "jailer", Warn, "writable by other users", "chmod go-w "+f.Jailer)

	f = newFakeHost(t)
	f.Euid = 0
	f.QEMU = fakeQEMU{version: "9.2.0", noRunas: true}.write(t, t.TempDir())
	r = f.run(t)
	expect(t, r, "qemu-confine", Fail, "no -runas or -chroot", "-")
	if r.OK {
		t.Error("report ok with a QEMU that cannot be confined as root")
	}
	// Fixes that need root say sudo only when the user is not root.
	f = newFakeHost(t)
	f.Euid = 0
	f.missing("mkfs.ext4")
	if c := check(t, f.run(t), "e2fsprogs"); strings.HasPrefix(c.Fix, "sudo ") {
		t.Errorf("fix %q for root starts with sudo", c.Fix)
	}
}

func TestNoImage(t *testing.T) {
	f := newFakeHost(t)
	f.CacheDir = t.TempDir()
	r := f.run(t)
	if r.OK {
		t.Fatalf("report ok without an image:\n%s", dump(r))
	}
	expect(t, r, "image", Fail, "no default image in "+f.CacheDir, "mvmctl bootstrap")
	expect(t, r, "kernel", OK, "mvmctl bootstrap compiles it from /usr/src/linux-source-6.1.tar.xz", "-")
	// What only bootstrap needs now fails, since bootstrap must run.
	f.missing("gcc", "flex", "busybox")
	f.AgentErr, f.Agent = errors.New("mvm-agent not found next to mvmctl"), ""
	r = f.run(t)
	c := expect(t, r, "kernel", Fail, "gcc (gcc), flex (flex)", "apt-get install -y --no-install-recommends flex gcc")
	if !strings.HasPrefix(c.Fix, "sudo ") {
		t.Errorf("fix %q for a regular user lacks sudo", c.Fix)
	}
	expect(t, r, "busybox", Fail, "missing", "busybox-static")
	expect(t, r, "agent", Fail, "not found", "make build")
}

func TestImageDamaged(t *testing.T) {
	t.Run("incomplete", func(t *testing.T) {
		f := newFakeHost(t)
		img, _ := image.Store{Root: f.CacheDir}.Load(image.DefaultName)
		os.Remove(img.Initrd)
		expect(t, f.run(t), "image", Fail, "incomplete", "mvmctl bootstrap")
	})
	t.Run("kernel without PVH", func(t *testing.T) {
		f := newFakeHost(t)
		img, _ := image.Store{Root: f.CacheDir}.Load(image.DefaultName)
		writeELF(t, img.Kernel, emX8664, elfSegment{ptNote, note("GNU", 3, make([]byte, 20))})
		expect(t, f.run(t), "image", Fail, "no PVH entry point", "mvmctl bootstrap")
	})
	t.Run("kernel for another machine", func(t *testing.T) {
		f := newFakeHost(t)
		img, _ := image.Store{Root: f.CacheDir}.Load(image.DefaultName)
		writeELF(t, img.Kernel, 183, pvhNote()) // aarch64
		expect(t, f.run(t), "image", Fail, "not x86-64", "mvmctl bootstrap")
	})
	t.Run("kernel not ELF", func(t *testing.T) {
		f := newFakeHost(t)
		img, _ := image.Store{Root: f.CacheDir}.Load(image.DefaultName)
		os.WriteFile(img.Kernel, []byte("MZ compressed bzImage"), 0o644)
		expect(t, f.run(t), "image", Fail, "not an ELF vmlinux", "mvmctl bootstrap")
	})
	t.Run("initramfs not cpio", func(t *testing.T) {
		f := newFakeHost(t)
		img, _ := image.Store{Root: f.CacheDir}.Load(image.DefaultName)
		os.WriteFile(img.Initrd, []byte("\x1f\x8b gzip"), 0o644)
		expect(t, f.run(t), "image", Fail, "not a newc cpio archive", "mvmctl bootstrap")
	})
	t.Run("QEMU refuses it", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU = fakeQEMU{version: "7.2.22", dryFails: "qemu: invalid kernel header"}.write(t, t.TempDir())
		r := f.run(t)
		expect(t, r, "image", Fail, "QEMU cannot load the default image", "mvmctl bootstrap")
		expect(t, r, "image", Fail, "invalid kernel header", "mvmctl bootstrap")
	})
	t.Run("corrupt manifest", func(t *testing.T) {
		f := newFakeHost(t)
		os.WriteFile(filepath.Join(f.CacheDir, "images", "default.json"), []byte("{"), 0o644)
		expect(t, f.run(t), "image", Fail, "corrupt manifest", "mvmctl bootstrap")
	})
	t.Run("user kernel", func(t *testing.T) {
		f := newFakeHost(t)
		img, _ := image.Store{Root: f.CacheDir}.Load(image.DefaultName)
		img.KernelKey = "user:" + img.Kernel
		saveImage(t, f.CacheDir, img)
		f.KernelSource = func() (string, error) { return "", fs.ErrNotExist }
		expect(t, f.run(t), "kernel", OK, "mvmctl bootstrap --kernel", "-")
	})
}

func TestAgent(t *testing.T) {
	f := newFakeHost(t)
	f.InitrdKey = func(string, string) (string, error) { return "other", nil }
	r := f.run(t)
	expect(t, r, "agent", Warn, "built from another mvm-agent", "mvmctl bootstrap")
	if !r.OK {
		t.Error("a stale image is not a failure")
	}

	f = newFakeHost(t)
	writeELF(t, f.Agent, emX8664, elfSegment{ptInterp, []byte("/lib64/ld-linux-x86-64.so.2\x00")})
	expect(t, f.run(t), "agent", Warn, "dynamically linked", "make build")

	f = newFakeHost(t)
	writeELF(t, f.Busybox, emX8664, elfSegment{ptInterp, []byte("/lib64/ld-linux-x86-64.so.2\x00")})
	expect(t, f.run(t), "busybox", Warn, "install busybox-static instead of busybox", "busybox-static")
}

func TestAccel(t *testing.T) {
	tests := []struct {
		name            string
		mode            string
		noDev           bool
		modules         []string // replaces kvm, kvm_intel
		cpuFlags        string
		wantAccel       Status
		accelHas        string
		wantKVM         Status
		kvmHas, kvmFix  string
		wantReportAccel string
	}{
		{name: "kvm", wantAccel: OK, accelHas: "kvm: hardware virtualisation (kvm_intel)", wantKVM: OK, kvmHas: "opens read-write", kvmFix: "-", wantReportAccel: "kvm"},
		{name: "tcg requested", mode: "tcg", wantAccel: OK, accelHas: "tcg (requested)", wantKVM: OK, kvmHas: "opens read-write", kvmFix: "-", wantReportAccel: "tcg"},
		{name: "pvm only", modules: []string{"kvm", "kvm_pvm"}, wantAccel: Warn, accelHas: "PVM-only", wantKVM: OK, kvmHas: "kvm_pvm", kvmFix: "-", wantReportAccel: "tcg"},
		{name: "no module, vmx", noDev: true, modules: []string{}, cpuFlags: "fpu vmx", wantAccel: Warn, accelHas: "/dev/kvm cannot be used (see the kvm check)",
			wantKVM: Warn, kvmHas: "kvm_intel module is not loaded", kvmFix: "sudo modprobe kvm_intel", wantReportAccel: "tcg"},
		{name: "no module, svm", noDev: true, modules: []string{}, cpuFlags: "fpu svm", wantAccel: Warn, accelHas: "see the kvm check",
			wantKVM: Warn, kvmHas: "kvm_amd module is not loaded", kvmFix: "sudo modprobe kvm_amd", wantReportAccel: "tcg"},
		{name: "no virtualisation", noDev: true, modules: []string{}, cpuFlags: "fpu sse", wantAccel: Warn, accelHas: "see the kvm check",
			wantKVM: Warn, kvmHas: "no virtualisation extensions", kvmFix: "-", wantReportAccel: "tcg"},
		{name: "kvm requested, none", mode: "kvm", noDev: true, modules: []string{}, cpuFlags: "fpu vmx", wantAccel: Fail, accelHas: "--accel kvm",
			wantKVM: Fail, kvmHas: "does not exist", kvmFix: "modprobe kvm_intel"},
		{name: "kvm requested, pvm only", mode: "kvm", modules: []string{"kvm", "kvm_pvm"}, wantAccel: Fail, accelHas: "only PVM-aware guest kernels boot, and the default image's kernel is not one",
			wantKVM: OK, kvmHas: "kvm_pvm", kvmFix: "-", wantReportAccel: "kvm"},
		{name: "bogus mode", mode: "xen", wantAccel: Fail, accelHas: `invalid accelerator "xen"`, wantKVM: OK, kvmHas: "opens", kvmFix: "-"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeHost(t)
			f.Accel = tt.mode
			if tt.noDev {
				os.Remove(filepath.Join(f.Root, "dev/kvm"))
			}
			if tt.modules != nil {
				os.RemoveAll(filepath.Join(f.Root, "sys/module"))
				for _, m := range tt.modules {
					os.MkdirAll(filepath.Join(f.Root, "sys/module", m), 0o755)
				}
			}
			if tt.cpuFlags != "" {
				os.WriteFile(filepath.Join(f.Root, "proc/cpuinfo"), []byte("processor\t: 0\nflags\t\t: "+tt.cpuFlags+"\n"), 0o644)
			}
			r := f.run(t)
			// The accelerator line repeats what fixes KVM.
			accelFix := tt.kvmFix
			switch {
			case tt.wantAccel == OK || tt.mode == "xen":
				accelFix = "-"
			case tt.name == "kvm requested, pvm only":
				accelFix = "--accel auto"
			}
			a := expect(t, r, "accel", tt.wantAccel, tt.accelHas, accelFix)
			expect(t, r, "kvm", tt.wantKVM, tt.kvmHas, tt.kvmFix)
			if r.Accel != tt.wantReportAccel {
				t.Errorf("report accel %q, want %q", r.Accel, tt.wantReportAccel)
			}
			if (tt.wantAccel == Fail) == r.OK {
				t.Errorf("report ok = %v with accel %s (%s)", r.OK, a.Status, a.Message)
			}
		})
	}
}

func TestKVMPermissions(t *testing.T) {
	denied := &fs.PathError{Op: "open", Path: "/dev/kvm", Err: fs.ErrPermission}
	tests := []struct {
		name      string
		k         kvmFacts
		groups    []int
		euid      int
		msg, fix  string
		wantEmpty bool
	}{
		{name: "usable", k: kvmFacts{mode: 0o660, gid: 993, group: "kvm"}, wantEmpty: true},
		{name: "not in the group", k: kvmFacts{mode: 0o660, gid: 993, group: "kvm", owner: "root", openErr: denied}, groups: []int{1000},
			msg: "add yourself to group kvm", fix: "sudo usermod -aG kvm alice"},
		{name: "added, session older", k: kvmFacts{mode: 0o660, gid: 993, group: "kvm", members: []string{"bob", "alice"}, openErr: denied}, groups: []int{1000},
			msg: "log in again", fix: "newgrp kvm"},
		{name: "root only", k: kvmFacts{mode: 0o600, gid: 0, group: "root", owner: "root", openErr: denied, inKVMGroup: true}, groups: []int{1000, 993},
			msg: "(mode 0600, root:root) cannot be opened by alice", fix: "sudo chgrp kvm /dev/kvm && sudo chmod 0660 /dev/kvm"},
		{name: "root only, not in kvm", k: kvmFacts{mode: 0o600, gid: 0, group: "root", owner: "root", openErr: denied}, groups: []int{1000},
			msg: "you need to be in group kvm", fix: "sudo chgrp kvm /dev/kvm && sudo chmod 0660 /dev/kvm && sudo usermod -aG kvm alice"},
		{name: "other error", k: kvmFacts{mode: 0o660, openErr: errors.New("device busy")}, msg: "device busy"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &Host{User: "alice", Uid: 1000, Euid: 1000, Groups: tt.groups}
			msg, fix := kvmProblem(h, tt.k)
			if tt.wantEmpty {
				if msg != "" || fix != "" {
					t.Fatalf("kvmProblem = %q, %q; want nothing", msg, fix)
				}
				return
			}
			if !strings.Contains(msg, tt.msg) || fix != tt.fix {
				t.Errorf("kvmProblem = %q, %q; want a message with %q and fix %q", msg, fix, tt.msg, tt.fix)
			}
		})
	}
}

func TestQEMU(t *testing.T) {
	t.Run("not found", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU, f.QEMUErr = "", errors.New("qemu-system-x86_64 not found in PATH")
		r := f.run(t)
		expect(t, r, "qemu", Fail, "not found", "apt-get install -y --no-install-recommends qemu-system-x86")
		expect(t, r, "qemu-features", Skip, "no working QEMU", "-")
		expect(t, r, "qemu-sandbox", Skip, "no working QEMU", "-")
		expect(t, r, "image", OK, "default image", "-")
		if r.OK {
			t.Error("report ok without QEMU")
		}
	})
	t.Run("MVM_QEMU names nothing", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU, f.QEMUErr, f.QEMUFromEnv = "", errors.New("MVM_QEMU=/opt/qemu: no such file or directory"), true
		expect(t, f.run(t), "qemu", Fail, "MVM_QEMU=/opt/qemu", "unset MVM_QEMU")
	})
	t.Run("not QEMU", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU = fakeQEMU{}.write(t, t.TempDir())
		expect(t, f.run(t), "qemu", Fail, "does not say it is QEMU", "qemu-system-x86")
	})
	t.Run("missing features", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU = fakeQEMU{version: "7.2.0", noMicrovm: true, noBlk: true}.write(t, t.TempDir())
		r := f.run(t)
		expect(t, r, "qemu-features", Fail, "the microvm machine, virtio-blk-device", "qemu-system-x86")
	})
	t.Run("no seccomp", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU = fakeQEMU{version: "7.2.0", noSandbox: true}.write(t, t.TempDir())
		expect(t, f.run(t), "qemu-sandbox", Fail, "built without seccomp", "qemu-system-x86")
	})
	t.Run("sandbox fails", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU = fakeQEMU{version: "7.2.0", sandboxFails: "qemu-system-x86_64: -sandbox on: failed to install seccomp syscall filter in the kernel"}.write(t, t.TempDir())
		expect(t, f.run(t), "qemu-sandbox", Fail, "failed to install seccomp syscall filter", "qemu-system-x86")
	})
	t.Run("hangs", func(t *testing.T) {
		f := newFakeHost(t)
		f.QEMU = fakeQEMU{hang: true}.write(t, t.TempDir())
		f.ProbeTimeout = 300 * time.Millisecond
		start := time.Now()
		r := f.run(t)
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("doctor with a hanging QEMU took %s; probes run concurrently with a %s timeout", d, f.ProbeTimeout)
		}
		expect(t, r, "qemu", Fail, "no answer within 300ms", "qemu-system-x86")
	})
}

func TestHostTools(t *testing.T) {
	f := newFakeHost(t)
	f.missing("mkfs.ext4", "e2fsck", "mmdebstrap", "newuidmap")
	r := f.run(t)
	expect(t, r, "e2fsprogs", Warn, "mkfs.ext4 (e2fsprogs), e2fsck (e2fsprogs): --add-dir", "sudo apt-get install -y --no-install-recommends e2fsprogs")
	expect(t, r, "mmdebstrap", Warn, "mmdebstrap (mmdebstrap), newuidmap (uidmap): needed only to build templates from Debian", "sudo apt-get install -y --no-install-recommends mmdebstrap uidmap")
	// Installed, but not in a regular user's PATH (Debian's default).
	for _, p := range []string{"usr/sbin/mkfs.ext4", "sbin/e2fsck"} {
		os.MkdirAll(filepath.Join(f.Root, filepath.Dir(p)), 0o755)
		os.WriteFile(filepath.Join(f.Root, p), nil, 0o755)
	}
	expect(t, f.run(t), "e2fsprogs", Warn, "cannot find /usr/sbin/mkfs.ext4 and /sbin/e2fsck: the sbin directories are not in PATH", `export PATH="$PATH:/usr/sbin:/sbin"`)
	// As root, mmdebstrap needs no uidmap.
	f.Euid = 0
	expect(t, f.run(t), "mmdebstrap", Warn, "missing mmdebstrap (mmdebstrap): needed", "apt-get install -y --no-install-recommends mmdebstrap")
	if !r.OK {
		t.Errorf("missing optional tools failed the report:\n%s", dump(r))
	}
}

func TestDirectories(t *testing.T) {
	t.Run("loose state dir", func(t *testing.T) {
		f := newFakeHost(t)
		os.Chmod(f.StateDir, 0o755)
		expect(t, f.run(t), "state-dir", Warn, "mode 0755", "chmod 0700 "+f.StateDir)
	})
	t.Run("loose run dir", func(t *testing.T) {
		f := newFakeHost(t)
		os.Chmod(f.RunDir, 0o755)
		os.Mkdir(filepath.Join(f.RunDir, "exec-1-2"), 0o700)
		expect(t, f.run(t), "run-dir", OK, "the next run makes it 0700; 1 run directory in it", "-")
	})
	t.Run("run dir is a symlink", func(t *testing.T) {
		f := newFakeHost(t)
		real := filepath.Join(f.dir, "elsewhere")
		os.Mkdir(real, 0o700)
		link := filepath.Join(f.dir, "runs-link")
		os.Symlink(real, link)
		f.RunDir = link
		expect(t, f.run(t), "run-dir", Fail, "is a symlink", "-")
	})
	t.Run("not mine", func(t *testing.T) {
		f := newFakeHost(t)
		f.Uid = os.Getuid() + 1
		r := f.run(t)
		expect(t, r, "state-dir", Fail, "not to you", "sudo chown -R alice "+f.StateDir)
		expect(t, r, "run-dir", Fail, "not to you", "chown -R alice "+f.RunDir)
	})
	t.Run("not yet created", func(t *testing.T) {
		f := newFakeHost(t)
		f.StateDir = filepath.Join(f.dir, "new", "state")
		f.RunDir = filepath.Join(f.StateDir, "runs")
		r := f.run(t)
		expect(t, r, "state-dir", OK, "the first run creates it", "-")
		expect(t, r, "disk-state", OK, "free for the state directory", "-")
	})
	t.Run("a file", func(t *testing.T) {
		f := newFakeHost(t)
		os.RemoveAll(f.StateDir)
		os.WriteFile(f.StateDir, nil, 0o600)
		expect(t, f.run(t), "state-dir", Fail, "is not a directory", "-")
	})
	t.Run("no home", func(t *testing.T) {
		f := newFakeHost(t)
		f.CacheDir, f.StateDir, f.RunDir, f.DataDir = "", "", "", ""
		f.DirErr = errors.New("locate home directory: $HOME is not defined")
		r := f.run(t)
		expect(t, r, "image", Fail, "$HOME is not defined", "mvmctl bootstrap")
		expect(t, r, "state-dir", Fail, "$HOME is not defined", "-")
	})
	t.Run("little space", func(t *testing.T) {
		f := newFakeHost(t)
		f.MinFree = 1 << 62
		r := f.run(t)
		expect(t, r, "disk-cache", Warn, "free for the cache directory "+f.CacheDir+" (below 4096.0 PiB)", "-")
		expect(t, r, "disk-state", Warn, "for the state directory", "-")
		if !r.OK {
			t.Error("little disk space failed the report")
		}
	})
}

func TestLeftovers(t *testing.T) {
	f := newFakeHost(t)
	r := f.run(t)
	expect(t, r, "staged", OK, "no kept changes", "-")
	expect(t, r, "logs", OK, "no console logs", "-")

	staged := filepath.Join(f.StateDir, "staged")
	for i, name := range []string{"exec-1-a-0", "exec-2-b-0"} {
		d := filepath.Join(staged, name)
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(d, "upper.img"), bytes.Repeat([]byte{1}, 8192), 0o600)
		if i == 0 {
			if err := writeback.SavePending(d, writeback.Pending{Host: f.dir, Guest: "/w", Created: time.Now().Add(-3 * time.Hour)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	logs := filepath.Join(f.StateDir, "logs")
	os.MkdirAll(logs, 0o700)
	os.WriteFile(filepath.Join(logs, "exec-1-a.console.log"), []byte("boot\n"), 0o600)
	os.WriteFile(filepath.Join(logs, "exec-1-a.vmm.log"), []byte("qemu\n"), 0o600)
	r = f.run(t)
	c := expect(t, r, "staged", Warn, "2 change sets", "mvmctl recover")
	for _, part := range []string{staged, "3 hours ago", "1 with an unreadable record", "KiB"} {
		if !strings.Contains(c.Message, part) {
			t.Errorf("staged: %q does not say %q", c.Message, part)
		}
	}
	expect(t, r, "logs", OK, "1 console log of failed runs kept in "+logs, "-")
	expect(t, r, "logs", OK, filepath.Join(logs, "exec-1-a.console.log"), "-")
}

func TestTemplatesAndSnapshots(t *testing.T) {
	f := newFakeHost(t)
	r := f.run(t)
	expect(t, r, "templates", OK, "no templates", "-")
	expect(t, r, "snapshots", OK, "no snapshots", "-")

	dir := filepath.Join(f.DataDir, "templates")
	os.MkdirAll(filepath.Join(dir, ".locks"), 0o755)
	good := `{"format":1,"name":"py","revision":"r1","rootfs":{"digest":"sha256:` + strings.Repeat("ab", 32) + `","size":1}}`
	os.WriteFile(filepath.Join(dir, "py.json"), []byte(good), 0o644)
	os.WriteFile(filepath.Join(dir, "app.json"), []byte(good), 0o644)
	expect(t, f.run(t), "templates", OK, "2 templates in "+dir+": app, py", "-")

	os.WriteFile(filepath.Join(dir, "broken.json"), []byte(`{"rootfs":`), 0o644)
	os.WriteFile(filepath.Join(dir, "nodigest.json"), []byte(`{"rootfs":{"digest":"md5:1"}}`), 0o644)
	c := expect(t, f.run(t), "templates", Warn, "2 of 4 template records", "-")
	for _, part := range []string{"broken (unreadable", "nodigest (no valid rootfs digest)"} {
		if !strings.Contains(c.Message, part) {
			t.Errorf("templates: %q does not say %q", c.Message, part)
		}
	}

	// A template revision's snapshot, with its record; a lock file and a
	// half-made one beside it are not snapshots.
	snap := filepath.Join(f.CacheDir, "templates", "snapshots", "r1", "0123abcd")
	os.MkdirAll(snap, 0o755)
	os.WriteFile(filepath.Join(snap, "ram"), bytes.Repeat([]byte{1}, 1<<20), 0o644)
	os.WriteFile(filepath.Join(snap, "snapshot.json"), []byte("{}"), 0o644)
	os.WriteFile(filepath.Join(filepath.Dir(snap), "lock"), nil, 0o644)
	os.MkdirAll(filepath.Join(filepath.Dir(snap), ".tmp-1"), 0o755)
	expect(t, f.run(t), "snapshots", OK, "1 snapshot (1.0 MiB)", "-")
	expect(t, f.run(t), "snapshots", OK, "runs make none themselves (MVM_NO_AUTO_SNAPSHOT)", "-")

	// The budget and the healing, as mvmctl fills them in; a failed
	// heal is the last line of its log.
	f.SnapshotBudget, f.AutoSnapshot = 2<<30, true
	expect(t, f.run(t), "snapshots", OK, "1 snapshot (1.0 MiB of a 2.0 GiB budget); a run that boots for want of one makes it", "-")
	f.HealLog = filepath.Join(f.CacheDir, "snapshots", "heal.log")
	os.MkdirAll(filepath.Dir(f.HealLog), 0o755)
	os.WriteFile(f.HealLog, []byte("2026-12-07T10:00:00Z made /x (the default image, 2 vCPUs, 512 MiB, 56 MiB) in 1s\n"), 0o644)
	expect(t, f.run(t), "snapshots", OK, "a run that boots for want of one makes it", "-")
	os.WriteFile(f.HealLog, []byte("2026-12-07T10:00:00Z made /x in 1s\n2026-12-07T10:01:00Z failed for the default image, 1 vCPUs, 512 MiB: no space left on device\x1b[2J\n"), 0o644)
	c = expect(t, f.run(t), "snapshots", Warn, "the last snapshot made after a run failed: 2026-12-07T10:01:00Z failed for the default image, 1 vCPUs, 512 MiB: no space left on device[2J", "see "+f.HealLog)
	if strings.ContainsRune(c.Message, 0x1b) {
		t.Errorf("snapshots: the log's escape reached the report: %q", c.Message)
	}
}

func TestPoolCheck(t *testing.T) {
	f := newFakeHost(t)
	expect(t, f.run(t), "pool", OK, "no pool is running", "-")
	f.PoolRunning, f.Pool = true, []string{"default image, 2 CPUs, 512M: 2 of 2 ready"}
	expect(t, f.run(t), "pool", OK, "running: default image, 2 CPUs, 512M: 2 of 2 ready", "-")
	f.PoolProblem = "template py cannot fill: boot: the guest\x1b[2J died\u009b2J\nagain"
	c := expect(t, f.run(t), "pool", Warn, "template py cannot fill: boot: the guest[2J died2J again", "see mvmctl pool status and the pool's log")
	if strings.ContainsRune(c.Message, 0x1b) {
		t.Errorf("pool: an escape reached the report: %q", c.Message)
	}
}

func TestHasNote(t *testing.T) {
	pvh := note("Xen", xenElfnotePhys32Entry, []byte{1, 2, 3, 4})
	tests := []struct {
		name string
		b    []byte
		want bool
	}{
		{"pvh", pvh, true},
		{"after others", append(note("GNU", 3, make([]byte, 20)), pvh...), true},
		{"other xen note", note("Xen", 1, []byte{1}), false},
		{"truncated", pvh[:len(pvh)-2], false},
		{"huge sizes", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 18, 0, 0, 0}, false},
		{"short", []byte{1, 2, 3}, false},
		{"empty", nil, false},
	}
	for _, tt := range tests {
		if got := hasNote(tt.b, binary.LittleEndian, "Xen", xenElfnotePhys32Entry); got != tt.want {
			t.Errorf("%s: hasNote = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestWriteText(t *testing.T) {
	r := Report{OK: false, Checks: []Result{
		{ID: "qemu", Status: OK, Message: "QEMU 7.2.22"},
		{ID: "accel", Status: Warn, Message: "tcg"},
		{ID: "image", Status: Fail, Message: "no default image", Fix: "mvmctl bootstrap"},
		{ID: "jailer", Status: Skip, Message: "not root"},
	}}
	var b bytes.Buffer
	if err := r.WriteText(&b, false); err != nil {
		t.Fatal(err)
	}
	want := "ok    qemu    QEMU 7.2.22\n" +
		"warn  accel   tcg\n" +
		"FAIL  image   no default image; fix: mvmctl bootstrap\n" +
		"skip  jailer  not root\n" +
		"mvmctl exec cannot work here: 1 check failed (1 warning); run the fixes above, then mvmctl doctor again\n"
	if b.String() != want {
		t.Errorf("text:\n%s\nwant:\n%s", b.String(), want)
	}
	if strings.Contains(b.String(), "\033") {
		t.Error("escape sequences without colour")
	}
	b.Reset()
	r.OK = true
	r.Checks = r.Checks[:2]
	r.WriteText(&b, true)
	if !strings.Contains(b.String(), "\033[33mwarn\033[0m  accel") || !strings.HasSuffix(b.String(), "mvmctl exec can work here (1 warning)\n") {
		t.Errorf("coloured text: %q", b.String())
	}
}

// TestJSONSchema pins the JSON form docs/doctor.md documents.
func TestJSONSchema(t *testing.T) {
	r := newFakeHost(t).run(t)
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range top {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"accel", "checks", "duration_ms", "ok", "schema"}; !slices.Equal(keys, want) {
		t.Errorf("top-level keys %v, want %v", keys, want)
	}
	var checks []map[string]any
	json.Unmarshal(top["checks"], &checks)
	if len(checks) != len(allIDs) {
		t.Fatalf("%d checks, want %d", len(checks), len(allIDs))
	}
	for _, c := range checks {
		for k := range c {
			if k != "id" && k != "status" && k != "message" && k != "fix" {
				t.Errorf("check %v has an undocumented field %q", c["id"], k)
			}
		}
		if st := c["status"]; st != "ok" && st != "warn" && st != "fail" && st != "skip" {
			t.Errorf("check %v: status %v", c["id"], st)
		}
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, r) {
		t.Errorf("round trip: %v\n%+v\n%+v", err, back, r)
	}
}

// TestDocumentedIDs keeps docs/doctor.md's table in step with the checks.
func TestDocumentedIDs(t *testing.T) {
	doc, err := os.ReadFile("../../docs/doctor.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range allIDs {
		if !strings.Contains(string(doc), "| `"+id+"` |") {
			t.Errorf("docs/doctor.md has no row for check %q", id)
		}
	}
}

// TestRealQEMU probes this host's QEMU, which the project needs
// (scripts/setup.sh installs it): what mvm uses must be found.
func TestRealQEMU(t *testing.T) {
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("QEMU is missing (install qemu-system-x86): %v", err)
	}
	h := &Host{QEMU: bin, Euid: os.Geteuid()}
	start := time.Now()
	f := &facts{qemu: probeQEMU(t.Context(), bin, DefaultProbeTimeout)}
	d := time.Since(start)
	for _, c := range []Result{checkQEMU(h, f), checkQEMUFeatures(h, f), checkQEMUSandbox(h, f)} {
		if c.Status != OK {
			t.Errorf("%s: %s: %s", c.ID, c.Status, c.Message)
		}
	}
	if d > 2*time.Second {
		t.Errorf("probing QEMU took %s", d)
	}
	t.Logf("QEMU probes took %s", d)
}
