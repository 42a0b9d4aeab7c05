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
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"

	"github.com/mvm-sh/mvm/internal/oci/ocitest"
)

// templateEnv is a private template store (data and cache directories)
// for mvmctl template commands; they boot nothing.
type templateEnv struct {
	t           *testing.T
	data, cache string
}

func newTemplateEnv(t *testing.T) *templateEnv {
	d := t.TempDir()
	return &templateEnv{t: t, data: filepath.Join(d, "data"), cache: filepath.Join(d, "cache")}
}

func (e *templateEnv) run(args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, mvmctl, args...)
	cmd.Env = append(os.Environ(), "MVM_DATA_DIR="+e.data, "MVM_CACHE_DIR="+e.cache)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.Bytes(), stderr: errb.Bytes(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("run mvmctl %q: %v", args, err)
	}
	return r
}

// assertEmptyStore fails if the store holds a template, an image or
// leftovers of a create.
func (e *templateEnv) assertEmptyStore() {
	e.t.Helper()
	for _, dir := range []string{filepath.Join(e.cache, "templates", "images"), filepath.Join(e.cache, "templates", "tmp"), filepath.Join(e.cache, "templates", "keys")} {
		if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
			e.t.Errorf("%s holds %d entries", dir, len(ents))
		}
	}
	if recs, _ := filepath.Glob(filepath.Join(e.data, "templates", "*.json")); len(recs) > 0 {
		e.t.Errorf("templates recorded: %v", recs)
	}
}

func writeSampleArchive(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "app.tar")
	if err := ocitest.WriteDockerArchive(p, ocitest.Sample(), "app:v1"); err != nil {
		t.Fatal(err)
	}
	return p
}

type templateListEntry struct {
	Name, Revision, Digest string
	Source                 struct{ Kind, Ref string }
	Rootfs                 struct {
		Path string
		Size int64
	}
	Config struct {
		User       string
		Env, Cmd   []string
		WorkingDir string `json:"working_dir"`
	}
	DiskUsage int64 `json:"disk_usage"`
}

// TestTemplateLifecycle: create (quiet in a script), ls --json with disk
// use, info, create again (reused in milliseconds), rm.
func TestTemplateLifecycle(t *testing.T) {
	e := newTemplateEnv(t)
	archive := writeSampleArchive(t)
	r := e.run("template", "create", "app", "--from-oci", "docker-archive:"+archive)
	if r.code != 0 || len(r.stdout) != 0 || len(bytes.TrimSpace(r.stderr)) != 0 && !bytes.Contains(r.stderr, []byte("extended attributes")) {
		t.Fatalf("create: %s", r)
	}
	r = e.run("template", "ls", "--json")
	var list []templateListEntry
	if err := json.Unmarshal(r.stdout, &list); err != nil || r.code != 0 {
		t.Fatalf("ls --json: %v %s", err, r)
	}
	if len(list) != 1 || list[0].Name != "app" || list[0].Source.Kind != "oci" || list[0].Config.User != "app" ||
		list[0].Config.WorkingDir != "/home/app" || list[0].DiskUsage <= 0 || list[0].Rootfs.Size <= 0 {
		t.Fatalf("ls --json: %+v", list)
	}
	if out, err := exec.Command("e2fsck", "-fn", list[0].Rootfs.Path).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v %s", err, out)
	}
	r = e.run("template", "ls")
	if r.code != 0 || !strings.HasPrefix(string(r.stdout), "NAME") || !strings.Contains(string(r.stdout), "app ") {
		t.Errorf("ls: %s", r)
	}
	r = e.run("template", "info", "app")
	for _, want := range []string{"digest:", list[0].Digest, "user:", "GREETING=hello world", `["tool","--version"]`} {
		if !strings.Contains(string(r.stdout), want) {
			t.Errorf("info lacks %q: %s", want, r)
		}
	}
	r = e.run("template", "create", "app", "--from-oci", "docker-archive:"+archive)
	if r.code != 0 || r.elapsed > 500*time.Millisecond {
		t.Errorf("second create (same image): %s", r)
	}
	r = e.run("template", "info", "app", "--json")
	var info templateListEntry
	if err := json.Unmarshal(r.stdout, &info); err != nil || info.Digest != list[0].Digest || info.Revision == list[0].Revision {
		t.Errorf("info --json after re-create: %+v %v (before: %+v)", info, err, list[0])
	}
	if r := e.run("template", "rm", "app"); r.code != 0 {
		t.Errorf("rm: %s", r)
	}
	if r := e.run("template", "info", "app"); r.code != 125 {
		t.Errorf("info after rm: %s", r)
	}
	e.assertEmptyStore()
}

// TestTemplateBadInput: each bad input is one line on stderr naming it,
// exit 125, and nothing in the store.
func TestTemplateBadInput(t *testing.T) {
	e := newTemplateEnv(t)
	dir := t.TempDir()
	archive := writeSampleArchive(t)
	b, err := os.ReadFile(archive)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.tar")
	garbage := filepath.Join(dir, "garbage.tar")
	arm := filepath.Join(dir, "arm.tar")
	for p, data := range map[string][]byte{truncated: b[:len(b)/2], garbage: bytes.Repeat([]byte("nope"), 3000)} {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := ocitest.WriteDockerArchive(arm, ocitest.Image(ocitest.SampleConfig, "arm64", ocitest.Layer(ocitest.SampleLayers()[0], compression.GZip)), "arm:1"); err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(dir, "layout")
	if err := ocitest.WriteLayout(layout, ocitest.Sample(), "v1"); err != nil {
		t.Fatal(err)
	}
	ls, _ := ocitest.Sample().Layers()
	l1, _ := ls[0].Digest()
	if err := os.Remove(filepath.Join(layout, "blobs", "sha256", l1.Hex)); err != nil {
		t.Fatal(err)
	}
	tampered := filepath.Join(dir, "tampered")
	if err := ocitest.WriteLayout(tampered, ocitest.Sample(), "v1"); err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(tampered, "blobs", "sha256", l1.Hex)
	tb, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	tb[len(tb)-20] ^= 1
	if err := os.WriteFile(blob, tb, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args  []string
		names string
	}{
		{[]string{"info", "nosuch"}, "nosuch"},
		{[]string{"rm", "nosuch"}, "nosuch"},
		{[]string{"create", "x", "--from-oci", "docker-archive:" + garbage}, garbage},
		{[]string{"create", "x", "--from-oci", "docker-archive:" + truncated}, truncated},
		{[]string{"create", "x", "--from-oci", "oci:" + layout + ":v1"}, l1.Hex[:12]},
		{[]string{"create", "x", "--from-oci", "oci:" + tampered + ":v1"}, "digest mismatch"},
		{[]string{"create", "x", "--from-oci", "127.0.0.1:1/tools:1"}, "127.0.0.1:1"},
		{[]string{"create", "x", "--from-oci", "docker-archive:" + arm}, "arm64"},
		{[]string{"create", "team/x", "--from-oci", "docker-archive:" + archive}, "team/x"},
		{[]string{"create", "x", "--from-dir", filepath.Join(dir, "nodir")}, "nodir"},
		{[]string{"create", "x", "--rootfs", garbage}, garbage},
		{[]string{"create", "x"}, "exactly one"},
		{[]string{"create", "x", "--from-oci", "docker-archive:" + archive, "--from-dir", dir}, "exactly one"},
	} {
		r := e.run(append([]string{"template"}, c.args...)...)
		msg := strings.TrimSuffix(string(r.stderr), "\n")
		if r.code != 125 || strings.Contains(msg, "\n") || !strings.HasPrefix(msg, "mvmctl: ") || !strings.Contains(msg, c.names) {
			t.Errorf("%q: want exit 125 and one line naming %q: %s", c.args, c.names, r)
		}
	}
	e.assertEmptyStore()
}

// TestTemplateConcurrentCreate: processes creating one name at once: each
// either succeeds or says the name is busy; the template left is whole.
func TestTemplateConcurrentCreate(t *testing.T) {
	e := newTemplateEnv(t)
	archive := writeSampleArchive(t)
	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "hello"), []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	results := make([]result, 6)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src := []string{"--from-oci", "docker-archive:" + archive}
			if i%2 == 1 {
				src = []string{"--from-dir", tree}
			}
			results[i] = e.run(append([]string{"template", "create", "same"}, src...)...)
		}()
	}
	wg.Wait()
	ok := 0
	for _, r := range results {
		switch {
		case r.code == 0:
			ok++
		case r.code == 125 && strings.Contains(string(r.stderr), "busy"):
		default:
			t.Errorf("concurrent create: %s", r)
		}
	}
	r := e.run("template", "info", "same", "--json")
	var info templateListEntry
	if err := json.Unmarshal(r.stdout, &info); err != nil || ok == 0 {
		t.Fatalf("%d creates succeeded; info: %v %s", ok, err, r)
	}
	if out, err := exec.Command("e2fsck", "-fn", info.Rootfs.Path).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v %s", err, out)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.cache, "templates", "tmp")); len(ents) > 0 {
		t.Errorf("leftovers in tmp: %d", len(ents))
	}
}

// TestTemplateFromRegistry: an image pulled from a registry on 127.0.0.1
// (plain HTTP) becomes a template; prune keeps it and removes what no
// template uses.
func TestTemplateFromRegistry(t *testing.T) {
	e := newTemplateEnv(t)
	reg, err := ocitest.StartRegistry()
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if _, err := reg.Push("team/tools:1", ocitest.Sample()); err != nil {
		t.Fatal(err)
	}
	ref := reg.Host + "/team/tools:1"
	if r := e.run("template", "create", "tools", "--from-oci", ref); r.code != 0 {
		t.Fatalf("create from %s: %s", ref, r)
	}
	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := e.run("template", "create", "tools", "--from-dir", tree); r.code != 0 {
		t.Fatalf("re-create: %s", r)
	}
	r := e.run("template", "prune")
	if r.code != 0 || !strings.HasPrefix(string(r.stdout), "removed ") {
		t.Errorf("prune: %s", r)
	}
	r = e.run("template", "ls", "--json")
	var list []templateListEntry
	if err := json.Unmarshal(r.stdout, &list); err != nil || len(list) != 1 || list[0].Source.Kind != "dir" {
		t.Fatalf("ls after prune: %v %s", err, r)
	}
	if _, err := os.Stat(list[0].Rootfs.Path); err != nil {
		t.Errorf("prune removed a template's image: %v", err)
	}
	imgs, _ := os.ReadDir(filepath.Join(e.cache, "templates", "images"))
	if len(imgs) != 1 {
		t.Errorf("%d images after prune, want 1", len(imgs))
	}
}
