package kernel

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestVerifyConfig(t *testing.T) {
	frag := []byte("CONFIG_A=y\nCONFIG_N=64\nCONFIG_S=\"x\"\n# CONFIG_OFF is not set\n# comment\n")
	tests := []struct {
		name    string
		config  string
		wantErr []string
	}{
		{name: "all kept", config: "CONFIG_A=y\nCONFIG_N=64\nCONFIG_S=\"x\"\n# CONFIG_OFF is not set\n"},
		{name: "dropped", config: "CONFIG_N=64\nCONFIG_S=\"x\"\n", wantErr: []string{"CONFIG_A=y"}},
		{name: "changed", config: "CONFIG_A=y\nCONFIG_N=8\nCONFIG_S=\"x\"\n", wantErr: []string{"CONFIG_N=64", `got "8"`}},
		{name: "forced on", config: "CONFIG_A=y\nCONFIG_N=64\nCONFIG_S=\"x\"\nCONFIG_OFF=y\n", wantErr: []string{"# CONFIG_OFF is not set"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), ".config")
			if err := os.WriteFile(p, []byte(tt.config), 0o644); err != nil {
				t.Fatal(err)
			}
			err := VerifyConfig(p, frag)
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("VerifyConfig succeeded, want an error")
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestCompareVersions(t *testing.T) {
	in := []string{"/usr/src/linux-source-6.10.tar.xz", "/usr/src/linux-source-6.1.tar.xz", "/usr/src/linux-source-5.19.tar.xz", "/usr/src/linux-source-6.2.tar.xz"}
	slices.SortFunc(in, compareVersions)
	want := []string{"/usr/src/linux-source-5.19.tar.xz", "/usr/src/linux-source-6.1.tar.xz", "/usr/src/linux-source-6.2.tar.xz", "/usr/src/linux-source-6.10.tar.xz"}
	if !slices.Equal(in, want) {
		t.Errorf("sorted = %v, want %v", in, want)
	}
}

// TestFragmentEssentials guards the options the rest of mvm depends on.
func TestFragmentEssentials(t *testing.T) {
	for _, opt := range []string{
		"CONFIG_VIRTIO_MMIO=y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y", "CONFIG_VIRTIO_CONSOLE=y",
		"CONFIG_VIRTIO_BLK=y", "CONFIG_EXT4_FS=y", "CONFIG_OVERLAY_FS=y", "CONFIG_PVH=y",
		"CONFIG_BLK_DEV_INITRD=y", "CONFIG_DEVTMPFS=y", "CONFIG_FUTEX=y", "CONFIG_EPOLL=y",
		"# CONFIG_ACPI is not set", "# CONFIG_PCI is not set", "# CONFIG_MODULES is not set",
	} {
		if !slices.Contains(strings.Split(string(Fragment), "\n"), opt) {
			t.Errorf("fragment lacks %q", opt)
		}
	}
}
