package qemu

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/backend"
)

var update = flag.Bool("update", false, "rewrite testdata/*.args from buildArgs")

// baseArgsConfig is a TCG machine with 2 CPUs, 512 MiB, a kernel and an
// initramfs, no drives, no raw ports and the sandbox on.
func baseArgsConfig() argsConfig {
	return argsConfig{
		cfg: backend.Config{
			Name:      "exec-1a2b-3c4d",
			RunDir:    "/run/mvm/exec-1a2b-3c4d",
			Kernel:    "/var/cache/mvm/vmlinux",
			Initrd:    "/var/cache/mvm/initramfs.cpio",
			CPUs:      2,
			MemoryMiB: 512,
			Accel:     accel.TCG,
		},
		agentFD:   3,
		qmpFD:     4,
		consoleFD: 5,
		sandbox:   true,
	}
}

const sandboxValue = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

type goldenCase struct {
	name   string
	modify func(a *argsConfig)
	// check asserts properties of the arguments beyond the golden file.
	check func(t *testing.T, args []string)
}

var goldenCases = []goldenCase{
	{
		name:   "tcg-default",
		modify: func(a *argsConfig) {},
		check: func(t *testing.T, args []string) {
			k := kernelArgs(t, args)
			if !slices.Contains(k, "lapic_timer_hz=1000000000") || !slices.Contains(k, "tsc=reliable") {
				t.Errorf("-append %q lacks the preset timer arguments under TCG", appendValue(t, args))
			}
			if slices.Contains(k, "noapictimer") {
				t.Errorf("-append %q turns the APIC timer off for mvm's own kernel", appendValue(t, args))
			}
			wantSeq(t, args, "-accel", "tcg", "-cpu", "max,-erms,-fsrm")
			wantSeq(t, args, "-smp", "2")
			wantSeq(t, args, "-m", "512M")
			wantSeq(t, args, "-kernel", "/var/cache/mvm/vmlinux")
			wantSeq(t, args, "-initrd", "/var/cache/mvm/initramfs.cpio")
			wantSeq(t, args, "-chardev", "socket,id=agent,fd=3")
			wantSeq(t, args, "-chardev", "socket,id=qmp,fd=4")
			wantSeq(t, args, "-chardev", "socket,id=console,fd=5")
			wantSeq(t, args, "-device", "virtserialport,bus=vser0.0,chardev=agent,id=agentport,name="+agentPortName)
			if got := args[len(args)-2:]; !slices.Equal(got, []string{"-sandbox", sandboxValue}) {
				t.Errorf("arguments end with %q, want the sandbox option", got)
			}
			if n := count(args, "-drive"); n != 0 {
				t.Errorf("%d -drive options, want none", n)
			}
		},
	},
	{
		name:   "kvm",
		modify: func(a *argsConfig) { a.cfg.Accel = accel.KVM },
		check: func(t *testing.T, args []string) {
			if v := appendValue(t, args); strings.Contains(v, "noapictimer") || strings.Contains(v, "lapic_timer_hz") || strings.Contains(v, "tsc=") {
				t.Errorf("-append %q has TCG's timer arguments under KVM", v)
			}
			wantSeq(t, args, "-accel", "kvm", "-cpu", "host")
			if slices.Contains(args, "tcg") {
				t.Errorf("KVM arguments mention tcg: %q", args)
			}
		},
	},
	{
		name:   "foreign-kernel",
		modify: func(a *argsConfig) { a.cfg.ForeignKernel = true },
		check: func(t *testing.T, args []string) {
			k := kernelArgs(t, args)
			if !slices.Contains(k, "noapictimer") {
				t.Errorf("-append %q lacks noapictimer for a --kernel kernel under TCG", appendValue(t, args))
			}
			if slices.Contains(k, "lapic_timer_hz=1000000000") {
				t.Errorf("-append %q passes lapic_timer_hz to a kernel that may not know it", appendValue(t, args))
			}
		},
	},
	{
		name:   "tsc-rate",
		modify: func(a *argsConfig) { a.tscKHz = 2599985 },
		check: func(t *testing.T, args []string) {
			if k := kernelArgs(t, args); !slices.Contains(k, "tsc_early_khz=2599985") {
				t.Errorf("-append %q does not tell the guest the TSC's rate", appendValue(t, args))
			}
		},
	},
	{
		name: "tsc-rate-foreign-kernel",
		modify: func(a *argsConfig) {
			a.tscKHz = 2599985
			a.cfg.ForeignKernel = true
		},
		check: func(t *testing.T, args []string) {
			if v := appendValue(t, args); strings.Contains(v, "tsc_early_khz") {
				t.Errorf("-append %q passes tsc_early_khz to a kernel that may not know it", v)
			}
		},
	},
	{
		name: "kernel-args",
		modify: func(a *argsConfig) {
			a.cfg.KernelArgs = []string{"mvm.debug=1", "loglevel=7"}
		},
		check: func(t *testing.T, args []string) {
			k := kernelArgs(t, args)
			if len(k) < 3 || !slices.Equal(k[len(k)-2:], []string{"mvm.debug=1", "loglevel=7"}) {
				t.Errorf("-append %q does not end with the extra arguments in order", appendValue(t, args))
			}
			if !slices.Contains(k, "lapic_timer_hz=1000000000") || !slices.Contains(k, "console=ttyS0") {
				t.Errorf("-append %q lost the built-in arguments", appendValue(t, args))
			}
		},
	},
	{
		name: "drives",
		modify: func(a *argsConfig) {
			a.cfg.Drives = []backend.Drive{
				{Label: "work", Path: "/tmp/work.img"},
				{Label: "ro-data", Path: "/srv/ro.img", ReadOnly: true},
			}
		},
		check: func(t *testing.T, args []string) {
			drives := valuesOf(args, "-drive")
			if len(drives) != 2 {
				t.Fatalf("-drive values = %q, want 2", drives)
			}
			if strings.Contains(drives[0], "readonly") {
				t.Errorf("writable drive %q is read-only", drives[0])
			}
			// Images come as descriptors (fdsets), never as paths.
			if !strings.HasPrefix(drives[0], "file=/dev/fdset/1,") || !strings.Contains(drives[0], ",id=drive0,") {
				t.Errorf("first drive = %q", drives[0])
			}
			if !strings.HasPrefix(drives[1], "file=/dev/fdset/2,") || !strings.Contains(drives[1], ",id=drive1,") ||
				!strings.HasSuffix(drives[1], ",readonly=on") {
				t.Errorf("second drive = %q, want drive1 with readonly=on", drives[1])
			}
			wantSeq(t, args, "-add-fd", "fd=10,set=1", "-add-fd", "fd=11,set=1", "-drive")
			wantSeq(t, args, "-add-fd", "fd=12,set=2", "-drive")
			wantSeq(t, args, "-device", "virtio-blk-device,drive=drive0,serial=work")
			wantSeq(t, args, "-device", "virtio-blk-device,drive=drive1,serial=ro-data")
		},
	},
	{
		name: "raw-port",
		modify: func(a *argsConfig) {
			a.cfg.RawPorts = []string{"org.mvm.bench.0"}
			a.rawFDs = []int{5}
		},
		check: func(t *testing.T, args []string) {
			wantSeq(t, args,
				"-chardev", "socket,id=raw0,fd=5",
				"-device", "virtserialport,bus=vser0.0,chardev=raw0,name=org.mvm.bench.0")
		},
	},
	{
		name: "nic",
		modify: func(a *argsConfig) {
			a.cfg.NIC = &backend.NIC{MAC: "52:54:00:ab:cd:ef"}
			a.nicFD = 7
		},
		check: func(t *testing.T, args []string) {
			wantSeq(t, args,
				"-netdev", "socket,id=net0,fd=7",
				"-device", "virtio-net-device,netdev=net0,mac=52:54:00:ab:cd:ef")
		},
	},
	{
		name: "tap",
		modify: func(a *argsConfig) {
			a.cfg.NIC = &backend.NIC{MAC: "0a:58:0a:fa:4d:05", TAP: true}
			a.nicFD = 7
		},
		check: func(t *testing.T, args []string) {
			wantSeq(t, args,
				"-netdev", "tap,id=net0,fd=7",
				"-device", "virtio-net-device,netdev=net0,mac=0a:58:0a:fa:4d:05")
		},
	},
	{
		name:   "sandbox-off",
		modify: func(a *argsConfig) { a.sandbox = false },
		check: func(t *testing.T, args []string) {
			if slices.Contains(args, "-sandbox") {
				t.Errorf("sandbox off but arguments contain -sandbox: %q", args)
			}
		},
	},
	{
		name:   "no-initrd",
		modify: func(a *argsConfig) { a.cfg.Initrd = "" },
		check: func(t *testing.T, args []string) {
			if slices.Contains(args, "-initrd") {
				t.Errorf("no initrd but arguments contain -initrd: %q", args)
			}
		},
	},
	{
		name: "comma-paths",
		modify: func(a *argsConfig) {
			a.cfg.Name = "a,b"
			a.cfg.Drives = []backend.Drive{{Label: "disk", Path: "/srv/x,format=qcow2.img"}}
		},
		check: func(t *testing.T, args []string) {
			wantSeq(t, args, "-name", "a,,b")
			// A drive's path never reaches the command line.
			for _, a := range args {
				if strings.Contains(a, "qcow2") {
					t.Errorf("argument %q names the image path", a)
				}
			}
		},
	},
	{
		name: "confined",
		modify: func(a *argsConfig) {
			a.runAs = "1073741825:1073741825"
			a.chroot = "/run/mvm/exec-1a2b-3c4d"
		},
		check: func(t *testing.T, args []string) {
			wantSeq(t, args, "-runas", "1073741825:1073741825", "-chroot", "/run/mvm/exec-1a2b-3c4d")
			// QEMU drops privileges after installing its filter, so the
			// filter must let it.
			wantSeq(t, args, "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny")
		},
	},
}

func init() {
	restore := func(readOnly bool) func(a *argsConfig) {
		return func(a *argsConfig) {
			a.cfg.Snapshot = &backend.Snapshot{Dir: "/var/cache/mvm/snapshots/0123", Restore: true}
			a.ramReadOnly = readOnly
		}
	}
	goldenCases = append(goldenCases,
		goldenCase{
			name: "snapshot-save",
			modify: func(a *argsConfig) {
				a.cfg.Snapshot = &backend.Snapshot{Dir: "/var/cache/mvm/snapshots/.tmp-1"}
			},
			check: func(t *testing.T, args []string) {
				// Booted with its RAM written through to the file.
				wantSeq(t, args, "-object", "memory-backend-file,id=ram0,size=512M,mem-path=/var/cache/mvm/snapshots/.tmp-1/ram,share=on")
				if slices.Contains(args, "-incoming") {
					t.Errorf("a machine to snapshot boots, it does not wait for state: %q", args)
				}
			},
		},
		goldenCase{
			name:   "snapshot-restore",
			modify: restore(false),
			check: func(t *testing.T, args []string) {
				wantSeq(t, args, "-object", "memory-backend-file,id=ram0,size=512M,mem-path=/var/cache/mvm/snapshots/0123/ram,share=off")
				wantSeq(t, args, "-incoming", "defer")
			},
		},
		goldenCase{
			name:   "snapshot-restore-readonly",
			modify: restore(true),
			check: func(t *testing.T, args []string) {
				// Opened read-only, mapped writable and private.
				wantSeq(t, args, "-object", "memory-backend-file,id=ram0,size=512M,mem-path=/var/cache/mvm/snapshots/0123/ram,share=off,readonly=on,rom=off")
			},
		},
	)
}

func TestHasROMProperty(t *testing.T) {
	for _, tc := range []struct {
		name, help string
		want       bool
	}{
		// QEMU 7.2, as Debian 12 has it.
		{"7.2", "memory-backend-file options:\n  align=<int>\n  readonly=<bool>\n  reserve=<bool>         - Reserve swap space\n  share=<bool>           - Mark the memory as private to QEMU or shared\n", false},
		{"8.2", "memory-backend-file options:\n  readonly=<bool>\n  rom=<OnOffAuto>        - Whether to create Read Only Memory (ROM)\n  share=<bool>\n", true},
		{"a value mentioning rom", "  x-note=<str> - see rom=on\n", false},
		{"empty", "", false},
	} {
		if got := hasROMProperty([]byte(tc.help)); got != tc.want {
			t.Errorf("%s: hasROMProperty = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestBuildArgsGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			a := baseArgsConfig()
			tc.modify(&a)
			args, err := buildArgs(withDriveFDs(a))
			if err != nil {
				t.Fatalf("buildArgs: %v", err)
			}
			golden := filepath.Join("testdata", tc.name+".args")
			if *update {
				if err := os.MkdirAll("testdata", 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(golden, []byte(strings.Join(args, "\n")+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			b, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("read golden file (run with -update to create it): %v", err)
			}
			want := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
			if diff := cmp.Diff(want, args); diff != "" {
				t.Errorf("buildArgs mismatch against %s (-want +got):\n%s", golden, diff)
			}
			tc.check(t, args)
		})
	}
}

// TestBuildArgsAppendLegacyDevices checks that no case switches off the
// PIT or PIC: under TCG the PIT is the guest's clock event device.
func TestBuildArgsAppendLegacyDevices(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			a := baseArgsConfig()
			tc.modify(&a)
			args, err := buildArgs(withDriveFDs(a))
			if err != nil {
				t.Fatalf("buildArgs: %v", err)
			}
			if n := count(args, "-append"); n != 1 {
				t.Fatalf("%d -append options, want 1", n)
			}
			v := appendValue(t, args)
			for _, bad := range []string{"pit=off", "pic=off"} {
				if strings.Contains(v, bad) {
					t.Errorf("-append %q contains %s", v, bad)
				}
			}
			for _, m := range valuesOf(args, "-M") {
				for _, bad := range []string{"pit=off", "pic=off"} {
					if strings.Contains(m, bad) {
						t.Errorf("-M %q contains %s", m, bad)
					}
				}
			}
		})
	}
}

func TestBuildArgsErrors(t *testing.T) {
	tests := []struct {
		name    string
		modify  func(a *argsConfig)
		wantErr string
	}{
		{"zero cpus", func(a *argsConfig) { a.cfg.CPUs = 0 }, "cpus must be at least 1, got 0"},
		{"negative cpus", func(a *argsConfig) { a.cfg.CPUs = -2 }, "cpus must be at least 1, got -2"},
		{"zero memory", func(a *argsConfig) { a.cfg.MemoryMiB = 0 }, "memory must be at least 1 MiB, got 0"},
		{"unknown accel", func(a *argsConfig) { a.cfg.Accel = "xen" }, `accelerator must be kvm or tcg, got "xen"`},
		{"unresolved auto", func(a *argsConfig) { a.cfg.Accel = accel.Auto }, `accelerator must be kvm or tcg, got "auto"`},
		{"empty accel", func(a *argsConfig) { a.cfg.Accel = "" }, `accelerator must be kvm or tcg, got ""`},
		{"kernel arg with space", func(a *argsConfig) { a.cfg.KernelArgs = []string{"ok=1", "init=/bin/sh -x"} }, `kernel argument "init=/bin/sh -x" contains whitespace`},
		{"kernel arg with tab", func(a *argsConfig) { a.cfg.KernelArgs = []string{"a\tb"} }, "contains whitespace"},
		{"kernel arg with newline", func(a *argsConfig) { a.cfg.KernelArgs = []string{"a\nb"} }, "contains whitespace"},
		{"drive label of 21 chars", func(a *argsConfig) {
			a.cfg.Drives = []backend.Drive{{Label: strings.Repeat("x", 21), Path: "/d.img"}}
		}, "at most 20 characters"},
		{"drive label with comma", func(a *argsConfig) {
			a.cfg.Drives = []backend.Drive{{Label: "a,b", Path: "/d.img"}}
		}, `drive label "a,b"`},
		{"drive label with equals", func(a *argsConfig) {
			a.cfg.Drives = []backend.Drive{{Label: "a=b", Path: "/d.img"}}
		}, `drive label "a=b"`},
		{"drive label with space", func(a *argsConfig) {
			a.cfg.Drives = []backend.Drive{{Label: "a b", Path: "/d.img"}}
		}, `drive label "a b"`},
		{"second drive bad", func(a *argsConfig) {
			a.cfg.Drives = []backend.Drive{{Label: "ok", Path: "/a.img"}, {Label: "no,pe", Path: "/b.img"}}
		}, `drive label "no,pe"`},
		{"nic with a bad MAC", func(a *argsConfig) { a.cfg.NIC = &backend.NIC{MAC: "52:54:00:ab:cd:ef,x=1"} }, "bad MAC"},
		{"nic with a short MAC", func(a *argsConfig) { a.cfg.NIC = &backend.NIC{MAC: "52:54:0:ab:cd:ef"} }, "bad MAC"},
		{"raw port without fd", func(a *argsConfig) { a.cfg.RawPorts = []string{"p0"} }, "1 raw ports but 0 descriptors"},
		{"fd without raw port", func(a *argsConfig) { a.rawFDs = []int{5} }, "0 raw ports but 1 descriptors"},
		{"two ports one fd", func(a *argsConfig) {
			a.cfg.RawPorts = []string{"p0", "p1"}
			a.rawFDs = []int{5}
		}, "2 raw ports but 1 descriptors"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := baseArgsConfig()
			tt.modify(&a)
			args, err := buildArgs(withDriveFDs(a))
			if err == nil {
				t.Fatalf("buildArgs succeeded with %q, want error containing %q", args, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("buildArgs error = %q, want it to contain %q", err, tt.wantErr)
			}
			if args != nil {
				t.Errorf("buildArgs returned arguments %q along with an error", args)
			}
		})
	}
}

func TestBuildArgsDriveIDOfTwentyChars(t *testing.T) {
	a := baseArgsConfig()
	id := strings.Repeat("y", 20)
	a.cfg.Drives = []backend.Drive{{Label: id, Path: "/d.img"}}
	args, err := buildArgs(withDriveFDs(a))
	if err != nil {
		t.Fatalf("buildArgs with a 20-character drive id: %v", err)
	}
	wantSeq(t, args, "-device", "virtio-blk-device,drive=drive0,serial="+id)
}

// TestBuildArgsDoesNotAliasConfig checks that building twice gives the same
// result and leaves the caller's kernel arguments alone.
func TestBuildArgsDoesNotAliasConfig(t *testing.T) {
	a := baseArgsConfig()
	a.cfg.KernelArgs = make([]string, 1, 8)
	a.cfg.KernelArgs[0] = "x=1"
	first, err := buildArgs(withDriveFDs(a))
	if err != nil {
		t.Fatal(err)
	}
	second, err := buildArgs(withDriveFDs(a))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first, second); diff != "" {
		t.Errorf("second build differs (-first +second):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"x=1"}, a.cfg.KernelArgs); diff != "" {
		t.Errorf("KernelArgs changed (-want +got):\n%s", diff)
	}
	if slices.Contains(baseKernelArgs, "x=1") || slices.Contains(baseKernelArgs, "noapictimer") || slices.Contains(baseKernelArgs, "tsc=reliable") {
		t.Errorf("baseKernelArgs changed: %q", baseKernelArgs)
	}
}

// valuesOf returns the argument after each occurrence of opt.
func valuesOf(args []string, opt string) []string {
	var vs []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == opt {
			vs = append(vs, args[i+1])
		}
	}
	return vs
}

func count(args []string, s string) int {
	n := 0
	for _, a := range args {
		if a == s {
			n++
		}
	}
	return n
}

func appendValue(t *testing.T, args []string) string {
	t.Helper()
	vs := valuesOf(args, "-append")
	if len(vs) != 1 {
		t.Fatalf("-append values = %q, want exactly one", vs)
	}
	return vs[0]
}

func kernelArgs(t *testing.T, args []string) []string {
	t.Helper()
	return strings.Split(appendValue(t, args), " ")
}

// wantSeq fails unless seq occurs in args as a contiguous run.
func wantSeq(t *testing.T, args []string, seq ...string) {
	t.Helper()
	for i := 0; i+len(seq) <= len(args); i++ {
		if slices.Equal(args[i:i+len(seq)], seq) {
			return
		}
	}
	t.Errorf("arguments lack the sequence %q:\n%q", seq, args)
}

// withDriveFDs gives every drive the descriptors Start would open for it,
// numbered from 10: one, or two for a writable drive.
func withDriveFDs(a argsConfig) argsConfig {
	if a.driveFDs != nil {
		return a
	}
	fd := 10
	for _, d := range a.cfg.Drives {
		fds := []int{fd}
		fd++
		if !d.ReadOnly {
			fds = append(fds, fd)
			fd++
		}
		a.driveFDs = append(a.driveFDs, fds)
	}
	return a
}
