package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/oci/ocitest"
)

// fsck runs a full, read-only e2fsck on an image.
func fsck(t *testing.T, img string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
}

// flatten converts im into an image and returns its path and stats.
func flatten(t *testing.T, im *Image) (string, dirimage.Stats, Stats) {
	t.Helper()
	b := dirimage.NewBuilder()
	f := NewFlattener(b, t.TempDir(), Limits{})
	defer f.Close()
	var events []Progress
	if err := f.Image(context.Background(), im, func(p Progress) { events = append(events, p) }); err != nil {
		t.Fatal(err)
	}
	done := 0
	for _, e := range events {
		if e.Done {
			done++
		}
	}
	if done != len(im.Layers) {
		t.Errorf("progress: %d layers done of %d", done, len(im.Layers))
	}
	img := filepath.Join(t.TempDir(), "rootfs.ext4")
	st, err := b.Write(context.Background(), img, dirimage.Options{Label: "t", Digest: true})
	if err != nil {
		t.Fatal(err)
	}
	fsck(t, img)
	return img, st, f.Stats()
}

type sources struct {
	archive, layout, ociArchive, save string
	reg                               *ocitest.Registry
	remote                            string
}

func writeSample(t *testing.T, img v1.Image) sources {
	t.Helper()
	d := t.TempDir()
	s := sources{archive: filepath.Join(d, "sample.tar"), layout: filepath.Join(d, "layout"), ociArchive: filepath.Join(d, "sample-oci.tar"),
		save: filepath.Join(d, "saved.tar")}
	var layers []string
	for i, l := range ocitest.SampleLayers() {
		p := filepath.Join(d, fmt.Sprintf("layer%d.tar", i))
		if err := os.WriteFile(p, l, 0o644); err != nil {
			t.Fatal(err)
		}
		layers = append(layers, p)
	}
	for _, err := range []error{
		ocitest.WriteDockerSave(s.save, "saved:v1", ocitest.SampleConfig, layers...),
		ocitest.WriteDockerArchive(s.archive, img, "sample:v1"),
		ocitest.WriteLayout(s.layout, img, "v1"),
		ocitest.WriteOCIArchive(s.ociArchive, img, "v1"),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	reg, err := ocitest.StartRegistry()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	if _, err := reg.Push("test/sample:v1", img); err != nil {
		t.Fatal(err)
	}
	s.reg, s.remote = reg, reg.Host+"/test/sample:v1"
	return s
}

func open(t *testing.T, s string) *Image {
	t.Helper()
	ref, err := ParseRef(s)
	if err != nil {
		t.Fatal(err)
	}
	im, err := Open(context.Background(), ref, Options{TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	return im
}

// TestFlattenSample: the sample image, from each transport, becomes the
// tree the guest should see (whiteouts, opaque directories, hard links,
// symlinked directories, owners, modes, xattrs, devices), checked by
// e2fsck and read back through internal/ext4; every transport gives the
// same config digest and the same tree digest.
func TestFlattenSample(t *testing.T) {
	s := writeSample(t, ocitest.Sample())
	var configDigest, treeDigest string
	for _, ref := range []string{"docker-archive:" + s.archive, "docker-archive:" + s.archive + ":sample:v1",
		"oci:" + s.layout + ":v1", "oci:" + s.layout, "oci-archive:" + s.ociArchive, s.remote, "docker://" + s.remote,
		"docker-archive:" + s.save} {
		t.Run(strings.SplitN(ref, ":", 2)[0], func(t *testing.T) {
			im := open(t, ref)
			if !slices.Equal(im.Config.Config.Env, ocitest.SampleConfig.Env) || im.Config.Config.User != "app" ||
				im.Config.Config.WorkingDir != "/home/app" || !slices.Equal(im.Config.Config.Cmd, ocitest.SampleConfig.Cmd) {
				t.Errorf("config %+v", im.Config.Config)
			}
			if len(im.Layers) != 3 {
				t.Fatalf("%d layers", len(im.Layers))
			}
			img, st, fs := flatten(t, im)
			got, err := ocitest.DescribeImage(img)
			if err != nil {
				t.Fatal(err)
			}
			if d := ocitest.Diff(ocitest.SampleTree(), got); d != "" {
				t.Errorf("flattened tree differs:\n%s", d)
			}
			if fs.DroppedXattrs != 1 || fs.Whiteouts != 4 {
				t.Errorf("stats %+v: want 1 dropped xattr (system.nfs4_acl), 4 whiteouts", fs)
			}
			if configDigest == "" {
				configDigest, treeDigest = im.ConfigDigest, st.Digest
			}
			// docker save's config is another (uncompressed layers,
			// another writer), the tree the same.
			if (im.ConfigDigest != configDigest && !strings.Contains(ref, "saved")) || st.Digest != treeDigest {
				t.Errorf("config %s tree %s; first transport had %s %s", im.ConfigDigest, st.Digest, configDigest, treeDigest)
			}
		})
	}
	if cd, _ := ocitest.Sample().ConfigName(); cd.String() != configDigest {
		t.Errorf("config digest %s, image's %s", configDigest, cd)
	}
}

// TestFlattenMatchesUmoci: umoci (the OCI reference unpacker) unpacks the
// sample layout to the same tree.
func TestFlattenMatchesUmoci(t *testing.T) {
	if _, err := exec.LookPath("umoci"); err != nil {
		t.Fatal("umoci is missing: apt-get install -y --no-install-recommends umoci")
	}
	s := writeSample(t, ocitest.SampleGzip())
	bundle := filepath.Join(t.TempDir(), "bundle")
	args := []string{"unpack", "--image", s.layout + ":v1", bundle}
	rootless := os.Geteuid() != 0
	if rootless {
		args = append(args[:1], append([]string{"--rootless"}, args[1:]...)...)
	}
	if out, err := exec.Command("umoci", args...).CombinedOutput(); err != nil {
		t.Fatalf("umoci %s: %v\n%s", args, err, out)
	}
	want, err := ocitest.DescribeHost(filepath.Join(bundle, "rootfs"))
	if err != nil {
		t.Fatal(err)
	}
	img, _, _ := flatten(t, open(t, "oci:"+s.layout+":v1"))
	got, err := ocitest.DescribeImage(img)
	if err != nil {
		t.Fatal(err)
	}
	if rootless { // umoci cannot chown, mknod or set capabilities without root
		for _, m := range []map[string]string{want, got} {
			for k, v := range m {
				f := strings.Fields(v)
				f[2] = "-"
				m[k] = capRE.ReplaceAllString(strings.Join(f, " "), "")
			}
			delete(m, "dev/null")
		}
	}
	// umoci gives the root, and directories no entry names (the parents
	// of dev/null, opt/old/ and var/removed), the time it unpacks them
	// at; we give such directories the time of the entry that made them,
	// so that the same image makes the same tree (and digest).
	delete(want, ".")
	delete(got, ".")
	for _, p := range []string{"dev", "opt", "var"} {
		for _, m := range []map[string]string{want, got} {
			f := strings.Fields(m[p])
			if len(f) < 5 {
				t.Fatalf("%s: %q", p, m[p])
			}
			f[4] = "-"
			m[p] = strings.Join(f, " ")
		}
	}
	if d := ocitest.Diff(want, got); d != "" {
		t.Errorf("umoci's tree (want) and ours (got) differ:\n%s", d)
	}
}

// TestPlatforms: an index gives its linux/amd64 image; an image or index
// for anything else is refused, naming what it is for.
func TestPlatforms(t *testing.T) {
	ls := ocitest.SampleLayers()
	amd := ocitest.Sample()
	arm := ocitest.Image(ocitest.SampleConfig, "arm64", ocitest.Layer(ls[0], compression.GZip))
	both := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}})
	onlyArm := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}})
	reg, err := ocitest.StartRegistry()
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	for repo, idx := range map[string]v1.ImageIndex{"multi:1": both, "armonly:1": onlyArm} {
		if _, err := reg.PushIndex(repo, idx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.Push("arm:1", arm); err != nil {
		t.Fatal(err)
	}
	im := open(t, reg.Host+"/multi:1")
	if want, _ := amd.ConfigName(); im.ConfigDigest != want.String() {
		t.Errorf("multi-arch index gave config %s, want the amd64 one %s", im.ConfigDigest, want)
	}
	if d, _ := amd.Digest(); !strings.HasSuffix(im.Resolved, "@"+d.String()) {
		t.Errorf("resolved %s, want the amd64 manifest %s", im.Resolved, d)
	}
	for ref, want := range map[string]string{reg.Host + "/armonly:1": "linux/arm64/v8", reg.Host + "/arm:1": "linux/arm64"} {
		r, _ := ParseRef(ref)
		_, err := Open(context.Background(), r, Options{})
		if !errors.Is(err, ErrPlatform) || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), ref) {
			t.Errorf("%s: %v, want ErrPlatform naming %s", ref, err, want)
		}
	}
}

func TestParseRef(t *testing.T) {
	d := t.TempDir()
	file := filepath.Join(d, "a.tar")
	colon := filepath.Join(d, "with:colon.tar")
	for _, p := range []string{file, colon} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		in   string
		want Ref
		err  bool
	}{
		{in: "python:3.12-slim", want: Ref{Transport: Registry, Name: "index.docker.io/library/python:3.12-slim"}},
		{in: "docker://alpine", want: Ref{Transport: Registry, Name: "index.docker.io/library/alpine:latest"}},
		{in: "user/app", want: Ref{Transport: Registry, Name: "index.docker.io/user/app:latest"}},
		{in: "127.0.0.1:5000/tools:1", want: Ref{Transport: Registry, Name: "127.0.0.1:5000/tools:1"}},
		{in: "registry.example.com/team/web:1.4", want: Ref{Transport: Registry, Name: "registry.example.com/team/web:1.4"}},
		{in: "docker-archive:" + file, want: Ref{Transport: DockerArchive, Name: file}},
		{in: "docker-archive:" + file + ":app:v1", want: Ref{Transport: DockerArchive, Name: file, Tag: "app:v1"}},
		{in: "docker-archive:" + colon, want: Ref{Transport: DockerArchive, Name: colon}},
		{in: "oci:" + d + ":v1", want: Ref{Transport: OCILayout, Name: d, Tag: "v1"}},
		{in: "oci-archive:" + file, want: Ref{Transport: OCIArchive, Name: file}},
		{in: "docker-archive:" + d + "/missing.tar", err: true},
		{in: "oci:" + file, err: true}, // not a directory
		{in: "docker-archive:" + d, err: true},
		{in: "docker-archive:", err: true},
		{in: "Bad Name", err: true},
		{in: file, err: true}, // a path without a transport
	} {
		got, err := ParseRef(c.in)
		if c.err {
			if !errors.Is(err, ErrBadRef) {
				t.Errorf("ParseRef(%q) = %+v, %v; want ErrBadRef", c.in, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseRef(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

// layerImage makes an image of one or more raw tar streams.
func layerImage(streams ...[]byte) v1.Image {
	var ls []v1.Layer
	for _, s := range streams {
		ls = append(ls, ocitest.Layer(s, compression.GZip))
	}
	return ocitest.Image(v1.Config{}, "amd64", ls...)
}

// TestHostileLayers: entries that would reach outside the tree, or pass
// a limit, fail the conversion with ErrInvalid; symlinks out of the tree
// only lead back into it; nothing is written outside the staging
// directory.
func TestHostileLayers(t *testing.T) {
	for _, c := range []struct {
		name    string
		streams [][]byte
		limits  Limits
	}{
		{"dotdot", [][]byte{ocitest.Tar(ocitest.File("../escape", "x", 0o644, 0, 0))}, Limits{}},
		{"inner dotdot", [][]byte{ocitest.Tar(ocitest.File("a/../../escape", "x", 0o644, 0, 0))}, Limits{}},
		{"hard link out", [][]byte{ocitest.Tar(ocitest.Hardlink("passwd", "../../../etc/passwd"))}, Limits{}},
		{"hard link to nothing", [][]byte{ocitest.Tar(ocitest.Hardlink("x", "etc/shadow"))}, Limits{}},
		{"hard link to a later entry", [][]byte{ocitest.Tar(ocitest.Hardlink("x", "y"), ocitest.File("y", "y", 0o644, 0, 0))}, Limits{}},
		{"whiteout of dotdot", [][]byte{ocitest.Tar(ocitest.Whiteout("a/.wh.."))}, Limits{}},
		{"device number", [][]byte{ocitest.Tar(ocitest.Entry{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/x", Devmajor: 1 << 13}})}, Limits{}},
		{"owner", [][]byte{ocitest.Tar(ocitest.File("f", "", 0o644, 1<<33, 0))}, Limits{}},
		{"file under a file", [][]byte{ocitest.Tar(ocitest.File("f", "", 0o644, 0, 0), ocitest.File("f/g", "", 0o644, 0, 0))}, Limits{}},
		{"symlink loop", [][]byte{ocitest.Tar(ocitest.Symlink("a", "b"), ocitest.Symlink("b", "a"), ocitest.File("a/f", "", 0o644, 0, 0))}, Limits{}},
		{"entries", [][]byte{ocitest.Tar(ocitest.File("1", "", 0o644, 0, 0), ocitest.File("2", "", 0o644, 0, 0), ocitest.File("3", "", 0o644, 0, 0))}, Limits{MaxEntries: 2}},
		{"bytes", [][]byte{ocitest.Tar(ocitest.File("a", "0123456789", 0o644, 0, 0)), ocitest.Tar(ocitest.File("b", "0123456789", 0o644, 0, 0))}, Limits{MaxBytes: 15}},
		{"stream", [][]byte{ocitest.Tar(ocitest.File("a", strings.Repeat("x", 5000), 0o644, 0, 0))}, Limits{MaxStream: 4096}},
		{"long name", [][]byte{ocitest.Tar(ocitest.File(strings.Repeat("d/", 2100)+"f", "", 0o644, 0, 0))}, Limits{}},
		{"big xattr", [][]byte{ocitest.Tar(bigXattr())}, Limits{}},
		{"not a tar", [][]byte{bytes.Repeat([]byte("garbage!"), 200)}, Limits{}},
		{"truncated tar", [][]byte{ocitest.Tar(ocitest.File("a", strings.Repeat("x", 5000), 0o644, 0, 0))[:2048]}, Limits{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			archive := filepath.Join(dir, "img.tar")
			if err := ocitest.WriteDockerArchive(archive, layerImage(c.streams...), "x:1"); err != nil {
				t.Fatal(err)
			}
			stage := filepath.Join(dir, "stage")
			if err := os.Mkdir(stage, 0o700); err != nil {
				t.Fatal(err)
			}
			b := dirimage.NewBuilder()
			f := NewFlattener(b, stage, c.limits)
			err := f.Image(context.Background(), open(t, "docker-archive:"+archive), nil)
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %v, want ErrInvalid", err)
			} else if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "layer ") {
				t.Errorf("error %q: want one line naming the layer", err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			assertOnly(t, dir, "img.tar", "stage")
			assertOnly(t, stage)
		})
	}

	// Symlinks pointing out of the tree lead back into it.
	dir := t.TempDir()
	archive := filepath.Join(dir, "img.tar")
	img := layerImage(
		ocitest.Tar(ocitest.Symlink("up", "../../../../.."), ocitest.Symlink("root", "/"), ocitest.Symlink("etc", "/../../real-etc")),
		ocitest.Tar(ocitest.File("up/tmp/a", "a", 0o644, 0, 0), ocitest.File("root/tmp/b", "b", 0o644, 0, 0), ocitest.File("etc/c", "c", 0o644, 0, 0)))
	if err := ocitest.WriteDockerArchive(archive, img, "x:1"); err != nil {
		t.Fatal(err)
	}
	out, _, _ := flatten(t, open(t, "docker-archive:"+archive))
	got, err := ocitest.DescribeImage(out)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for p := range got {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	if want := []string{".", "etc", "real-etc", "real-etc/c", "root", "tmp", "tmp/a", "tmp/b", "up"}; !slices.Equal(paths, want) {
		t.Errorf("paths %v, want %v", paths, want)
	}
	assertOnly(t, dir, "img.tar")
}

var capRE = regexp.MustCompile(` security\.capability="[^"]*"`)

func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if !slices.Equal(got, names) {
		t.Errorf("%s holds %v, want %v", dir, got, names)
	}
}

// TestBadImages: every kind of broken input fails with its class, in one
// line that names the thing.
func TestBadImages(t *testing.T) {
	img := ocitest.Sample()
	s := writeSample(t, img)
	dir := t.TempDir()
	layer2, _ := img.Layers()
	l2digest, _ := layer2[1].Digest()
	blob := func(layout string, d v1.Hash) string { return filepath.Join(layout, "blobs", d.Algorithm, d.Hex) }
	cp := func(src string) string {
		dst := filepath.Join(dir, filepath.Base(src)+"-copy")
		if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v %s", err, out)
		}
		return dst
	}
	missing := cp(s.layout)
	if err := os.Remove(blob(missing, l2digest)); err != nil {
		t.Fatal(err)
	}
	tampered := filepath.Join(dir, "tampered")
	if out, err := exec.Command("cp", "-a", s.layout, tampered).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	b, err := os.ReadFile(blob(tampered, l2digest))
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(blob(tampered, l2digest), b, 0o644); err != nil {
		t.Fatal(err)
	}
	arch, err := os.ReadFile(s.archive)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.tar")
	if err := os.WriteFile(truncated, arch[:len(arch)*2/3], 0o644); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.tar")
	if err := os.WriteFile(garbage, bytes.Repeat([]byte("not a tar"), 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		ref   string
		class error
		names string
	}{
		{"docker-archive:" + garbage, ErrInvalid, garbage},
		{"docker-archive:" + truncated, ErrInvalid, truncated},
		{"oci:" + missing + ":v1", ErrNotFound, l2digest.String()[:19]},
		{"oci:" + tampered + ":v1", ErrDigest, l2digest.String()[:19]},
		{"oci:" + s.layout + ":v2", ErrNotFound, "v2"},
		{"127.0.0.1:1/nothing:here", ErrUnreachable, "127.0.0.1:1"},
		{s.reg.Host + "/test/absent:v1", ErrNotFound, "absent"},
		{"docker-archive:" + s.archive + ":other:v1", ErrNotFound, "other:v1"},
	} {
		ref, err := ParseRef(c.ref)
		if err != nil {
			t.Fatalf("%s: %v", c.ref, err)
		}
		err = func() error {
			im, err := Open(context.Background(), ref, Options{TempDir: dir})
			if err != nil {
				return err
			}
			defer im.Close()
			f := NewFlattener(dirimage.NewBuilder(), t.TempDir(), Limits{})
			defer f.Close()
			return f.Image(context.Background(), im, nil)
		}()
		if err == nil {
			t.Errorf("%s: no error", c.ref)
			continue
		}
		if !errors.Is(err, c.class) {
			t.Errorf("%s: %v, want %v", c.ref, err, c.class)
		}
		if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, c.names) {
			t.Errorf("%s: %q: want one line naming %s", c.ref, msg, c.names)
		}
	}
}

func bigXattr() ocitest.Entry {
	e := ocitest.File("f", "", 0o644, 0, 0)
	e.PAXRecords = map[string]string{"SCHILY.xattr.user.big": strings.Repeat("v", 10000)}
	return e
}

// FuzzLayer reads any bytes as a layer (whiteouts on) on top of the
// sample's first layer: the conversion fails cleanly or writes an image
// internal/ext4 reads whole. Seeded with the sample's upper layers.
func FuzzLayer(f *testing.F) {
	// Small inputs: the fuzzer's coverage instrumentation makes every
	// byte of content cost.
	for _, l := range ocitest.SampleLayers()[1:] {
		f.Add(l)
	}
	f.Add(ocitest.Tar(ocitest.Symlink("a", "/"), ocitest.File("a/b/c", "x", 0o4755, 1, 2), ocitest.Hardlink("h", "a/b/c"), ocitest.Whiteout("a/b/.wh..wh..opq")))
	base := ocitest.Tar(
		ocitest.Dir("usr/lib/", 0o755, 0, 0), ocitest.File("usr/lib/libx.so", "libx", 0o644, 0, 0), ocitest.Symlink("lib", "usr/lib"),
		ocitest.File("usr/bin/tool", "tool", 0o755, 0, 0), ocitest.Hardlink("usr/bin/tool2", "usr/bin/tool"),
		ocitest.Dir("opt/old/", 0o755, 0, 0), ocitest.File("opt/old/a", "a", 0o644, 0, 0), ocitest.File("var/removed", "r", 0o644, 0, 0),
		ocitest.Dir("home/app/", 0o700, 1000, 1000))
	f.Fuzz(func(t *testing.T, data []byte) {
		b := dirimage.NewBuilder()
		b.SetMaxNodes(10000)
		fl := NewFlattener(b, t.TempDir(), Limits{MaxEntries: 5000, MaxBytes: 16 << 20, MaxStream: 32 << 20})
		defer fl.Close()
		ctx := context.Background()
		for i, layer := range [][]byte{base, data} {
			c, err := fl.read(ctx, bytes.NewReader(layer), true)
			if err == nil {
				err = c.apply(b)
			}
			if err != nil {
				if i == 0 {
					t.Fatal(err)
				}
				return
			}
		}
		img := filepath.Join(t.TempDir(), "img")
		if _, err := b.Write(ctx, img, dirimage.Options{Digest: true}); err != nil {
			t.Fatalf("write: %v", err)
		}
		if _, err := ocitest.DescribeImage(img); err != nil {
			t.Fatalf("read back: %v", err)
		}
	})
}
