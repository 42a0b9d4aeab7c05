package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// fakeRoot lays out a directory tree that stands for a template's root,
// with symlinks that point out of it if followed from the agent's view.
func fakeRoot(t *testing.T) (*fsRoot, string) {
	t.Helper()
	dir := t.TempDir()
	outside := t.TempDir()
	mk := func(p, data string, mode os.FileMode) {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(full, mode); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, p string) {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, filepath.Join(dir, p)); err != nil {
			t.Fatal(err)
		}
	}
	mk("opt/tool", "#!/bin/sh\n", 0o755)
	mk("opt/data", "not executable", 0o644)
	mk("opt/owner-only", "#!/bin/sh\n", 0o700)
	mk("bin/sh", "", 0o755)
	link("/opt/tool", "usr/local/bin/tool")        // absolute, inside the root
	link("../../../../../../opt/tool", "bin/dots") // climbs past the root
	link(outside, "escape")                        // an absolute path of the host
	link("/opt", "usr/lib/alt")
	if err := os.MkdirAll(filepath.Join(dir, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(dir, "etc/fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	return &fsRoot{path: dir}, outside
}

func TestLookPathInRoot(t *testing.T) {
	r, _ := fakeRoot(t)
	alice := &identity{uid: 1000, gid: 1000}
	for _, tc := range []struct {
		name, path, cwd string
		id              *identity
		want            string
		wantErr         error
	}{
		{"tool", "/usr/local/bin:/bin", "/", rootIdentity, "/usr/local/bin/tool", nil},
		{"dots", "/bin", "/", rootIdentity, "/bin/dots", nil},
		{"sh", "/nonexistent:/bin", "/", rootIdentity, "/bin/sh", nil},
		{"data", "/opt", "/", rootIdentity, "", unix.EACCES},
		{"missing", "/opt:/bin", "/", rootIdentity, "", unix.ENOENT},
		{"owner-only", "/opt", "/", rootIdentity, "/opt/owner-only", nil},
		{"owner-only", "/opt", "/", alice, "", unix.EACCES},
		{"tool", "/opt", "/", alice, "/opt/tool", nil},
		{"/usr/lib/alt/tool", "", "/", rootIdentity, "/usr/lib/alt/tool", nil},
		{"./tool", "", "/opt", rootIdentity, "./tool", nil},
		{"tool", "bin:.", "/opt", rootIdentity, "tool", nil},
		{"opt", "/", "/", rootIdentity, "", unix.EACCES}, // a directory
		{"escape", "/", "/", rootIdentity, "", unix.ENOENT},
	} {
		got, err := lookPath(r, tc.name, tc.path, tc.cwd, tc.id)
		if got != tc.want || !errors.Is(err, tc.wantErr) && !(err == nil && tc.wantErr == nil) {
			t.Errorf("lookPath(%q, PATH=%q, cwd %s, uid %d) = %q, %v; want %q, %v", tc.name, tc.path, tc.cwd, tc.id.uid, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestRootFilesStayInside(t *testing.T) {
	r, outside := fakeRoot(t)
	// mkdir -p through an absolute symlink to a host directory fails as
	// it would in a chroot (the target does not exist in the root), and
	// never writes the host directory.
	if fd, err := r.mkdirAll("/escape/made/here", 0o755); err == nil {
		unix.Close(fd)
		t.Error("mkdirAll through a dangling symlink succeeded")
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("mkdirAll wrote outside the root: %v", entries)
	}
	// Through a symlink to a directory of the root, it creates there.
	fd, err := r.mkdirAll("/usr/lib/alt/made/here", 0o755)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if fi, err := os.Stat(filepath.Join(r.path, "opt/made/here")); err != nil || !fi.IsDir() {
		t.Errorf("mkdirAll did not create the directory inside the root: %v", err)
	}
	// Writes follow symlinks inside the root too.
	if err := r.writeFile("/usr/lib/alt/new", []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(r.path, "opt/new")); err != nil || string(b) != "x" {
		t.Errorf("write through /usr/lib/alt: %q, %v", b, err)
	}
	// A FIFO is never opened (it would block), a big file is refused.
	if _, err := r.readFile("/etc/fifo", 100); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("read of a FIFO: %v", err)
	}
	if err := r.writeFile("/etc/fifo", []byte("x"), 0o644); err == nil {
		t.Error("write to a FIFO succeeded")
	}
	if _, err := r.readFile("/opt/data", 5); err == nil || !strings.Contains(err.Error(), "larger than 5 bytes") {
		t.Errorf("read past the limit: %v", err)
	}
	if b, err := r.readFile("/opt/data", 100); err != nil || string(b) != "not executable" {
		t.Errorf("read: %q, %v", b, err)
	}
}

func TestHostsFile(t *testing.T) {
	for _, tc := range []struct{ old, want string }{
		{"", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tvm1\n"},
		{"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 debian\n10.0.0.1 db # the database\n\n\n",
			"127.0.0.1 localhost\n::1 localhost\n10.0.0.1 db # the database\n127.0.1.1\tvm1\n"},
		{"# comment only\n10.0.0.1 db", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n# comment only\n10.0.0.1 db\n127.0.1.1\tvm1\n"},
		{"127.0.0.1\tlocalhost.localdomain localhost\n", "::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\tlocalhost.localdomain localhost\n127.0.1.1\tvm1\n"},
	} {
		if got := string(hostsFile([]byte(tc.old), "vm1")); got != tc.want {
			t.Errorf("hostsFile(%q)\n got %q\nwant %q", tc.old, got, tc.want)
		}
	}
}

func TestCheckHostname(t *testing.T) {
	for _, h := range []string{"a", "mvm", "exec-1f2e.local", strings.Repeat("x", 64)} {
		if err := checkHostname(h); err != nil {
			t.Errorf("%q: %v", h, err)
		}
	}
	for _, h := range []string{"", "-x", ".x", "a b", "a/b", "a\x00", "é", strings.Repeat("x", 65)} {
		if err := checkHostname(h); !errors.Is(err, errInvalidRequest) {
			t.Errorf("%q: got %v, want invalid", h, err)
		}
	}
}

// TestRootRequestChecked covers the Root calls refused before anything is
// mounted (the mounting itself is tested on a real VM).
func TestRootRequestChecked(t *testing.T) {
	f := newFakeDrives(t)
	f.add("vda", "tmpl", "", false)
	f.add("vdb", "-", "", false)
	srv := NewServer(nil, "test", Options{})
	srv.drives = f.d
	for _, tc := range []struct {
		req  *agentpb.Root
		want error
		msg  string
	}{
		{&agentpb.Root{LowerLabel: "tmpl"}, errInvalidRequest, "upper_label"},
		{&agentpb.Root{UpperLabel: "tmpl"}, errInvalidRequest, "lower_label"},
		{&agentpb.Root{LowerLabel: "tmpl", UpperLabel: "tmpl"}, errInvalidRequest, "both"},
		{&agentpb.Root{LowerLabel: "tmpl", UpperLabel: "a/b"}, errInvalidRequest, "drive name"},
		{&agentpb.Root{LowerLabel: "tmpl", UpperLabel: "up", Hostname: "no spaces"}, errInvalidRequest, "host name"},
		{&agentpb.Root{LowerLabel: "absent", UpperLabel: "tmpl"}, nil, `no drive with label "absent" after 0s (the VM has vda: ext4 "tmpl", vdb: no ext2/3/4 filesystem)`},
	} {
		err := srv.setRootWait(tc.req, 0)
		if err == nil || tc.want != nil && !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%v: got %v, want %v containing %q", tc.req, err, tc.want, tc.msg)
		}
	}
	srv.mounted["/dev/vdc"] = true
	if err := srv.setRootWait(&agentpb.Root{LowerLabel: "tmpl", UpperLabel: "up"}, 0); !errors.Is(err, errPrecondition) {
		t.Errorf("root after a mount: got %v, want a precondition error", err)
	}
}

// FuzzHostsFile feeds arbitrary image /etc/hosts content to the rewrite:
// it never panics, keeps a localhost entry, and names the host exactly
// once, on the one 127.0.1.1 line.
func FuzzHostsFile(f *testing.F) {
	f.Add([]byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tdebian\n"))
	f.Add([]byte("# empty\n\n\t\n127.0.1.1 a b c # x\n127.0.1.1\n"))
	f.Add([]byte("\x00\xff localhost\r\n"))
	f.Fuzz(func(t *testing.T, old []byte) {
		out := string(hostsFile(old, "vm-host"))
		if !strings.HasSuffix(out, "127.0.1.1\tvm-host\n") {
			t.Fatalf("no host line at the end: %q", out)
		}
		n := 0
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(strings.SplitN(line, "#", 2)[0]); len(f) > 0 && f[0] == "127.0.1.1" {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("%d 127.0.1.1 lines in %q", n, out)
		}
		if !strings.Contains(out, "localhost") {
			t.Fatalf("no localhost in %q", out)
		}
	})
}

// TestFileCallParents: CopyIn.parents makes the missing directories
// above a path inside the command root, following its links there and
// never out of it, and only an agent that owns the guest's filesystems
// serves it (files.root).
func TestFileCallParents(t *testing.T) {
	r, outside := fakeRoot(t)
	srv := NewServer(nil, "test", Options{Mounts: true})
	srv.root = r
	root, base, err := srv.fileCallRoot("", "/usr/lib/alt/made/here/file", true)
	if err != nil {
		t.Fatal(err)
	}
	root.Close()
	if fi, err := os.Stat(filepath.Join(r.path, "opt/made/here")); err != nil || !fi.IsDir() || base != "file" {
		t.Errorf("parents through /usr/lib/alt: %v, base %q", err, base)
	}
	if _, _, err := srv.fileCallRoot("", "/escape/a/b", true); err == nil {
		t.Error("parents through a link out of the root succeeded")
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("parents wrote outside the root: %v", entries)
	}
	if _, _, err := srv.fileCallRoot("", "/new/dir/file", false); err == nil {
		t.Error("a missing parent without parents was made")
	}
	plain := NewServer(nil, "test", Options{})
	plain.root = r
	for _, c := range []struct {
		sub     string
		parents bool
	}{{"/opt", false}, {"", true}} {
		if _, _, err := plain.fileCallRoot(c.sub, "/x/y", c.parents); !errors.Is(err, errInvalidRequest) {
			t.Errorf("root %q parents %v on an agent without files.root: %v", c.sub, c.parents, err)
		}
	}
	if _, _, err := srv.fileCallRoot("../opt", "/x", false); !errors.Is(err, errInvalidRequest) {
		t.Errorf("an unclean root: %v", err)
	}
}
