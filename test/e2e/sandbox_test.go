package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

type sandboxEntry struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	PID    int    `json:"pid"`
	Dirs   int    `json:"dirs"`
	Reason string `json:"reason"`
}

func (e *env) sandboxes() map[string]sandboxEntry {
	e.t.Helper()
	r := e.run(nil, "sandbox", "ls", "--json")
	var list []sandboxEntry
	if r.code != 0 || json.Unmarshal(r.stdout, &list) != nil {
		e.t.Fatalf("sandbox ls --json: %s", r)
	}
	m := map[string]sandboxEntry{}
	for _, s := range list {
		m[s.Name] = s
	}
	return m
}

func (e *env) mustRun(stdin []byte, args ...string) result {
	e.t.Helper()
	var in *bytes.Reader
	if stdin != nil {
		in = bytes.NewReader(stdin)
	}
	var r result
	if in != nil {
		r = e.run(in, args...)
	} else {
		r = e.run(nil, args...)
	}
	if r.code != 0 {
		e.t.Fatalf("mvmctl %q: %s", args, r)
	}
	return r
}

// TestSandboxLifecycle: a sandbox stays up across commands (files in
// /tmp, a background process), runs them with exec's semantics (bytes,
// exit codes, stdin, two at once), refuses a duplicate name before
// anything boots, writes a read-write directory back when stopped, shows
// why it ended, and leaves nothing once removed.
func TestSandboxLifecycle(t *testing.T) {
	e := newEnv(t)
	data := t.TempDir()
	e.mustRun(nil, "sandbox", "create", "-d", data+":/data:rw", "-e", "GREETING=hello", "-e", "KEEP=kept", "box")
	t.Cleanup(func() { e.run(nil, "sandbox", "rm", "box") })

	if s := e.sandboxes()["box"]; s.Status != "running" || s.PID == 0 || s.Dirs != 1 {
		t.Fatalf("ls shows %+v, want box running with its directory", s)
	}
	// A restored VM's console starts at the restore: not empty (the
	// restore probes its drives), bounded.
	if r := e.run(nil, "sandbox", "logs", "box"); r.code != 0 || len(r.stdout) == 0 || len(r.stdout) > 1<<20 {
		t.Errorf("logs of a running sandbox: %s", r)
	}
	r := e.run(nil, "sandbox", "exec", "box", "--", "sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2; exit 7")
	if r.code != 7 || string(r.stdout) != "out\n" || string(r.stderr) != "err\n" {
		t.Fatalf("exec: %s; want exit 7 with out/err", r)
	}
	e.mustRun(nil, "sandbox", "exec", "box", "--", "sh", "-c", "echo kept > /tmp/state; setsid sh -c 'echo $$ > /tmp/pid; exec sleep 600' >/dev/null 2>&1 < /dev/null & while [ ! -s /tmp/pid ]; do sleep 0.05; done")
	r = e.mustRun([]byte("from stdin"), "sandbox", "exec", "box", "--", "sh", "-c", "cat /tmp/state; pidof sleep >/dev/null && echo server-alive; cat")
	if string(r.stdout) != "kept\nserver-alive\nfrom stdin" {
		t.Errorf("later exec saw %q; want the file, the background process and stdin", r.stdout)
	}
	r = e.mustRun(nil, "sandbox", "exec", "-e", "GREETING=override", "box", "--", "sh", "-c", `echo "$GREETING $KEEP"`)
	if string(r.stdout) != "override kept\n" {
		t.Errorf("create's -e under exec's -e: %q", r.stdout)
	}
	if r := e.run(nil, "sandbox", "exec", "box", "--", "nosuchcommand"); r.code != 127 {
		t.Errorf("missing command: %s, want 127", r)
	}

	// Two clients at once: both run, in parallel.
	var wg sync.WaitGroup
	var res [2]result
	start := time.Now()
	for i := range res {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = e.run(nil, "sandbox", "exec", "box", "--", "sh", "-c", "sleep 2; echo done")
		}()
	}
	wg.Wait()
	for i, r := range res {
		if r.code != 0 || string(r.stdout) != "done\n" {
			t.Errorf("concurrent exec %d: %s", i, r)
		}
	}
	if d := time.Since(start); d > 3900*time.Millisecond {
		t.Errorf("two 2 s commands took %s together: they did not run at once", d)
	}

	if os.Geteuid() == 0 {
		// Another user, who can reach the directories above, cannot
		// list, use or stop the sandbox: the run and state directories
		// are the owner's alone.
		for d := filepath.Dir(e.runDir); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
			must(t, os.Chmod(d, 0o755))
		}
		for _, args := range [][]string{{"sandbox", "exec", "box", "--", "true"}, {"sandbox", "stop", "box"}, {"sandbox", "cp", "box:/etc/hostname", "/tmp/x"}} {
			cmd := exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", mvmctl}, args...)...)
			cmd.Env = e.environ()
			if out, err := cmd.CombinedOutput(); err == nil {
				t.Errorf("another user ran mvmctl %q: %s", args, out)
			}
		}
		if s := e.sandboxes()["box"]; s.Status != "running" {
			t.Errorf("after another user's tries: %+v", s)
		}
	}

	dup := e.run(nil, "sandbox", "create", "box")
	if dup.code != 125 || !strings.Contains(string(dup.stderr), "box is running") || dup.elapsed > 2*time.Second {
		t.Errorf("duplicate create: %s; want a quick 125 naming the running sandbox", dup)
	}

	e.mustRun(nil, "sandbox", "exec", "box", "--", "sh", "-c", "echo written > /data/out")
	e.mustRun(nil, "sandbox", "stop", "box")
	if b, err := os.ReadFile(filepath.Join(data, "out")); err != nil || string(b) != "written\n" {
		t.Errorf("after stop the rw directory has %q, %v; want the guest's file", b, err)
	}
	if s := e.sandboxes()["box"]; s.Status != "stopped" || !strings.Contains(s.Reason, "stopped") {
		t.Errorf("after stop ls shows %+v", s)
	}
	r = e.run(nil, "sandbox", "exec", "box", "--", "true")
	if r.code != 125 || !strings.Contains(string(r.stderr), "box is stopped") {
		t.Errorf("exec on a stopped sandbox: %s", r)
	}
	if r := e.run(nil, "sandbox", "logs", "box"); r.code != 0 || len(r.stdout) == 0 {
		t.Errorf("logs of a stopped sandbox (kept when it ended): %s", r)
	}
	e.mustRun(nil, "sandbox", "rm", "box")
	if len(e.sandboxes()) != 0 {
		t.Errorf("after rm ls shows %v", e.sandboxes())
	}
	if r := e.run(nil, "sandbox", "exec", "nosuch", "--", "true"); r.code != 125 || !strings.Contains(string(r.stderr), "no sandbox called nosuch") {
		t.Errorf("exec on an unknown sandbox: %s", r)
	}
	e.assertClean()
}

// TestSandboxCp: trees go in and out with their modes, times and links,
// by docker cp's rules; bad paths, a symlinked destination, and a guest
// that sends more than the limit (a 100 GiB sparse file, or 2 MiB over
// --limit 1M) are refused, leaving nothing on the host; a guest's setuid
// bit does not reach the host.
func TestSandboxCp(t *testing.T) {
	e := newEnv(t)
	e.mustRun(nil, "sandbox", "create", "cp")
	t.Cleanup(func() { e.run(nil, "sandbox", "rm", "cp") })

	host := t.TempDir()
	src := filepath.Join(host, "src")
	must(t, os.MkdirAll(filepath.Join(src, "sub"), 0o755))
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	must(t, os.WriteFile(filepath.Join(src, "sub", "big"), big, 0o640))
	must(t, os.WriteFile(filepath.Join(src, "run.sh"), []byte("#!/bin/sh\necho ran\n"), 0o755))
	must(t, os.Symlink("run.sh", filepath.Join(src, "link")))
	old := time.Date(2021, 5, 6, 7, 8, 9, 0, time.UTC)
	must(t, os.Chtimes(filepath.Join(src, "run.sh"), old, old))

	e.mustRun(nil, "sandbox", "cp", src, "cp:/tmp")
	r := e.mustRun(nil, "sandbox", "exec", "cp", "--", "sh", "-c",
		"/tmp/src/run.sh; readlink /tmp/src/link; stat -c '%a %s' /tmp/src/sub/big; date -u -r /tmp/src/run.sh +%Y")
	if string(r.stdout) != "ran\nrun.sh\n640 4194304\n2021\n" {
		t.Errorf("in the guest: %q", r.stdout)
	}

	out := filepath.Join(host, "out")
	e.mustRun(nil, "sandbox", "cp", "cp:/tmp/src", out)
	if b, err := os.ReadFile(filepath.Join(out, "sub", "big")); err != nil || !bytes.Equal(b, big) {
		t.Errorf("big file back: %d bytes, %v", len(b), err)
	}
	if l, _ := os.Readlink(filepath.Join(out, "link")); l != "run.sh" {
		t.Errorf("link back: %q", l)
	}
	if fi, err := os.Stat(filepath.Join(out, "run.sh")); err != nil || fi.Mode() != 0o755 || !fi.ModTime().Equal(old) {
		t.Errorf("run.sh back: %v, %v", fi.Mode(), err)
	}
	// Into an existing directory: under its own name; "/." its contents.
	e.mustRun(nil, "sandbox", "cp", "cp:/tmp/src/run.sh", host)
	if _, err := os.Stat(filepath.Join(host, "run.sh")); err != nil {
		t.Error("copy into a directory:", err)
	}
	merged := filepath.Join(host, "merged")
	must(t, os.Mkdir(merged, 0o755))
	must(t, os.WriteFile(filepath.Join(merged, "mine"), nil, 0o644))
	e.mustRun(nil, "sandbox", "cp", "cp:/tmp/src/.", merged)
	if _, err := os.Stat(filepath.Join(merged, "sub", "big")); err != nil {
		t.Error("contents copy:", err)
	}
	if _, err := os.Stat(filepath.Join(merged, "mine")); err != nil {
		t.Error("contents copy removed a file already there:", err)
	}

	// The guest's setuid program arrives as a plain executable.
	e.mustRun(nil, "sandbox", "exec", "cp", "--", "sh", "-c", "cp /bin/busybox /tmp/suid; chmod 4755 /tmp/suid")
	e.mustRun(nil, "sandbox", "cp", "cp:/tmp/suid", filepath.Join(host, "suid"))
	if fi, err := os.Stat(filepath.Join(host, "suid")); err != nil || fi.Mode() != 0o755 {
		t.Errorf("setuid file on the host: %v, %v; want -rwxr-xr-x", fi.Mode(), err)
	}

	e.mustRun(nil, "sandbox", "exec", "cp", "--", "sh", "-c", "truncate -s 100G /tmp/huge; dd if=/dev/zero of=/tmp/two bs=1M count=2 2>/dev/null")
	before := listDir(t, host)
	must(t, os.Symlink("/etc", filepath.Join(host, "etclink")))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"cp:/tmp/huge", filepath.Join(host, "huge")}, "over the copy limit"},
		{[]string{"--limit", "1M", "cp:/tmp/two", filepath.Join(host, "two")}, "over the copy limit"},
		{[]string{"cp:/tmp/../etc/passwd", host}, `may not contain ".."`},
		{[]string{"cp:/etc/hostname", filepath.Join(host, "etclink")}, "symbolic link"},
		{[]string{"cp:/nonexistent", host}, "does not exist"},
		{[]string{src, "cp:relative"}, "absolute"},
		{[]string{src, "cp:/tmp/src/run.sh"}, "cannot copy a directory to a file"},
		{[]string{"cp:/tmp", "nosuch:/tmp"}, "between two sandboxes"},
	} {
		r := e.run(nil, append([]string{"sandbox", "cp"}, c.args...)...)
		if r.code != 125 || !strings.Contains(string(r.stderr), c.want) {
			t.Errorf("cp %q: %s; want 125 and %q", c.args, r, c.want)
		}
	}
	os.Remove(filepath.Join(host, "etclink"))
	if after := listDir(t, host); after != before {
		t.Errorf("refused copies left files: before %s, after %s", before, after)
	}
	if _, err := os.Lstat("/etc/hostname.mvm"); err == nil {
		t.Error("a copy wrote through the symlink")
	}
}

func listDir(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return strings.Join(names, ",")
}

// TestSandboxSupervisorKilled: a supervisor SIGKILLed while a client
// runs a command gives that client a clear error at once, its VM does
// not outlive it, and the sandbox is gone from ls; --idle and --ttl stop
// sandboxes by themselves, saying why.
func TestSandboxSupervisorKilled(t *testing.T) {
	e := newEnv(t)
	e.mustRun(nil, "sandbox", "create", "victim")
	e.mustRun(nil, "sandbox", "create", "--idle", "2s", "idle")
	e.mustRun(nil, "sandbox", "create", "--ttl", "4s", "ttl")
	e.mustRun(nil, "sandbox", "create", "--idle", "2s", "--on-idle", "pause", "idlep")
	e.mustRun(nil, "sandbox", "create", "vmdies")
	t.Cleanup(func() { e.run(nil, "sandbox", "rm", "victim", "idle", "ttl", "idlep", "vmdies") })

	// A VM that dies under its supervisor: the sandbox ends as failed,
	// saying why.
	var ps []struct {
		Name   string `json:"name"`
		VMMPID int    `json:"vmm_pid"`
	}
	if r := e.mustRun(nil, "ps", "--json"); json.Unmarshal(r.stdout, &ps) != nil {
		t.Fatalf("ps --json: %s", r)
	}
	for _, p := range ps {
		if p.Name == "vmdies" && p.VMMPID > 0 {
			must(t, syscall.Kill(p.VMMPID, syscall.SIGKILL))
		}
	}
	if !waitFor(20*time.Second, func() bool { return e.sandboxes()["vmdies"].Status == "failed" }) {
		t.Errorf("a sandbox whose VM was killed: %+v", e.sandboxes()["vmdies"])
	} else if s := e.sandboxes()["vmdies"]; !strings.Contains(s.Reason, "VM") && !strings.Contains(s.Reason, "vm") {
		t.Errorf("its reason: %q", s.Reason)
	}
	if r := e.run(nil, "sandbox", "exec", "vmdies", "--", "true"); r.code != 125 || !strings.Contains(string(r.stderr), "failed") {
		t.Errorf("exec on a sandbox whose VM died: %s", r)
	}
	sup := e.sandboxes()["victim"].PID
	if sup == 0 {
		t.Fatal("no supervisor pid")
	}
	done := make(chan result, 1)
	go func() { done <- e.run(nil, "sandbox", "exec", "victim", "--", "sleep", "60") }()
	time.Sleep(1500 * time.Millisecond)
	killed := time.Now()
	must(t, syscall.Kill(sup, syscall.SIGKILL))
	select {
	case r := <-done:
		if r.code != 125 || !strings.Contains(string(r.stderr), "victim") {
			t.Errorf("exec whose supervisor died: %s", r)
		}
		if d := time.Since(killed); d > 5*time.Second {
			t.Errorf("the client noticed after %s", d)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the client still waits 20 s after its supervisor died")
	}
	if _, ok := e.sandboxes()["victim"]; ok {
		t.Error("ls still shows the killed sandbox")
	}

	if !waitFor(20*time.Second, func() bool {
		s := e.sandboxes()
		return s["idle"].Status == "stopped" && s["ttl"].Status == "stopped" && s["idlep"].Status == "paused"
	}) {
		t.Fatalf("idle and ttl sandboxes: %+v", e.sandboxes())
	}
	s := e.sandboxes()
	if !strings.Contains(s["idle"].Reason, "idle") || !strings.Contains(s["ttl"].Reason, "ttl") {
		t.Errorf("reasons: %q, %q", s["idle"].Reason, s["ttl"].Reason)
	}
	// A sandbox paused for being idle resumes.
	e.mustRun(nil, "sandbox", "resume", "idlep")
	if r := e.mustRun(nil, "sandbox", "exec", "idlep", "--", "echo", "back"); string(r.stdout) != "back\n" {
		t.Errorf("exec after the idle pause: %s", r)
	}
	e.mustRun(nil, "sandbox", "rm", "idlep")
	// Only the killed sandbox's VMM could linger, and it must not.
	if !waitFor(5*time.Second, func() bool { return len(e.vmms()) == 0 }) {
		t.Errorf("VMMs left: %v", e.vmms())
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestSandboxPauseResume: a paused sandbox has no VMM and no owning
// process, only its files on disk, and refuses commands; resumed (by a
// new owner), its files and a background process are where they were.
// A pause while a command runs is refused. A resume under a QEMU that
// cannot load the state fails clearly and keeps the paused state, which
// the original QEMU then resumes.
func TestSandboxPauseResume(t *testing.T) {
	e := newEnv(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	wrapper := filepath.Join(t.TempDir(), "qemu")
	writeWrapper := func(extra string) {
		must(t, os.WriteFile(wrapper+".new", []byte("#!/bin/sh\nexec "+qemu+` "$@"`+extra+"\n"), 0o755))
		must(t, os.Rename(wrapper+".new", wrapper))
	}
	writeWrapper("")
	rw := t.TempDir()
	create := e.command(context.Background(), "sandbox", "create", "-d", rw+":/rw:rw", "pz")
	create.Env = append(create.Env, "MVM_QEMU="+wrapper)
	if out, err := create.CombinedOutput(); err != nil {
		t.Fatalf("create: %v: %s", err, out)
	}
	t.Cleanup(func() { e.run(nil, "sandbox", "rm", "pz") })
	e.mustRun(nil, "sandbox", "exec", "pz", "--", "sh", "-c",
		`echo kept > /tmp/f; setsid sh -c 'echo $$ > /tmp/pid; i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done' >/dev/null 2>&1 </dev/null & while [ ! -s /tmp/n ]; do sleep 0.05; done`)

	busy := make(chan result, 1)
	go func() { busy <- e.run(nil, "sandbox", "exec", "pz", "--", "sleep", "3") }()
	time.Sleep(1 * time.Second)
	if r := e.run(nil, "sandbox", "pause", "pz"); r.code != 125 || !strings.Contains(string(r.stderr), "busy") {
		t.Errorf("pause while a command runs: %s", r)
	}
	if r := <-busy; r.code != 0 {
		t.Errorf("the command a pause was refused for: %s", r)
	}

	r := e.mustRun(nil, "sandbox", "pause", "pz")
	if !strings.Contains(string(r.stderr), "paused pz") {
		t.Errorf("pause said %q", r.stderr)
	}
	owner := e.sandboxes()["pz"]
	if owner.Status != "paused" || owner.PID != 0 {
		t.Errorf("ls after pause: %+v; want paused with no owning process", owner)
	}
	if vmms := e.vmms(); len(vmms) != 0 {
		t.Errorf("a paused sandbox has VMMs: %v", vmms)
	}
	if out, _ := exec.Command("pgrep", "-f", "sandbox supervise pz").Output(); len(out) > 0 {
		t.Errorf("a paused sandbox's owner still runs: %s", out)
	}
	if r := e.run(nil, "sandbox", "exec", "pz", "--", "true"); r.code != 125 || !strings.Contains(string(r.stderr), "paused") {
		t.Errorf("exec on a paused sandbox: %s", r)
	}
	if r := e.run(nil, "sandbox", "cp", "pz:/tmp/f", t.TempDir()); r.code != 125 || !strings.Contains(string(r.stderr), "paused") {
		t.Errorf("cp from a paused sandbox: %s", r)
	}

	// A QEMU that builds another machine cannot load the state.
	writeWrapper(" -smp 1")
	resume := e.command(context.Background(), "sandbox", "resume", "pz")
	resume.Env = append(resume.Env, "MVM_QEMU="+wrapper)
	if out, err := resume.CombinedOutput(); err == nil || !strings.Contains(string(out), "paused state is kept") {
		t.Errorf("resume under another QEMU: %v: %s", err, out)
	}
	if s := e.sandboxes()["pz"]; s.Status != "paused" {
		t.Errorf("ls after a failed resume: %+v", s)
	}
	writeWrapper("")
	resume = e.command(context.Background(), "sandbox", "resume", "pz")
	resume.Env = append(resume.Env, "MVM_QEMU="+wrapper)
	if out, err := resume.CombinedOutput(); err != nil {
		t.Fatalf("resume: %v: %s", err, out)
	}
	r = e.mustRun(nil, "sandbox", "exec", "pz", "--", "sh", "-c", "cat /tmp/f; a=$(cat /tmp/n); sleep 1; b=$(cat /tmp/n); [ $b -gt $a ] && echo counting; kill -0 $(cat /tmp/pid) && echo alive")
	if string(r.stdout) != "kept\ncounting\nalive\n" {
		t.Errorf("after resume: %q; want the file, and the background process still counting", r.stdout)
	}
	// Stopped while paused, it writes its read-write directory back.
	e.mustRun(nil, "sandbox", "exec", "pz", "--", "sh", "-c", "echo late > /rw/late")
	e.mustRun(nil, "sandbox", "pause", "pz")
	e.mustRun(nil, "sandbox", "stop", "pz")
	if b, err := os.ReadFile(filepath.Join(rw, "late")); err != nil || string(b) != "late\n" {
		t.Errorf("stopped while paused, the rw directory has %q, %v", b, err)
	}
	if s := e.sandboxes()["pz"]; s.Status != "stopped" {
		t.Errorf("ls after a stop while paused: %+v", s)
	}
	e.mustRun(nil, "sandbox", "rm", "pz")
	e.assertClean()
}
