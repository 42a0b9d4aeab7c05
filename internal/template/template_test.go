package template

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"

	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/oci"
	"github.com/mvm-sh/mvm/internal/oci/ocitest"
)

func newStore(t *testing.T) *Store {
	t.Helper()
	d := t.TempDir()
	s, err := Open(filepath.Join(d, "data"), filepath.Join(d, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sampleArchive(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sample.tar")
	if err := ocitest.WriteDockerArchive(p, ocitest.Sample(), "sample:v1"); err != nil {
		t.Fatal(err)
	}
	return p
}

func fsck(t *testing.T, img string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
}

// listDir names what dir holds ("" entries for none).
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestCreateOCI: a template from a docker-archive records its source,
// digests, config and a read-only image the guest sees the image's tree
// in; creating it again gives a new revision on the same image, reused
// in milliseconds.
func TestCreateOCI(t *testing.T) {
	s := newStore(t)
	archive := sampleArchive(t)
	var steps []string
	tpl, err := s.Create(context.Background(), "app", Spec{OCI: "docker-archive:" + archive}, Options{Progress: func(e Event) { steps = append(steps, e.Step) }})
	if err != nil {
		t.Fatal(err)
	}
	cfgDigest, _ := ocitest.Sample().ConfigName()
	if tpl.Name != "app" || tpl.Source.Kind != "oci" || tpl.Source.Ref != "docker-archive:"+archive || tpl.Source.ConfigDigest != cfgDigest.String() {
		t.Errorf("template %+v", tpl)
	}
	want := Config{User: "app", Env: ocitest.SampleConfig.Env, WorkingDir: "/home/app", Cmd: []string{"tool", "--version"}}
	if !slices.Equal(tpl.Config.Env, want.Env) || tpl.Config.User != want.User || tpl.Config.WorkingDir != want.WorkingDir || !slices.Equal(tpl.Config.Cmd, want.Cmd) || tpl.Config.Entrypoint != nil {
		t.Errorf("config %+v, want %+v", tpl.Config, want)
	}
	if !validDigest(tpl.Digest) || tpl.Rootfs.Digest != tpl.Digest || len(tpl.Revision) != 24 {
		t.Errorf("digest %q rootfs %+v revision %q", tpl.Digest, tpl.Rootfs, tpl.Revision)
	}
	fi, err := os.Stat(tpl.Rootfs.Path)
	if err != nil || fi.Mode().Perm() != 0o444 || fi.Size() != tpl.Rootfs.Size {
		t.Fatalf("rootfs %s: %v %v, size %d", tpl.Rootfs.Path, fi, err, tpl.Rootfs.Size)
	}
	fsck(t, tpl.Rootfs.Path)
	tree, err := ocitest.DescribeImage(tpl.Rootfs.Path)
	if err != nil {
		t.Fatal(err)
	}
	if d := ocitest.Diff(ocitest.SampleTree(), tree); d != "" {
		t.Errorf("tree:\n%s", d)
	}
	if !slices.Contains(steps, "layer") || !slices.Contains(steps, "image") || steps[len(steps)-1] != "done" {
		t.Errorf("progress steps %v", steps)
	}
	got, err := s.Get("app")
	if err != nil || got.Revision != tpl.Revision || got.Rootfs.Path != tpl.Rootfs.Path || got.Source.String() != tpl.Source.String() || got.Source.Resolved != tpl.Source.Resolved {
		t.Errorf("Get: %+v, %v", got, err)
	}

	// Again: reused, new revision, the same file.
	steps = nil
	start := time.Now()
	again, err := s.Create(context.Background(), "app", Spec{OCI: "docker-archive:" + archive}, Options{Progress: func(e Event) { steps = append(steps, e.Step) }})
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if again.Digest != tpl.Digest || again.Revision == tpl.Revision || again.Rootfs.Path != tpl.Rootfs.Path || !slices.Contains(steps, "reuse") || slices.Contains(steps, "layer") {
		t.Errorf("second create: %+v, steps %v", again, steps)
	}
	if took > 200*time.Millisecond {
		t.Errorf("second create of the same image took %s, want <= 200ms", took)
	}
	if n := listDir(t, s.objDir(kindImage)); len(n) != 1 {
		t.Errorf("images %v, want one", n)
	}
	if n := listDir(t, s.tmpDir()); len(n) != 0 {
		t.Errorf("work left in tmp: %v", n)
	}
}

// TestTransportsShareOneImage: the same image from a registry, a layout
// and an archive is converted once.
func TestTransportsShareOneImage(t *testing.T) {
	s := newStore(t)
	img := ocitest.Sample()
	dir := t.TempDir()
	layout, ociArchive := filepath.Join(dir, "layout"), filepath.Join(dir, "img.oci.tar")
	if err := ocitest.WriteLayout(layout, img, "v1"); err != nil {
		t.Fatal(err)
	}
	if err := ocitest.WriteOCIArchive(ociArchive, img, ""); err != nil {
		t.Fatal(err)
	}
	reg, err := ocitest.StartRegistry()
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if _, err := reg.Push("team/sample:1", img); err != nil {
		t.Fatal(err)
	}
	var digest string
	for i, ref := range []string{reg.Host + "/team/sample:1", "oci:" + layout + ":v1", "oci-archive:" + ociArchive} {
		tpl, err := s.Create(context.Background(), "t"+string(rune('0'+i)), Spec{OCI: ref}, Options{})
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if digest == "" {
			digest = tpl.Digest
			if !strings.HasPrefix(tpl.Source.Resolved, reg.Host+"/team/sample@sha256:") {
				t.Errorf("resolved %q", tpl.Source.Resolved)
			}
		}
		if tpl.Digest != digest {
			t.Errorf("%s: digest %s, want %s", ref, tpl.Digest, digest)
		}
	}
	if n := listDir(t, s.objDir(kindImage)); len(n) != 1 {
		t.Errorf("images %v, want one", n)
	}
	ts, err := s.List()
	if err != nil || len(ts) != 3 || ts[0].Name != "t0" || ts[2].Name != "t2" {
		t.Errorf("List: %v %v", ts, err)
	}
}

// TestCreateDirAndPrebuilt: a root tree and a prebuilt disk (with a
// kernel and an initrd) make templates; a prebuilt disk is used byte for
// byte, its digest the file's SHA-256.
func TestCreateDirAndPrebuilt(t *testing.T) {
	s := newStore(t)
	tree := t.TempDir()
	if err := os.MkdirAll(filepath.Join(tree, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "etc/hostname"), []byte("tree\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dt, err := s.Create(context.Background(), "tree", Spec{Dir: tree}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	fsck(t, dt.Rootfs.Path)
	if dt.Source.Kind != "dir" || dt.Source.Ref != tree {
		t.Errorf("source %+v", dt.Source)
	}
	got, err := ocitest.DescribeImage(dt.Rootfs.Path)
	if err != nil || !strings.Contains(got["etc/hostname"], `"tree\n"`) {
		t.Errorf("etc/hostname: %q %v", got["etc/hostname"], err)
	}

	disk := filepath.Join(t.TempDir(), "disk.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-d", tree, disk, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	kernel, err := os.Executable() // an x86-64 ELF file
	if err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(t.TempDir(), "initrd.img")
	if err := os.WriteFile(initrd, []byte("070701 not really"), 0o644); err != nil {
		t.Fatal(err)
	}
	pt, err := s.Create(context.Background(), "pre", Spec{Rootfs: disk, Kernel: kernel, Initrd: initrd}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	sum, err := exec.Command("sha256sum", disk).Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := "sha256:" + strings.Fields(string(sum))[0]; pt.Digest != want {
		t.Errorf("prebuilt digest %s, want sha256sum's %s", pt.Digest, want)
	}
	if out, err := exec.Command("cmp", disk, pt.Rootfs.Path).CombinedOutput(); err != nil {
		t.Errorf("the cached disk differs from the given one: %s", out)
	}
	if pt.Kernel == nil || pt.Initrd == nil || pt.Kernel.Path == "" || pt.Initrd.Size != 17 {
		t.Fatalf("kernel %+v initrd %+v", pt.Kernel, pt.Initrd)
	}
	if out, err := exec.Command("cmp", kernel, pt.Kernel.Path).CombinedOutput(); err != nil {
		t.Errorf("kernel copy: %s", out)
	}
	reread, err := s.Get("pre")
	if err != nil || reread.Kernel.Path != pt.Kernel.Path || reread.Initrd.Digest != pt.Initrd.Digest {
		t.Errorf("Get: %+v %v", reread, err)
	}

	// Not ext4, not a kernel: refused, nothing kept.
	notExt4 := filepath.Join(t.TempDir(), "zero.img")
	if err := os.WriteFile(notExt4, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(context.Background(), "bad", Spec{Rootfs: notExt4}, Options{}); !errors.Is(err, ErrNotExt4) || !strings.Contains(err.Error(), notExt4) {
		t.Errorf("zero-filled rootfs: %v", err)
	}
	if _, err := s.Create(context.Background(), "bad", Spec{Rootfs: disk, Kernel: initrd}, Options{}); err == nil || !strings.Contains(err.Error(), initrd) {
		t.Errorf("kernel that is no ELF: %v", err)
	}
	if _, err := s.Get("bad"); !errors.Is(err, ErrNotFound) {
		t.Errorf("failed creates left a template: %v", err)
	}
	if n := listDir(t, s.tmpDir()); len(n) != 0 {
		t.Errorf("work left: %v", n)
	}
}

// TestLeaseSurvivesRecreateAndPrune: a run's lease keeps the files of
// the revision it started with through a create of the same name, a
// removal and a prune; once released, prune takes them.
func TestLeaseSurvivesRecreateAndPrune(t *testing.T) {
	s := newStore(t)
	archive := sampleArchive(t)
	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(context.Background(), "app", Spec{OCI: "docker-archive:" + archive}, Options{}); err != nil {
		t.Fatal(err)
	}
	lease, err := s.Use("app")
	if err != nil {
		t.Fatal(err)
	}
	old := lease.Template.Rootfs.Path
	newer, err := s.Create(context.Background(), "app", Spec{Dir: tree}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if newer.Rootfs.Path == old {
		t.Fatal("the new template has the old image")
	}
	if err := s.Remove("app"); err != nil {
		t.Fatal(err)
	}
	st, err := s.Prune()
	if err != nil {
		t.Fatal(err)
	}
	if !exists(old) || st.InUse != 1 {
		t.Fatalf("leased image removed (%v), prune %+v", exists(old), st)
	}
	if exists(newer.Rootfs.Path) {
		t.Error("removed template's unleased image kept")
	}
	lease.Release()
	if st, err = s.Prune(); err != nil || st.Images != 1 || exists(old) {
		t.Errorf("after release: prune %+v %v, image there: %v", st, err, exists(old))
	}
	if n := listDir(t, s.objDir(kindImage)); len(n) != 0 {
		t.Errorf("images left: %v", n)
	}
}

// TestRemoveAndPruneKeepReferenced: removing a template keeps what
// another one uses; prune keeps named templates' images and removes the
// implicit ones.
func TestRemoveAndPruneKeepReferenced(t *testing.T) {
	s := newStore(t)
	archive := sampleArchive(t)
	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	a, err := s.Create(context.Background(), "a", Spec{OCI: "docker-archive:" + archive}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(context.Background(), "b", Spec{OCI: "docker-archive:" + archive}, Options{}); err != nil {
		t.Fatal(err)
	}
	d, err := s.Create(context.Background(), "d", Spec{Dir: tree}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	imp, err := s.UseImage(context.Background(), "docker-archive:"+archive, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !imp.Template.Implicit() || imp.Template.Digest != a.Digest {
		t.Errorf("implicit %+v", imp.Template)
	}
	imp.Release()
	if err := s.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if !exists(a.Rootfs.Path) {
		t.Fatal("removing a took b's image")
	}
	if err := s.Remove("a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second remove: %v", err)
	}
	st, err := s.Prune()
	if err != nil {
		t.Fatal(err)
	}
	if st.Implicit != 1 || st.Images != 0 || !exists(a.Rootfs.Path) || !exists(d.Rootfs.Path) {
		t.Errorf("prune %+v", st)
	}
	if imps, _ := s.ListImplicit(); len(imps) != 0 {
		t.Errorf("implicit templates after prune: %v", imps)
	}
	if err := s.Remove("b"); err != nil {
		t.Fatal(err)
	}
	if exists(a.Rootfs.Path) {
		t.Error("image of no template kept after its last template was removed")
	}
	if ts, _ := s.List(); len(ts) != 1 || ts[0].Name != "d" {
		t.Errorf("List %v", ts)
	}
}

// TestConcurrentCreates: of two creates of one name, the second fails at
// once with ErrBusy while the first runs; many at once leave one whole
// template and no debris.
func TestConcurrentCreates(t *testing.T) {
	s := newStore(t)
	archive := sampleArchive(t)
	var second error
	_, err := s.Create(context.Background(), "app", Spec{OCI: "docker-archive:" + archive}, Options{Progress: func(e Event) {
		if e.Step == "resolve" {
			_, second = s.Create(context.Background(), "app", Spec{OCI: "docker-archive:" + archive}, Options{})
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(second, ErrBusy) || !strings.Contains(second.Error(), "pid") {
		t.Errorf("concurrent create: %v, want ErrBusy naming the holder", second)
	}

	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sp := Spec{OCI: "docker-archive:" + archive}
			if i%2 == 1 {
				sp = Spec{Dir: tree}
			}
			_, errs[i] = s.Create(context.Background(), "race", sp, Options{})
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, ErrBusy):
			t.Errorf("create: %v", err)
		}
	}
	tpl, err := s.Get("race")
	if ok == 0 || err != nil {
		t.Fatalf("%d creates succeeded, template: %v", ok, err)
	}
	fsck(t, tpl.Rootfs.Path)
	if n := listDir(t, s.tmpDir()); len(n) != 0 {
		t.Errorf("work left: %v", n)
	}
	// Both images are there at most: app's (the archive's) and race's.
	if n := listDir(t, s.objDir(kindImage)); len(n) > 2 {
		t.Errorf("images %v", n)
	}
}

// TestBadInputs: each fails with its class, one line naming the thing,
// and leaves the store as it was.
func TestBadInputs(t *testing.T) {
	s := newStore(t)
	dir := t.TempDir()
	archive := sampleArchive(t)
	b, err := os.ReadFile(archive)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.tar")
	if err := os.WriteFile(truncated, b[:len(b)-3000], 0o644); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.tar")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("garbage ", 300)), 0o644); err != nil {
		t.Fatal(err)
	}
	layout := filepath.Join(dir, "layout")
	if err := ocitest.WriteLayout(layout, ocitest.Sample(), "v1"); err != nil {
		t.Fatal(err)
	}
	ls, _ := ocitest.Sample().Layers()
	d, _ := ls[2].Digest()
	if err := os.Remove(filepath.Join(layout, "blobs", "sha256", d.Hex)); err != nil {
		t.Fatal(err)
	}
	arm := filepath.Join(dir, "arm.tar")
	if err := ocitest.WriteDockerArchive(arm, ocitest.Image(ocitest.SampleConfig, "arm64", ocitest.Layer(ocitest.SampleLayers()[0], compression.GZip)), "arm:1"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		spec  Spec
		class error
		names string
	}{
		{"app", Spec{OCI: "docker-archive:" + garbage}, oci.ErrInvalid, garbage},
		{"app", Spec{OCI: "docker-archive:" + truncated}, oci.ErrInvalid, truncated},
		{"app", Spec{OCI: "oci:" + layout + ":v1"}, oci.ErrNotFound, d.Hex[:12]},
		{"app", Spec{OCI: "127.0.0.1:1/x:y"}, oci.ErrUnreachable, "127.0.0.1:1"},
		{"app", Spec{OCI: "docker-archive:" + arm}, oci.ErrPlatform, "arm64"},
		{"app", Spec{OCI: "docker-archive:" + dir + "/none.tar"}, oci.ErrBadRef, "none.tar"},
		{"a/b", Spec{OCI: "docker-archive:" + archive}, ErrInvalidName, "a/b"},
		{"App", Spec{OCI: "docker-archive:" + archive}, ErrInvalidName, "App"},
		{strings.Repeat("x", 64), Spec{OCI: "docker-archive:" + archive}, ErrInvalidName, "xxxx"},
		{"app", Spec{Dir: dir + "/missing"}, os.ErrNotExist, "missing"},
		{"app", Spec{Debian: &Debian{Suite: "--help"}}, ErrDebian, "--help"},
		{"app", Spec{Debian: &Debian{Suite: "bookworm", Packages: []string{"python3;rm"}}}, ErrDebian, "python3;rm"},
		{"app", Spec{}, nil, "exactly one"},
	} {
		_, err := s.Create(context.Background(), c.name, c.spec, Options{})
		if err == nil || (c.class != nil && !errors.Is(err, c.class)) {
			t.Errorf("%+v: %v, want %v", c.spec, err, c.class)
			continue
		}
		if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, c.names) {
			t.Errorf("%+v: %q: want one line naming %q", c.spec, msg, c.names)
		}
	}
	if _, err := s.Get("nope"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("unknown template: %v", err)
	}
	if _, err := s.Use("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Use of an unknown template: %v", err)
	}
	for _, sub := range []string{s.objDir(kindImage), s.objDir(kindFile), s.tmpDir(), filepath.Join(s.cache, "keys"), filepath.Join(s.cache, "refs"), s.lockDir()} {
		if n := listDir(t, sub); len(n) != 0 {
			t.Errorf("%s holds %v after failed creates", sub, n)
		}
	}
	if ts, _ := s.List(); len(ts) != 0 {
		t.Errorf("templates %v", ts)
	}
}

// TestUseImage: an implicit template from a registry is converted once;
// a second use needs no registry; PullAlways asks it.
func TestUseImage(t *testing.T) {
	s := newStore(t)
	reg, err := ocitest.StartRegistry()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Push("tools:1", ocitest.Sample()); err != nil {
		t.Fatal(err)
	}
	ref := reg.Host + "/tools:1"
	l, err := s.UseImage(context.Background(), ref, Options{})
	if err != nil {
		t.Fatal(err)
	}
	tpl := l.Template
	if !tpl.Implicit() || tpl.Config.User != "app" || !exists(tpl.Rootfs.Path) || !strings.HasPrefix(tpl.Revision, "image-") {
		t.Errorf("implicit template %+v", tpl)
	}
	l.Release()
	reg.Close()
	start := time.Now()
	l, err = s.UseImage(context.Background(), ref, Options{})
	if err != nil {
		t.Fatalf("second use with the registry gone: %v", err)
	}
	if took := time.Since(start); took > 200*time.Millisecond || l.Template.Digest != tpl.Digest {
		t.Errorf("second use took %s, digest %s", took, l.Template.Digest)
	}
	l.Release()
	if _, err := s.UseImage(context.Background(), ref, Options{Pull: PullAlways}); !errors.Is(err, oci.ErrUnreachable) {
		t.Errorf("PullAlways with the registry gone: %v", err)
	}
	if _, err := s.UseImage(context.Background(), reg.Host+"/other:1", Options{Pull: PullNever}); !errors.Is(err, oci.ErrNotFound) {
		t.Errorf("PullNever of a new reference: %v", err)
	}
	if imps, err := s.ListImplicit(); err != nil || len(imps) != 1 || imps[0].Source.Ref != ref {
		t.Errorf("ListImplicit: %v %v", imps, err)
	}
	if ts, _ := s.List(); len(ts) != 0 {
		t.Errorf("an implicit template is listed as named: %v", ts)
	}
}

func TestCheckName(t *testing.T) {
	for name, ok := range map[string]bool{
		"py": true, "a": true, "0": true, "web-1.4_x": true, strings.Repeat("a", 63): true,
		"": false, "Py": false, "-x": false, ".x": false, "_x": false, "a/b": false, "a b": false,
		strings.Repeat("a", 64): false, "..": false, "x\n": false, "é": false,
	} {
		if err := CheckName(name); (err == nil) != ok {
			t.Errorf("CheckName(%q) = %v", name, err)
		}
	}
}

// debianCache is where Debian bootstraps are kept between test runs (and
// shared with the e2e suite): MVM_DEBIAN_CACHE, else
// $XDG_CACHE_HOME/mvm-test/debian.
func debianCache(t *testing.T) string {
	if d := os.Getenv("MVM_DEBIAN_CACHE"); d != "" {
		return d
	}
	d, err := os.UserCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(d, "mvm-test", "debian")
}

// TestDebianPython: a bookworm userland with python3, bootstrapped with
// mmdebstrap once (then from the cache), has Debian's PATH, root as its
// user, and python3 in it.
func TestDebianPython(t *testing.T) {
	if err := hostdeps.Check("TestDebianPython", DebianDeps()...); err != nil {
		t.Fatal(err)
	}
	s := newStore(t)
	s.DebianCache = debianCache(t)
	spec := Spec{Debian: &Debian{Suite: "bookworm", Packages: []string{"python3"}}}
	start := time.Now()
	tpl, err := s.Create(context.Background(), "py", spec, Options{Progress: func(e Event) {
		if e.Step == "bootstrap" && !strings.HasPrefix(e.Detail, "I: ") {
			t.Log(e.Detail)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("created in %s", time.Since(start).Round(time.Millisecond))
	if tpl.Source.Kind != "debian" || tpl.Source.Ref != "bookworm" || !slices.Equal(tpl.Source.Packages, []string{"python3"}) || tpl.Source.Mirror != DefaultMirror {
		t.Errorf("source %+v", tpl.Source)
	}
	if !slices.Equal(tpl.Config.Env, []string{DebianPath}) || tpl.Config.User != "root" {
		t.Errorf("config %+v", tpl.Config)
	}
	fsck(t, tpl.Rootfs.Path)
	tree, err := ocitest.DescribeImage(tpl.Rootfs.Path)
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]string{
		"usr/bin/python3": "symlink 777 0:0", "bin": "symlink 777 0:0", "usr/bin/apt-get": "file 755 0:0",
		"dev/null": "chardev 666 0:0", "etc/passwd": "file 644 0:0", "usr/bin/su": "file 4755 0:0",
	} {
		if !strings.HasPrefix(tree[p], want) {
			t.Errorf("%s: %q, want %s...", p, tree[p], want)
		}
	}
	if !strings.Contains(tree["etc/debian_version"], `"12.`) {
		t.Errorf("etc/debian_version: %s", tree["etc/debian_version"])
	}
	start = time.Now()
	again, err := s.Create(context.Background(), "py2", spec, Options{})
	if err != nil || again.Digest != tpl.Digest {
		t.Fatalf("second create: %v, digest %s want %s", err, again.Digest, tpl.Digest)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("second create from the cached bootstrap took %s", took)
	}
}

// TestLeaseRacesPrune: runs taking leases while the template is created
// again and the cache pruned, over and over: every lease that succeeds
// has its files there until it is released.
func TestLeaseRacesPrune(t *testing.T) {
	s := newStore(t)
	trees := make([]string, 3)
	for i := range trees {
		trees[i] = t.TempDir()
		if err := os.WriteFile(filepath.Join(trees[i], "f"), []byte{byte(i)}, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Create(context.Background(), "t", Spec{Dir: trees[0]}, Options{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	fail := func(f string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(f, args...))
		mu.Unlock()
	}
	wg.Add(3)
	go func() { // re-creates
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			if _, err := s.Create(context.Background(), "t", Spec{Dir: trees[i%3]}, Options{}); err != nil && !errors.Is(err, ErrBusy) {
				fail("create: %v", err)
			}
		}
	}()
	go func() { // prunes
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := s.Prune(); err != nil {
				fail("prune: %v", err)
			}
		}
	}()
	uses := 0
	go func() { // runs
		defer wg.Done()
		for ctx.Err() == nil {
			l, err := s.Use("t")
			if err != nil {
				fail("use: %v", err)
				continue
			}
			uses++
			time.Sleep(time.Millisecond)
			if !exists(l.Template.Rootfs.Path) {
				fail("leased image %s gone", l.Template.Rootfs.Path)
			}
			l.Release()
		}
	}()
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d failures, first: %s", len(failures), failures[0])
	}
	if uses < 20 {
		t.Errorf("only %d leases in 2 s", uses)
	}
	if _, err := s.Prune(); err != nil {
		t.Fatal(err)
	}
	if n := listDir(t, s.objDir(kindImage)); len(n) != 1 {
		t.Errorf("after the race and a prune: images %v, want the template's one", n)
	}
}

// TestCorruptRevision: a record whose revision is not one the store made
// (empty, or a path) is refused, never used to name the snapshots that
// Remove deletes.
func TestCorruptRevision(t *testing.T) {
	s := newStore(t)
	tree := t.TempDir()
	if err := os.WriteFile(filepath.Join(tree, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(context.Background(), "t", Spec{Dir: tree}, Options{}); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(s.CacheDir(), "snapshots", "other-revision")
	if err := os.MkdirAll(other, 0o755); err != nil {
		t.Fatal(err)
	}
	record := s.recordPath("t")
	b, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, rev := range []string{"", "..", "../../data", "0123"} {
		m["revision"] = rev
		b, _ := json.Marshal(m)
		if err := os.WriteFile(record, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get("t"); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "revision") {
			t.Errorf("revision %q: Get gave %v", rev, err)
		}
		// ls goes on without it; rm removes it.
		if ts, err := s.List(); err != nil || len(ts) != 0 {
			t.Errorf("revision %q: List gave %v %v", rev, ts, err)
		}
		if err := s.Remove("t"); err != nil {
			t.Errorf("revision %q: Remove: %v", rev, err)
		}
		if _, err := s.Get("t"); !errors.Is(err, ErrNotFound) {
			t.Errorf("revision %q: after Remove, Get gave %v", rev, err)
		}
		if err := os.WriteFile(record, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("another revision's snapshots went: %v", err)
	}
}

// TestUseDirAndTree: two directories with the same tree, made at
// different times (two mounts of one image), give one template revision
// and one image; another tree another; UseTree finds a tree by its digest
// without the directory, and Prune removes them.
func TestUseDirAndTree(t *testing.T) {
	s := newStore(t)
	mk := func(content string, mtime time.Time) string {
		d := t.TempDir()
		if err := os.WriteFile(filepath.Join(d, "hostname"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(filepath.Join(d, "hostname"), time.Unix(1e9, 0), time.Unix(1e9, 0)); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(d, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		return d
	}
	ctx := context.Background()
	use := func(dir string) *Template {
		t.Helper()
		l, err := s.UseDir(ctx, dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		l.Release()
		return l.Template
	}
	a := use(mk("one\n", time.Unix(2e9, 0)))
	b := use(mk("one\n", time.Unix(2e9+77, 0)))
	c := use(mk("two\n", time.Unix(2e9, 0)))
	if !a.Implicit() || !strings.HasPrefix(a.Revision, "tree-") || a.Source.Kind != "dir" {
		t.Errorf("template %+v", a)
	}
	if b.Revision != a.Revision || b.Digest != a.Digest || b.Rootfs.Path != a.Rootfs.Path {
		t.Errorf("the same tree, another root time: %+v and %+v", a, b)
	}
	if c.Revision == a.Revision || c.Digest == a.Digest {
		t.Errorf("another tree, the same revision: %+v and %+v", a, c)
	}
	got, err := ocitest.DescribeImage(a.Rootfs.Path)
	if err != nil || !strings.Contains(got["hostname"], `"one\n"`) {
		t.Errorf("hostname in the image: %q %v", got["hostname"], err)
	}
	fsck(t, a.Rootfs.Path)
	l, err := s.UseTree(a.Digest)
	if err != nil || l.Template.Revision != a.Revision || !exists(l.Template.Rootfs.Path) {
		t.Fatalf("UseTree: %v %v", l, err)
	}
	l.Release()
	for _, d := range []string{"sha256:" + strings.Repeat("0", 64), "sha256:XYZ", "../../etc", ""} {
		if _, err := s.UseTree(d); err == nil {
			t.Errorf("UseTree(%q) found a tree", d)
		}
	}
	if _, err := s.UseTree("sha256:" + strings.Repeat("0", 64)); !errors.Is(err, ErrNotFound) {
		t.Errorf("UseTree of an unknown tree: %v", err)
	}
	if imps, _ := s.ListImplicit(); len(imps) != 2 {
		t.Errorf("implicit templates: %d, want 2", len(imps))
	}
	if st, err := s.Prune(); err != nil || st.Implicit != 2 || st.Images != 2 {
		t.Errorf("prune: %+v %v", st, err)
	}
	if _, err := s.UseTree(a.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("UseTree after prune: %v", err)
	}
}
