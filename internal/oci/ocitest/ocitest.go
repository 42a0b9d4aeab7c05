// Package ocitest builds container images for tests, with
// go-containerregistry, and writes them the ways users have them: a
// `docker save` archive, an OCI layout, an OCI archive, a registry.
package ocitest

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Entry is one tar entry of a layer: a header and, for a regular file,
// its content.
type Entry struct {
	tar.Header
	Body string
}

// Epoch is the modification time of the sample image's entries.
var Epoch = time.Unix(1700000000, 0)

// Dir, File, Symlink, Hardlink and Whiteout make entries.
func Dir(name string, mode int64, uid, gid int) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: gid, ModTime: Epoch}}
}

func File(name, body string, mode int64, uid, gid int) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: gid, Size: int64(len(body)), ModTime: Epoch}, Body: body}
}

func Symlink(name, target string) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: Epoch}}
}

func Hardlink(name, target string) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: Epoch}}
}

func Whiteout(name string) Entry {
	return File(name, "", 0o600, 0, 0)
}

// Tar returns the tar stream of entries, in PAX format where a header
// needs it (extended attributes).
func Tar(entries ...Entry) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.Header
		if h.Format == tar.FormatUnknown && len(h.PAXRecords) > 0 {
			h.Format = tar.FormatPAX
		}
		if err := tw.WriteHeader(&h); err != nil {
			panic(fmt.Sprintf("tar header %s: %v", h.Name, err))
		}
		if _, err := io.WriteString(tw, e.Body); err != nil {
			panic(err)
		}
	}
	if err := tw.Close(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// Layer makes a layer of a tar stream, compressed with c.
func Layer(tarStream []byte, c compression.Compression) v1.Layer {
	opener := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(tarStream)), nil }
	opts := []tarball.LayerOption{tarball.WithCompressedCaching}
	if c == compression.ZStd {
		opts = append(opts, tarball.WithCompression(c), tarball.WithMediaType(types.OCILayerZStd))
	} else {
		opts = append(opts, tarball.WithMediaType(types.OCILayer))
	}
	l, err := tarball.LayerFromOpener(opener, opts...)
	if err != nil {
		panic(err)
	}
	return l
}

// Image makes an OCI image of layers with the given config, for
// linux/amd64 unless arch says otherwise.
func Image(cfg v1.Config, arch string, layers ...v1.Layer) v1.Image {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		panic(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		panic(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	cf.Config = cfg
	cf.Created = v1.Time{Time: Epoch}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		panic(err)
	}
	return img
}

// capNetBind is a file capability (VFS_CAP_REVISION_2, effective):
// cap_net_bind_service.
const capNetBind = "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// SampleConfig is the config of Sample.
var SampleConfig = v1.Config{
	User:       "app",
	Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world"},
	WorkingDir: "/home/app",
	Cmd:        []string{"tool", "--version"},
}

// SampleLayers are the tar streams of Sample: in the first, a tree with
// every kind of file; in the second, whiteouts of a file and of a
// directory, an opaque directory (its marker after an entry of the same
// layer in it, which stays), a file added through a symlinked directory,
// a file replaced and a hard link to a file of the first layer; in the
// third, a directory removed and made again.
func SampleLayers() [][]byte {
	xattr := File("usr/bin/capped", "cap", 0o755, 0, 0)
	xattr.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": capNetBind, "SCHILY.xattr.user.note": "hi", "SCHILY.xattr.system.nfs4_acl": "x"}
	dev := Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: Epoch}}
	fifo := Entry{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "run/fifo", Mode: 0o600, ModTime: Epoch}}
	return [][]byte{
		Tar(
			Dir("./", 0o755, 0, 0),
			Dir("etc/", 0o755, 0, 0),
			File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n", 0o644, 0, 0),
			File("etc/group", "root:x:0:\napp:x:1000:\n", 0o644, 0, 0),
			Dir("usr/", 0o755, 0, 0),
			Dir("usr/bin/", 0o755, 0, 0),
			File("usr/bin/tool", "#!/bin/sh\necho tool 1.0\n", 0o755, 0, 0),
			Hardlink("usr/bin/tool-link", "usr/bin/tool"),
			File("usr/bin/su", "setuid", 0o4755, 0, 0),
			xattr,
			Dir("usr/lib/", 0o755, 0, 0),
			File("usr/lib/libx.so", "libx", 0o644, 0, 0),
			Symlink("lib", "usr/lib"),
			Symlink("abs", "/usr/lib/libx.so"),
			Dir("home/", 0o755, 0, 0),
			Dir("home/app/", 0o750, 1000, 1000),
			File("home/app/notes", "mine", 0o600, 1000, 1000),
			dev,
			Dir("run/", 0o755, 0, 0),
			fifo,
			File("var/removed", "gone", 0o644, 0, 0),
			File("var/dir/inside", "gone too", 0o644, 0, 0),
			Dir("opt/old/", 0o755, 0, 0),
			File("opt/old/a", "old a", 0o644, 0, 0),
			File("opt/old/b", "old b", 0o644, 0, 0),
			File("big", string(make([]byte, 200<<10))+"end", 0o644, 0, 0),
		),
		Tar(
			Whiteout("var/.wh.removed"),
			Whiteout("var/.wh.dir"),
			File("opt/old/new", "new in layer 2", 0o644, 0, 0),
			Whiteout("opt/old/.wh..wh..opq"),
			File("lib/added", "through the symlink", 0o644, 0, 0),
			File("usr/bin/tool", "#!/bin/sh\necho tool 2.0\n", 0o755, 0, 0),
			Hardlink("usr/bin/lib-link", "usr/lib/libx.so"),
			Whiteout(".wh..wh.plnk"),
		),
		Tar(
			Whiteout("home/.wh.app"),
			Dir("home/app/", 0o700, 1000, 1000),
			File("home/app/.profile", "export X=1\n", 0o644, 1000, 1000),
		),
	}
}

// SampleTree is what the guest sees of Sample, as Describe describes
// it (content as the text itself).
func SampleTree() map[string]string {
	m := "mtime 1700000000.000000000"
	return map[string]string{
		".":                 "dir 755 0:0 " + m,
		"etc":               "dir 755 0:0 " + m,
		"etc/passwd":        "file 644 0:0 " + m + " links 1 \"root:x:0:0:root:/root:/bin/sh\\napp:x:1000:1000::/home/app:/bin/sh\\n\"",
		"etc/group":         "file 644 0:0 " + m + " links 1 \"root:x:0:\\napp:x:1000:\\n\"",
		"usr":               "dir 755 0:0 " + m,
		"usr/bin":           "dir 755 0:0 " + m,
		"usr/bin/tool":      "file 755 0:0 " + m + " links 1 \"#!/bin/sh\\necho tool 2.0\\n\"",
		"usr/bin/tool-link": "file 755 0:0 " + m + " links 1 \"#!/bin/sh\\necho tool 1.0\\n\"",
		"usr/bin/su":        "file 4755 0:0 " + m + " links 1 \"setuid\"",
		"usr/bin/capped":    "file 755 0:0 " + m + " links 1 \"cap\" xattrs security.capability=" + fmt.Sprintf("%q", capNetBind) + " user.note=\"hi\"",
		"usr/bin/lib-link":  "file 644 0:0 " + m + " links 2 \"libx\"",
		"usr/lib":           "dir 755 0:0 " + m,
		"usr/lib/libx.so":   "file 644 0:0 " + m + " links 2 \"libx\"",
		"usr/lib/added":     "file 644 0:0 " + m + " links 1 \"through the symlink\"",
		"lib":               "symlink 777 0:0 " + m + " -> usr/lib",
		"abs":               "symlink 777 0:0 " + m + " -> /usr/lib/libx.so",
		"home":              "dir 755 0:0 " + m,
		"home/app":          "dir 700 1000:1000 " + m,
		"home/app/.profile": "file 644 1000:1000 " + m + " links 1 \"export X=1\\n\"",
		"dev":               "dir 755 0:0 " + m,
		"dev/null":          "chardev 666 0:0 " + m + " 1:3",
		"run":               "dir 755 0:0 " + m,
		"run/fifo":          "fifo 600 0:0 " + m,
		"var":               "dir 755 0:0 " + m,
		"opt":               "dir 755 0:0 " + m,
		"opt/old":           "dir 755 0:0 " + m,
		"opt/old/new":       "file 644 0:0 " + m + " links 1 \"new in layer 2\"",
		"big":               fmt.Sprintf("file 644 0:0 %s links 1 %d bytes ending \"end\"", m, 200<<10+3),
	}
}

// Sample is the test image: SampleLayers (gzip, zstd, gzip) and
// SampleConfig, for linux/amd64.
func Sample() v1.Image {
	ls := SampleLayers()
	return Image(SampleConfig, "amd64",
		Layer(ls[0], compression.GZip), Layer(ls[1], compression.ZStd), Layer(ls[2], compression.GZip))
}

// SampleGzip is Sample with every layer compressed with gzip, for tools
// that read no zstd (umoci 0.4).
func SampleGzip() v1.Image {
	ls := SampleLayers()
	return Image(SampleConfig, "amd64",
		Layer(ls[0], compression.GZip), Layer(ls[1], compression.GZip), Layer(ls[2], compression.GZip))
}

// WriteDockerArchive writes img as `docker save` would, tagged tag.
func WriteDockerArchive(p string, img v1.Image, tag string) error {
	t, err := name.NewTag(tag)
	if err != nil {
		return err
	}
	return tarball.WriteToFile(p, t, img)
}

// WriteLayout writes img into a new OCI layout at dir, annotated with
// tag ("" for none).
func WriteLayout(dir string, img v1.Image, tag string) error {
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	var opts []layout.Option
	if tag != "" {
		opts = append(opts, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag}))
	}
	return p.AppendImage(img, opts...)
}

// WriteOCIArchive writes img as an OCI archive (a tar of its layout).
func WriteOCIArchive(p string, img v1.Image, tag string) error {
	dir, err := os.MkdirTemp("", "ocitest-layout-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := WriteLayout(dir, img, tag); err != nil {
		return err
	}
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		h, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		h.Name = rel
		if err := tw.WriteHeader(h); err != nil || fi.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	})
	if cerr := tw.Close(); err == nil {
		err = cerr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Registry is a registry (go-containerregistry's) serving on a loopback
// port.
type Registry struct {
	// Host is host:port, for references ("127.0.0.1:40123/test/img:v1").
	Host string
	srv  *http.Server
	ln   net.Listener
}

// StartRegistry starts a registry on 127.0.0.1.
func StartRegistry() (*Registry, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &Registry{Host: ln.Addr().String(), ln: ln,
		srv: &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0))), ReadHeaderTimeout: 10 * time.Second}}
	go r.srv.Serve(ln)
	return r, nil
}

// Push uploads img as repo:tag (repo without the host).
func (r *Registry) Push(repo string, img v1.Image) (name.Reference, error) {
	ref, err := name.ParseReference(r.Host + "/" + repo)
	if err != nil {
		return nil, err
	}
	return ref, remote.Write(ref, img)
}

// PushIndex uploads an index as repo:tag.
func (r *Registry) PushIndex(repo string, idx v1.ImageIndex) (name.Reference, error) {
	ref, err := name.ParseReference(r.Host + "/" + repo)
	if err != nil {
		return nil, err
	}
	return ref, remote.WriteIndex(ref, idx)
}

// Close stops the registry.
func (r *Registry) Close() error { return r.srv.Close() }

// WriteDockerSave writes an archive as `docker save` (Docker 25 and
// later) does: uncompressed layers, from the tar files layers, under
// blobs/sha256/, a config and manifest.json; for linux/amd64 with cfg.
func WriteDockerSave(p, tag string, cfg v1.Config, layers ...string) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, size int64, r io.Reader) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: size, Mode: 0o644, ModTime: Epoch}); err != nil {
			return err
		}
		_, err := io.Copy(tw, r)
		return err
	}
	cf := v1.ConfigFile{OS: "linux", Architecture: "amd64", Config: cfg, Created: v1.Time{Time: Epoch}, RootFS: v1.RootFS{Type: "layers"}}
	var paths []string
	for _, l := range layers {
		lf, err := os.Open(l)
		if err != nil {
			return err
		}
		h, size, err := v1.SHA256(lf)
		if err != nil {
			lf.Close()
			return err
		}
		if _, err := lf.Seek(0, io.SeekStart); err != nil {
			lf.Close()
			return err
		}
		name := "blobs/sha256/" + h.Hex
		err = add(name, size, lf)
		lf.Close()
		if err != nil {
			return err
		}
		cf.RootFS.DiffIDs = append(cf.RootFS.DiffIDs, h)
		paths = append(paths, name)
	}
	raw, err := json.Marshal(cf)
	if err != nil {
		return err
	}
	ch, _, err := v1.SHA256(bytes.NewReader(raw))
	if err != nil {
		return err
	}
	if err := add("blobs/sha256/"+ch.Hex, int64(len(raw)), bytes.NewReader(raw)); err != nil {
		return err
	}
	m, err := json.Marshal([]map[string]any{{"Config": "blobs/sha256/" + ch.Hex, "RepoTags": []string{tag}, "Layers": paths}})
	if err != nil {
		return err
	}
	if err := add("manifest.json", int64(len(m)), bytes.NewReader(m)); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}
