package e2e

import (
	"strings"
	"testing"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
)

// TestExecUser runs commands as the users and groups of a template's
// /etc/passwd and /etc/group, docker-style, and as numeric ids on the
// agent's own root; names that do not resolve fail to start with a clear
// reason, and the command runs with exactly the groups it should have.
func TestExecUser(t *testing.T) {
	tmpl := ext4Image(t, templateTree(t, t.TempDir()), "tmpl-0", 64<<20)
	upper := ext4Image(t, "", "root-rw", 64<<20)
	g := bootGuest(t,
		backend.Drive{Path: tmpl, Label: "tmpl-0", ReadOnly: true},
		backend.Drive{Path: upper, Label: "root-rw"},
	)
	const script = `echo "$(id -u) $(id -g) $(id -G) $HOME"`
	run := func(user string, env ...agentclient.EnvVar) guestRun {
		return g.exec(agentclient.ExecSpec{Argv: []string{"sh", "-c", script}, User: user, Env: env})
	}
	// The initramfs has root and nobody.
	if r := run("nobody"); r.stdout != "65534 65534 65534 /nonexistent\n" {
		t.Errorf("nobody in the initramfs:\n%s", r)
	}
	if err := g.c.Root(g.ctx(), agentclient.Root{Template: "tmpl-0", Upper: "root-rw"}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ user, want string }{
		{"", "0 0 0 /root\n"},
		{"alice", "1000 1000 1000 50 60 /home/alice\n"},
		{"1001", "1001 1001 1001 50 /home/bob\n"},
		{"alice:devs", "1000 60 60 /home/alice\n"},
		{"bob:7777", "1001 7777 7777 /home/bob\n"},
		{"4242", "4242 0 0 /\n"},
		{"4242:staff", "4242 50 50 /\n"},
	} {
		if r := run(tc.user); r.stdout != tc.want || r.st.Code != 0 {
			t.Errorf("user %q: want %q\n%s", tc.user, tc.want, r)
		}
	}
	if r := run("alice", agentclient.EnvVar{Name: "HOME", Value: "/elsewhere"}); !strings.HasSuffix(r.stdout, " /elsewhere\n") {
		t.Errorf("HOME from the request must win:\n%s", r)
	}
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"whoami"}, User: "1000"}); r.stdout != "alice\n" {
		t.Errorf("whoami:\n%s", r)
	}
	// Files the user creates are the user's.
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"sh", "-c", "touch /tmp/mine && stat -c %u:%g /tmp/mine"}, User: "alice:devs"}); r.stdout != "1000:60\n" {
		t.Errorf("file made by alice:devs:\n%s", r)
	}
	// execvp's permission rules apply to the user: rootonly is 0700 root.
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"rootonly"}}); r.stdout != "root only\n" {
		t.Errorf("rootonly as root:\n%s", r)
	}
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"rootonly"}, User: "alice"}); r.st.StartFailure == nil || r.st.StartFailure.Reason != agentclient.StartNotExecutable {
		t.Errorf("rootonly as alice should not be executable:\n%s", r)
	}
	for _, tc := range []struct{ user, msg string }{
		{"mallory", `user "mallory": no such user in /etc/passwd`},
		{"alice:wheel", `group "wheel": no such group in /etc/group`},
		{"alice:", "not user[:group]"},
	} {
		r := run(tc.user)
		if f := r.st.StartFailure; f == nil || f.Reason != agentclient.StartUser || !strings.Contains(f.Message, tc.msg) {
			t.Errorf("user %q: want a user start failure saying %q\n%s", tc.user, tc.msg, r)
		}
	}
}
