package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests here run mvmctl exec on restored snapshots as a user does:
// TestMain's bootstrap snapshotted the default VM, so a plain exec
// restores it, and --no-snapshot cold-boots the same machine. Whatever a
// command sees or returns must not depend on which of the two ran it;
// -v says which one did, and every restored run here checks that it was
// one. A restored guest is a clone of one frozen VM, so what must differ
// between clones (random bytes, boot id, clock) is checked too, and so is
// what a hostile guest could do with the drive slots a snapshot has.

// started is what the -v breakdown says of how the machine started.
type started struct {
	restored bool
	snapshot string // the snapshot restored
	why      string // why the machine booted instead
	agent    string // the agent ready step's detail
}

var startedRE = regexp.MustCompile(`(?m)^mvmctl: .*\bstart vm \d+ms \((?:restored from snapshot (\S+)|cold boot: (.*?))\), agent ready \d+ms(?: \(([^)]*)\))?`)

func startedOf(t *testing.T, stderr []byte) started {
	t.Helper()
	m := startedRE.FindSubmatch(stderr)
	if m == nil {
		t.Fatalf("no start vm step in the -v breakdown:\n%s", stderr)
	}
	return started{restored: len(m[1]) > 0, snapshot: string(m[1]), why: string(m[2]), agent: string(m[3])}
}

// commandStderr is stderr without what -v adds: log lines, the timing
// breakdown and the write-back report. What is left is the command's own stderr and mvmctl's
// messages, as without -v (-v logs only while the machine starts and
// stops, never between a command's output bytes).
func commandStderr(stderr []byte) []byte {
	var out []byte
	for _, l := range bytes.SplitAfter(stderr, []byte("\n")) {
		if bytes.HasPrefix(l, []byte("time=")) || bytes.HasPrefix(l, []byte("mvmctl: reclaim ")) || bytes.HasPrefix(l, []byte("mvmctl: wrote back ")) {
			continue
		}
		out = append(out, l...)
	}
	return out
}

// snapRun is one mvmctl -v run.
type snapRun struct {
	result
	started
	cmdStderr []byte
}

// runMvmctl runs mvmctl with environ and stdin (nil: /dev/null); it is
// safe to call from any goroutine.
func runMvmctl(environ []string, stdin io.Reader, args ...string) (result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, mvmctl, args...)
	cmd.Env = environ
	cmd.WaitDelay = 5 * time.Second
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.Bytes(), stderr: errb.Bytes(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		return r, fmt.Errorf("run mvmctl %q: %w", args, err)
	}
	return r, nil
}

// execV runs `mvmctl -v exec ARGS` in e's directories with extra
// environment (later entries win).
func (e *env) execV(stdin io.Reader, extra []string, args ...string) snapRun {
	e.t.Helper()
	r, err := runMvmctl(e.environ(extra...), stdin, append([]string{"-v", "exec"}, args...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	return snapRun{result: r, started: startedOf(e.t, r.stderr), cmdStderr: commandStderr(r.stderr)}
}

// suiteSnapshot is the snapshot of the default VM that TestMain's
// bootstrap took in the suite's cache.
func suiteSnapshot(t *testing.T) string {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(cacheDir, "snapshots", "[0-9a-f]*"))
	if len(dirs) != 1 {
		t.Fatalf("want one snapshot in the suite's cache, found %v", dirs)
	}
	return dirs[0]
}

// restoredAndCold runs exec ARGS restored, then with --no-snapshot, and
// checks that each started as it says.
func (e *env) restoredAndCold(stdin func() io.Reader, args ...string) (restored, cold snapRun) {
	e.t.Helper()
	in := func() io.Reader {
		if stdin == nil {
			return nil
		}
		return stdin()
	}
	restored = e.execV(in(), nil, args...)
	if !restored.restored || restored.snapshot != suiteSnapshot(e.t) {
		e.t.Fatalf("exec %q did not restore the default VM's snapshot: %+v\n%s", args, restored.started, restored)
	}
	cold = e.execV(in(), nil, append([]string{"--no-snapshot"}, args...)...)
	if cold.restored || cold.why != "snapshots are off for this run" {
		e.t.Fatalf("exec --no-snapshot %q: %+v", args, cold.started)
	}
	return restored, cold
}

// assertSame fails unless two runs gave the same exit status and the same
// bytes on stdout and stderr.
func assertSame(t *testing.T, restored, cold snapRun) {
	t.Helper()
	if restored.code != cold.code {
		t.Errorf("exit %d restored, %d cold", restored.code, cold.code)
	}
	if !bytes.Equal(restored.stdout, cold.stdout) {
		t.Errorf("stdout differs: restored %d bytes (sha256 %x), cold %d bytes (sha256 %x)\nrestored: %q\ncold:     %q",
			len(restored.stdout), sha256.Sum256(restored.stdout), len(cold.stdout), sha256.Sum256(cold.stdout), trim(restored.stdout), trim(cold.stdout))
	}
	if !bytes.Equal(restored.cmdStderr, cold.cmdStderr) {
		t.Errorf("stderr differs: restored %d bytes (sha256 %x), cold %d bytes (sha256 %x)\nrestored: %q\ncold:     %q",
			len(restored.cmdStderr), sha256.Sum256(restored.cmdStderr), len(cold.cmdStderr), sha256.Sum256(cold.cmdStderr), trim(restored.cmdStderr), trim(cold.cmdStderr))
	}
}

// seqOutput is what `seq from to` (step 1 or -1) prints.
func seqOutput(from, to int) []byte {
	var b bytes.Buffer
	step := 1
	if to < from {
		step = -1
	}
	for i := from; ; i += step {
		b.WriteString(strconv.Itoa(i) + "\n")
		if i == to {
			return b.Bytes()
		}
	}
}

// TestSnapshotRunSameAsCold runs the exec cases that matter restored and
// cold: exit statuses of every kind, output of a few MB (byte-exact, on
// both streams), stdin, the environment and working directory, a launch
// plan, the machine's shape.
func TestSnapshotRunSameAsCold(t *testing.T) {
	plan := filepath.Join(t.TempDir(), "launch.json")
	writeFile(t, plan, `{"version": "v0", "apps": [{"name": "app", "env": {"A": "app", "B": "app"},
  "entrypoint": {"command": ["sh", "-c", "printf '%s %s %s\\n' \"$A\" \"$B\" \"$(pwd)\"; exit 5"], "working_dir": "/srv/app", "env": {"B": "entry"}}}]}`, 0o644)
	in := make([]byte, 2<<20+17)
	if _, err := rand.Read(in); err != nil {
		t.Fatal(err)
	}
	ff := bytes.Repeat([]byte{0xff}, 1<<20)
	bigOut := append(seqOutput(1, 200000), ff...)
	bigErr := seqOutput(150000, 1)
	tests := []struct {
		name   string
		args   []string
		stdin  []byte
		code   int
		stdout []byte // nil: anything, as long as both runs agree
		stderr string // a substring of the command's stderr
	}{
		{name: "true", args: []string{"true"}, stdout: []byte{}},
		{name: "own code", args: []string{"sh", "-c", "echo out; echo err >&2; exit 7"}, code: 7, stdout: []byte("out\n"), stderr: "err\n"},
		{name: "not executable", args: []string{"/etc/passwd"}, code: 126, stderr: "/etc/passwd"},
		{name: "not found", args: []string{"mvm-no-such-command"}, code: 127, stderr: "mvm-no-such-command"},
		{name: "SIGKILL", args: []string{"sh", "-c", "kill -9 $$"}, code: 137},
		{name: "SIGTERM", args: []string{"sh", "-c", "kill -TERM $$"}, code: 143},
		{name: "timeout", args: []string{"--timeout", "2s", "--", "sh", "-c", "echo started; sleep 60; echo never"}, code: 124,
			stdout: []byte("started\n"), stderr: "timed out"},
		{name: "output", args: []string{"sh", "-c", `seq 1 200000; seq 150000 -1 1 >&2; head -c 1048576 /dev/zero | tr '\0' '\377'`},
			stdout: bigOut},
		{name: "stdin", args: []string{"sh", "-c", "cat; exit 3"}, stdin: in, code: 3, stdout: in},
		{name: "env and workdir", args: []string{"-e", "A=two  words", "-e", "EMPTY=", "-w", "/srv/new dir", "--", "sh", "-c", `echo "[$A] [$EMPTY] $HOME"; pwd`},
			stdout: []byte("[two  words] [] /root\n/srv/new dir\n")},
		{name: "launch plan", args: []string{"--launch-plan", plan, "-e", "A=cli"}, code: 5, stdout: []byte("cli entry /srv/app\n")},
		{name: "machine", args: []string{"sh", "-c", `nproc; grep MemTotal /proc/meminfo; uname -srm`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			var stdin func() io.Reader
			if tt.stdin != nil {
				stdin = func() io.Reader { return bytes.NewReader(tt.stdin) }
			}
			restored, cold := e.restoredAndCold(stdin, tt.args...)
			assertSame(t, restored, cold)
			if restored.code != tt.code {
				t.Errorf("exit %d, want %d\n%s", restored.code, tt.code, restored)
			}
			if tt.stdout != nil && !bytes.Equal(restored.stdout, tt.stdout) {
				t.Errorf("stdout %d bytes (sha256 %x), want %d bytes (sha256 %x): %q",
					len(restored.stdout), sha256.Sum256(restored.stdout), len(tt.stdout), sha256.Sum256(tt.stdout), trim(restored.stdout))
			}
			if !strings.Contains(string(restored.cmdStderr), tt.stderr) {
				t.Errorf("stderr %q lacks %q", restored.cmdStderr, tt.stderr)
			}
			if tt.name == "output" && !bytes.Equal(restored.cmdStderr, bigErr) {
				t.Errorf("stderr %d bytes (sha256 %x), want %d bytes (sha256 %x)",
					len(restored.cmdStderr), sha256.Sum256(restored.cmdStderr), len(bigErr), sha256.Sum256(bigErr))
			}
			t.Logf("restored %s, cold %s", restored.elapsed.Round(time.Millisecond), cold.elapsed.Round(time.Millisecond))
			e.assertClean()
		})
	}
}

// startStreaming starts mvmctl -v exec ARGS with a stdin pipe and returns
// its stdout as lines.
func (e *env) startStreaming(extra []string, args ...string) (*exec.Cmd, io.WriteCloser, *bufio.Reader, *bytes.Buffer) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	e.t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, mvmctl, append([]string{"-v", "exec"}, args...)...)
	cmd.Env = e.environ(extra...)
	cmd.WaitDelay = 5 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	return cmd, stdin, bufio.NewReader(out), &stderr
}

// TestSnapshotRunInterrupt: Ctrl-C (SIGINT to mvmctl) reaches the
// command's trap on a restored machine as on a booted one.
func TestSnapshotRunInterrupt(t *testing.T) {
	script := `trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.1; done`
	for _, cold := range []bool{false, true} {
		args := []string{"--", "sh", "-c", script}
		if cold {
			args = append([]string{"--no-snapshot"}, args...)
		}
		e := newEnv(t)
		cmd, _, out, stderr := e.startStreaming(nil, args...)
		if line, _ := out.ReadString('\n'); line != "ready\n" {
			t.Fatalf("first line %q, stderr %q", line, stderr)
		}
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		rest, _ := io.ReadAll(out)
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 42 || string(rest) != "got INT\n" {
			t.Errorf("cold=%v: exit %d, rest %q: the command should have trapped SIGINT and exited 42", cold, code, rest)
		}
		if s := startedOf(t, stderr.Bytes()); s.restored == cold {
			t.Errorf("cold=%v: the machine started as %+v", cold, s)
		}
		e.assertClean()
	}
}

// TestSnapshotRunAddDirs: a read-only and a read-write directory on a
// restored machine (the snapshot's two directory slots) give what they
// give on a booted one: the same reads, the same refused writes, the same
// changes written back. A third directory has no slot: the run boots and
// -v says why.
func TestSnapshotRunAddDirs(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "a.txt"), "alpha\n", 0o644)
	writeFile(t, filepath.Join(src, "sub dir/b.bin"), "\x00\x01\xffbinary", 0o600)
	srcBefore := snapshot(t, src)
	makeOut := func() string {
		d := t.TempDir()
		writeFile(t, filepath.Join(d, "keep.txt"), "untouched\n", 0o644)
		writeFile(t, filepath.Join(d, "modify.txt"), "old\n", 0o644)
		writeFile(t, filepath.Join(d, "delete.txt"), "bye\n", 0o644)
		return d
	}
	outR, outC := makeOut(), makeOut()
	want := snapshot(t, outR)
	delete(want, "delete.txt")
	want["modify.txt"] = fileHash("new content\n", 0o644)
	want["made"] = "dir 755"
	want["made/f"] = fileHash("made in the guest\n", 0o640)
	script := `cat /src/a.txt; ls -A /src /out; echo "new content" > /out/modify.txt; rm /out/delete.txt;
mkdir /out/made; echo "made in the guest" > /out/made/f; chmod 640 /out/made/f;
touch /src/x 2>/dev/null && echo WROTE-RO; echo done`
	e := newEnv(t)
	restored := e.execV(nil, nil, "-d", src+":/src:ro", "-d", outR+":/out:rw", "--", "sh", "-c", script)
	cold := e.execV(nil, nil, "--no-snapshot", "-d", src+":/src:ro", "-d", outC+":/out:rw", "--", "sh", "-c", script)
	if !restored.restored || cold.restored {
		t.Fatalf("restored run %+v, cold run %+v", restored.started, cold.started)
	}
	assertSame(t, restored, cold)
	if restored.code != 0 || !strings.HasPrefix(string(restored.stdout), "alpha\n") || !strings.HasSuffix(string(restored.stdout), "done\n") ||
		strings.Contains(string(restored.stdout), "WROTE-RO") {
		t.Errorf("restored run: %s", restored)
	}
	for name, out := range map[string]string{"restored": outR, "cold": outC} {
		if d := diffTrees(want, snapshot(t, out)); d != "" {
			t.Errorf("%s run: the read-write directory after write-back:\n%s", name, d)
		}
	}
	if d := diffTrees(srcBefore, snapshot(t, src)); d != "" {
		t.Errorf("the read-only directory changed:\n%s", d)
	}

	third := e.execV(nil, nil, "-d", src+":/a", "-d", t.TempDir()+":/b", "-d", t.TempDir()+":/c", "--", "cat", "/a/a.txt")
	if third.code != 0 || string(third.stdout) != "alpha\n" || third.restored || third.why != "more than 2 shared directories" {
		t.Errorf("three directories: %+v\n%s", third.started, third)
	}
	e.assertClean()
}

// TestSnapshotRunStaleKey: a run whose machine differs from the
// snapshot's in anything the snapshot depends on (kernel arguments,
// vCPUs) boots, and -v says why.
func TestSnapshotRunStaleKey(t *testing.T) {
	e := newEnv(t)
	r := e.execV(nil, []string{"MVM_KERNEL_ARGS=mvm.stale=1"}, "--", "cat", "/proc/cmdline")
	if r.code != 0 || !strings.Contains(string(r.stdout), " mvm.stale=1") {
		t.Errorf("with MVM_KERNEL_ARGS: %s", r)
	}
	if r.restored || !strings.HasPrefix(r.why, "no snapshot for this configuration") {
		t.Errorf("with MVM_KERNEL_ARGS the run should boot and say why: %+v", r.started)
	}
	r = e.execV(nil, nil, "--cpus", "3", "--", "nproc")
	if r.code != 0 || string(r.stdout) != "3\n" || r.restored || !strings.HasPrefix(r.why, "no snapshot for this configuration") {
		t.Errorf("--cpus 3: %+v\n%s", r.started, r)
	}
	if want := "(mvmctl bootstrap --cpus 3 --memory 512M makes one)"; !strings.Contains(r.why, want) {
		t.Errorf("--cpus 3: the reason %q does not say %q", r.why, want)
	}
	e.assertClean()
}

// TestSnapshotBootstrapShape: bootstrap --cpus --memory snapshots that
// machine too, which runs of that shape restore; the default machine's
// snapshot stays.
func TestSnapshotBootstrapShape(t *testing.T) {
	kernel, err := userKernel()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	env := []string{"MVM_CACHE_DIR=" + filepath.Join(t.TempDir(), "cache")}
	for _, args := range [][]string{nil, {"--cpus", "1", "--memory", "256M"}} {
		if r, err := runMvmctl(e.environ(env...), nil, append([]string{"bootstrap", "--kernel", kernel}, args...)...); err != nil || r.code != 0 {
			t.Fatalf("bootstrap %q: %v %s", args, err, r)
		}
	}
	r := e.execV(nil, env, "--cpus", "1", "--memory", "256M", "--", "sh", "-c", "nproc; grep -c . /proc/meminfo >/dev/null && echo ok")
	if r.code != 0 || string(r.stdout) != "1\nok\n" || !r.restored {
		t.Errorf("a run of the snapshotted shape: %+v\n%s", r.started, r)
	}
	if r := e.execV(nil, env, "--", "nproc"); r.code != 0 || string(r.stdout) != "2\n" || !r.restored {
		t.Errorf("a run of the default shape: %+v\n%s", r.started, r)
	}
	if r, err := runMvmctl(e.environ(env...), nil, "bootstrap", "--kernel", kernel, "--memory", "12Q"); err != nil || r.code != 125 || !strings.Contains(string(r.stderr), `invalid memory size "12Q"`) {
		t.Errorf("bootstrap --memory 12Q: %v %s", err, r)
	}
	e.assertClean()
}

// privateCache is a copy of the suite's cache (the image manifest and
// the snapshot; the kernel and initramfs stay where they are, which keeps
// the snapshot's key) that a test may damage.
func privateCache(t *testing.T) (cache, snap string) {
	t.Helper()
	cache = filepath.Join(t.TempDir(), "cache")
	if err := os.Mkdir(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"images", "snapshots"} {
		if out, err := exec.Command("cp", "-a", "--sparse=always", filepath.Join(cacheDir, d), cache).CombinedOutput(); err != nil {
			t.Fatalf("copy the cache: %v %s", err, out)
		}
	}
	snap = filepath.Join(cache, "snapshots", filepath.Base(suiteSnapshot(t)))
	// A copied RAM file has a change time of its own, which its record
	// does not know (a snapshot copied with the cache is not used).
	agreeRecord(t, snap)
	return cache, snap
}

// agreeRecord makes the snapshot's record agree with its files (the RAM
// file's change time, the state's digest), as if they had been saved as
// they are.
func agreeRecord(t *testing.T, snap string) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(snap, "ram"), &st); err != nil {
		t.Fatal(err)
	}
	record := filepath.Join(snap, "snapshot.json")
	var meta map[string]any
	b, err := os.ReadFile(record)
	if err == nil {
		err = json.Unmarshal(b, &meta)
	}
	if err != nil {
		t.Fatal(err)
	}
	// Numbers come back as float64: ram_ctime_ns is written whole.
	meta["ram_ctime_ns"] = st.Ctim.Nano()
	meta["state_sha256"] = fileSHA256(t, filepath.Join(snap, "state"))
	if b, err = json.Marshal(meta); err != nil || os.WriteFile(record, b, 0o644) != nil {
		t.Fatal("cannot rewrite the record", err)
	}
}

// TestSnapshotRunDamaged damages the snapshot's files on disk. Each time
// the run still succeeds, says so in one warning line, and the snapshot
// is discarded: the next run boots (and -v says there is no snapshot)
// until `mvmctl bootstrap` makes a new one, which restores. The device
// state is checked against its digest before QEMU sees it; the RAM file
// is too large to hash at every run: its size and change time are
// checked, and one zeroed behind the record's back restores into a guest
// that dies, which the run notices at its hello.
func TestSnapshotRunDamaged(t *testing.T) {
	garble := func(path string, off, n int64) {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, n)
		_, _ = rand.Read(b)
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	half := func(path string) {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, fi.Size()/2); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name   string
		damage func(snap string)
	}{
		{"state truncated", func(snap string) { half(filepath.Join(snap, "state")) }},
		{"state garbled", func(snap string) { garble(filepath.Join(snap, "state"), 4096, 64) }},
		{"RAM truncated", func(snap string) { half(filepath.Join(snap, "ram")) }},
		// Of the right size but its content lost, as a file system that
		// lost the file's blocks leaves it: the restored guest has no
		// page tables and dies at its first instruction. (Random bytes
		// over its kernel's code make it die, or hang until the
		// restore's timeout.)
		{"RAM zeroed", func(snap string) {
			ram := filepath.Join(snap, "ram")
			fi, err := os.Stat(ram)
			if err != nil {
				t.Fatal(err)
			}
			if os.Truncate(ram, 0) != nil || os.Truncate(ram, fi.Size()) != nil {
				t.Fatal("cannot zero the RAM file")
			}
			// A file system that loses blocks leaves the change time as
			// it was; the record is made to agree, so that the damage
			// reaches the guest.
			agreeRecord(t, snap)
		}},
		// A state of the right digest that QEMU cannot load: the
		// migration fails.
		{"state QEMU refuses", func(snap string) {
			garble(filepath.Join(snap, "state"), 0, 16)
			agreeRecord(t, snap)
		}},
		// Written in place, as a VMM that wrote its RAM file would leave
		// it: caught by the file's change time before anything restores.
		{"RAM rewritten", func(snap string) { garble(filepath.Join(snap, "ram"), 1<<20, 4096) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cache, snap := privateCache(t)
			tt.damage(snap)
			e := newEnv(t)
			r, err := runMvmctl(e.environ("MVM_CACHE_DIR="+cache), nil, "exec", "--", "echo", "hi")
			if err != nil {
				t.Fatal(err)
			}
			if r.code != 0 || string(r.stdout) != "hi\n" {
				t.Errorf("the run failed: %s", r)
			}
			if lines := strings.Split(strings.TrimSuffix(string(r.stderr), "\n"), "\n"); len(lines) != 1 ||
				!strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "discarded: mvmctl bootstrap rebuilds it") {
				t.Errorf("want one warning line, got %q", r.stderr)
			}
			t.Logf("%s", r.stderr)
			// (The heal log, when the suite's cache had one, came with
			// the copy.)
			var ents []string
			des, _ := os.ReadDir(filepath.Join(cache, "snapshots"))
			for _, d := range des {
				if !strings.HasPrefix(d.Name(), "heal.log") {
					ents = append(ents, d.Name())
				}
			}
			if len(ents) != 1 || ents[0] != "lock" {
				t.Errorf("the damaged snapshot was kept: %v", ents)
			}
			if tt.name == "RAM zeroed" {
				next := e.execV(nil, []string{"MVM_CACHE_DIR=" + cache}, "--", "true")
				if next.code != 0 || next.restored || !strings.HasPrefix(next.why, "no snapshot for this configuration") {
					t.Errorf("the run after: %+v\n%s", next.started, next)
				}
				kernel, err := userKernel()
				if err != nil {
					t.Fatal(err)
				}
				if r, err := runMvmctl(e.environ("MVM_CACHE_DIR="+cache), nil, "bootstrap", "--kernel", kernel); err != nil || r.code != 0 {
					t.Fatalf("bootstrap: %v %s", err, r)
				}
				again := e.execV(nil, []string{"MVM_CACHE_DIR=" + cache}, "--", "true")
				if again.code != 0 || !again.restored || !strings.HasPrefix(again.snapshot, filepath.Join(cache, "snapshots")+"/") {
					t.Errorf("after bootstrap the run should restore the new snapshot: %+v\n%s", again.started, again)
				}
			}
			e.assertClean()
		})
	}
}

// guestClock parses the line "clock SECONDS.MICROSECONDS" the guest
// prints (busybox date has no %N; adjtimex reads the clock to the
// microsecond).
func guestClock(t *testing.T, line string) time.Time {
	t.Helper()
	var sec, usec int64
	if _, err := fmt.Sscanf(line, "clock %d.%d\n", &sec, &usec); err != nil {
		t.Fatalf("clock line %q: %v", line, err)
	}
	return time.Unix(sec, usec*1000)
}

// TestSnapshotRunClockAndTimers: right after a restore the guest's clock
// is the host's (the snapshot's clock is older than the allowed error),
// and stays so: a sleep 1 takes a second by the guest's monotonic clock
// and by its wall clock.
func TestSnapshotRunClockAndTimers(t *testing.T) {
	const maxErr = time.Second
	fi, err := os.Stat(filepath.Join(suiteSnapshot(t), "snapshot.json"))
	if err != nil {
		t.Fatal(err)
	}
	// A clock left at the snapshot's would then be more than maxErr off.
	if age := time.Since(fi.ModTime()); age < 2*maxErr {
		time.Sleep(2*maxErr - age)
	}
	clock := `adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf "clock %d.%06d\n", s, u}'`
	uptime := `echo "uptime $(cut -d' ' -f1 /proc/uptime)"`
	script := clock + "; " + uptime + "; sleep 1; " + uptime + "; " + clock
	e := newEnv(t)
	cmd, _, out, stderr := e.startStreaming(nil, "--", "sh", "-c", script)
	read := func() (string, time.Time) {
		line, err := out.ReadString('\n')
		if err != nil {
			t.Fatalf("read: %v (got %q); stderr %s", err, line, stderr)
		}
		return line, time.Now()
	}
	line1, host1 := read()
	up1, _ := read()
	up2, _ := read()
	line2, host2 := read()
	_ = cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if s := startedOf(t, stderr.Bytes()); !s.restored {
		t.Fatalf("not restored: %+v", s)
	}
	for i, c := range []struct {
		guest, host time.Time
	}{{guestClock(t, line1), host1}, {guestClock(t, line2), host2}} {
		// The guest reads its clock before the host reads the line.
		if d := c.host.Sub(c.guest); d < -50*time.Millisecond || d > maxErr {
			t.Errorf("clock %d: the guest's is %s behind the host's, want within [-50ms, %s]", i+1, d.Round(time.Millisecond), maxErr)
		}
	}
	var a, b float64
	if _, err := fmt.Sscanf(up1+up2, "uptime %g\nuptime %g\n", &a, &b); err != nil {
		t.Fatalf("uptime lines %q %q: %v", up1, up2, err)
	}
	if d := b - a; d < 0.98 || d > 1.5 {
		t.Errorf("sleep 1 took %.2fs by the guest's uptime", d)
	}
	if d := guestClock(t, line2).Sub(guestClock(t, line1)); d < time.Second || d > 1600*time.Millisecond {
		t.Errorf("sleep 1 and two clock reads took %s by the guest's wall clock", d)
	}
	t.Logf("guest clock behind the host's by %s after the restore, %s a second later; sleep 1 by uptime %.2fs",
		host1.Sub(guestClock(t, line1)).Round(time.Millisecond), host2.Sub(guestClock(t, line2)).Round(time.Millisecond), b-a)
	e.assertClean()
}

// fileState is what the parallel test compares of a snapshot file.
type fileState struct {
	size, blocks int64
	mtime        time.Time
	sum          string
}

// stateOf reads path's state; its digest only when hash is set (the
// placeholder is a sparse TiB: its blocks say it holds nothing).
func stateOf(t *testing.T, path string, hash bool) fileState {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	fs := fileState{size: st.Size, blocks: st.Blocks, mtime: time.Unix(st.Mtim.Unix())}
	if hash {
		fs.sum = fileSHA256(t, path)
	}
	return fs
}

// TestSnapshotRunParallel restores the same snapshot eight times at
// once: each run gets its own output and exit status, random bytes and
// boot id of its own (a clone that did not reseed would read its
// siblings' bytes), and none writes the snapshot's files.
func TestSnapshotRunParallel(t *testing.T) {
	const n = 8
	snap := suiteSnapshot(t)
	files := []string{"ram", "state", "placeholder", "snapshot.json"}
	before := map[string]fileState{}
	for _, f := range files {
		before[f] = stateOf(t, filepath.Join(snap, f), f != "placeholder")
	}
	e := newEnv(t)
	results := make([]snapRun, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			script := fmt.Sprintf(`echo %d; head -c 32 /dev/urandom | od -x; cat /proc/sys/kernel/random/boot_id; echo %d > /tmp/mine; sleep 0.5; cat /tmp/mine; exit %d`, i, i, i)
			r, err := runMvmctl(e.environ(), nil, "-v", "exec", "--", "sh", "-c", script)
			results[i], errs[i] = snapRun{result: r}, err
		}()
	}
	wg.Wait()
	took := time.Since(start)
	randoms, bootIDs := map[string]int{}, map[string]int{}
	for i, r := range results {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		s := startedOf(t, r.stderr)
		if !s.restored || s.snapshot != snap {
			t.Errorf("run %d: %+v", i, s)
		}
		lines := strings.Split(string(r.stdout), "\n")
		if r.code != i || len(lines) != 7 || lines[0] != strconv.Itoa(i) || lines[5] != strconv.Itoa(i) {
			t.Errorf("run %d: want exit %d and its own number: %s", i, i, r)
			continue
		}
		random, bootID := strings.Join(lines[1:4], "\n"), lines[4]
		if !hexWords.MatchString(random + "\n") {
			t.Errorf("run %d: od output %q", i, random)
		}
		if j, ok := randoms[random]; ok {
			t.Errorf("runs %d and %d read the same random bytes", j, i)
		}
		if j, ok := bootIDs[bootID]; ok {
			t.Errorf("runs %d and %d have the same boot id %s", j, i, bootID)
		}
		randoms[random], bootIDs[bootID] = i, i
	}
	for _, f := range files {
		if after := stateOf(t, filepath.Join(snap, f), f != "placeholder"); after != before[f] {
			t.Errorf("the snapshot's %s changed: %+v -> %+v", f, before[f], after)
		}
	}
	t.Logf("%d restores at once: %s", n, took.Round(time.Millisecond))
	e.assertClean()
}

// imgFiles records the size and allocated bytes of every drive image
// under the run directory, and of the snapshot's placeholder.
func imgFiles(t *testing.T, runDir, snap string) map[string][2]int64 {
	t.Helper()
	out := map[string][2]int64{}
	add := func(p string) {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err == nil {
			out[p] = [2]int64{st.Size, st.Blocks * 512}
		}
	}
	_ = filepath.WalkDir(runDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && strings.HasSuffix(p, ".img") {
			add(p)
		}
		return nil
	})
	add(filepath.Join(snap, "placeholder"))
	return out
}

// TestSnapshotRunGuestCannotGrowHostFiles: a restored guest sees every
// drive slot with the capacity it had when the snapshot was taken (1
// TiB), whatever the run put in it. Writing past the real image (the
// read-write directory's), or into a slot the run leaves empty, fails in
// the guest; no file on the host grows, or gets a block allocated.
func TestSnapshotRunGuestCannotGrowHostFiles(t *testing.T) {
	snap := suiteSnapshot(t)
	out := t.TempDir()
	writeFile(t, filepath.Join(out, "f"), "x\n", 0o644)
	// Slot 0: the directory's image (vda, read-only) and its writable
	// layer (vdb); slot 1 unused: the shared placeholder (vdc) and an
	// empty file of the run's (vdd). 512000 MiB is inside the capacity
	// the guest knows and far beyond the writable layer's size. (The
	// read is elsewhere: the failed write's pages stay in the guest's
	// cache, and reading them reaches no drive.)
	script := `read -r go
for d in vda vdb vdc vdd; do echo "$d $(cat /sys/block/$d/size)"; done
dd if=/dev/urandom of=/dev/vdd bs=64k count=16 conv=fsync 2>/dev/null; echo "write unused slot $?"
dd if=/dev/vdd of=/dev/null bs=4k count=1 2>/dev/null; echo "read unused slot $?"
dd if=/dev/urandom of=/dev/vdb bs=1M count=4 seek=512000 conv=fsync 2>/dev/null; echo "write beyond the image $?"
dd if=/dev/vdb of=/dev/null bs=1M count=1 skip=700000 2>/dev/null; echo "read beyond the image $?"
dd if=/dev/urandom of=/dev/vdc bs=4k count=1 conv=fsync 2>/dev/null; echo "write shared placeholder $?"
dd if=/dev/urandom of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null; echo "write read-only image $?"
echo ready; read -r done; cat /out/f`
	e := newEnv(t)
	cmd, stdin, lines, stderr := e.startStreaming(nil, "-d", out+":/out:rw", "--", "sh", "-c", script)
	if !waitFor(time.Minute, func() bool { return len(imgFiles(t, e.runDir, snap)) >= 4 }) {
		t.Fatalf("drive images: %v", imgFiles(t, e.runDir, snap))
	}
	before := imgFiles(t, e.runDir, snap)
	_, _ = io.WriteString(stdin, "go\n")
	var got []string
	for {
		line, err := lines.ReadString('\n')
		if err != nil {
			t.Fatalf("read: %v; so far %q; stderr %s", err, got, stderr)
		}
		if line == "ready\n" {
			break
		}
		got = append(got, strings.TrimSuffix(line, "\n"))
	}
	after := imgFiles(t, e.runDir, snap)
	_, _ = io.WriteString(stdin, "done\n")
	stdin.Close()
	rest, _ := io.ReadAll(lines)
	_ = cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 0 || string(rest) != "x\n" {
		t.Errorf("exit %d, rest %q, stderr %s", code, rest, stderr)
	}
	if s := startedOf(t, stderr.Bytes()); !s.restored {
		t.Fatalf("not restored: %+v", s)
	}
	const tib = "2147483648" // sectors
	for i, want := range []string{"vda " + tib, "vdb " + tib, "vdc " + tib, "vdd " + tib} {
		if i >= len(got) || got[i] != want {
			t.Errorf("guest line %d: got %q, want %q (the capacity of the snapshot's slots)", i, got, want)
		}
	}
	for _, l := range got[min(4, len(got)):] {
		if strings.HasSuffix(l, " 0") {
			t.Errorf("the guest succeeded: %q", l)
		}
	}
	if len(got) != 10 {
		t.Errorf("guest output %q", got)
	}
	for p, b := range before {
		a := after[p]
		grew := a[1] - b[1]
		// The writable layer is a mounted filesystem: its own writes
		// may allocate a few blocks; 4 MiB past its end may not.
		if a[0] != b[0] || grew > 1<<20 || (!strings.HasSuffix(p, "upper.img") && grew != 0) {
			t.Errorf("%s: size %d -> %d, allocated %d -> %d", p, b[0], a[0], b[1], a[1])
		}
	}
	t.Logf("guest: %q; drive files: %v", got, after)
	e.assertClean()
}

// TestSnapshotRunTemplate: a template's snapshot (taken by template
// create) restores with the run's writable root layer and two
// directories in its slots and gives what a boot gives; template
// snapshot makes one for another machine shape, which runs of that shape
// restore; template rm removes the snapshots.
func TestSnapshotRunTemplate(t *testing.T) {
	tree := templateTree(t, t.TempDir())
	data := filepath.Join(t.TempDir(), "data")
	extra := []string{"MVM_DATA_DIR=" + data}
	e := newEnv(t)
	mvm := func(args ...string) result {
		t.Helper()
		r, err := runMvmctl(e.environ(extra...), nil, args...)
		if err != nil {
			t.Fatal(err)
		}
		if r.code != 0 {
			t.Fatalf("mvmctl %q: %s", args, r)
		}
		return r
	}
	// The cache is shared with other tests' templates: count only the
	// snapshots this test's template made.
	all := func() []string {
		dirs, _ := filepath.Glob(filepath.Join(cacheDir, "templates", "snapshots", "*", "[0-9a-f]*"))
		return dirs
	}
	others := map[string]bool{}
	for _, d := range all() {
		others[d] = true
	}
	mvm("template", "create", "tiny", "--from-dir", tree)
	snaps := func() []string {
		var mine []string
		for _, d := range all() {
			if !others[d] {
				mine = append(mine, d)
			}
		}
		return mine
	}
	if len(snaps()) != 1 {
		t.Fatalf("template create made snapshots %v, want one", snaps())
	}
	// From here on, the snapshots of this template's key, whichever other
	// tests run beside it.
	key := filepath.Dir(snaps()[0])
	snaps = func() []string {
		dirs, _ := filepath.Glob(filepath.Join(key, "[0-9a-f]*"))
		return dirs
	}
	var listed []struct {
		Name          string
		DiskUsage     int64 `json:"disk_usage"`
		SnapshotUsage int64 `json:"snapshot_usage"`
	}
	if err := json.Unmarshal(mvm("template", "ls", "--json").stdout, &listed); err != nil || len(listed) != 1 {
		t.Fatalf("template ls --json: %v %+v", err, listed)
	}
	// The RAM file holds at least the pages the kernel and agent touched.
	if listed[0].SnapshotUsage < 4<<20 {
		t.Errorf("template ls says the snapshot takes %d bytes", listed[0].SnapshotUsage)
	}

	src := t.TempDir()
	writeFile(t, filepath.Join(src, "in.txt"), "input\n", 0o644)
	outR, outC := t.TempDir(), t.TempDir()
	script := `cat /etc/os-release /src/in.txt; id -un; hello; echo changed > /etc/os-release; cat /etc/os-release; echo out > /out/f`
	args := func(out string) []string {
		return []string{"--template", "tiny", "-d", src + ":/src", "-d", out + ":/out:rw", "--", "sh", "-c", script}
	}
	restored := e.execV(nil, extra, args(outR)...)
	cold := e.execV(nil, extra, append([]string{"--no-snapshot"}, args(outC)...)...)
	if !restored.restored || restored.snapshot != snaps()[0] || cold.restored {
		t.Fatalf("restored run %+v, cold run %+v", restored.started, cold.started)
	}
	assertSame(t, restored, cold)
	want := "NAME=mvm-test-template\nID=mvmtest\ninput\nroot\nhello from the template\nchanged\n"
	if restored.code != 0 || string(restored.stdout) != want {
		t.Errorf("restored run: %s\nwant stdout %q", restored, want)
	}
	for _, out := range []string{outR, outC} {
		if b, err := os.ReadFile(filepath.Join(out, "f")); err != nil || string(b) != "out\n" {
			t.Errorf("write-back to %s: %q %v", out, b, err)
		}
	}
	// The template's root is a per-run layer: the change is gone.
	if r := e.execV(nil, extra, "--template", "tiny", "--", "cat", "/etc/os-release"); !r.restored || !strings.HasPrefix(string(r.stdout), "NAME=mvm-test-template") {
		t.Errorf("next run: %+v\n%s", r.started, r)
	}
	// The snapshot's guest had the root mounted: its layer is kept,
	// read-only, and every restore starts from a copy, with a machine id
	// and a boot id of its own and nothing of an earlier run's writes.
	if fi, err := os.Stat(filepath.Join(snaps()[0], "root.img")); err != nil || fi.Mode().Perm() != 0o444 {
		t.Errorf("the snapshot's root layer: %v %v", fi, err)
	}
	ids := func() []string {
		t.Helper()
		r := e.execV(nil, extra, "--template", "tiny", "--", "sh", "-c", "cat /etc/machine-id /proc/sys/kernel/random/boot_id; ls /tmp; touch /tmp/seen")
		lines := strings.Split(strings.TrimSpace(string(r.stdout)), "\n")
		if !r.restored || r.code != 0 || len(lines) != 2 || !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(lines[0]) {
			t.Fatalf("restored run: %+v\n%s", r.started, r)
		}
		return lines
	}
	if a, b := ids(), ids(); a[0] == b[0] || a[1] == b[1] {
		t.Errorf("two restored runs share an identity: %q and %q", a, b)
	}

	r := e.execV(nil, extra, "--template", "tiny", "--cpus", "1", "--memory", "256M", "--", "grep", "-c", "^processor", "/proc/cpuinfo")
	if r.code != 0 || string(r.stdout) != "1\n" || r.restored || !strings.HasPrefix(r.why, "no snapshot for this configuration") {
		t.Errorf("another machine before its snapshot: %+v\n%s", r.started, r)
	}
	mvm("template", "snapshot", "tiny", "--cpus", "1", "--memory", "256M")
	if len(snaps()) != 2 {
		t.Errorf("after template snapshot --cpus 1: snapshots %v", snaps())
	}
	r = e.execV(nil, extra, "--template", "tiny", "--cpus", "1", "--memory", "256M", "--", "sh", "-c", "grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo")
	if r.code != 0 || !strings.HasPrefix(string(r.stdout), "1\n") || !r.restored {
		t.Errorf("another machine after its snapshot: %+v\n%s", r.started, r)
	}

	mvm("template", "rm", "tiny")
	if s := snaps(); len(s) != 0 {
		t.Errorf("template rm left snapshots %v", s)
	}
	e.assertClean()
}
