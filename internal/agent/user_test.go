package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const testPasswd = `root:x:0:0:root:/root:/bin/bash
# a comment
+nis-compat

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
broken:x:notanumber:1:::
short:x:7
bob:x:1001:1001::/home/bob:/bin/sh
nohome:x:1002:1002
alice:x:2000:2000:second alice, ignored:/nowhere:/bin/sh
`

const testGroup = `root:x:0:
daemon:x:1:
staff:x:50:alice,bob
alice:x:1000:
devs:x:60:alice
bob:x:1001:
badgid:x:-1:alice
twice:x:50:
empty:x:70:
`

func accountRoot(t *testing.T, passwd, group string) *fsRoot {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string]string{"passwd": passwd, "group": group} {
		if data == "-" {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, "etc", name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &fsRoot{path: dir}
}

func TestResolveUser(t *testing.T) {
	r := accountRoot(t, testPasswd, testGroup)
	for _, tc := range []struct {
		spec string
		want identity
	}{
		{"", identity{home: "/root"}},
		{"root", identity{groups: []uint32{0}, home: "/root", explicit: true}},
		{"0", identity{groups: []uint32{0}, home: "/root", explicit: true}},
		{"alice", identity{uid: 1000, gid: 1000, groups: []uint32{1000, 50, 60}, home: "/home/alice", explicit: true}},
		{"1000", identity{uid: 1000, gid: 1000, groups: []uint32{1000, 50, 60}, home: "/home/alice", explicit: true}},
		{"bob", identity{uid: 1001, gid: 1001, groups: []uint32{1001, 50}, home: "/home/bob", explicit: true}},
		{"alice:devs", identity{uid: 1000, gid: 60, groups: []uint32{60}, home: "/home/alice", explicit: true}},
		{"alice:7777", identity{uid: 1000, gid: 7777, groups: []uint32{7777}, home: "/home/alice", explicit: true}},
		{"bob:0", identity{uid: 1001, groups: []uint32{0}, home: "/home/bob", explicit: true}},
		{"4242", identity{uid: 4242, groups: []uint32{0}, home: "/", explicit: true}},
		{"4242:staff", identity{uid: 4242, gid: 50, groups: []uint32{50}, home: "/", explicit: true}},
		{"nohome", identity{uid: 1002, gid: 1002, groups: []uint32{1002}, home: "/", explicit: true}},
		{"daemon", identity{uid: 1, gid: 1, groups: []uint32{1}, home: "/usr/sbin", explicit: true}},
	} {
		got, err := resolveUser(r, tc.spec)
		if err != nil {
			t.Errorf("%q: %v", tc.spec, err)
			continue
		}
		if diff := cmp.Diff(tc.want, *got, cmp.AllowUnexported(identity{})); diff != "" {
			t.Errorf("%q (-want +got):\n%s", tc.spec, diff)
		}
	}
	for _, tc := range []struct{ spec, msg string }{
		{"nobody", `user "nobody": no such user in /etc/passwd`},
		{"broken", `no such user`},
		{"short", `no such user`},
		{"+nis-compat", `no such user`},
		{"alice:wheel", `group "wheel": no such group in /etc/group`},
		{":50", "not user[:group]"},
		{"alice:", "not user[:group]"},
		{"-1", "no such user"},
		{"4294967295", "no such user"},
		{"99999999999", "no such user"},
	} {
		_, err := resolveUser(r, tc.spec)
		if !errors.Is(err, errUser) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%q: got %v, want a user error with %q", tc.spec, err, tc.msg)
		}
	}
}

func TestResolveUserWithoutAccountFiles(t *testing.T) {
	r := accountRoot(t, "-", "-")
	if got, err := resolveUser(r, "1234:5678"); err != nil || got.uid != 1234 || got.gid != 5678 || got.home != "/" {
		t.Errorf("numeric ids without /etc/passwd: %+v, %v", got, err)
	}
	if got, err := resolveUser(r, ""); err != nil || got.home != "/root" || got.explicit {
		t.Errorf("default user without /etc/passwd: %+v, %v", got, err)
	}
	if _, err := resolveUser(r, "alice"); !errors.Is(err, errUser) || !strings.Contains(err.Error(), "/etc/passwd does not exist") {
		t.Errorf("name without /etc/passwd: %v", err)
	}
	big := accountRoot(t, strings.Repeat("x", maxAccountFile+1), "")
	if _, err := resolveUser(big, "alice"); !errors.Is(err, errUser) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("oversized /etc/passwd: %v", err)
	}
}

// FuzzAccountFiles feeds arbitrary passwd and group content to the
// lookups, seeded with real-looking files: they never panic, and what
// they return came from a well-formed line.
func FuzzAccountFiles(f *testing.F) {
	f.Add([]byte(testPasswd), []byte(testGroup), "alice")
	f.Add([]byte("root:x:0:0::/:\n"), []byte("g:x:1:root,root,\n"), "root")
	f.Add([]byte(":::::::\n\n\x00:x:1:1\n"), []byte("::::\n"), "1")
	f.Fuzz(func(t *testing.T, passwd, group []byte, name string) {
		id, numeric := parseID(name)
		if e, ok := findPasswd(passwd, name, id, numeric); ok {
			if e.name == "" || strings.Contains(e.name, ":") || strings.Contains(e.name, "\n") {
				t.Fatalf("bad entry name %q", e.name)
			}
			if !numeric && e.name != name || numeric && e.uid != id {
				t.Fatalf("entry %+v does not match %q", e, name)
			}
		}
		if e, ok := findGroup(group, name, id, numeric); ok && (e.name == "" || numeric && e.gid != id) {
			t.Fatalf("bad group %+v for %q", e, name)
		}
		_ = memberOf(group, name)
	})
}

func TestMayEnter(t *testing.T) {
	dir := t.TempDir()
	// In order: a parent before its children.
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{"open", 0o755}, {"private", 0o700}, {"private/sub", 0o755}, {"search", 0o711}, {"group", 0o710}} {
		if err := os.Mkdir(filepath.Join(dir, d.path), d.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(dir, d.path), d.mode); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/private/sub", filepath.Join(dir, "open/link")); err != nil {
		t.Fatal(err)
	}
	r := &fsRoot{path: dir}
	other := &identity{uid: 4242, gid: 4242}
	member := &identity{uid: 4242, gid: 4242, groups: []uint32{uint32(os.Getgid())}}
	for _, tc := range []struct {
		id   *identity
		dir  string
		want bool
	}{
		{other, "/", true},
		{other, "/open", true},
		{other, "/search", true},
		{other, "/private", false},
		{other, "/private/sub", false},
		{other, "/open/link", true}, // the target's ancestors are not checked; the kernel's word stands
		{other, "/group", false},
		{member, "/group", true},
		{other, "/nonexistent/dir", true},
		{rootIdentity, "/private/sub", true},
	} {
		if got := tc.id.mayEnter(r, tc.dir); got != tc.want {
			t.Errorf("uid %d groups %v mayEnter(%s) = %v, want %v", tc.id.uid, tc.id.groups, tc.dir, got, tc.want)
		}
	}
}
