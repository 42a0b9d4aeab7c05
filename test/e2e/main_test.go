// Package e2e runs mvmctl as a user would: the binary built from this
// tree, real QEMU, the real guest kernel and an initramfs with this tree's
// agent. Nothing is mocked; every test boots VMs.
//
// The suite fails (it never skips) when QEMU, the kernel or the image is
// missing: `mvmctl bootstrap` (or `make bootstrap`, or .ci/run) provides
// them.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var (
	mvmctlFlag = flag.String("mvmctl", "", "mvmctl binary to test (default: build it from this tree)")
	// Filled in by TestMain.
	mvmctl   string
	cacheDir string // test cache with the kernel and a fresh initramfs
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(setup(m))
}

func setup(m *testing.M) int {
	// Runs leave no snapshots behind by themselves here: a background
	// heal would compete for the CPUs and change what later tests find.
	// The heal tests turn it back on for their own runs.
	os.Setenv("MVM_NO_AUTO_SNAPSHOT", "1")
	work, err := os.MkdirTemp("", "mvm-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(work)
	if err := prepare(work); err != nil {
		fmt.Fprintf(os.Stderr, "e2e setup failed: %v\n", err)
		return 1
	}
	return m.Run()
}

// prepare builds mvmctl, mvm-agent, mvm-jailer and the containerd shim
// from this tree (unless -mvmctl names a binary, with the others beside it) and bootstraps a private image cache
// that reuses the user's compiled kernel.
func prepare(work string) error {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return fmt.Errorf("QEMU is missing (install qemu-system-x86): %w", err)
	}
	if *mvmctlFlag != "" {
		mvmctl = *mvmctlFlag
	} else {
		bin := filepath.Join(work, "bin")
		mvmctl = filepath.Join(bin, "mvmctl")
		for _, b := range []struct{ out, pkg string }{
			{mvmctl, "../../cmd/mvmctl"}, {filepath.Join(bin, "mvm-agent"), "../../cmd/mvm-agent"}, {filepath.Join(bin, "mvm-jailer"), "../../cmd/mvm-jailer"},
			{filepath.Join(bin, "containerd-shim-mvm-v2"), "../../cmd/containerd-shim-mvm-v2"},
		} {
			cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
			}
		}
	}
	// Tests that start VMs in-process (not through mvmctl) find the
	// jailer here.
	if err := os.Setenv("MVM_JAILER", filepath.Join(filepath.Dir(mvmctl), "mvm-jailer")); err != nil {
		return err
	}
	kernel, err := userKernel()
	if err != nil {
		return err
	}
	cacheDir = filepath.Join(work, "cache")
	cmd := exec.Command(mvmctl, "bootstrap", "--kernel", kernel)
	cmd.Env = append(os.Environ(), "MVM_CACHE_DIR="+cacheDir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mvmctl bootstrap --kernel %s: %v\n%s", kernel, err, out)
	}
	return nil
}

// userKernel is the kernel of the user's default image (MVM_CACHE_DIR or
// ~/.cache/mvm), built by `mvmctl bootstrap`.
func userKernel() (string, error) {
	cache := os.Getenv("MVM_CACHE_DIR")
	if cache == "" {
		base := os.Getenv("XDG_CACHE_HOME")
		if base == "" {
			home, err := os.UserHomeDir()
			if err != nil {
				return "", err
			}
			base = filepath.Join(home, ".cache")
		}
		cache = filepath.Join(base, "mvm")
	}
	manifest := filepath.Join(cache, "images", "default.json")
	b, err := os.ReadFile(manifest)
	if err != nil {
		return "", fmt.Errorf("no guest kernel: run `make bootstrap` (or `mvmctl bootstrap`) first: %w", err)
	}
	var img struct{ Kernel string }
	if err := json.Unmarshal(b, &img); err != nil {
		return "", fmt.Errorf("%s: %w", manifest, err)
	}
	if _, err := os.Stat(img.Kernel); err != nil {
		return "", fmt.Errorf("guest kernel missing: run `make bootstrap`: %w", err)
	}
	return img.Kernel, nil
}

// env is one test's private view of mvm's directories, so that leak checks
// see only this test's runs.
type env struct {
	t      *testing.T
	runDir string
	state  string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	d := t.TempDir()
	return &env{t: t, runDir: filepath.Join(d, "run"), state: filepath.Join(d, "state")}
}

func (e *env) environ(extra ...string) []string {
	env := append(os.Environ(),
		"MVM_CACHE_DIR="+cacheDir,
		"MVM_RUN_DIR="+e.runDir,
		"MVM_STATE_DIR="+e.state,
	)
	return append(env, extra...)
}

// result is what a user sees from one mvmctl invocation.
type result struct {
	stdout, stderr []byte
	code           int
	elapsed        time.Duration
}

func (r result) String() string {
	return fmt.Sprintf("exit %d after %s\nstdout: %q\nstderr: %q", r.code, r.elapsed.Round(time.Millisecond), trim(r.stdout), trim(r.stderr))
}

func trim(b []byte) string {
	if len(b) > 2000 {
		return string(b[:1000]) + "..." + string(b[len(b)-1000:])
	}
	return string(b)
}

// command prepares mvmctl with args in this env.
func (e *env) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, mvmctl, args...)
	cmd.Env = e.environ()
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run runs mvmctl to completion with stdin (nil: /dev/null).
func (e *env) run(stdin io.Reader, args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := e.command(ctx, args...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.Bytes(), stderr: errb.Bytes(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("run mvmctl %q: %v", args, err)
	}
	return r
}

// assertClean fails if a run directory or a VMM of this env is left.
func (e *env) assertClean() {
	e.t.Helper()
	if entries, err := os.ReadDir(e.runDir); err == nil && len(entries) > 0 {
		var names []string
		for _, en := range entries {
			names = append(names, en.Name())
		}
		e.t.Errorf("run directories left behind: %v", names)
	}
	if pids := e.vmms(); len(pids) > 0 {
		e.t.Errorf("VMM processes left behind: %v", pids)
	}
}

// vmms lists QEMU processes whose command line names this env's run dir.
func (e *env) vmms() []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte(e.runDir+"/")) {
			continue
		}
		var pid int
		fmt.Sscanf(strings.TrimPrefix(p, "/proc/"), "%d", &pid)
		// Skip zombies: they hold no resources and their parent reaps them.
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && bytes.Contains(st, []byte(") Z ")) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// waitFor polls cond until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return cond()
}
