package doctor

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/image"
)

// elfSegment is one program header of a hand-made ELF file.
type elfSegment struct {
	typ  uint32
	data []byte
}

const (
	ptInterp = 3
	ptNote   = 4
)

// writeELF writes a minimal x86-64 ELF executable with the given
// segments: enough for debug/elf, and for the checks that read program
// headers (static or not, a PVH note or not).
func writeELF(t *testing.T, path string, machine uint16, segs ...elfSegment) {
	t.Helper()
	var b bytes.Buffer
	le := binary.LittleEndian
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0})
	b.Write(make([]byte, 8))
	for _, v := range []any{uint16(2), machine, uint32(1), uint64(0), uint64(64), uint64(0), uint32(0),
		uint16(64), uint16(56), uint16(len(segs)), uint16(64), uint16(0), uint16(0)} {
		_ = binary.Write(&b, le, v)
	}
	off := uint64(64 + 56*len(segs))
	for _, s := range segs {
		for _, v := range []any{s.typ, uint32(4), off, uint64(0), uint64(0), uint64(len(s.data)), uint64(len(s.data)), uint64(4)} {
			_ = binary.Write(&b, le, v)
		}
		off += uint64(len(s.data))
	}
	for _, s := range segs {
		b.Write(s.data)
	}
	if err := os.WriteFile(path, b.Bytes(), 0o755); err != nil {
		t.Fatal(err)
	}
}

// note encodes one ELF note.
func note(owner string, typ uint32, desc []byte) []byte {
	var b bytes.Buffer
	name := append([]byte(owner), 0)
	le := binary.LittleEndian
	_ = binary.Write(&b, le, uint32(len(name)))
	_ = binary.Write(&b, le, uint32(len(desc)))
	_ = binary.Write(&b, le, typ)
	pad := func(p []byte) []byte { return append(p, make([]byte, (4-len(p)%4)%4)...) }
	b.Write(pad(name))
	b.Write(pad(desc))
	return b.Bytes()
}

func pvhNote() elfSegment {
	return elfSegment{ptNote, append(note("GNU", 3, make([]byte, 20)), note("Xen", xenElfnotePhys32Entry, []byte{0, 6, 0, 1})...)}
}

const emX8664 = 62

// fakeQEMU describes what a fake qemu-system-x86_64 answers.
type fakeQEMU struct {
	version      string // "" prints no version line
	noMicrovm    bool
	noBlk        bool
	noSandbox    bool   // -help without -sandbox
	sandboxFails string // the sandbox probe exits 1 with this
	noRunas      bool
	dryFails     string // loading the image exits 1 with this
	hang         bool   // never answers
}

// write puts a shell script that answers QEMU's probes as f says in dir.
func (f fakeQEMU) write(t *testing.T, dir string) string {
	t.Helper()
	var s strings.Builder
	s.WriteString("#!/bin/sh\n")
	if f.hang {
		s.WriteString("exec sleep 30\n")
	}
	machines := "Supported machines are:\npc                   Standard PC\n"
	if !f.noMicrovm {
		machines += "microvm              microvm (i386)\n"
	}
	devices := "name \"virtio-serial-device\", bus virtio-bus\nname \"virtserialport\", bus virtio-serial-bus\n"
	if !f.noBlk {
		devices += "name \"virtio-blk-device\", bus virtio-bus\n"
	}
	help := "-name string     set the name of the guest\n"
	if !f.noSandbox {
		help += "-sandbox on[,obsolete=allow|deny]\n"
	}
	if !f.noRunas {
		help += "-runas user     change to user id user just before starting the VM\n-chroot dir     chroot to dir just before starting the VM\n"
	}
	fail := func(msg string) string {
		if msg == "" {
			return "read line; exit 0"
		}
		return fmt.Sprintf("echo %q >&2; exit 1", msg)
	}
	// Help texts are files beside the script, printed with cat.
	for name, text := range map[string]string{"version": versionLine(f.version), "machines": machines, "devices": devices, "help": help} {
		if err := os.WriteFile(filepath.Join(dir, name+".txt"), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	fmt.Fprintf(&s, `d=$(dirname "$0")
case "$*" in
-version) cat "$d/version.txt" ;;
"-M help") cat "$d/machines.txt" ;;
"-M microvm,help") echo "microvm-machine options:"; echo "  acpi=<OnOffAuto>       - Enable ACPI" ;;
"-device help") cat "$d/devices.txt" ;;
"-accel help") printf 'Accelerators supported in QEMU binary:\ntcg\nkvm\n' ;;
-help) cat "$d/help.txt" ;;
"-M none "*) %s ;;
"-M microvm,acpi=off "*) %s ;;
*) echo "unexpected arguments: $*" >&2; exit 1 ;;
esac
`, fail(f.sandboxFails), fail(f.dryFails))
	p := filepath.Join(dir, "qemu-system-x86_64")
	if err := os.WriteFile(p, []byte(s.String()), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func versionLine(v string) string {
	if v == "" {
		return "some other program\n"
	}
	return "QEMU emulator version " + v + " (fake)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
}

// fakeHost is a host tree in a temp dir: /dev/kvm (a regular file, which
// opens read-write as the check needs), /sys/module entries, cpuinfo,
// passwd and group, mvm's directories with a default image whose kernel
// has a PVH note, a static agent and jailer, and a fake QEMU. Every host
// package counts as installed. Tests break one thing at a time.
type fakeHost struct {
	Host
	dir string
}

func newFakeHost(t *testing.T) *fakeHost {
	t.Helper()
	dir := t.TempDir()
	mk := func(p string, mode os.FileMode, data string) string {
		t.Helper()
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		return full
	}
	root := filepath.Join(dir, "root")
	mk("root/dev/kvm", 0o660, "")
	for _, m := range []string{"kvm", "kvm_intel"} {
		if err := os.MkdirAll(filepath.Join(root, "sys/module", m), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mk("root/proc/cpuinfo", 0o644, "processor\t: 0\nflags\t\t: fpu vme vmx sse\n")
	mk("root/etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
	mk("root/etc/group", 0o644, "root:x:0:\nkvm:x:993:alice\nalice:x:1000:\n")

	bin := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	agent := filepath.Join(bin, "mvm-agent")
	writeELF(t, agent, emX8664)
	jailer := filepath.Join(bin, "mvm-jailer")
	writeELF(t, jailer, emX8664)
	busybox := filepath.Join(bin, "busybox")
	writeELF(t, busybox, emX8664)

	cache := filepath.Join(dir, "cache")
	kernel := filepath.Join(cache, "kernels", "k1", "vmlinux")
	if err := os.MkdirAll(filepath.Dir(kernel), 0o755); err != nil {
		t.Fatal(err)
	}
	writeELF(t, kernel, emX8664, pvhNote())
	initrd := mk("cache/initrds/i1.cpio", 0o644, "070701"+strings.Repeat("0", 100))
	saveImage(t, cache, image.Image{Name: image.DefaultName, Kernel: kernel, KernelKey: "k1", Initrd: initrd, InitrdKey: "i1"})

	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(filepath.Join(state, "runs"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(state, 0o700); err != nil {
		t.Fatal(err)
	}
	return &fakeHost{dir: dir, Host: Host{
		Root:         root,
		CacheDir:     cache,
		StateDir:     state,
		RunDir:       filepath.Join(state, "runs"),
		DataDir:      filepath.Join(dir, "data"),
		QEMU:         fakeQEMU{version: "7.2.22"}.write(t, bin),
		Jailer:       jailer,
		Agent:        agent,
		Busybox:      busybox,
		Euid:         1000,
		Uid:          os.Getuid(),
		Groups:       []int{1000, 993},
		User:         "alice",
		Present:      func(hostdeps.Dep) bool { return true },
		KernelSource: func() (string, error) { return "/usr/src/linux-source-6.1.tar.xz", nil },
		KernelDeps:   []hostdeps.Dep{hostdeps.Program("gcc", "gcc"), hostdeps.Program("flex", "flex")},
		InitrdKey:    func(string, string) (string, error) { return "i1", nil },
		ProbeTimeout: 5 * time.Second,
		MinFree:      1,
	}}
}

func saveImage(t *testing.T, cache string, img image.Image) {
	t.Helper()
	if err := (image.Store{Root: cache}).Save(img); err != nil {
		t.Fatal(err)
	}
}

// missing makes the named programs or files absent.
func (f *fakeHost) missing(names ...string) {
	f.Present = func(d hostdeps.Dep) bool {
		for _, n := range names {
			if d.What == n || filepath.Base(d.What) == n {
				return false
			}
		}
		return true
	}
}

func (f *fakeHost) run(t *testing.T) Report {
	t.Helper()
	return Run(context.Background(), f.Host)
}

// check returns the result with the given ID.
func check(t *testing.T, r Report, id string) Result {
	t.Helper()
	for _, c := range r.Checks {
		if c.ID == id {
			return c
		}
	}
	t.Fatalf("no check %q in %v", id, r.Checks)
	return Result{}
}

// expect asserts a check's status and that its message and fix contain
// the given parts; fixHas "-" means it must have no fix. A failure always
// needs a fix unless the test says so.
func expect(t *testing.T, r Report, id string, st Status, msgHas, fixHas string) Result {
	t.Helper()
	c := check(t, r, id)
	if c.Status != st {
		t.Errorf("%s: status %s, want %s (%s; fix %q)", id, c.Status, st, c.Message, c.Fix)
	}
	if !strings.Contains(c.Message, msgHas) {
		t.Errorf("%s: message %q does not contain %q", id, c.Message, msgHas)
	}
	switch {
	case fixHas == "-" && c.Fix != "":
		t.Errorf("%s: fix %q, want none", id, c.Fix)
	case fixHas != "-" && !strings.Contains(c.Fix, fixHas):
		t.Errorf("%s: fix %q does not contain %q", id, c.Fix, fixHas)
	case fixHas != "-" && c.Status == Fail && c.Fix == "":
		t.Errorf("%s: a failure without a fix: %s", id, c.Message)
	}
	return c
}

func dump(r Report) string {
	b, _ := json.MarshalIndent(r, "", "  ")
	return string(b)
}
