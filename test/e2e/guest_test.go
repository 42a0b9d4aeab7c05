package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/backend/qemu"
)

// The helpers here drive a VM's agent directly with the protocol client,
// for guest features the CLI does not expose yet (template roots, users,
// terminals): the backend boots this tree's kernel and initramfs, the test
// is the host.

// guestImage is the test cache's default image.
func guestImage(t *testing.T) (kernel, initrd string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cacheDir, "images", "default.json"))
	if err != nil {
		t.Fatal(err)
	}
	var img struct{ Kernel, Initrd string }
	if err := json.Unmarshal(b, &img); err != nil {
		t.Fatal(err)
	}
	return img.Kernel, img.Initrd
}

// guest is one VM whose agent the test talks to.
type guest struct {
	t       *testing.T
	m       backend.Machine
	c       *agentclient.Client
	console string // the console log, complete once the VM is stopped
}

// bootGuest starts a VM with drives attached and waits for its agent's
// hello. The VM is stopped when the test ends.
func bootGuest(t *testing.T, drives ...backend.Drive) *guest {
	t.Helper()
	kernel, initrd := guestImage(t)
	choice, err := accel.Host{}.Resolve(accel.Auto)
	if err != nil {
		t.Fatal(err)
	}
	console := filepath.Join(t.TempDir(), "console.log")
	m, err := qemu.New(nil).Start(context.Background(), backend.Config{
		Name: "e2e-guest", RunDir: t.TempDir(), ConsoleLog: console, Kernel: kernel, Initrd: initrd,
		CPUs: 2, MemoryMiB: 256, Accel: choice.Kind, Drives: drives,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	conn, err := m.DialAgent(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c, err := agentclient.Dial(conn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := c.Hello(ctx); err != nil {
		t.Fatalf("hello: %v", err)
	}
	return &guest{t: t, m: m, c: c, console: console}
}

// ctx is a context for one call to the guest.
func (g *guest) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	g.t.Cleanup(cancel)
	return ctx
}

// guestRun is what one command in the guest did.
type guestRun struct {
	stdout, stderr string
	st             agentclient.ExitStatus
}

func (r guestRun) String() string {
	return "status " + strings.TrimSpace(stringOf(r.st)) + "\nstdout: " + r.stdout + "\nstderr: " + r.stderr
}

func stringOf(st agentclient.ExitStatus) string {
	b, _ := json.Marshal(st)
	return string(b)
}

// exec runs spec to its end.
func (g *guest) exec(spec agentclient.ExecSpec) guestRun {
	g.t.Helper()
	var out, errb bytes.Buffer
	spec.Stdout, spec.Stderr = &out, &errb
	p, err := g.c.Exec(g.ctx(), spec)
	if err != nil {
		g.t.Fatalf("exec %q: %v", spec.Argv, err)
	}
	st, err := p.Wait(g.ctx())
	if err != nil {
		g.t.Fatalf("exec %q: %v", spec.Argv, err)
	}
	return guestRun{stdout: out.String(), stderr: errb.String(), st: st}
}

// sh runs a shell script and fails the test unless it exits 0.
func (g *guest) sh(script string) string {
	g.t.Helper()
	r := g.exec(agentclient.ExecSpec{Argv: []string{"sh", "-c", script}})
	if r.st.StartFailure != nil || r.st.Code != 0 || r.st.Signal != 0 {
		g.t.Fatalf("sh -c %q:\n%s", script, r)
	}
	return r.stdout
}

// shutdown powers the guest off through the agent and waits for the VMM
// to end, as the SDK does before reading disk images back.
func (g *guest) shutdown() {
	g.t.Helper()
	if err := g.c.Shutdown(g.ctx()); err != nil {
		g.t.Fatalf("shutdown: %v", err)
	}
	select {
	case <-g.m.Done():
	case <-time.After(30 * time.Second):
		g.t.Fatal("the VM did not end after shutdown")
	}
	_ = g.m.Stop(context.Background())
}

// agentWarnings returns the agent's warnings and errors from the console
// log of a stopped VM.
func (g *guest) agentWarnings() []string {
	g.t.Helper()
	b, err := os.ReadFile(g.console)
	if err != nil {
		g.t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, "component=mvm-agent") && (strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR")) {
			out = append(out, line)
		}
	}
	return out
}

// remoteCode is the protocol error code of a failed call, or "".
func remoteCode(err error) string {
	var re *agentclient.RemoteError
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}

// ext4Image makes an ext4 image of size bytes labelled label, holding the
// tree at dir (empty when dir is ""), with the real mkfs.ext4.
func ext4Image(t *testing.T, dir, label string, size int64) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), label+".img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	args := []string{"-q", "-F", "-L", label}
	if dir != "" {
		args = append(args, "-d", dir)
	}
	args = append(args, img)
	if out, err := exec.Command("mkfs.ext4", args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 %v: %v\n%s", args, err, out)
	}
	return img
}

// fileSHA256 is the hash of a file's bytes.
func fileSHA256(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// fsckClean checks an ext4 image with e2fsck -fn: a filesystem that was
// unmounted cleanly has nothing to fix.
func fsckClean(t *testing.T, img string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn %s: %v\n%s", filepath.Base(img), err, out)
	}
}

// busyboxApplets are linked into test templates: enough for the tests'
// scripts, and not vi, which the initramfs has (so a lookup that leaked
// into the agent's root would show).
var busyboxApplets = []string{
	"sh", "cat", "ls", "echo", "id", "stat", "hostname", "head", "od", "tty", "stty", "sleep",
	"env", "pwd", "mkdir", "rm", "touch", "grep", "mount", "sha256sum", "find", "sort", "true",
	"false", "readlink", "wc", "kill", "ps", "setsid", "cut", "test", "[", "printf", "date",
	"chmod", "ln", "uname", "df", "dd", "sync", "tr", "dirname", "basename", "whoami", "groups",
}

// templateTree lays out a small userland at dir, the way an image unpacks
// (busybox standing in for a distribution), with files the tests look
// at. It returns dir.
func templateTree(t *testing.T, dir string) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatalf("busybox is needed for template tests (apt-get install busybox-static): %v", err)
	}
	for _, d := range []string{"bin", "etc", "usr/local/bin", "opt", "root", "home/alice", "var"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "bin/busybox"), string(data), 0o755)
	for _, a := range busyboxApplets {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", a)); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(dir, "etc/os-release"), "NAME=mvm-test-template\nID=mvmtest\n", 0o644)
	writeFile(t, filepath.Join(dir, "etc/passwd"),
		"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:Alice:/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\n", 0o644)
	writeFile(t, filepath.Join(dir, "etc/group"),
		"root:x:0:\ntty:x:5:\nalice:x:1000:\nbob:x:1001:\nstaff:x:50:alice,bob\ndevs:x:60:alice\n", 0o644)
	// /etc/hosts is an absolute symlink: it must resolve inside the
	// template, where the target exists, not in the agent's root.
	writeFile(t, filepath.Join(dir, "etc/hosts.real"), "10.1.2.3\tdb.internal\n127.0.1.1\toldname\n", 0o644)
	if err := os.Symlink("/etc/hosts.real", filepath.Join(dir, "etc/hosts")); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "etc/machine-id"), "", 0o444)
	// A command reached through an absolute symlink on PATH.
	writeFile(t, filepath.Join(dir, "opt/hello.sh"), "#!/bin/sh\necho hello from the template\n", 0o755)
	if err := os.Symlink("/opt/hello.sh", filepath.Join(dir, "usr/local/bin/hello")); err != nil {
		t.Fatal(err)
	}
	// Only root may run this one.
	writeFile(t, filepath.Join(dir, "usr/local/bin/rootonly"), "#!/bin/sh\necho root only\n", 0o700)
	return dir
}
