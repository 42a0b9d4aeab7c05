package e2e

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/backend"
)

// TestRootTemplate runs commands in a template's root: a read-only ext4
// image of a userland with a writable overlay on a second, empty drive.
// The commands see the template's files and a normal Linux around them,
// find programs on the template's PATH, see shared directories mounted
// inside the root, can change and delete anything, and the template image
// is byte-identical afterwards; the guest's shutdown leaves every
// filesystem clean.
func TestRootTemplate(t *testing.T) {
	tree := templateTree(t, t.TempDir())
	tmpl := ext4Image(t, tree, "tmpl-0", 64<<20)
	upper := ext4Image(t, "", "root-rw", 256<<20)
	data := t.TempDir()
	writeFile(t, filepath.Join(data, "x"), "shared data\n", 0o644)
	dataImg := ext4Image(t, data, "mvm-dir-0", 16<<20)
	outLower := ext4Image(t, t.TempDir(), "mvm-dir-1", 16<<20)
	outUpper := ext4Image(t, "", "mvm-rw-1", 64<<20)
	before := fileSHA256(t, tmpl)

	g := bootGuest(t,
		backend.Drive{Path: tmpl, Label: "tmpl-0", ReadOnly: true},
		backend.Drive{Path: upper, Label: "root-rw"},
		backend.Drive{Path: dataImg, Label: "mvm-dir-0", ReadOnly: true},
		backend.Drive{Path: outLower, Label: "mvm-dir-1", ReadOnly: true},
		backend.Drive{Path: outUpper, Label: "mvm-rw-1"},
	)
	start := time.Now()
	if err := g.c.Root(g.ctx(), agentclient.Root{Template: "tmpl-0", Upper: "root-rw", Hostname: "tmplhost"}); err != nil {
		t.Fatalf("root: %v", err)
	}
	t.Logf("root call: %s", time.Since(start).Round(time.Millisecond))
	if err := g.c.Root(g.ctx(), agentclient.Root{Template: "tmpl-0", Upper: "root-rw"}); remoteCode(err) != "CODE_FAILED_PRECONDITION" {
		t.Errorf("second root: got %v, want CODE_FAILED_PRECONDITION", err)
	}
	if err := g.c.Mount(g.ctx(), agentclient.Mount{Device: "mvm-dir-0", Target: "/data", ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	if err := g.c.Mount(g.ctx(), agentclient.Mount{Device: "mvm-dir-1", Target: "/out", Upper: "mvm-rw-1"}); err != nil {
		t.Fatal(err)
	}

	if got := g.sh("cat /etc/os-release"); !strings.Contains(got, "NAME=mvm-test-template") {
		t.Errorf("/etc/os-release is not the template's: %q", got)
	}
	if got := g.sh("hostname; cat /etc/hostname"); got != "tmplhost\ntmplhost\n" {
		t.Errorf("host name: %q", got)
	}
	// /etc/hosts is a symlink to /etc/hosts.real in the template: the
	// agent kept its lines, replaced its 127.0.1.1 line and added
	// localhost.
	hosts := g.sh("cat /etc/hosts.real")
	for _, want := range []string{"127.0.0.1\tlocalhost\n", "10.1.2.3\tdb.internal\n", "127.0.1.1\ttmplhost\n"} {
		if !strings.Contains(hosts, want) {
			t.Errorf("/etc/hosts lacks %q:\n%s", want, hosts)
		}
	}
	if strings.Contains(hosts, "oldname") {
		t.Errorf("/etc/hosts kept the image's 127.0.1.1 line:\n%s", hosts)
	}
	if got := g.sh("cat /etc/machine-id"); !regexp.MustCompile(`^[0-9a-f]{32}\n$`).MatchString(got) {
		t.Errorf("/etc/machine-id = %q, want 32 hex digits", got)
	}
	// PATH lookup happens in the template: hello is an absolute symlink
	// there, and vi exists only in the agent's initramfs.
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"hello"}}); r.stdout != "hello from the template\n" || r.st.Code != 0 {
		t.Errorf("hello:\n%s", r)
	}
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"vi"}}); r.st.StartFailure == nil || r.st.StartFailure.Reason != agentclient.StartNotFound {
		t.Errorf("vi should not be found in the template:\n%s", r)
	}
	mounts := g.sh("cat /proc/mounts")
	for _, want := range []string{" / overlay ", " /proc proc ", " /sys sysfs ", " /dev devtmpfs ", " /dev/pts devpts ",
		" /dev/shm tmpfs ", " /run tmpfs ", " /data ext4 ro,", " /out overlay "} {
		if !strings.Contains(mounts, want) {
			t.Errorf("/proc/mounts lacks %q:\n%s", want, mounts)
		}
	}
	for _, line := range strings.Split(mounts, "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "/run/mvm") {
			t.Errorf("the agent's own mounts show in the root: %s", line)
		}
	}
	if got := g.sh("stat -c %a /tmp /run/lock; cat /data/x; echo new > /out/new; echo ok > /dev/null; test -c /dev/pts/ptmx && echo pts"); got != "1777\n1777\nshared data\npts\n" {
		t.Errorf("root tree: %q", got)
	}
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"pwd"}, Dir: "/work/sub"}); r.stdout != "/work/sub\n" {
		t.Errorf("working directory in the root:\n%s", r)
	}
	// Anything in the root can be changed or removed; the template
	// cannot be.
	g.sh("dd if=/dev/zero of=/big bs=1M count=4 2>/dev/null; rm -rf /opt /etc/os-release; sync")
	if r := g.exec(agentclient.ExecSpec{Argv: []string{"hello"}}); r.st.StartFailure == nil || r.st.StartFailure.Reason != agentclient.StartNotFound {
		t.Errorf("hello still runs after rm -rf /opt:\n%s", r)
	}
	g.shutdown()
	if after := fileSHA256(t, tmpl); after != before {
		t.Errorf("the template image changed: %s -> %s", before, after)
	}
	fsckClean(t, upper)
	fsckClean(t, outUpper)
	if w := g.agentWarnings(); len(w) > 0 {
		t.Errorf("the agent warned (an unclean unmount shows here):\n%s", strings.Join(w, "\n"))
	}
}

// TestRootBadInput: a Root call that cannot be served fails with a clear
// error and leaves the agent serving commands in its own root.
func TestRootBadInput(t *testing.T) {
	tmpl := ext4Image(t, templateTree(t, t.TempDir()), "tmpl-0", 64<<20)
	notExt4 := filepath.Join(t.TempDir(), "zero.img")
	writeFile(t, notExt4, strings.Repeat("\x00", 1<<20), 0o644)
	g := bootGuest(t,
		backend.Drive{Path: tmpl, Label: "tmpl-0", ReadOnly: true},
		backend.Drive{Path: notExt4, Label: "zero"},
	)
	for _, tc := range []struct {
		root      agentclient.Root
		code      string
		inMessage []string
	}{
		{agentclient.Root{Template: "tmpl-0", Upper: "missing"}, "CODE_INTERNAL",
			[]string{`no drive with label "missing"`, `ext4 "tmpl-0"`, "no ext2/3/4 filesystem"}},
		{agentclient.Root{Template: "tmpl-0", Upper: "tmpl-0"}, "CODE_INVALID_ARGUMENT", []string{"both"}},
		{agentclient.Root{Template: "tmpl-0"}, "CODE_INVALID_ARGUMENT", []string{"upper_label"}},
		{agentclient.Root{Template: "tmpl-0", Upper: "seventeen-bytes-x"}, "CODE_INVALID_ARGUMENT", []string{"longer than 16"}},
		{agentclient.Root{Template: "tmpl-0", Upper: "up", Hostname: "bad name"}, "CODE_INVALID_ARGUMENT", []string{"host name"}},
	} {
		err := g.c.Root(g.ctx(), tc.root)
		if remoteCode(err) != tc.code {
			t.Errorf("%+v: got %v, want %s", tc.root, err, tc.code)
			continue
		}
		for _, want := range tc.inMessage {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%+v: %q does not say %q", tc.root, err, want)
			}
		}
	}
	if got := g.sh("cat /etc/os-release"); !strings.Contains(got, "NAME=mvm") || strings.Contains(got, "template") {
		t.Errorf("after failed roots, commands should run in the initramfs: %q", got)
	}
	// A drive mounted first: the root cannot come after it.
	if err := g.c.Mount(g.ctx(), agentclient.Mount{Device: "tmpl-0", Target: "/t", ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	if err := g.c.Root(g.ctx(), agentclient.Root{Template: "tmpl-0", Upper: "zero"}); remoteCode(err) != "CODE_FAILED_PRECONDITION" {
		t.Errorf("root after mount: got %v, want CODE_FAILED_PRECONDITION", err)
	}
}
