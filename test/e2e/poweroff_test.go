package e2e

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// poweroff, halt and reboot in the guest (busybox's, which signal PID 1)
// end the VM cleanly: the run ends at once with the command's status, and
// what the guest wrote to a read-write directory is written back.
func TestGuestPowerOff(t *testing.T) {
	for _, tc := range []struct {
		name, script string
		code         int
	}{
		{"poweroff", "exec poweroff", 0},
		{"halt", "exec halt", 0},
		{"reboot", "exec reboot", 0},
		// A command still running when the guest shuts down gets SIGTERM
		// (143), as on any machine going down.
		{"poweroff then sleep", "poweroff; sleep 100", 143},
		{"SIGPWR to init", "kill -PWR 1; sleep 100", 143},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			r := e.run(nil, "exec", "--timeout", "60s", "-d", dir+":/out:rw", "--", "sh", "-c", "echo kept > /out/f; "+tc.script)
			if r.code != tc.code {
				t.Fatalf("got %s, want exit %d", r, tc.code)
			}
			// A hang would last the 60 s timeout.
			if r.elapsed > 20*time.Second {
				t.Fatalf("run took %s", r.elapsed)
			}
			if b, err := os.ReadFile(filepath.Join(dir, "f")); err != nil || string(b) != "kept\n" {
				t.Fatalf("written back: %q, %v", b, err)
			}
			e.assertClean()
		})
	}
}
