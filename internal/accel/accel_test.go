package accel

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeHost builds a directory tree with the given /sys/module entries and,
// when kvm is true, a regular file standing in for /dev/kvm (openable
// read-write, which is all the check does).
func fakeHost(t *testing.T, kvm bool, modules ...string) Host {
	t.Helper()
	root := t.TempDir()
	for _, m := range modules {
		if err := os.MkdirAll(filepath.Join(root, "sys/module", m), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "dev"), 0o755); err != nil {
		t.Fatal(err)
	}
	if kvm {
		if err := os.WriteFile(filepath.Join(root, "dev/kvm"), nil, 0o666); err != nil {
			t.Fatal(err)
		}
	}
	return Host{Root: root}
}

func TestResolve(t *testing.T) {
	tests := []struct {
		name       string
		kvm        bool
		modules    []string
		mode       Mode
		want       Mode
		wantErr    string
		wantReason string
	}{
		{name: "auto intel", kvm: true, modules: []string{"kvm", "kvm_intel"}, mode: Auto, want: KVM, wantReason: "kvm_intel"},
		{name: "auto amd", kvm: true, modules: []string{"kvm", "kvm_amd"}, mode: Auto, want: KVM, wantReason: "kvm_amd"},
		{name: "auto pvm only", kvm: true, modules: []string{"kvm", "kvm_pvm"}, mode: Auto, want: TCG, wantReason: "PVM-only"},
		{name: "auto no dev", modules: []string{"kvm_intel"}, mode: Auto, want: TCG, wantReason: "does not exist"},
		{name: "auto no vendor", kvm: true, mode: Auto, want: TCG, wantReason: "no kvm_intel"},
		{name: "forced tcg on kvm host", kvm: true, modules: []string{"kvm_intel"}, mode: TCG, want: TCG},
		{name: "forced kvm on pvm", kvm: true, modules: []string{"kvm_pvm"}, mode: KVM, want: KVM, wantReason: "PVM-aware"},
		{name: "forced kvm without dev", mode: KVM, wantErr: "/dev/kvm does not exist"},
		{name: "bogus mode", kvm: true, mode: "xen", wantErr: "invalid accelerator"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := fakeHost(t, tt.kvm, tt.modules...).Resolve(tt.mode)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Resolve(%q) error = %v, want it to contain %q", tt.mode, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Resolve(%q): %v", tt.mode, err)
			}
			if got.Kind != tt.want {
				t.Errorf("Resolve(%q) = %s (%s), want %s", tt.mode, got.Kind, got.Reason, tt.want)
			}
			if !strings.Contains(got.Reason, tt.wantReason) {
				t.Errorf("reason %q does not mention %q", got.Reason, tt.wantReason)
			}
		})
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"": Auto, "auto": Auto, "KVM": KVM, " tcg ": TCG} {
		got, err := ParseMode(in)
		if err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseMode("hvf"); err == nil || !strings.Contains(err.Error(), `"hvf"`) {
		t.Errorf("ParseMode(hvf) error = %v, want it to name the value", err)
	}
}
