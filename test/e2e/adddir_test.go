package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tree is a snapshot of a host directory: path -> description (type, mode,
// content hash or link target), which is what a user compares.
type tree map[string]string

func snapshot(t *testing.T, root string) tree {
	t.Helper()
	out := tree{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			out[rel] = "link " + target
		case fi.IsDir():
			out[rel] = fmt.Sprintf("dir %o", fi.Mode().Perm())
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = fmt.Sprintf("file %o %x", fi.Mode().Perm(), sha256.Sum256(b))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func diffTrees(want, got tree) string {
	var keys []string
	seen := map[string]bool{}
	for k := range want {
		keys, seen[k] = append(keys, k), true
	}
	for k := range got {
		if !seen[k] {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		if want[k] != got[k] {
			fmt.Fprintf(&b, "%q: want %q, got %q\n", k, want[k], got[k])
		}
	}
	return b.String()
}

func writeFile(t *testing.T, p string, data string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
}

func fileHash(s string, mode os.FileMode) string {
	return fmt.Sprintf("file %o %x", mode, sha256.Sum256([]byte(s)))
}

func TestAddDirReadOnly(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "a.txt"), "alpha\n", 0o644)
	writeFile(t, filepath.Join(src, "sub dir/b.bin"), "\x00\x01\xffbinary", 0o600)
	before := snapshot(t, src)
	script := `cat /data/a.txt; cat "/data/sub dir/b.bin" | od -An -c | tr -s ' '; ls -A /data;
touch /data/new 2>/dev/null && echo WROTE;
mount -o remount,rw /data 2>/dev/null; touch /data/new2 2>/dev/null && echo WROTE-AFTER-REMOUNT;
echo done`
	r := e.run(nil, "exec", "-d", src+":/data", "--", "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	out := string(r.stdout)
	for _, want := range []string{"alpha\n", "a.txt\nsub dir\n", "done"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q: %s", want, r)
		}
	}
	if strings.Contains(out, "WROTE") || strings.Contains(out, "lost+found") {
		t.Errorf("read-only directory was writable or showed extra entries: %s", r)
	}
	if d := diffTrees(before, snapshot(t, src)); d != "" {
		t.Errorf("host directory changed:\n%s", d)
	}
	e.assertClean()
}

func TestAddDirReadWrite(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "keep.txt"), "untouched\n", 0o644)
	writeFile(t, filepath.Join(src, "modify.txt"), "old\n", 0o644)
	writeFile(t, filepath.Join(src, "delete.txt"), "bye\n", 0o644)
	writeFile(t, filepath.Join(src, "chmod.sh"), "#!/bin/sh\n", 0o644)
	writeFile(t, filepath.Join(src, "gone/inner.txt"), "x", 0o644)
	writeFile(t, filepath.Join(src, "replaced/old.txt"), "x", 0o644)
	script := `cd /w &&
echo new > "with space.txt" &&
printf 'x' > "$(printf 'new\nline')" &&
echo ünïcödé > "ünï ✓.txt" &&
echo changed >> modify.txt &&
rm delete.txt && rm -r gone &&
rm -r replaced && mkdir replaced && echo fresh > replaced/only.txt &&
chmod 755 chmod.sh &&
ln -s keep.txt link &&
mkdir -p deep/er/est && head -c 100000 /dev/urandom > deep/er/est/random.bin && sha256sum deep/er/est/random.bin | cut -d' ' -f1`
	r := e.run(nil, "exec", "-d", src+":/w:rw", "--", "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	guestSum := strings.TrimSpace(string(r.stdout))
	b, err := os.ReadFile(filepath.Join(src, "deep/er/est/random.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprintf("%x", sha256.Sum256(b)); got != guestSum || len(b) != 100000 {
		t.Errorf("binary file: host sha256 %s (%d bytes), guest %s", got, len(b), guestSum)
	}
	want := tree{
		"keep.txt":               "file 644 " + fmt.Sprintf("%x", sha256.Sum256([]byte("untouched\n"))),
		"modify.txt":             fileHash("old\nchanged\n", 0o644),
		"chmod.sh":               fileHash("#!/bin/sh\n", 0o755),
		"with space.txt":         fileHash("new\n", 0o644),
		"new\nline":              fileHash("x", 0o644),
		"ünï ✓.txt":              fileHash("ünïcödé\n", 0o644),
		"link":                   "link keep.txt",
		"replaced":               "dir 755",
		"replaced/only.txt":      fileHash("fresh\n", 0o644),
		"deep":                   "dir 755",
		"deep/er":                "dir 755",
		"deep/er/est":            "dir 755",
		"deep/er/est/random.bin": fmt.Sprintf("file 644 %x", sha256.Sum256(b)),
	}
	if d := diffTrees(want, snapshot(t, src)); d != "" {
		t.Errorf("host directory after write-back:\n%s", d)
	}
	e.assertClean()
}

func TestAddDirUntouchedFilesAndHostEdits(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	for i := 0; i < 1600; i++ {
		writeFile(t, filepath.Join(src, fmt.Sprintf("d%02d/f%04d.txt", i%40, i)), fmt.Sprintf("content %d\n", i), 0o644)
	}
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			err = os.Chtimes(p, old, old)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, src)

	// The guest waits for a line on stdin, so the host can edit a file
	// while the VM runs; then it changes two other files.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "-d", src+":/w:rw", "--", "sh", "-c",
		`echo ready; read go; echo guest >> /w/d01/f0001.txt; rm /w/d02/f0002.txt; echo new > /w/new.txt`)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if !waitFor(2*time.Minute, func() bool { return strings.Contains(stdout.String(), "ready") }) {
		t.Fatalf("guest never got ready: %q %q", stdout.String(), stderr.String())
	}
	hostEdit := filepath.Join(src, "d00/f0000.txt")
	writeFile(t, hostEdit, "edited on the host during the run\n", 0o644)
	fmt.Fprintln(stdin, "go")
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("mvmctl: %v; stderr %q", err, stderr.String())
	}

	after := snapshot(t, src)
	want := tree{}
	for k, v := range before {
		want[k] = v
	}
	want["d00/f0000.txt"] = fileHash("edited on the host during the run\n", 0o644)
	want["d01/f0001.txt"] = fileHash("content 1\nguest\n", 0o644)
	delete(want, "d02/f0002.txt")
	want["new.txt"] = fileHash("new\n", 0o644)
	if d := diffTrees(want, after); d != "" {
		t.Errorf("host directory after write-back:\n%s", d)
	}
	// Untouched files keep their mtimes too: they were not rewritten.
	fi, err := os.Stat(filepath.Join(src, "d39/f1599.txt"))
	if err != nil || !fi.ModTime().Equal(old) {
		t.Errorf("untouched file mtime %v (%v), want %v", fi.ModTime(), err, old)
	}
	e.assertClean()
}

func TestAddDirTwoAtOnce(t *testing.T) {
	e := newEnv(t)
	in, out := t.TempDir(), t.TempDir()
	writeFile(t, filepath.Join(in, "input.txt"), "3\n1\n2\n", 0o644)
	r := e.run(nil, "exec", "-d", in+":/in", "-d", out+":/out:rw", "--", "sh", "-c", "sort /in/input.txt > /out/sorted.txt")
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	if b, err := os.ReadFile(filepath.Join(out, "sorted.txt")); err != nil || string(b) != "1\n2\n3\n" {
		t.Errorf("sorted.txt = %q, %v", b, err)
	}
	e.assertClean()
}

func TestAddDirSpaceBeyondSource(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "small"), "x", 0o644)
	// At least 1 GiB free for the guest, and a 64 MiB file comes back.
	r := e.run(nil, "exec", "--timeout", "5m", "-d", src+":/w:rw", "--", "sh", "-c",
		`df -k /w | awk 'NR==2 {print $4}'; dd if=/dev/zero of=/w/big bs=1048576 count=64 2>/dev/null`)
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	var availKB int64
	fmt.Sscan(strings.TrimSpace(string(r.stdout)), &availKB)
	if availKB < 1<<20 {
		t.Errorf("guest sees %d KiB free, want at least 1 GiB", availKB)
	}
	if fi, err := os.Stat(filepath.Join(src, "big")); err != nil || fi.Size() != 64<<20 {
		t.Errorf("big file on the host: %v, %v", fi, err)
	}
}

func TestAddDirTimeoutStillWritesBack(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	r := e.run(nil, "exec", "--timeout", "2s", "-d", src+":/w:rw", "--", "sh", "-c", "echo partial > /w/result; sleep 60")
	if r.code != 124 {
		t.Fatalf("got %s\nwant 124", r)
	}
	if b, err := os.ReadFile(filepath.Join(src, "result")); err != nil || string(b) != "partial\n" {
		t.Errorf("result = %q, %v", b, err)
	}
	e.assertClean()
}

func TestAddDirVMKilledAfterWrite(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	c, _ := startReadyArgs(t, e, "-d", src+":/w:rw", "--", "sh", "-c", "echo saved > /w/result; sync; echo ready; sleep 60")
	vmms := e.vmms()
	if len(vmms) != 1 {
		t.Fatalf("want one VMM, found %v", vmms)
	}
	_ = syscall.Kill(vmms[0], syscall.SIGKILL)
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 125 {
		t.Fatalf("exit %d, want 125; stderr %q", code, c.stderr)
	}
	// Either written back, or kept with a message naming where.
	b, err := os.ReadFile(filepath.Join(src, "result"))
	if err != nil {
		kept := regexp.MustCompile(`kept in (\S+);`).FindStringSubmatch(c.stderr.String())
		if kept == nil {
			t.Fatalf("result not written back (%v) and no kept data named: %q", err, c.stderr)
		}
		if r := e.run(nil, "recover", kept[1]); r.code != 0 {
			t.Fatalf("recover: %s", r)
		}
		b, err = os.ReadFile(filepath.Join(src, "result"))
	}
	if err != nil || string(b) != "saved\n" {
		t.Errorf("result = %q, %v", b, err)
	}
	e.assertClean()
}

func TestAddDirKill9KeepsChangesForRecover(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	c, _ := startReadyArgs(t, e, "-d", src+":/w:rw", "--", "sh", "-c", "echo saved > /w/result; sync; echo ready; sleep 60")
	_ = c.Process.Kill()
	_ = c.Wait()
	if !waitFor(5*time.Second, func() bool { return len(e.vmms()) == 0 }) {
		t.Fatal("VMM outlived mvmctl")
	}
	// The next run finds the leftovers and keeps the changes aside.
	r := e.run(nil, "exec", "--", "true")
	if r.code != 0 || !strings.Contains(string(r.stderr), "mvmctl recover") {
		t.Fatalf("next run: %s\nwant a warning naming mvmctl recover", r)
	}
	list := e.run(nil, "recover")
	fields := strings.Fields(string(list.stdout))
	if list.code != 0 || len(fields) < 2 || fields[1] != src {
		t.Fatalf("recover listing: %s", list)
	}
	if r := e.run(nil, "recover", fields[0]); r.code != 0 {
		t.Fatalf("recover: %s", r)
	}
	if b, err := os.ReadFile(filepath.Join(src, "result")); err != nil || string(b) != "saved\n" {
		t.Errorf("result = %q, %v", b, err)
	}
	if _, err := os.Stat(fields[0]); !os.IsNotExist(err) {
		t.Errorf("staged data still there after recover: %v", err)
	}
	e.assertClean()
}

func TestAddDirBadSpecs(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	writeFile(t, file, "x", 0o644)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing host", []string{"-d", "/nonexistent/mvm:/x"}, `"/nonexistent/mvm:/x"`},
		{"not a directory", []string{"-d", file + ":/x"}, "not a directory"},
		{"mode typo", []string{"-d", dir + ":/x:rx"}, `"rx"`},
		{"relative guest", []string{"-d", dir + ":x"}, "absolute"},
		{"no colon", []string{"-d", dir}, "missing ':'"},
		{"same guest twice", []string{"-d", dir + ":/x", "-d", dir + ":/x/"}, "already used"},
		{"reserved", []string{"-d", dir + ":/proc/x"}, "reserved"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.run(nil, append(append([]string{"exec"}, tt.args...), "--", "true")...)
			if r.code != 125 || !strings.Contains(string(r.stderr), tt.want) {
				t.Fatalf("got %s\nwant exit 125 naming %s", r, tt.want)
			}
			if r.elapsed > time.Second {
				t.Errorf("took %s: must fail before any VM boots", r.elapsed)
			}
		})
	}
}

func TestLaunchPlan(t *testing.T) {
	e := newEnv(t)
	plan := filepath.Join(t.TempDir(), "launch.json")
	writeFile(t, plan, `{
  "version": "v0",
  "apps": [{
    "name": "hello",
    "env": {"A": "app", "B": "app", "C": "app"},
    "entrypoint": {
      "command": ["sh", "-c", "printf '%s %s %s %s\\n' \"$A\" \"$B\" \"$C\" \"$(pwd)\""],
      "working_dir": "/srv/app",
      "env": {"B": "entrypoint", "C": "entrypoint"}
    }
  }]
}`, 0o644)
	r := e.run(nil, "exec", "--launch-plan", plan, "-e", "C=cli")
	if r.code != 0 || string(r.stdout) != "app entrypoint cli /srv/app\n" {
		t.Fatalf("got %s\nwant env precedence app < entrypoint < --env and the plan's working dir", r)
	}
	r = e.run(nil, "exec", "--launch-plan", plan, "-w", "/tmp")
	if r.code != 0 || !strings.HasSuffix(string(r.stdout), " /tmp\n") {
		t.Fatalf("--workdir should override working_dir: %s", r)
	}
	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"--launch-plan", plan, "--", "true"}, "--launch-plan"},
		{[]string{"--launch-plan", "/nonexistent/launch.json"}, "/nonexistent/launch.json"},
	} {
		r := e.run(nil, append([]string{"exec"}, bad.args...)...)
		if r.code != 125 || !strings.Contains(string(r.stderr), bad.want) {
			t.Errorf("%q: got %s", bad.args, r)
		}
	}
}

// TestAddDirWriteBackFailureKeepsData removes the host directory while the
// guest runs, so the write-back cannot happen: the command's own exit
// status must stand, and the changes must be kept and recoverable.
func TestAddDirWriteBackFailureKeepsData(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(t.TempDir(), "shared")
	writeFile(t, filepath.Join(src, "old.txt"), "old\n", 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "-d", src+":/w:rw", "--", "sh", "-c", `echo result > /w/new.txt; echo ready; read go; exit 3`)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if !waitFor(2*time.Minute, func() bool { return strings.Contains(stdout.String(), "ready") }) {
		t.Fatalf("guest never got ready: %q", stderr.String())
	}
	if err := os.RemoveAll(src); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(stdin, "go")
	stdin.Close()
	_ = cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 3 {
		t.Fatalf("exit %d, want the command's 3; stderr %q", code, stderr.String())
	}
	kept := regexp.MustCompile(`kept in (\S+);`).FindStringSubmatch(stderr.String())
	if kept == nil {
		t.Fatalf("stderr should say where the changes are kept: %q", stderr.String())
	}
	// Once the directory is back, recover applies the changes.
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if r := e.run(nil, "recover", kept[1]); r.code != 0 {
		t.Fatalf("recover: %s", r)
	}
	if b, err := os.ReadFile(filepath.Join(src, "new.txt")); err != nil || string(b) != "result\n" {
		t.Errorf("new.txt = %q, %v", b, err)
	}
	e.assertClean()
}
