package hostdeps

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestCheckNamesPackagesAndCommand(t *testing.T) {
	err := Check("mvmctl bootstrap",
		Program("sh", "dash"),
		Program("mvm-no-such-program-a", "pkg-b"),
		File("/mvm/no/such/file", "pkg-a"),
		Program("mvm-no-such-program-c", "pkg-b"),
	)
	var me *MissingError
	if !errors.As(err, &me) {
		t.Fatalf("Check = %v, want *MissingError", err)
	}
	if got := strings.Join(me.Packages(), " "); got != "pkg-a pkg-b" {
		t.Errorf("Packages = %q, want %q", got, "pkg-a pkg-b")
	}
	msg := err.Error()
	for _, want := range []string{"mvm-no-such-program-a (package pkg-b)", "/mvm/no/such/file (package pkg-a)", "apt-get install -y --no-install-recommends pkg-a pkg-b"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "dash") {
		t.Errorf("message names a present dependency: %q", msg)
	}
	if wantSudo := os.Geteuid() != 0; strings.HasPrefix(me.InstallCommand(), "sudo ") != wantSudo {
		t.Errorf("InstallCommand %q: sudo prefix should be %v", me.InstallCommand(), wantSudo)
	}
}

func TestCheckAllPresent(t *testing.T) {
	if err := Check("x", Program("sh", "dash")); err != nil {
		t.Fatal(err)
	}
}

func TestIsStatic(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The test binary is linked by the Go toolchain; whether it is static
	// depends on cgo, so only check that the answer comes without error.
	if _, err := IsStatic(exe); err != nil {
		t.Fatal(err)
	}
	if st, err := IsStatic("/bin/sh"); err != nil || st {
		t.Errorf("IsStatic(/bin/sh) = %v, %v; want false (dynamically linked)", st, err)
	}
	if _, err := IsStatic("/etc/hostname"); err == nil {
		t.Error("IsStatic on a non-ELF file should fail")
	}
}

// An ordinary user's PATH often lacks /usr/sbin, where e2fsprogs lives.
func TestLookPathFindsSystemPrograms(t *testing.T) {
	if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
		if _, err := os.Stat("/sbin/mkfs.ext4"); err != nil {
			t.Fatal("mkfs.ext4 is not installed in /usr/sbin or /sbin (e2fsprogs)")
		}
	}
	t.Setenv("PATH", "/usr/bin:/bin")
	p, err := LookPath("mkfs.ext4")
	if err != nil || !strings.HasSuffix(p, "/mkfs.ext4") {
		t.Fatalf("LookPath(mkfs.ext4) = %q, %v", p, err)
	}
	if _, err := LookPath("mvm-no-such-program"); err == nil {
		t.Error("found a program that does not exist")
	}
}
