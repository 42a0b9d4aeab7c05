package runstate

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary, started by startSleeper, sleep instead
// of running tests. Its extra arguments end up in /proc/<pid>/cmdline,
// which is what killOrphanVMM inspects.
const helperEnv = "MVM_RUNSTATE_TEST_SLEEPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		time.Sleep(time.Minute)
		os.Exit(3)
	}
	os.Exit(m.Run())
}

var discard = slog.New(slog.DiscardHandler)

func perm(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestCreate(t *testing.T) {
	tests := []struct {
		name     string
		preexist bool
		mode     fs.FileMode
	}{
		{name: "missing root"},
		{name: "root 0755", preexist: true, mode: 0o755},
		{name: "root 0777", preexist: true, mode: 0o777},
		{name: "root 0700", preexist: true, mode: 0o700},
		{name: "root 0500", preexist: true, mode: 0o500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "a", "runs")
			if tt.preexist {
				if err := os.MkdirAll(root, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(root, tt.mode); err != nil {
					t.Fatal(err)
				}
			}
			r, err := Create(root, "exec-1")
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			defer r.Remove()
			if r.Name != "exec-1" || r.Dir != filepath.Join(root, "exec-1") {
				t.Errorf("Run = {Name: %q, Dir: %q}", r.Name, r.Dir)
			}
			if got := perm(t, root); got != 0o700 {
				t.Errorf("root mode = %v, want 0700", got)
			}
			if got := perm(t, r.Dir); got != 0o700 {
				t.Errorf("run directory mode = %v, want 0700", got)
			}
			lockPath := filepath.Join(r.Dir, "lock")
			if got := perm(t, lockPath); got != 0o600 {
				t.Errorf("lock file mode = %v, want 0600", got)
			}
			b, err := os.ReadFile(lockPath)
			if err != nil {
				t.Fatal(err)
			}
			want := regexp.MustCompile(`^pid ` + strconv.Itoa(os.Getpid()) + `\nstarted \d{4}-\d\d-\d\dT[0-9:.]+Z\n$`)
			if !want.Match(b) {
				t.Errorf("lock file content = %q, want it to match %v", b, want)
			}
			// The lock is held: a second open file description cannot take it.
			f, err := os.Open(lockPath)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
				t.Errorf("flock on a live run's lock = %v, want EWOULDBLOCK", err)
			}
		})
	}
}

func TestCreateRefusesRoot(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, root string)
		wantErr string
	}{
		{
			name: "regular file",
			setup: func(t *testing.T, root string) {
				if err := os.WriteFile(root, nil, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "create " + "ROOT",
		},
		{
			name: "symlink to a directory",
			setup: func(t *testing.T, root string) {
				target := root + ".target"
				if err := os.Mkdir(target, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(target, root); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "ROOT is not a directory",
		},
		{
			name: "owned by another uid",
			setup: func(t *testing.T, root string) {
				if os.Getuid() != 0 {
					t.Skip("needs root to chown a directory to another uid")
				}
				if err := os.Mkdir(root, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Chown(root, 1234, 1234); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "ROOT is owned by uid 1234, not by this user",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "runs")
			tt.setup(t, root)
			before, err := os.Lstat(root)
			if err != nil {
				t.Fatal(err)
			}
			r, err := Create(root, "exec-1")
			if err == nil {
				r.Remove()
				t.Fatal("Create succeeded, want an error")
			}
			if want := strings.ReplaceAll(tt.wantErr, "ROOT", root); !strings.Contains(err.Error(), want) {
				t.Errorf("Create error = %q, want it to contain %q", err, want)
			}
			after, err := os.Lstat(root)
			if err != nil {
				t.Fatal(err)
			}
			if before.Mode() != after.Mode() {
				t.Errorf("refused root changed mode from %v to %v", before.Mode(), after.Mode())
			}
			if fi, err := os.Lstat(filepath.Join(root, "exec-1")); err == nil {
				t.Errorf("run directory created under a refused root (%v)", fi.Mode())
			}
		})
	}
}

func TestCreateExistingName(t *testing.T) {
	root := t.TempDir()
	r, err := Create(root, "exec-1")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Remove()
	if r2, err := Create(root, "exec-1"); err == nil {
		r2.Remove()
		t.Fatal("second Create with the same name succeeded")
	} else if !errors.Is(err, fs.ErrExist) {
		t.Errorf("second Create error = %v, want ErrExist", err)
	}
	// The first run's directory and lock are intact.
	if _, err := os.Stat(filepath.Join(r.Dir, "lock")); err != nil {
		t.Errorf("first run's lock: %v", err)
	}
}

func TestRemove(t *testing.T) {
	root := t.TempDir()
	r, err := Create(root, "exec-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.Path("console.log"), []byte("boot\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(r.Path("sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := r.Remove(); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if _, err := os.Lstat(r.Dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("run directory still there after Remove (err = %v)", err)
	}
	if _, err := os.Stat(root); err != nil {
		t.Errorf("root went with the run: %v", err)
	}
}

func TestRecordVMM(t *testing.T) {
	r, err := Create(t.TempDir(), "exec-1")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Remove()
	if err := r.RecordVMM(4242); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(r.Path("vmm.pid"))
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != "4242\n" {
		t.Errorf("vmm.pid = %q, want %q", b, "4242\n")
	}
	if got := perm(t, r.Path("vmm.pid")); got != 0o600 {
		t.Errorf("vmm.pid mode = %v, want 0600", got)
	}
}

func TestKeep(t *testing.T) {
	tests := []struct {
		name     string
		preexist bool
	}{
		{name: "new log dir"},
		{name: "existing 0755 log dir", preexist: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tmp := t.TempDir()
			r, err := Create(filepath.Join(tmp, "runs"), "exec-7")
			if err != nil {
				t.Fatal(err)
			}
			defer r.Remove()
			logDir := filepath.Join(tmp, "state", "logs")
			if tt.preexist {
				if err := os.MkdirAll(logDir, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			content := []byte("[    0.000000] Linux version\nkernel panic\n")
			if err := os.WriteFile(r.Path("console.log"), content, 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := r.Keep("console.log", logDir, ".console.log")
			if err != nil {
				t.Fatalf("Keep: %v", err)
			}
			want := filepath.Join(logDir, "exec-7.console.log")
			if got != want {
				t.Errorf("Keep returned %q, want %q", got, want)
			}
			b, err := os.ReadFile(want)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(content, b); diff != "" {
				t.Errorf("kept file content (-want +got):\n%s", diff)
			}
			if _, err := os.Lstat(r.Path("console.log")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("console.log still in the run directory (err = %v)", err)
			}
			if m := perm(t, logDir); m != 0o700 {
				t.Errorf("log dir mode = %v, want 0700", m)
			}
			// The kept file outlives the run.
			if err := r.Remove(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(want); err != nil {
				t.Errorf("kept file gone after Remove: %v", err)
			}
		})
	}
}

func TestKeepMissingFile(t *testing.T) {
	tmp := t.TempDir()
	r, err := Create(filepath.Join(tmp, "runs"), "exec-7")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Remove()
	p, err := r.Keep("vmm.log", filepath.Join(tmp, "logs"), ".vmm.log")
	if err == nil {
		t.Fatalf("Keep of a missing file returned %q and no error", p)
	}
	if !strings.Contains(err.Error(), "keep vmm.log") || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Keep error = %v, want a wrapped ErrNotExist naming vmm.log", err)
	}
}

func TestReclaimMissingRoot(t *testing.T) {
	got, err := ReclaimSalvaging(filepath.Join(t.TempDir(), "nope"), discard, nil)
	if err != nil || got != nil {
		t.Errorf("Reclaim(missing) = %q, %v; want nil, nil", got, err)
	}
}

func TestReclaimRootNotADirectory(t *testing.T) {
	root := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(root, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReclaimSalvaging(root, discard, nil)
	if err == nil || !strings.Contains(err.Error(), "reclaim runs") {
		t.Errorf("Reclaim(file) = %q, %v; want a reclaim runs error", got, err)
	}
}

// makeDeadRun creates a run directory with a lock file that nobody holds,
// as a crashed mvmctl leaves it.
func makeDeadRun(t *testing.T, root, name string) string {
	t.Helper()
	dir := filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "lock"), []byte("pid 99999\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "console.log"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

func exists(t *testing.T, path string) bool {
	t.Helper()
	_, err := os.Lstat(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

func TestReclaimDirectories(t *testing.T) {
	root := t.TempDir()

	live, err := Create(root, "live")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Remove()
	if err := live.RecordVMM(os.Getpid()); err != nil {
		t.Fatal(err)
	}

	makeDeadRun(t, root, "dead")

	// A directory whose run was killed before it created its lock: left
	// alone while young, removed once old.
	if err := os.Mkdir(filepath.Join(root, "young-nolock"), 0o700); err != nil {
		t.Fatal(err)
	}
	old := filepath.Join(root, "old-nolock")
	if err := os.Mkdir(old, 0o700); err != nil {
		t.Fatal(err)
	}
	then := time.Now().Add(-2 * time.Minute)
	if err := os.Chtimes(old, then, then); err != nil {
		t.Fatal(err)
	}

	// vmm.pid files that cannot name a process to kill.
	for name, content := range map[string]string{"garbage-pid": "not a pid\n", "empty-pid": "", "negative-pid": "-5\n"} {
		dir := makeDeadRun(t, root, name)
		if err := os.WriteFile(filepath.Join(dir, "vmm.pid"), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	// Plain files in root are not runs.
	stray := filepath.Join(root, "stray.txt")
	if err := os.WriteFile(stray, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	got, err := ReclaimSalvaging(root, discard, nil)
	if err != nil {
		t.Fatalf("Reclaim: %v", err)
	}
	want := []string{"dead", "empty-pid", "garbage-pid", "negative-pid", "old-nolock"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Reclaim removed (-want +got):\n%s", diff)
	}
	for _, name := range want {
		if exists(t, filepath.Join(root, name)) {
			t.Errorf("%s still exists after Reclaim", name)
		}
	}
	for _, keep := range []string{live.Dir, filepath.Join(live.Dir, "lock"), filepath.Join(root, "young-nolock"), stray} {
		if !exists(t, keep) {
			t.Errorf("Reclaim removed %s", keep)
		}
	}

	// A second pass finds nothing more to do.
	got, err = ReclaimSalvaging(root, discard, nil)
	if err != nil || len(got) != 0 {
		t.Errorf("second Reclaim = %q, %v; want nothing", got, err)
	}
}

// sleeper is a child process that sleeps for a minute.
type sleeper struct {
	cmd    *exec.Cmd
	done   chan struct{} // closed once the process has been waited for
	status syscall.WaitStatus
}

// startSleeper starts a sleeper with args on its command line. It is
// killed at the end of the test if still running.
// startSleeper starts a long-running child in the working directory cwd,
// as the backend starts the VMM in its run directory.
func startSleeper(t *testing.T, cwd string, args ...string) *sleeper {
	t.Helper()
	s := &sleeper{cmd: exec.Command(os.Args[0], args...), done: make(chan struct{})}
	s.cmd.Dir = cwd
	s.cmd.Env = append(os.Environ(), helperEnv+"=1")
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = s.cmd.Wait()
		s.status = s.cmd.ProcessState.Sys().(syscall.WaitStatus)
		close(s.done)
	}()
	t.Cleanup(func() {
		_ = s.cmd.Process.Kill()
		<-s.done
	})
	return s
}

func (s *sleeper) pid() int { return s.cmd.Process.Pid }

func TestReclaimKillsOrphanVMM(t *testing.T) {
	root := t.TempDir()
	dir := makeDeadRun(t, root, "exec-orphan")
	s := startSleeper(t, dir, "-chardev", "file,id=console,path="+filepath.Join(dir, "console.log"))
	if err := os.WriteFile(filepath.Join(dir, "vmm.pid"), []byte(strconv.Itoa(s.pid())+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReclaimSalvaging(root, discard, nil)
	if err != nil {
		t.Fatalf("Reclaim: %v", err)
	}
	if diff := cmp.Diff([]string{"exec-orphan"}, got); diff != "" {
		t.Errorf("Reclaim removed (-want +got):\n%s", diff)
	}
	if exists(t, dir) {
		t.Errorf("%s still exists", dir)
	}
	select {
	case <-s.done:
		if ws := s.status; !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("orphan VMM ended with %v, want killed by SIGKILL", ws)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("orphan VMM still running 10s after Reclaim")
	}
}

func TestReclaimSparesUnrelatedProcess(t *testing.T) {
	tests := []struct {
		name string
		// working directory of the process whose pid is recorded; DIR is
		// replaced by the run directory, ROOT by its parent, OTHER by an
		// unrelated directory.
		cwd string
	}{
		{name: "unrelated working directory", cwd: "OTHER"},
		{name: "sibling run sharing the prefix", cwd: "DIR0"},
		{name: "run directory's parent", cwd: "ROOT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			dir := makeDeadRun(t, root, "exec-reused")
			cwd := strings.NewReplacer("DIR", dir, "ROOT", root, "OTHER", t.TempDir()).Replace(tt.cwd)
			if err := os.MkdirAll(cwd, 0o700); err != nil {
				t.Fatal(err)
			}
			// The command line names the run directory: only the working
			// directory may count.
			s := startSleeper(t, cwd, "-chardev", "file,id=console,path="+filepath.Join(dir, "console.log"))
			if err := os.WriteFile(filepath.Join(dir, "vmm.pid"), []byte(strconv.Itoa(s.pid())+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := ReclaimSalvaging(root, discard, nil)
			if err != nil {
				t.Fatalf("Reclaim: %v", err)
			}
			if diff := cmp.Diff([]string{"exec-reused"}, got); diff != "" {
				t.Errorf("Reclaim removed (-want +got):\n%s", diff)
			}
			select {
			case <-s.done:
				t.Fatalf("process with a reused pid ended (%v) after Reclaim", s.status)
			case <-time.After(300 * time.Millisecond):
			}
			if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case <-s.done:
				if ws := s.status; !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
					t.Errorf("process ended with %v, want our SIGTERM", ws)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("process did not end after SIGTERM")
			}
		})
	}
}

func TestReclaimSalvaging(t *testing.T) {
	root := t.TempDir()
	keep := t.TempDir()

	live, err := Create(root, "live")
	if err != nil {
		t.Fatal(err)
	}
	defer live.Remove()

	for _, name := range []string{"dead-1", "dead-2"} {
		dir := makeDeadRun(t, root, name)
		if err := os.WriteFile(filepath.Join(dir, "changes"), []byte(name), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	orphanDir := makeDeadRun(t, root, "dead-vmm")
	s := startSleeper(t, orphanDir, filepath.Join(orphanDir, "disk.img"))
	if err := os.WriteFile(filepath.Join(orphanDir, "vmm.pid"), []byte(strconv.Itoa(s.pid())+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	var salvaged []string
	vmmGone := false
	got, err := ReclaimSalvaging(root, discard, func(dir string) error {
		salvaged = append(salvaged, dir)
		if !exists(t, filepath.Join(dir, "lock")) {
			t.Errorf("salvage(%s) called after the directory was emptied", dir)
		}
		if dir == orphanDir {
			_, err := os.Stat(fmt.Sprintf("/proc/%d/cmdline", s.pid()))
			vmmGone = errors.Is(err, fs.ErrNotExist)
		}
		if src := filepath.Join(dir, "changes"); exists(t, src) {
			if err := os.Rename(src, filepath.Join(keep, filepath.Base(dir))); err != nil {
				t.Error(err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ReclaimSalvaging: %v", err)
	}
	want := []string{"dead-1", "dead-2", "dead-vmm"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("removed (-want +got):\n%s", diff)
	}
	wantSalvaged := []string{filepath.Join(root, "dead-1"), filepath.Join(root, "dead-2"), orphanDir}
	if diff := cmp.Diff(wantSalvaged, salvaged); diff != "" {
		t.Errorf("salvage calls (-want +got):\n%s", diff)
	}
	if !vmmGone {
		t.Errorf("salvage ran while the orphan VMM (pid %d) still existed", s.pid())
	}
	for _, name := range []string{"dead-1", "dead-2"} {
		b, err := os.ReadFile(filepath.Join(keep, name))
		if err != nil || string(b) != name {
			t.Errorf("salvaged file %s = %q, %v; want %q", name, b, err, name)
		}
	}
	if !exists(t, live.Dir) {
		t.Errorf("live run removed")
	}
}

func TestReclaimKeepsWhatCouldNotBeSalvaged(t *testing.T) {
	root := t.TempDir()
	dir := makeDeadRun(t, root, "dead")
	if err := os.WriteFile(filepath.Join(dir, "changes"), []byte("only copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReclaimSalvaging(root, discard, func(string) error { return errors.New("disk full") })
	if err == nil || len(got) != 0 {
		t.Fatalf("ReclaimSalvaging = %q, %v; want nothing removed and an error", got, err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "changes")); err != nil || string(b) != "only copy" {
		t.Errorf("run directory content after a failed salvage: %q, %v", b, err)
	}
}
