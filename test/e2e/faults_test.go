package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A write error on mvmctl's stdout other than a closed pipe is an error:
// the command is stopped, one line says why, and the status is 125.
func TestOutputWriteErrors(t *testing.T) {
	e := newEnv(t)
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer full.Close()

	t.Run("dev full", func(t *testing.T) {
		cmd := e.command(context.Background(), "exec", "--", "echo", "hello")
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = full, &stderr
		_ = cmd.Run()
		if code := cmd.ProcessState.ExitCode(); code != 125 || !strings.Contains(stderr.String(), "write stdout: no space left on device") {
			t.Fatalf("exit %d, stderr %q: want 125 and the write error", code, stderr.String())
		}
	})

	t.Run("full filesystem", func(t *testing.T) {
		// A 1 MiB tmpfs, 3 MB of output: what fits is written, then the
		// error ends the run.
		mnt := t.TempDir()
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt).CombinedOutput(); err != nil {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
		defer exec.Command("umount", mnt).Run()
		f, err := os.Create(filepath.Join(mnt, "out"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd := e.command(context.Background(), "exec", "--", "sh", "-c", "head -c 3000000 /dev/zero; echo after >&2; sleep 30")
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = f, &stderr
		start := time.Now()
		_ = cmd.Run()
		if code := cmd.ProcessState.ExitCode(); code != 125 || !strings.Contains(stderr.String(), "write stdout: no space left on device") {
			t.Fatalf("exit %d, stderr %q: want 125 and the write error", code, stderr.String())
		}
		// The command was stopped rather than left to run its 30 s.
		if el := time.Since(start); el > 20*time.Second {
			t.Errorf("took %s: the command was not stopped", el)
		}
	})
	e.assertClean()
}

// A signal while the VM boots ends mvmctl at once, with nothing left.
func TestInterruptWhileBooting(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--", "sleep", "30")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The run directory appears as the boot begins.
	if !waitFor(10*time.Second, func() bool { entries, _ := os.ReadDir(e.runDir); return len(entries) > 0 }) {
		t.Fatal("the run never started")
	}
	start := time.Now()
	_ = cmd.Process.Signal(syscall.SIGINT)
	_ = cmd.Wait()
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("mvmctl ended %s after the interrupt, want under 2 s", el)
	}
	if code := cmd.ProcessState.ExitCode(); code != 130 || !strings.Contains(stderr.String(), "interrupted") {
		t.Fatalf("exit %d, stderr %q: want 130 and a message", code, stderr.String())
	}
	e.assertClean()
}

// A guest that halts or powers off on its own (the reboot(2) call made
// directly, which without ACPI stops the CPUs but not the VMM) is noticed
// at once through the VMM's events, not at a timeout.
func TestGuestHaltIsNoticed(t *testing.T) {
	e := newEnv(t)
	for _, argv := range [][]string{{"poweroff", "-f"}, {"halt", "-f"}} {
		t.Run(argv[0], func(t *testing.T) {
			r := e.run(nil, append([]string{"exec", "--timeout", "0", "--"}, argv...)...)
			if r.code != 125 || !strings.Contains(string(r.stderr), "the guest halted or powered off") {
				t.Fatalf("got %s\nwant 125 and a message", r)
			}
			if r.elapsed > 15*time.Second {
				t.Errorf("took %s to notice", r.elapsed)
			}
		})
	}
	e.assertClean()
}

// A SIGTERM while a large shared directory is being turned into an image
// ends mvmctl within a second, leaving nothing behind.
func TestSIGTERMDuringImageBuild(t *testing.T) {
	e := newEnv(t)
	flat := t.TempDir()
	for i := 0; i < 60000; i++ {
		if err := os.WriteFile(filepath.Join(flat, fmt.Sprintf("f%06d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "-d", flat+":/flat", "--", "true")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The image's directory appears as the build starts.
	building := func() bool {
		m, _ := filepath.Glob(filepath.Join(e.runDir, "*", "dirs", "0"))
		return len(m) > 0
	}
	if !waitFor(20*time.Second, building) {
		t.Fatal("the build never started")
	}
	start := time.Now()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
	if el := time.Since(start); el > 1500*time.Millisecond {
		t.Errorf("mvmctl ended %s after SIGTERM, want about a second at most", el)
	}
	if code := cmd.ProcessState.ExitCode(); code != 143 {
		t.Errorf("exit %d, want 143; stderr %q", code, stderr.String())
	}
	e.assertClean()
}

// --timeout T ends mvmctl by T plus the documented grace even when the
// guest does nothing at all (the agent froze after starting the command).
func TestTimeoutBackstopFrozenGuest(t *testing.T) {
	cache := hostileCache(t)
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r := e.runMeasured(ctx, nil, []string{"MVM_CACHE_DIR=" + cache, "MVM_KERNEL_ARGS=mvm.hostile=frozen"},
		"exec", "--timeout", "1", "--", "sleep", "1000")
	// 1 s, plus the 2 s kill grace and 3 s the host waits, plus boot.
	if r.code != 124 || !strings.Contains(string(r.stderr), "did not stop the command") {
		t.Fatalf("got %s\nwant 124 from the host's backstop", r.result)
	}
	if r.elapsed > 12*time.Second {
		t.Errorf("took %s", r.elapsed)
	}
	e.assertClean()
}
