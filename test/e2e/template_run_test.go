package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/mvm-sh/mvm/internal/oci/ocitest"
)

// The tests here run commands on templates as a user does: `mvmctl
// template create`, then `mvmctl exec --template NAME` or `--image REF`,
// on real VMs. They share one template store for the whole test binary
// (made once: a Debian userland with python3 and a small image built
// here), so that each test pays only for its own runs.

// templateData is MVM_DATA_DIR for the tests of this file: beside the
// suite's private cache (where the templates' disks and snapshots go), and
// removed with it.
func templateData() string { return filepath.Join(filepath.Dir(cacheDir), "template-data") }

// newTemplateRunEnv is newEnv with the shared template store.
func newTemplateRunEnv(t *testing.T) *env {
	t.Setenv("MVM_DATA_DIR", templateData())
	return newEnv(t)
}

// fixtureOnce builds a shared fixture the first time a test needs it; a failure
// fails every test that needs it.
type fixtureOnce struct {
	once sync.Once
	err  error
}

func (o *fixtureOnce) do(t *testing.T, f func() error) {
	t.Helper()
	o.once.Do(func() { o.err = f() })
	if o.err != nil {
		t.Fatalf("shared template fixture: %v", o.err)
	}
}

var imageTemplates, debianTemplate fixtureOnce

// fixtureMvmctl runs mvmctl for a shared fixture (not a test's env: the
// runs of template snapshots have their own directories).
func fixtureMvmctl(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	work := filepath.Dir(cacheDir)
	cmd := exec.CommandContext(ctx, mvmctl, args...)
	cmd.Env = append(os.Environ(),
		"MVM_CACHE_DIR="+cacheDir, "MVM_DATA_DIR="+templateData(),
		"MVM_RUN_DIR="+filepath.Join(work, "template-runs"), "MVM_STATE_DIR="+filepath.Join(work, "template-state"),
		"MVM_DEBIAN_CACHE="+debianCache())
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("mvmctl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// debianCache keeps the Debian bootstrap between test runs, shared with
// internal/template's tests: MVM_DEBIAN_CACHE, else
// $XDG_CACHE_HOME/mvm-test/debian.
func debianCache() string {
	if d := os.Getenv("MVM_DEBIAN_CACHE"); d != "" {
		return d
	}
	d, err := os.UserCacheDir()
	if err != nil {
		d = os.TempDir()
	}
	return filepath.Join(d, "mvm-test", "debian")
}

// needDebian makes the template "py": Debian bookworm (minbase) with
// python3, snapshotted as `template create` does by default.
func needDebian(t *testing.T) {
	t.Helper()
	debianTemplate.do(t, func() error {
		start := time.Now()
		err := fixtureMvmctl("template", "create", "py", "--from-debian", "bookworm", "--packages", "python3")
		t.Logf("template py (Debian bookworm + python3) created and snapshotted in %s", time.Since(start).Round(time.Millisecond))
		return err
	})
}

// The test image: busybox (the host's static one) and two more layers
// over it, with everything the conversion has to get right and the run
// has to show.
var (
	// filesConfig: a non-root user by name, an environment, a working
	// directory and a Cmd; no Entrypoint.
	filesConfig = v1.Config{
		User:       "app",
		Env:        []string{"PATH=/usr/local/bin:/bin", "GREETING=hello world", "FROM_IMAGE=yes"},
		WorkingDir: "/home/app",
		Cmd:        []string{"id"},
	}
	// epConfig adds an Entrypoint to filesConfig, with Cmd as its
	// default arguments.
	epConfig = v1.Config{
		User: "app", Env: filesConfig.Env, WorkingDir: "/home/app",
		Entrypoint: []string{"/bin/echo", "entry"}, Cmd: []string{"default", "args"},
	}
	// bareConfig has neither Entrypoint nor Cmd.
	bareConfig = v1.Config{Env: []string{"PATH=/bin"}}
)

// busyboxLayer is the first layer: a static busybox with a symlink for
// each applet, accounts (app is in audio and staff besides its own group)
// and files of every kind the second layer changes.
func busyboxLayer() ([]byte, error) {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return nil, fmt.Errorf("the test image needs the host's static busybox (busybox-static): %w", err)
	}
	list, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	es := []ocitest.Entry{
		ocitest.Dir("./", 0o755, 0, 0),
		ocitest.Dir("bin/", 0o755, 0, 0),
		ocitest.File("bin/busybox", string(bb), 0o755, 0, 0),
	}
	for _, a := range strings.Fields(string(list)) {
		if a != "busybox" {
			es = append(es, ocitest.Symlink("bin/"+a, "busybox"))
		}
	}
	es = append(es,
		ocitest.Dir("etc/", 0o755, 0, 0),
		ocitest.File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644, 0, 0),
		ocitest.File("etc/group", "root:x:0:\naudio:x:29:app\nstaff:x:50:other,app\napp:x:1000:\nnogroup:x:65534:\n", 0o644, 0, 0),
		ocitest.File("etc/hosts", "10.1.2.3\timage-host.example\n", 0o644, 0, 0),
		ocitest.File("etc/hostname", "image-hostname\n", 0o644, 0, 0),
		ocitest.Dir("root/", 0o700, 0, 0),
		ocitest.Dir("home/", 0o755, 0, 0),
		ocitest.Dir("home/app/", 0o750, 1000, 1000),
		ocitest.File("home/app/notes", "mine\n", 0o600, 1000, 1000),
		ocitest.Dir("data/", 0o755, 0, 0),
		ocitest.File("data/owned", "app's, group staff\n", 0o640, 1000, 50),
		ocitest.File("data/setuid", "#!/bin/sh\n", 0o4755, 0, 0),
		ocitest.Dir("data/sticky/", 0o1777, 0, 0),
		ocitest.File("data/orig", "linked\n", 0o644, 0, 0),
		ocitest.Hardlink("data/hard", "data/orig"),
		ocitest.Symlink("data/link", "orig"),
		ocitest.File("data/replaced", "v1\n", 0o644, 0, 0),
		ocitest.Dir("var/", 0o755, 0, 0),
		ocitest.File("var/removed", "gone\n", 0o644, 0, 0),
		ocitest.Dir("var/dir/", 0o755, 0, 0),
		ocitest.File("var/dir/inside", "gone too\n", 0o644, 0, 0),
		ocitest.File("var/kept", "kept\n", 0o644, 0, 0),
		ocitest.Dir("opt/", 0o755, 0, 0),
		ocitest.Dir("opt/old/", 0o755, 0, 0),
		ocitest.File("opt/old/a", "old a\n", 0o644, 0, 0),
		ocitest.File("opt/old/b", "old b\n", 0o644, 0, 0),
	)
	return ocitest.Tar(es...), nil
}

// changeLayer whites out a file and a directory, makes opt/old opaque
// (keeping what this layer puts there), replaces a file and links to a
// file of the first layer.
func changeLayer() []byte {
	return ocitest.Tar(
		ocitest.Whiteout("var/.wh.removed"),
		ocitest.Whiteout("var/.wh.dir"),
		ocitest.File("opt/old/new", "new in layer 2\n", 0o644, 0, 0),
		ocitest.Whiteout("opt/old/.wh..wh..opq"),
		ocitest.File("data/replaced", "v2\n", 0o644, 0, 0),
		ocitest.Hardlink("data/cross", "data/orig"),
	)
}

// testImage is the test image with cfg, its layers gzip, zstd and gzip;
// marker, when set, is the content of /marker in the third layer (to make
// images of other content).
func testImage(cfg v1.Config, marker string) (v1.Image, error) {
	base, err := busyboxLayer()
	if err != nil {
		return nil, err
	}
	third := ocitest.Tar(ocitest.File("marker", marker+"\n", 0o644, 0, 0))
	return ocitest.Image(cfg, "amd64",
		ocitest.Layer(base, compression.GZip), ocitest.Layer(changeLayer(), compression.ZStd), ocitest.Layer(third, compression.GZip)), nil
}

// needImages makes the templates of the test image: "files" (filesConfig)
// and "ep" (epConfig), snapshotted, and "bare" (bareConfig), not.
func needImages(t *testing.T) {
	t.Helper()
	imageTemplates.do(t, func() error {
		start := time.Now()
		dir, err := os.MkdirTemp(filepath.Dir(cacheDir), "images-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		for _, tc := range []struct {
			name string
			cfg  v1.Config
			args []string
		}{
			{"files", filesConfig, nil},
			{"ep", epConfig, nil},
			{"bare", bareConfig, []string{"--no-snapshot"}},
		} {
			img, err := testImage(tc.cfg, "template")
			if err != nil {
				return err
			}
			archive := filepath.Join(dir, tc.name+".tar")
			if err := ocitest.WriteDockerArchive(archive, img, tc.name+":1"); err != nil {
				return err
			}
			if err := fixtureMvmctl(append([]string{"template", "create", tc.name, "--from-oci", "docker-archive:" + archive}, tc.args...)...); err != nil {
				return err
			}
		}
		t.Logf("templates files, ep and bare created in %s", time.Since(start).Round(time.Millisecond))
		return nil
	})
}

// templateInfo is what `template info --json` says about a template.
type templateInfo struct {
	Digest string
	Rootfs struct{ Path string }
}

func infoOf(t *testing.T, e *env, name string) templateInfo {
	t.Helper()
	r := e.run(nil, "template", "info", name, "--json")
	var info templateInfo
	if err := json.Unmarshal(r.stdout, &info); err != nil || r.code != 0 || info.Rootfs.Path == "" {
		t.Fatalf("template info %s: %v %s", name, err, r)
	}
	return info
}

// keyValues parses lines KEY=VALUE.
func keyValues(out []byte) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
		k, v, _ := strings.Cut(l, "=")
		m[k] = v
	}
	return m
}

// diffValues lists the keys of want whose values got does not have.
func diffValues(want, got map[string]string) string {
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		if g, ok := got[k]; !ok || g != want[k] {
			fmt.Fprintf(&b, "%s: want %q, got %q\n", k, want[k], g)
		}
	}
	return b.String()
}

// filesScript prints what the guest sees of the test image's files, one
// KEY=VALUE per line: type, mode, owner, link count and first line of
// each file, and how the second layer changed the first.
const filesScript = `
for p in /etc/passwd /home/app/notes /data/owned /data/setuid /data/orig /data/hard /data/cross /data/replaced /var/kept /opt/old/new /marker; do
	echo "$p=$(stat -c '%F %a %U:%G links %h' $p) $(head -n 1 $p)"
done
for p in /bin/busybox /bin /home/app /data /data/sticky /var /opt/old /root /tmp; do
	echo "$p=$(stat -c '%F %a %U:%G' $p)"
done
echo "/data/link=$(readlink /data/link) $(cat /data/link)"
echo "/bin/sh=$(readlink /bin/sh)"
echo "hard link inodes=$(stat -c %i /data/orig /data/hard /data/cross | sort -u | wc -l)"
echo "/opt/old entries=$(ls -A /opt/old | tr '\n' ' ')"
echo "/var entries=$(ls -A /var | tr '\n' ' ')"
echo "busybox sha256=$(sha256sum /bin/busybox | cut -d' ' -f1)"
`

// identityScript prints who and where the command is, and the
// environment the image sets.
const identityScript = `
echo "id=$(id)"
echo "pwd=$(pwd)"
echo "GREETING=$GREETING"
echo "FROM_IMAGE=$FROM_IMAGE"
echo "HOME=$HOME"
echo "PATH=$PATH"
`

// wantFiles is filesScript's output for the test image.
func wantFiles(t *testing.T) map[string]string {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(bb)
	return map[string]string{
		"/etc/passwd":      "regular file 644 root:root links 1 root:x:0:0:root:/root:/bin/sh",
		"/home/app/notes":  "regular file 600 app:app links 1 mine",
		"/data/owned":      "regular file 640 app:staff links 1 app's, group staff",
		"/data/setuid":     "regular file 4755 root:root links 1 #!/bin/sh",
		"/data/orig":       "regular file 644 root:root links 3 linked",
		"/data/hard":       "regular file 644 root:root links 3 linked",
		"/data/cross":      "regular file 644 root:root links 3 linked",
		"/data/replaced":   "regular file 644 root:root links 1 v2",
		"/var/kept":        "regular file 644 root:root links 1 kept",
		"/opt/old/new":     "regular file 644 root:root links 1 new in layer 2",
		"/marker":          "regular file 644 root:root links 1 template",
		"/bin/busybox":     "regular file 755 root:root",
		"/bin":             "directory 755 root:root",
		"/home/app":        "directory 750 app:app",
		"/data":            "directory 755 root:root",
		"/data/sticky":     "directory 1777 root:root",
		"/var":             "directory 755 root:root",
		"/opt/old":         "directory 755 root:root",
		"/root":            "directory 700 root:root",
		"/tmp":             "directory 1777 root:root",
		"/data/link":       "orig linked",
		"/bin/sh":          "busybox",
		"hard link inodes": "1",
		"/opt/old entries": "new ",
		"/var entries":     "kept ",
		"busybox sha256":   hex.EncodeToString(sum[:]),
	}
}

// appIdentity is identityScript's output for the image's own user and
// settings.
var appIdentity = map[string]string{
	"id":         "uid=1000(app) gid=1000(app) groups=29(audio),50(staff),1000(app)",
	"pwd":        "/home/app",
	"GREETING":   "hello world",
	"FROM_IMAGE": "yes",
	"HOME":       "/home/app",
	"PATH":       "/usr/local/bin:/bin",
}

func merged(ms ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// TestTemplateRunImage: a command on the test image sees its files as the
// layers made them (owners, modes, set-user-ID and sticky bits, a hard
// link across layers as one inode, whiteouts and an opaque directory
// applied), runs as the image's user with its supplementary groups, in
// its working directory with its environment; -e, -w and -u override
// them, and without a command the image's Cmd runs.
func TestTemplateRunImage(t *testing.T) {
	needImages(t)
	e := newTemplateRunEnv(t)
	r := e.run(nil, "exec", "--template", "files", "--", "sh", "-c", filesScript+identityScript)
	if d := diffValues(merged(wantFiles(t), appIdentity), keyValues(r.stdout)); r.code != 0 || d != "" {
		t.Errorf("the image as the guest sees it:\n%s%s", d, r)
	}
	if r := e.run(nil, "exec", "--template", "files"); r.code != 0 || string(r.stdout) != appIdentity["id"]+"\n" {
		t.Errorf("no command: the image's Cmd (id) should run: %s", r)
	}
	r = e.run(nil, "exec", "--template", "files", "-e", "GREETING=from the command line", "-e", "PATH=/bin", "-w", "/srv/new dir", "-u", "root",
		"--", "sh", "-c", identityScript)
	want := map[string]string{
		"id": "uid=0(root) gid=0(root) groups=0(root)", "pwd": "/srv/new dir", "GREETING": "from the command line",
		"FROM_IMAGE": "yes", "HOME": "/root", "PATH": "/bin",
	}
	if d := diffValues(want, keyValues(r.stdout)); r.code != 0 || d != "" {
		t.Errorf("-e, -w and -u over the image's settings:\n%s%s", d, r)
	}
	// 4242 is no user of the image: gid 0, and / as the working
	// directory (it may not enter the image's /home/app).
	for _, tc := range []struct{ user, want string }{
		{"app:staff", "uid=1000(app) gid=50(staff) groups=50(staff)\n"},
		{"4242", "uid=4242 gid=0(root) groups=0(root)\n"},
	} {
		if r := e.run(nil, "exec", "--template", "files", "-u", tc.user, "-w", "/", "--", "id"); r.code != 0 || string(r.stdout) != tc.want {
			t.Errorf("-u %s: want %q: %s", tc.user, tc.want, r)
		}
	}
	// The image's WorkingDir is app's: the user 4242 may not enter it,
	// which is said as such.
	r = e.run(nil, "exec", "--template", "files", "-u", "4242", "--", "id")
	if r.code != 125 || len(r.stdout) != 0 {
		t.Errorf("-u 4242 in /home/app (0750 app:app): want exit 125: %s", r)
	}
	assertOneLine(t, r.stderr, `working directory "/home/app": permission denied for uid 4242`)
	r = e.run(nil, "exec", "--template", "files", "-u", "mallory", "--", "id")
	if r.code != 125 || len(r.stdout) != 0 {
		t.Errorf("-u mallory (not in the image's /etc/passwd): want exit 125: %s", r)
	}
	assertOneLine(t, r.stderr, "mallory")
	e.assertClean()
}

// TestTemplateRunEntrypointAndCmd: docker run's rules. Without arguments
// the Entrypoint runs with the Cmd; arguments replace the Cmd;
// --entrypoint replaces the Entrypoint and drops the Cmd (an empty one
// runs the arguments alone); an image with neither and no arguments is an
// error before anything boots.
func TestTemplateRunEntrypointAndCmd(t *testing.T) {
	needImages(t)
	e := newTemplateRunEnv(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "entry default args\n"},
		{[]string{"--", "one", "two words"}, "entry one two words\n"},
		{[]string{"--entrypoint", "/bin/id"}, appIdentity["id"] + "\n"},
		{[]string{"--entrypoint", "/bin/echo", "--", "x", "y"}, "x y\n"},
		{[]string{"--entrypoint", "", "--", "sh", "-c", "echo $0 $1", "plain", "args"}, "plain args\n"},
	} {
		args := append([]string{"exec", "--template", "ep"}, tc.args...)
		if r := e.run(nil, args...); r.code != 0 || string(r.stdout) != tc.want {
			t.Errorf("%q: want %q: %s", args, tc.want, r)
		}
	}
	e.assertClean()
	e = newTemplateRunEnv(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--template", "bare"}, "template bare has no Entrypoint or Cmd"},
		{[]string{"--template", "ep", "--entrypoint", ""}, "template ep has no Entrypoint or Cmd"},
	} {
		r := e.run(nil, append([]string{"exec"}, tc.args...)...)
		if r.code != 125 || len(r.stdout) != 0 {
			t.Errorf("%q: want exit 125: %s", tc.args, r)
		}
		assertOneLine(t, r.stderr, tc.want)
		if _, err := os.Stat(e.runDir); err == nil {
			t.Errorf("%q: a run directory was made before the command was known", tc.args)
		}
	}
	e.assertClean()
}

// cacheEntries counts what the template cache holds: images, conversion
// keys, implicit templates.
func cacheEntries(t *testing.T) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, d := range []string{"images", "keys", "refs"} {
		ents, err := os.ReadDir(filepath.Join(cacheDir, "templates", d))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		n[d] = len(ents)
	}
	return n
}

// TestTemplateRunImageRef: exec --image runs an image from a registry on
// 127.0.0.1 (plain HTTP), a docker-archive, an OCI layout and an OCI
// archive, each converted on first use with its config applied. A second
// run converts nothing: the registry's image runs with the registry gone,
// the layout's with its layer blobs deleted, the archive's without a new
// image in the cache.
func TestTemplateRunImageRef(t *testing.T) {
	e := newTemplateRunEnv(t)
	dir := t.TempDir()
	img := func(marker string) v1.Image {
		i, err := testImage(filesConfig, marker)
		if err != nil {
			t.Fatal(err)
		}
		return i
	}
	reg, err := ocitest.StartRegistry()
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if _, err := reg.Push("team/tools:1", img("registry")); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "app.tar")
	if err := ocitest.WriteDockerArchive(archive, img("docker-archive"), "app:1"); err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(dir, "layout")
	layoutImg := img("oci")
	if err := ocitest.WriteLayout(layout, layoutImg, "v1"); err != nil {
		t.Fatal(err)
	}
	ociArchive := filepath.Join(dir, "app.oci.tar")
	if err := ocitest.WriteOCIArchive(ociArchive, img("oci-archive"), "v2"); err != nil {
		t.Fatal(err)
	}
	const script = `echo "$(cat /marker) $(id -un) $(pwd) $GREETING $(cat /data/replaced)"`
	run := func(ref, marker string) result {
		t.Helper()
		r := e.run(nil, "exec", "--image", ref, "--", "sh", "-c", script)
		if want := marker + " app /home/app hello world v2\n"; r.code != 0 || string(r.stdout) != want {
			t.Errorf("exec --image %s: want %q: %s", ref, want, r)
		}
		return r
	}
	for _, tc := range []struct{ ref, marker string }{
		{reg.Host + "/team/tools:1", "registry"},
		{"docker-archive:" + archive, "docker-archive"},
		{"oci:" + layout + ":v1", "oci"},
		{"oci-archive:" + ociArchive + ":v2", "oci-archive"},
	} {
		before := cacheEntries(t)
		r := run(tc.ref, tc.marker)
		after := cacheEntries(t)
		t.Logf("first run of %s: %s", tc.ref, r.elapsed.Round(time.Millisecond))
		if after["images"] != before["images"]+1 || after["refs"] != before["refs"]+1 {
			t.Errorf("first run of %s: the cache went from %v to %v, want one more image and implicit template", tc.ref, before, after)
		}
	}

	// Again, with nothing to convert from.
	reg.Close()
	ls, err := layoutImg.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(filepath.Join(layout, "blobs", "sha256", d.Hex)); err != nil {
			t.Fatal(err)
		}
	}
	before := cacheEntries(t)
	for _, tc := range []struct{ ref, marker string }{
		{reg.Host + "/team/tools:1", "registry"},
		{"docker-archive:" + archive, "docker-archive"},
		{"oci:" + layout + ":v1", "oci"},
	} {
		r := run(tc.ref, tc.marker)
		t.Logf("second run of %s: %s", tc.ref, r.elapsed.Round(time.Millisecond))
	}
	if after := cacheEntries(t); !maps.Equal(before, after) {
		t.Errorf("second runs changed the cache from %v to %v", before, after)
	}
	e.assertClean()
}

// pythonScript exercises what Python programs lean on: json, subprocess,
// a multiprocessing Pool (fork, semaphores in /dev/shm), sqlite3 on the
// root's writable layer, a venv, a TCP connection over loopback; it reads
// its input from a read-only shared directory (which it cannot write)
// and leaves its result in a read-write one, replacing and deleting
// files there.
const pythonScript = `import json, multiprocessing, os, socket, sqlite3, subprocess, sys


def square(x):
    return x * x


if __name__ == "__main__":
    res = {"python": list(sys.version_info[:2]), "uid": os.getuid(), "cwd": os.getcwd()}
    with open("/src/input.json") as f:
        res["input"] = json.load(f)
    try:
        open("/src/new", "w")
        res["ro"] = "writable"
    except OSError as e:
        res["ro"] = e.strerror
    res["subprocess"] = subprocess.run(["sh", "-c", "echo $((6 * 7))"], capture_output=True, text=True, check=True).stdout.strip()
    with multiprocessing.Pool(2) as pool:
        res["pool"] = sum(pool.map(square, range(100)))
    db = sqlite3.connect("/var/tmp/t.db")
    db.execute("create table t (x integer)")
    db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    db.commit()
    res["sqlite"] = list(db.execute("select count(*), sum(x) from t").fetchone())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "/tmp/venv"], check=True)
    res["venv"] = subprocess.run(["/tmp/venv/bin/python", "-c", "import sys; print(sys.prefix, sys.prefix != sys.base_prefix)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname(), timeout=10)
    conn, _ = srv.accept()
    c.sendall(b"over loopback")
    res["loopback"] = conn.recv(100).decode()
    res["localhost"] = socket.gethostbyname("localhost")
    with open("/out/result.json", "w") as f:
        json.dump(res, f, sort_keys=True)
    with open("/out/keep.txt", "a") as f:
        f.write("appended by python\n")
    os.remove("/out/old.txt")
    print("done")
`

// TestTemplateRunPython: real Python on the Debian template, with a
// read-only and a read-write shared directory.
func TestTemplateRunPython(t *testing.T) {
	needDebian(t)
	e := newTemplateRunEnv(t)
	src, out := t.TempDir(), t.TempDir()
	writeFile(t, filepath.Join(src, "t.py"), pythonScript, 0o644)
	writeFile(t, filepath.Join(src, "input.json"), `{"from": "the host"}`, 0o644)
	writeFile(t, filepath.Join(out, "keep.txt"), "from the host\n", 0o644)
	writeFile(t, filepath.Join(out, "old.txt"), "to be deleted\n", 0o644)
	r := e.run(nil, "exec", "--template", "py", "-d", src+":/src:ro", "-d", out+":/out:rw", "-w", "/work", "--", "python3", "/src/t.py")
	if r.code != 0 || string(r.stdout) != "done\n" {
		t.Fatalf("python3 /src/t.py: %s", r)
	}
	b, err := os.ReadFile(filepath.Join(out, "result.json"))
	if err != nil {
		t.Fatalf("the result was not written back: %v", err)
	}
	const want = `{"cwd": "/work", "input": {"from": "the host"}, "localhost": "127.0.0.1", "loopback": "over loopback", "pool": 328350, ` +
		`"python": [3, 11], "ro": "Read-only file system", "sqlite": [1000, 499500], "subprocess": "42", "uid": 0, "venv": "/tmp/venv True"}`
	if string(b) != want {
		t.Errorf("result.json:\n got %s\nwant %s", b, want)
	}
	if got := snapshot(t, out); len(got) != 2 || got["keep.txt"] != fileHash("from the host\nappended by python\n", 0o644) {
		t.Errorf("write-back of /out: %v", got)
	}
	if got := snapshot(t, src); len(got) != 2 {
		t.Errorf("the read-only directory changed: %v", got)
	}
	e.assertClean()
}

// linuxScript checks that a template's root is a normal Linux: kernel
// filesystems, device nodes, writable /tmp, /var/tmp, /dev/shm and /run
// (as far as the user may), a pty, a host name that resolves, localhost.
const linuxScript = `
ok() { echo "$1=ok"; }
grep -q '^Name:' /proc/self/status && [ "$(cat /proc/1/comm)" != "" ] && ok /proc
[ -d /sys/kernel ] && [ -e /sys/class/net/lo ] && ok /sys
echo x > /dev/null && [ -z "$(head -c 1 /dev/null)" ] && ok /dev/null
[ "$(head -c 4 /dev/zero | od -An -tx1 | tr -d ' ')" = 00000000 ] && ok /dev/zero
[ "$(head -c 16 /dev/urandom | wc -c)" = 16 ] && ok /dev/urandom
echo "pty=$(python3 -c 'import os, pty; m, s = pty.openpty(); print(os.ttyname(s))')"
echo x > /dev/shm/f && ok /dev/shm
echo x > /tmp/f && ok /tmp
echo x > /var/tmp/f && ok /var/tmp
[ -d /run/lock ] && echo x > /run/lock/f && ok /run/lock
echo x 2>/dev/null > /run/f && ok /run
echo "user=$(whoami) $HOME"
echo "hostname=$(hostname) $(cat /etc/hostname)"
echo "self=$(getent hosts "$(hostname)" | tr -s ' \t' ' ')"
echo "localhost=$(getent hosts localhost | cut -d' ' -f1) $(python3 -c "import socket; print(socket.gethostbyname('localhost'))")"
echo "root=$(stat -f -c %T /) $(df -k / | tail -1 | tr -s ' ' | cut -d' ' -f2)"
echo "os=$(. /etc/os-release; echo $ID $VERSION_ID)"
echo "PATH=$PATH"
`

// TestTemplateRunNormalLinux runs linuxScript on the Debian template as
// root from its snapshot and as nobody on a cold boot: both are the same
// Linux.
func TestTemplateRunNormalLinux(t *testing.T) {
	needDebian(t)
	e := newTemplateRunEnv(t)
	common := map[string]string{
		"/proc": "ok", "/sys": "ok", "/dev/null": "ok", "/dev/zero": "ok", "/dev/urandom": "ok", "pty": "/dev/pts/0",
		"/dev/shm": "ok", "/tmp": "ok", "/var/tmp": "ok", "/run/lock": "ok",
		"localhost": "::1 127.0.0.1", "os": "debian 12",
		"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	}
	for _, tc := range []struct {
		args []string
		boot string
		want map[string]string
	}{
		{nil, "restored from snapshot", map[string]string{"/run": "ok", "user": "root /root"}},
		{[]string{"--no-snapshot", "-u", "nobody"}, "cold boot", map[string]string{"user": "nobody /nonexistent"}},
	} {
		args := append(append([]string{"-v", "exec", "--template", "py"}, tc.args...), "--", "bash", "-c", linuxScript)
		r := e.run(nil, args...)
		got := keyValues(r.stdout)
		if d := diffValues(merged(common, tc.want), got); r.code != 0 || d != "" {
			t.Errorf("%q:\n%s%s", tc.args, d, r)
		}
		if _, ok := tc.want["/run"]; !ok && got["/run"] != "" {
			t.Errorf("%q: /run is writable by a user", tc.args)
		}
		// The host name is the VM's, written over the image's, and
		// resolves to Debian's 127.0.1.1.
		host := strings.Fields(got["hostname"])
		if len(host) != 2 || host[0] != host[1] || got["self"] != "127.0.1.1 "+host[0] {
			t.Errorf("%q: host name %q resolves to %q", tc.args, got["hostname"], got["self"])
		}
		// The writable layer: an overlay with at least 1 GiB.
		root := strings.Fields(got["root"] + " 0")
		if kib, _ := strconv.Atoi(root[1]); root[0] != "overlayfs" || kib < 1<<20 {
			t.Errorf("%q: root filesystem %q, want an overlay of at least 1 GiB", tc.args, got["root"])
		}
		if !strings.Contains(string(r.stderr), tc.boot) {
			t.Errorf("%q: the run was not a %s: %s", tc.args, tc.boot, r.stderr)
		}
	}
	e.assertClean()
}

// TestTemplateRunImmutable: whatever a run does to its root, as root,
// the next run gets the template as it was, and the template's disk is
// byte for byte the same: a run that removes everything (`rm -rf /`), and
// tries to write the template's drive itself; a run on Debian that
// removes /usr/bin.
func TestTemplateRunImmutable(t *testing.T) {
	needImages(t)
	needDebian(t)
	e := newTemplateRunEnv(t)
	disk := infoOf(t, e, "files").Rootfs.Path
	before := fileSHA256(t, disk)
	pyDisk := infoOf(t, e, "py").Rootfs.Path
	pyBefore, err := os.Stat(pyDisk)
	if err != nil {
		t.Fatal(err)
	}
	const destroy = `
for d in /sys/block/vd*; do
	[ "$(cat $d/ro)" = 1 ] || continue
	n=/dev/${d##*/}
	blockdev --setrw $n 2>/dev/null
	dd if=/dev/zero of=$n bs=4096 count=256 conv=notrunc,fsync 2>/dev/null && echo "wrote $n"
done
rm -rf / 2>/dev/null
[ -e /bin/busybox ] && echo "busybox survived"
[ -e /etc/passwd ] && echo "passwd survived"
echo removed
`
	r := e.run(nil, "exec", "--template", "files", "-u", "root", "--", "/bin/busybox", "sh", "-c", destroy)
	if r.code != 0 || string(r.stdout) != "removed\n" {
		t.Errorf("rm -rf / as root: %s", r)
	}
	r = e.run(nil, "exec", "--template", "files", "--no-snapshot", "--", "sh", "-c", filesScript+identityScript)
	if d := diffValues(merged(wantFiles(t), appIdentity), keyValues(r.stdout)); r.code != 0 || d != "" {
		t.Errorf("the run after rm -rf / (cold boot):\n%s%s", d, r)
	}
	if after := fileSHA256(t, disk); after != before {
		t.Errorf("the template's disk changed: sha256 %s, was %s", after, before)
	}

	r = e.run(nil, "exec", "--template", "py", "--", "bash", "-c", "rm -rf /usr/bin; python3 -c pass")
	if r.code != 127 {
		t.Errorf("python3 after rm -rf /usr/bin should not be found: %s", r)
	}
	r = e.run(nil, "exec", "--template", "py", "--", "python3", "-c", "import json; print(json.dumps([1, 2]))")
	if r.code != 0 || string(r.stdout) != "[1, 2]\n" {
		t.Errorf("python3 on the next run: %s", r)
	}
	pyAfter, err := os.Stat(pyDisk)
	if err != nil {
		t.Fatal(err)
	}
	if !pyAfter.ModTime().Equal(pyBefore.ModTime()) || pyAfter.Size() != pyBefore.Size() || pyAfter.Mode() != pyBefore.Mode() || pyAfter.Mode().Perm() != 0o444 {
		t.Errorf("the Debian template's disk changed: %v %d %v, was %v %d %v", pyAfter.ModTime(), pyAfter.Size(), pyAfter.Mode(), pyBefore.ModTime(), pyBefore.Size(), pyBefore.Mode())
	}
	e.assertClean()
}

// allocated is how much of the host's disk a file takes.
func allocated(t *testing.T, p string) (size, used int64) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Size, st.Blocks * 512
}

// TestTemplateRunWritableLayer: the guest writes 1 GiB into its root;
// the run's writable layer on the host is a sparse file that grows by
// what was written, and goes with the run.
func TestTemplateRunWritableLayer(t *testing.T) {
	needImages(t)
	e := newTemplateRunEnv(t)
	const script = `mkdir -p /var/tmp; echo ready; read x
dd if=/dev/zero of=/var/tmp/big bs=16M count=64 oflag=direct 2>/dev/null || echo "dd failed"
echo "written $(stat -c %s /var/tmp/big)"; read x
df -k / | tail -1 | tr -s ' ' | cut -d' ' -f4
`
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--template", "files", "-u", "root", "--", "sh", "-c", script)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(stdout)
	line := func(want string) {
		t.Helper()
		l, err := br.ReadString('\n')
		if l != want {
			cmd.Process.Kill()
			t.Fatalf("guest said %q (%v), want %q; stderr %q", l, err, want, stderr.String())
		}
	}
	line("ready\n")
	layers, _ := filepath.Glob(filepath.Join(e.runDir, "*", "root.img"))
	if len(layers) != 1 {
		t.Fatalf("writable layers in the run directory: %v", layers)
	}
	size, usedBefore := allocated(t, layers[0])
	io.WriteString(stdin, "\n")
	start := time.Now()
	line(fmt.Sprintf("written %d\n", 1<<30))
	took := time.Since(start)
	_, usedAfter := allocated(t, layers[0])
	stdin.Close()
	rest, _ := io.ReadAll(br)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%v: stderr %q", err, stderr.String())
	}
	t.Logf("writable layer: %d MiB file, %.1f MiB allocated before the guest wrote, %.1f MiB after 1 GiB in %s; %s KiB left",
		size>>20, float64(usedBefore)/(1<<20), float64(usedAfter)/(1<<20), took.Round(time.Millisecond), strings.TrimSpace(string(rest)))
	if size < 1<<30 || usedBefore > 64<<20 {
		t.Errorf("the writable layer is %d bytes, %d allocated: want at least 1 GiB, sparse", size, usedBefore)
	}
	if usedAfter < 1<<30 || usedAfter > 1<<30+64<<20 {
		t.Errorf("after 1 GiB written in the guest, the writable layer takes %d bytes", usedAfter)
	}
	e.assertClean()
}

// TestTemplateRunAsOnTheDefaultImage: exit statuses, --timeout, Ctrl-C
// and --launch-plan work on a template exactly as on the default image.
func TestTemplateRunAsOnTheDefaultImage(t *testing.T) {
	needImages(t)
	e := newTemplateRunEnv(t)
	for _, tc := range []struct {
		argv   []string
		code   int
		stderr string
	}{
		{[]string{"sh", "-c", "echo out; echo err >&2; exit 7"}, 7, "err\n"},
		{[]string{"sh", "-c", "kill -9 $$"}, 137, ""},
		{[]string{"sh", "-c", "kill -TERM $$"}, 143, ""},
		{[]string{"/etc/passwd"}, 126, "/etc/passwd"},
		{[]string{"mvm-no-such-command"}, 127, "mvm-no-such-command"},
	} {
		for _, where := range [][]string{nil, {"--template", "files"}} {
			args := append(append(append([]string{"exec"}, where...), "--"), tc.argv...)
			r := e.run(nil, args...)
			if r.code != tc.code || !strings.Contains(string(r.stderr), tc.stderr) {
				t.Errorf("%q: want exit %d and stderr with %q: %s", args, tc.code, tc.stderr, r)
			}
		}
	}

	r := e.run(nil, "exec", "--template", "files", "--timeout", "2s", "--", "sleep", "60")
	if r.code != 124 || r.elapsed > 15*time.Second {
		t.Errorf("--timeout 2s: %s", r)
	}
	assertOneLine(t, r.stderr, "timed out after 2s")

	c, br := startReadyArgs(t, e, "--template", "files", "--", "sh", "-c", `trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.1; done`)
	if err := c.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(br)
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 42 || string(rest) != "got INT\n" {
		t.Errorf("Ctrl-C: exit %d, rest %q: the command should have handled SIGINT and exited 42; stderr %q", code, rest, c.stderr)
	}
	c, br = startReadyArgs(t, e, "--template", "files", "--", "sh", "-c", "echo ready; sleep 60")
	if err := c.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(br)
	_ = c.Wait()
	if code := c.ProcessState.ExitCode(); code != 130 {
		t.Errorf("Ctrl-C of sleep: exit %d, want 130; stderr %q", code, c.stderr)
	}

	// A launch plan's command is taken whole (no Cmd); its environment
	// and working directory go over the image's, -e and -w over both.
	plan := filepath.Join(t.TempDir(), "launch.json")
	writeFile(t, plan, `{"entrypoint": {
  "command": ["sh", "-c", "echo \"$A $GREETING $FROM_IMAGE $(pwd) $(id -un)\""],
  "working_dir": "/srv/app",
  "env": {"A": "plan", "GREETING": "from the plan"}}}`, 0o644)
	if r := e.run(nil, "exec", "--template", "files", "--launch-plan", plan); r.code != 0 || string(r.stdout) != "plan from the plan yes /srv/app app\n" {
		t.Errorf("--launch-plan on a template: %s", r)
	}
	if r := e.run(nil, "exec", "--template", "files", "--launch-plan", plan, "-e", "A=cli", "-w", "/tmp"); r.code != 0 || string(r.stdout) != "cli from the plan yes /tmp app\n" {
		t.Errorf("--launch-plan with -e and -w on a template: %s", r)
	}
	e.assertClean()
}

// TestTemplateRunBadInput: every mistake in naming a template or an image
// fails with one line and exit 125 before anything boots: no run
// directory, no VMM, within a second or two.
func TestTemplateRunBadInput(t *testing.T) {
	needImages(t)
	dir := t.TempDir()
	archive := filepath.Join(dir, "app.tar")
	img, err := testImage(filesConfig, "bad input")
	if err != nil {
		t.Fatal(err)
	}
	if err := ocitest.WriteDockerArchive(archive, img, "app:1"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(archive)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.tar")
	writeFile(t, truncated, string(b[:len(b)/2]), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown template", []string{"--template", "nosuch", "--", "true"}, "nosuch"},
		{"template and image", []string{"--template", "files", "--image", "docker-archive:" + archive, "--", "true"}, "--template and --image"},
		{"a name with a slash", []string{"--template", "team/files", "--", "true"}, "team/files"},
		{"unreachable registry", []string{"--image", "127.0.0.1:1/team/tools:1", "--", "true"}, "127.0.0.1:1"},
		{"truncated archive", []string{"--image", "docker-archive:" + truncated, "--", "true"}, truncated},
		{"missing archive", []string{"--image", "docker-archive:" + filepath.Join(dir, "nope.tar"), "--", "true"}, "nope.tar"},
		{"missing layout", []string{"--image", "oci:" + filepath.Join(dir, "nolayout") + ":v1", "--", "true"}, "nolayout"},
		{"entrypoint without a template", []string{"--entrypoint", "/bin/sh", "--", "true"}, "--entrypoint"},
		{"image without a command", []string{"--template", "bare"}, "no Entrypoint or Cmd"},
		// A template takes two of the VM's drives, a read-write
		// directory two more.
		{"too many drives", []string{"--template", "files", "-d", t.TempDir() + ":/a:rw", "-d", t.TempDir() + ":/b:rw", "-d", t.TempDir() + ":/c:rw", "--", "true"}, "3 shared directories need 8 drives; the VM has room for 7 (the template takes two"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTemplateRunEnv(t)
			r := e.run(nil, append([]string{"exec"}, tc.args...)...)
			if r.code != 125 || len(r.stdout) != 0 {
				t.Errorf("want exit 125: %s", r)
			}
			assertOneLine(t, r.stderr, tc.want)
			if r.elapsed > 2*time.Second {
				t.Errorf("took %s: bad input must fail before any VM boots", r.elapsed)
			}
			if _, err := os.Stat(e.runDir); err == nil {
				t.Errorf("a run directory was created for bad input")
			}
			if pids := e.vmms(); len(pids) > 0 {
				t.Errorf("VMM processes started: %v", pids)
			}
		})
	}
}
