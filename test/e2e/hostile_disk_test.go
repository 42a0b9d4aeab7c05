package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
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

	"golang.org/x/sys/unix"
)

// The guest is hostile: these tests run, as root in the VM, a static
// program (testdata/diskattack) brought in through a read-only share,
// which rewrites the raw scratch disk of a read-write share behind the
// filesystem's back, and check what the host sees.

var (
	toolsOnce sync.Once
	toolsDir  string
	toolsErr  error
)

// tools builds the in-guest programs (testdata/diskattack, netattack,
// guestprobe), once, into a directory the tests share read-only with the
// guest.
func tools(t *testing.T) string {
	t.Helper()
	toolsOnce.Do(func() {
		// Under the suite's work directory (the cache's parent), which
		// the suite removes at the end.
		toolsDir = filepath.Join(filepath.Dir(cacheDir), "tools")
		for _, prog := range []string{"diskattack", "netattack", "guestprobe"} {
			cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(toolsDir, prog), "./testdata/"+prog)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				toolsErr = fmt.Errorf("build the guest's program %s: %v\n%s", prog, err, out)
				return
			}
		}
	})
	if toolsErr != nil {
		t.Fatal(toolsErr)
	}
	return toolsDir
}

// runMeasuredArgs is runMeasured with a five-minute limit and the output
// kept in the result.
func (e *env) runMeasuredArgs(args ...string) measured {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return e.runMeasured(ctx, nil, nil, args...)
}

var writeBackMS = regexp.MustCompile(`write-back (\d+)ms`)

func writeBackTime(r result) string {
	if m := writeBackMS.FindSubmatch(r.stderr); m != nil {
		return string(m[1]) + "ms"
	}
	return "?"
}

// keptDir is the staged directory the failure message names.
var keptRE = regexp.MustCompile(`they are kept in (\S+); apply them with: mvmctl recover (\S+)`)

// shareWithSibling makes parent/share (the shared directory) and
// parent/sib (a directory beside it that nothing may touch), with content.
func shareWithSibling(t *testing.T) (share, sib string) {
	t.Helper()
	parent := t.TempDir()
	share, sib = filepath.Join(parent, "share"), filepath.Join(parent, "sib")
	writeFile(t, filepath.Join(share, "keep.txt"), "host file\n", 0o644)
	writeFile(t, filepath.Join(share, "a/inner.txt"), "host inner\n", 0o644)
	writeFile(t, filepath.Join(sib, "x"), "sibling\n", 0o644)
	writeFile(t, filepath.Join(sib, "secret"), "sibling secret\n", 0o600)
	return share, sib
}

// TestHostileDiskCraftedEntries: the guest rewrites directory entries and
// inodes of its scratch disk. Whatever catches it (the full e2fsck or the
// write-back's own validation), the host sees the same: the command's exit
// status, a message naming where the changes are kept, the share and its
// sibling untouched, mvmctl done in bounded time.
func TestHostileDiskCraftedEntries(t *testing.T) {
	toolsDir := tools(t)
	name := strings.Repeat("A", 40)
	cases := []struct {
		name   string
		script string
	}{
		{"name leading out of the share", `echo evil > /w/` + name + `; sync; /tools/diskattack rename upper ` + name + ` '"../sib/x"'`},
		{"name leading far up", `echo evil > /w/` + name + `; sync; /tools/diskattack rename upper ` + name + ` '"../../../../../../../../tmp/x"'`},
		{"empty name", `rm -r /w/a; echo evil > /w/victim; sync; /tools/diskattack rename upper victim '""'`},
		{"duplicate names, a symlink out and a hard link through it",
			`mkdir /w/d; echo f > /w/d/f; ln -s ../sib /w/l; ln /w/d/f /w/link; sync; /tools/diskattack rename upper l '"d"'`},
		{"hard-linked directory", `mkdir /w/d1 /w/d2; echo x > /w/d1/f; sync; /tools/diskattack setino upper d2 upper/d1`},
		{"endless extent tree", `head -c 200000 /dev/urandom > /w/big; sync; /tools/diskattack endless upper/big`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			share, sib := shareWithSibling(t)
			shareBefore, sibBefore := snapshot(t, share), snapshot(t, sib)
			script := `echo ordinary > /w/ordinary.txt; ` + tc.script + ` && echo attacked; exit 7`
			r := e.runMeasuredArgs("-v", "exec", "-d", toolsDir+":/tools:ro", "-d", share+":/w:rw", "--", "sh", "-c", script)
			t.Logf("exit %d in %s (write-back %s), mvmctl peak RSS %d KiB", r.code, r.elapsed.Round(time.Millisecond), writeBackTime(r.result), r.peakKiB())
			if r.code != 7 || !strings.Contains(string(r.stdout), "attacked") {
				t.Fatalf("got %s\nwant the command's own status 7 after the attack", r.result)
			}
			if !strings.Contains(string(r.stderr), "could not write the guest's changes back to "+share) ||
				!strings.Contains(string(r.stderr), "invalid change set") {
				t.Errorf("stderr does not say the change set was refused: %q", r.stderr)
			}
			kept := keptRE.FindSubmatch(r.stderr)
			if kept == nil || !strings.HasPrefix(string(kept[1]), filepath.Join(e.state, "staged")) {
				t.Errorf("stderr does not name the staged directory: %q", r.stderr)
			} else if _, err := os.Stat(filepath.Join(string(kept[1]), "upper.img")); err != nil {
				t.Errorf("staged changes: %v", err)
			}
			if d := diffTrees(shareBefore, snapshot(t, share)); d != "" {
				t.Errorf("the share changed (an invalid change set must not be applied at all):\n%s", d)
			}
			if d := diffTrees(sibBefore, snapshot(t, sib)); d != "" {
				t.Errorf("the directory beside the share changed:\n%s", d)
			}
			if _, err := os.Lstat("/tmp/x"); err == nil {
				t.Errorf("/tmp/x exists")
			}
			if r.elapsed > 90*time.Second || r.peakKiB() > 200<<10 {
				t.Errorf("mvmctl took %s and %d KiB", r.elapsed, r.peakKiB())
			}
			// recover goes through the same checks: refused again,
			// quickly, the staged data left in place.
			if kept != nil {
				rr := e.runMeasuredArgs("recover", string(kept[1]))
				if rr.code == 0 || !strings.Contains(string(rr.stderr), "invalid change set") || rr.elapsed > 30*time.Second {
					t.Errorf("recover of the invalid set: %s", rr.result)
				}
				if _, err := os.Stat(string(kept[1])); err != nil {
					t.Errorf("staged directory after a refused recover: %v", err)
				}
			}
			e.assertClean()
		})
	}
}

// TestHostileDiskOversizedDirectory: a directory inode claiming 256 GiB
// is written back as what it holds, without mvmctl's memory growing.
func TestHostileDiskOversizedDirectory(t *testing.T) {
	e := newEnv(t)
	share, sib := shareWithSibling(t)
	sibBefore := snapshot(t, sib)
	r := e.runMeasuredArgs("-v", "exec", "-d", tools(t)+":/tools:ro", "-d", share+":/w:rw", "--", "sh", "-c",
		`mkdir /w/d; echo x > /w/d/x; sync; /tools/diskattack size upper/d 274877906944 && echo attacked`)
	t.Logf("exit %d in %s (write-back %s), mvmctl peak RSS %d KiB", r.code, r.elapsed.Round(time.Millisecond), writeBackTime(r.result), r.peakKiB())
	if r.code != 0 || !strings.Contains(string(r.stdout), "attacked") {
		t.Fatalf("got %s", r.result)
	}
	if b, err := os.ReadFile(filepath.Join(share, "d/x")); err != nil || string(b) != "x\n" {
		t.Errorf("d/x = %q, %v", b, err)
	}
	if d := diffTrees(sibBefore, snapshot(t, sib)); d != "" {
		t.Errorf("the directory beside the share changed:\n%s", d)
	}
	if r.peakKiB() > 200<<10 {
		t.Errorf("mvmctl peak RSS %d KiB", r.peakKiB())
	}
	e.assertClean()
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root on the host (mounts, ownership)")
	}
}

// TestHostileDiskNoPrivilege: as root on the host, the guest's setuid-root
// binaries, device nodes and owners do not come back as such: files belong
// to the share's owner, set-id bits are gone, devices are not written.
func TestHostileDiskNoPrivilege(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	share, _ := shareWithSibling(t)
	for _, p := range []string{share, filepath.Join(share, "keep.txt"), filepath.Join(share, "a"), filepath.Join(share, "a/inner.txt")} {
		if err := os.Chown(p, 1000, 1000); err != nil {
			t.Fatal(err)
		}
	}
	script := `cd /w && cp /bin/busybox suid && chmod 4755 suid && cp /bin/busybox sgid && chmod 2755 sgid &&
mknod disk b 8 0 && chmod 666 disk && mknod mem c 1 1 && mknod fifo p && chmod 666 fifo &&
echo x > owned && chown 4321:4321 owned && mkdir d && chmod 2777 d && mkdir sticky && chmod 1777 sticky &&
echo y > d/f && chown 0:0 d/f && ln -s /etc/shadow link && ls -ln`
	r := e.runMeasuredArgs("-v", "exec", "-d", share+":/w:rw", "--", "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("got %s", r.result)
	}
	if !strings.Contains(string(r.stderr), "not written back: 2 device nodes") {
		t.Errorf("stderr (-v) does not report the dropped device nodes: %q", r.stderr)
	}
	want := map[string]string{
		"suid": "file 0755", "sgid": "file 0755", "owned": "file 0644", "d": "dir 0777", "d/f": "file 0644",
		"sticky": "dir 1777", "fifo": "fifo 0666", "link": "symlink",
	}
	for name, w := range want {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(share, name), &st); err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		typ := map[uint32]string{unix.S_IFREG: "file", unix.S_IFDIR: "dir", unix.S_IFIFO: "fifo", unix.S_IFLNK: "symlink"}[st.Mode&unix.S_IFMT]
		got := fmt.Sprintf("%s %04o", typ, st.Mode&0o7777)
		if typ == "symlink" {
			got = typ
		}
		if got != w || st.Uid != 1000 || st.Gid != 1000 {
			t.Errorf("%s: %s owned by %d:%d, want %s owned by 1000:1000", name, got, st.Uid, st.Gid, w)
		}
	}
	for _, dev := range []string{"disk", "mem"} {
		if _, err := os.Lstat(filepath.Join(share, dev)); err == nil {
			t.Errorf("device node %s was written back", dev)
		}
	}
	e.assertClean()
}

// TestHostileDiskSparse100G: a plain truncate in the guest makes a 100 GiB
// file; the host gets a 100 GiB file that takes no space, quickly.
func TestHostileDiskSparse100G(t *testing.T) {
	e := newEnv(t)
	share, _ := shareWithSibling(t)
	r := e.runMeasuredArgs("-v", "exec", "-d", share+":/w:rw", "--", "sh", "-c", `truncate -s 100G /w/huge && echo tail >> /w/huge`)
	t.Logf("exit %d in %s (write-back %s), mvmctl peak RSS %d KiB", r.code, r.elapsed.Round(time.Millisecond), writeBackTime(r.result), r.peakKiB())
	if r.code != 0 {
		t.Fatalf("got %s", r.result)
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(share, "huge"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 100<<30+5 || st.Blocks*512 > 1<<20 {
		t.Errorf("huge: %d bytes taking %d bytes of disk; want 100 GiB + 5 taking at most 1 MiB", st.Size, st.Blocks*512)
	}
	if ms, _ := strconv.Atoi(strings.TrimSuffix(writeBackTime(r.result), "ms")); ms > 5000 {
		t.Errorf("write-back took %dms", ms)
	}
	e.assertClean()
}

// mountTmpfs mounts a tmpfs of the given size, unmounted at the end.
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// TestHostileDiskNoSpace: a write-back that would not fit on the host
// filesystem is refused before it starts, with how much it needs; the
// changes are kept, staged across filesystems (the run directory on a
// tmpfs, as under $XDG_RUNTIME_DIR; the state directory on disk). Once
// there is room, recover applies them, and an interrupted recover stops at
// once, leaving no temporary file and the changes staged.
func TestHostileDiskNoSpace(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	e.runDir = filepath.Join(mountTmpfs(t, "512m"), "run")
	small := mountTmpfs(t, "24m")
	share := filepath.Join(small, "share")
	writeFile(t, filepath.Join(share, "keep.txt"), "host file\n", 0o644)
	before := snapshot(t, share)
	r := e.runMeasuredArgs("exec", "-d", share+":/w:rw", "--", "sh", "-c", `dd if=/dev/zero of=/w/big bs=1048576 count=48 2>/dev/null; exit 5`)
	t.Logf("exit %d in %s, mvmctl peak RSS %d KiB", r.code, r.elapsed.Round(time.Millisecond), r.peakKiB())
	if r.code != 5 {
		t.Fatalf("got %s\nwant the command's own 5", r.result)
	}
	if !regexp.MustCompile(`not enough space on the host filesystem: the write-back needs 4[89]\.\d MiB`).Match(r.stderr) {
		t.Errorf("stderr does not say how much space is needed: %q", r.stderr)
	}
	if d := diffTrees(before, snapshot(t, share)); d != "" {
		t.Errorf("the share changed:\n%s", d)
	}
	kept := keptRE.FindSubmatch(r.stderr)
	if kept == nil {
		t.Fatalf("stderr does not name the staged directory: %q", r.stderr)
	}
	staged := string(kept[1])
	if fi, err := os.Stat(filepath.Join(staged, "upper.img")); err != nil || !strings.HasPrefix(staged, e.state) {
		t.Fatalf("staged changes: %v, %v", fi, err)
	}
	e.assertClean()

	if err := unix.Mount("tmpfs", small, "tmpfs", unix.MS_REMOUNT, "size=256m"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "recover", staged)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if !waitFor(time.Minute, func() bool {
		ents, _ := os.ReadDir(share)
		for _, en := range ents {
			if strings.HasPrefix(en.Name(), ".mvm-writeback-") {
				return true
			}
		}
		return false
	}) {
		t.Fatalf("recover never started writing: %q", stderr.String())
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	start := time.Now()
	_ = cmd.Wait()
	stopped := time.Since(start)
	t.Logf("interrupted recover stopped %s after SIGINT", stopped.Round(time.Millisecond))
	if code := cmd.ProcessState.ExitCode(); code != 130 || stopped > time.Second {
		t.Errorf("interrupted recover: exit %d after %s, want 130 within 1 s; stderr %q", code, stopped, stderr.String())
	}
	if !strings.Contains(stderr.String(), "interrupted") {
		t.Errorf("stderr does not say the write-back was interrupted: %q", stderr.String())
	}
	ents, _ := os.ReadDir(share)
	for _, en := range ents {
		if strings.HasPrefix(en.Name(), ".mvm-") {
			t.Errorf("temporary file left in the share: %s", en.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(staged, "upper.img")); err != nil {
		t.Fatalf("staged changes after an interrupted recover: %v", err)
	}

	rr := e.runMeasuredArgs("recover", staged)
	t.Logf("recover: exit %d in %s, peak RSS %d KiB", rr.code, rr.elapsed.Round(time.Millisecond), rr.peakKiB())
	if rr.code != 0 {
		t.Fatalf("recover: %s", rr.result)
	}
	if fi, err := os.Stat(filepath.Join(share, "big")); err != nil || fi.Size() != 48<<20 {
		t.Errorf("big after recover: %v, %v", fi, err)
	}
	if _, err := os.Stat(staged); !os.IsNotExist(err) {
		t.Errorf("staged directory after recover: %v", err)
	}
}

// TestHostileDiskKill9RunDirOnTmpfs: mvmctl killed with the run directory
// on a tmpfs and the state directory on disk: the next run salvages the
// changes across filesystems, and recover applies them.
func TestHostileDiskKill9RunDirOnTmpfs(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	e.runDir = filepath.Join(mountTmpfs(t, "512m"), "run")
	share := t.TempDir()
	c, _ := startReadyArgs(t, e, "-d", share+":/w:rw", "--", "sh", "-c", "echo saved > /w/result; sync; echo ready; sleep 60")
	_ = c.Process.Kill()
	_ = c.Wait()
	if !waitFor(5*time.Second, func() bool { return len(e.vmms()) == 0 }) {
		t.Fatal("VMM outlived mvmctl")
	}
	r := e.run(nil, "exec", "--", "true")
	if r.code != 0 || !strings.Contains(string(r.stderr), "mvmctl recover") {
		t.Fatalf("next run: %s\nwant a warning naming mvmctl recover", r)
	}
	list := e.run(nil, "recover")
	sc := bufio.NewScanner(bytes.NewReader(list.stdout))
	var staged string
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		if len(f) == 4 && f[1] == share {
			staged = f[0]
		}
	}
	if staged == "" || !strings.HasPrefix(staged, e.state) {
		t.Fatalf("recover listing: %s", list)
	}
	if rr := e.run(nil, "recover", staged); rr.code != 0 {
		t.Fatalf("recover: %s", rr)
	}
	if b, err := os.ReadFile(filepath.Join(share, "result")); err != nil || string(b) != "saved\n" {
		t.Errorf("result = %q, %v", b, err)
	}
	e.assertClean()
}

// TestRecoverDiscard: recover lists what is staged with its size and age,
// and --discard removes one, --all every one.
func TestRecoverDiscard(t *testing.T) {
	e := newEnv(t)
	staged := filepath.Join(e.state, "staged")
	for i, host := range []string{"/h/one", "/h/two", "/h/three"} {
		dir := filepath.Join(staged, fmt.Sprintf("run-%d", i))
		writeFile(t, filepath.Join(dir, "upper.img"), strings.Repeat("x", 100000), 0o600)
		rec := fmt.Sprintf(`{"host": %q, "lower": "lower.img", "upper": "upper.img", "created": %q}`, host, time.Now().Add(-time.Duration(3-i)*time.Hour).UTC().Format(time.RFC3339))
		writeFile(t, filepath.Join(dir, "writeback.json"), rec, 0o600)
	}
	r := e.run(nil, "recover")
	lines := strings.Split(strings.TrimSpace(string(r.stdout)), "\n")
	if r.code != 0 || len(lines) != 3 || !strings.Contains(lines[0], "/h/one\t3h ago\t") || !strings.Contains(lines[0], "KiB") {
		t.Fatalf("listing: %s", r)
	}
	if r := e.run(nil, "recover", "--discard", filepath.Join(staged, "run-0")); r.code != 0 {
		t.Fatalf("discard: %s", r)
	}
	if r := e.run(nil, "recover", "--discard", t.TempDir()); r.code == 0 {
		t.Errorf("discard of a directory that is not staged succeeded: %s", r)
	}
	if r := e.run(nil, "recover", "--discard", "--all"); r.code != 0 {
		t.Fatalf("discard --all: %s", r)
	}
	if ents, _ := os.ReadDir(staged); len(ents) != 0 {
		t.Errorf("left after --discard --all: %v", ents)
	}
}
