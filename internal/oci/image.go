package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Platform is the only one a guest runs.
var Platform = v1.Platform{OS: "linux", Architecture: "amd64"}

// Error classes; every error Open and the layer readers return about a
// bad image wraps one of them (and ErrBadRef for the reference).
var (
	// ErrUnreachable: the registry could not be reached.
	ErrUnreachable = errors.New("registry unreachable")
	// ErrNotFound: the image, or a blob of it, is not there.
	ErrNotFound = errors.New("not found")
	// ErrPlatform: the image is not for linux/amd64.
	ErrPlatform = errors.New("not a linux/amd64 image")
	// ErrDigest: a blob's content does not match its digest or size.
	ErrDigest = errors.New("digest mismatch")
	// ErrInvalid: the image or a layer is malformed (bad JSON, a broken
	// or truncated tar stream, a refused entry, a limit passed).
	ErrInvalid = errors.New("invalid image")
)

// Limits on what is read from an image.
const (
	maxManifest = 4 << 20  // a manifest, an index, index.json, manifest.json
	maxConfig   = 16 << 20 // an image config
	maxLayers   = 1000
	maxMembers  = 1 << 20 // members of a docker-archive or oci-archive
)

// Options tell Open how to reach images.
type Options struct {
	// Keychain finds registry credentials; nil is authn.DefaultKeychain
	// (the Docker config file, $DOCKER_CONFIG, credential helpers,
	// podman's auth.json).
	Keychain authn.Keychain
	// Transport is the HTTP transport to registries; nil is
	// go-containerregistry's default (proxies from the environment).
	// Plain HTTP is refused whatever the transport, except to localhost
	// and loopback addresses.
	Transport http.RoundTripper
	// TempDir is where an oci-archive is unpacked (default os.TempDir()).
	TempDir string
}

// Image is one linux/amd64 image, its manifest and config read and
// verified, its layers not yet read.
type Image struct {
	Ref Ref
	// Resolved names exactly what was read: repository@manifest digest
	// for a registry, the archive or layout and the manifest digest
	// otherwise.
	Resolved string
	// ManifestDigest is empty for a docker-archive, which has none.
	ManifestDigest string
	// ConfigDigest is the digest of the image config (the image ID): it
	// covers the layers' uncompressed digests, so it identifies the
	// image's content whatever it was compressed or shipped as.
	ConfigDigest string
	Config       v1.ConfigFile
	Layers       []Layer

	cleanup func() error
}

// Close releases what Open holds (an unpacked oci-archive).
func (im *Image) Close() error {
	if im.cleanup == nil {
		return nil
	}
	err := im.cleanup()
	im.cleanup = nil
	return err
}

// Layer is one layer of an Image.
type Layer struct {
	Index int // from 0, the lowest
	// Digest and Size are the blob's, as the manifest has them; empty
	// and -1 in a docker-archive, whose layers are known by DiffID only.
	Digest string
	Size   int64
	// DiffID is the digest of the uncompressed tar stream, from the
	// config.
	DiffID    string
	MediaType string
	// open returns the blob as stored (compressed or not).
	open func() (io.ReadCloser, error)
	// uncompressed: open returns the tar stream itself.
	uncompressed bool
}

func (l Layer) String() string {
	d := l.Digest
	if d == "" {
		d = l.DiffID
	}
	return fmt.Sprintf("layer %d (%s)", l.Index+1, short(d))
}

// short abbreviates a digest for messages.
func short(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 && len(d) > i+13 {
		return d[:i+13]
	}
	return d
}

// Open finds the image ref names, for linux/amd64 (an index's entry for
// it, or an image that is for it), and reads and verifies its manifest and
// config. A cancelled ctx stops it.
func Open(ctx context.Context, ref Ref, o Options) (*Image, error) {
	var (
		im  *Image
		err error
	)
	switch ref.Transport {
	case Registry:
		im, err = openRemote(ctx, ref, o)
	case DockerArchive:
		im, err = openDockerArchive(ref)
	case OCILayout:
		im, err = openLayout(ref, ref.Name)
	case OCIArchive:
		im, err = openOCIArchive(ctx, ref, o)
	default:
		err = fmt.Errorf("%w: unknown transport %q", ErrBadRef, ref.Transport)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	return im, nil
}

// httpGuard refuses plain HTTP except to loopback registries:
// go-containerregistry falls back to it for private addresses too, where
// it would let anyone on the network serve the image.
type httpGuard struct{ base http.RoundTripper }

func (g httpGuard) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !isLoopback(req.URL.Hostname()) {
		return nil, fmt.Errorf("refusing plain HTTP to %s: only registries on localhost or a loopback address are reached without TLS", req.URL.Host)
	}
	return g.base.RoundTrip(req)
}

func isLoopback(host string) bool {
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func openRemote(ctx context.Context, ref Ref, o Options) (*Image, error) {
	r, err := name.ParseReference(ref.Name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRef, err)
	}
	kc := o.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	base := o.Transport
	if base == nil {
		base = remote.DefaultTransport
	}
	opts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(kc),
		remote.WithTransport(httpGuard{base}),
		remote.WithUserAgent("mvmctl"),
		remote.WithPlatform(Platform),
	}
	desc, err := remote.Get(r, opts...)
	if err != nil {
		return nil, remoteError(r.Context().RegistryStr(), err)
	}
	var img v1.Image
	digest := desc.Digest
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, remoteError(r.Context().RegistryStr(), err)
		}
		child, err := pickPlatform(idx)
		if err != nil {
			return nil, err
		}
		if img, err = idx.Image(child.Digest); err != nil {
			return nil, remoteError(r.Context().RegistryStr(), err)
		}
		digest = child.Digest
	case desc.MediaType.IsImage():
		if img, err = desc.Image(); err != nil {
			return nil, remoteError(r.Context().RegistryStr(), err)
		}
	default:
		return nil, fmt.Errorf("%w: %s is a %s, not an image", ErrInvalid, ref.Name, desc.MediaType)
	}
	im, err := fromManifest(img, digest)
	if err != nil {
		return nil, remoteError(r.Context().RegistryStr(), err)
	}
	im.Ref = ref
	im.Resolved = r.Context().Digest(digest.String()).String()
	return im, nil
}

// remoteError classifies a registry error: unreachable, not found (or
// not allowed: registries answer both for a repository one cannot see).
func remoteError(registry string, err error) error {
	var te *transport.Error
	var ue *url.Error
	var ne net.Error
	switch {
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrPlatform), errors.Is(err, ErrDigest), errors.Is(err, context.Canceled):
		return err
	case errors.As(err, &te):
		if te.StatusCode == http.StatusNotFound || te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden {
			return fmt.Errorf("%w (or access denied: log in with `docker login %s`): %w", ErrNotFound, registry, err)
		}
		return err
	case errors.As(err, &ue), errors.As(err, &ne):
		return fmt.Errorf("%w: %s: %w", ErrUnreachable, registry, err)
	}
	return err
}

// pickPlatform returns the index entry for Platform: an exact match, else
// one with a variant (amd64 has none that matter to a guest).
func pickPlatform(idx v1.ImageIndex) (v1.Descriptor, error) {
	m, err := idx.IndexManifest()
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("%w: index: %w", ErrInvalid, err)
	}
	var seen []string
	var found *v1.Descriptor
	for i, d := range m.Manifests {
		if d.Platform == nil || !d.MediaType.IsImage() {
			continue
		}
		p := d.Platform
		if p.OS == "unknown" { // attestations
			continue
		}
		seen = append(seen, p.String())
		if p.OS == Platform.OS && p.Architecture == Platform.Architecture && (found == nil || p.Variant == "") {
			found = &m.Manifests[i]
		}
	}
	if found == nil {
		slices.Sort(seen)
		has := strings.Join(slices.Compact(seen), ", ")
		if has == "" {
			has = "no platforms"
		}
		return v1.Descriptor{}, fmt.Errorf("%w: the index has %s", ErrPlatform, has)
	}
	return *found, nil
}

// fromManifest reads and checks an image's manifest and config. digest is
// what the manifest is known by; its bytes are checked against it.
func fromManifest(img v1.Image, digest v1.Hash) (*Image, error) {
	raw, err := img.RawManifest()
	if err != nil {
		return nil, notFound("manifest", err)
	}
	if len(raw) > maxManifest {
		return nil, fmt.Errorf("%w: manifest of %d bytes", ErrInvalid, len(raw))
	}
	if got := sha256Hash(raw); digest.Algorithm == "sha256" && got != digest.String() {
		return nil, fmt.Errorf("%w: manifest is %s, want %s", ErrDigest, got, digest)
	}
	mf, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%w: manifest: %w", ErrInvalid, err)
	}
	if mt := mf.Config.MediaType; mt != types.DockerConfigJSON && mt != types.OCIConfigJSON {
		return nil, fmt.Errorf("%w: config of type %q: not a container image", ErrInvalid, mt)
	}
	if mf.Config.Size > maxConfig {
		return nil, fmt.Errorf("%w: config of %d bytes", ErrInvalid, mf.Config.Size)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, notFound("config", err)
	}
	if got := sha256Hash(rawCfg); got != mf.Config.Digest.String() || int64(len(rawCfg)) != mf.Config.Size {
		return nil, fmt.Errorf("%w: config is %s (%d bytes), want %s (%d bytes)", ErrDigest, got, len(rawCfg), mf.Config.Digest, mf.Config.Size)
	}
	im, err := fromConfig(rawCfg)
	if err != nil {
		return nil, err
	}
	if len(mf.Layers) != len(im.Config.RootFS.DiffIDs) {
		return nil, fmt.Errorf("%w: %d layers in the manifest, %d in the config", ErrInvalid, len(mf.Layers), len(im.Config.RootFS.DiffIDs))
	}
	im.ManifestDigest = digest.String()
	for i, d := range mf.Layers {
		switch d.MediaType {
		case types.OCILayer, types.OCILayerZStd, types.OCIUncompressedLayer, types.DockerLayer, types.DockerUncompressedLayer:
		default:
			return nil, fmt.Errorf("%w: layer %d of type %q: not a layer of a Linux image", ErrInvalid, i+1, d.MediaType)
		}
		d := d
		im.Layers = append(im.Layers, Layer{
			Index:     i,
			Digest:    d.Digest.String(),
			Size:      d.Size,
			DiffID:    im.Config.RootFS.DiffIDs[i].String(),
			MediaType: string(d.MediaType),
			open: func() (io.ReadCloser, error) {
				l, err := img.LayerByDigest(d.Digest)
				if err != nil {
					return nil, err
				}
				return l.Compressed()
			},
		})
	}
	return im, nil
}

// fromConfig parses and checks an image config.
func fromConfig(raw []byte) (*Image, error) {
	cfg, err := v1.ParseConfigFile(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%w: config: %w", ErrInvalid, err)
	}
	if cfg.OS != Platform.OS || cfg.Architecture != Platform.Architecture {
		return nil, fmt.Errorf("%w: the image is for %s/%s", ErrPlatform, cfg.OS, cfg.Architecture)
	}
	if n := len(cfg.RootFS.DiffIDs); n > maxLayers {
		return nil, fmt.Errorf("%w: %d layers, more than %d", ErrInvalid, n, maxLayers)
	}
	for i, d := range cfg.RootFS.DiffIDs {
		if d.Algorithm != "sha256" || len(d.Hex) != 64 {
			return nil, fmt.Errorf("%w: layer %d: diff ID %q is not a sha256 digest", ErrInvalid, i+1, d)
		}
	}
	return &Image{ConfigDigest: sha256Hash(raw), Config: *cfg}, nil
}

func sha256Hash(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func notFound(what string, err error) error {
	if errors.Is(err, os.ErrNotExist) || strings.Contains(err.Error(), "not found") {
		return fmt.Errorf("%w: %s: %w", ErrNotFound, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// member is one file of an archive.
type member struct {
	typ    byte
	size   int64
	target string
}

// scanArchive lists the members of a tar archive by their cleaned names,
// reading only headers (a file skips by seeking), so that what the
// archive's own JSON files say can be bounded before anything reads them.
func scanArchive(file string) (map[string]member, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	out := map[string]member{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: not a tar archive, or a damaged one: %w", ErrInvalid, err)
		}
		if len(out) == maxMembers {
			return nil, fmt.Errorf("%w: more than %d files in the archive", ErrInvalid, maxMembers)
		}
		out[path.Clean(h.Name)] = member{typ: h.Typeflag, size: h.Size, target: h.Linkname}
	}
}

func openDockerArchive(ref Ref) (*Image, error) {
	members, err := scanArchive(ref.Name)
	if err != nil {
		return nil, err
	}
	small := func(p string, limit int64) error {
		m, ok := members[path.Clean(p)]
		if !ok {
			return fmt.Errorf("%w: %s is not in the archive", ErrNotFound, p)
		}
		if m.typ == tar.TypeSymlink || m.typ == tar.TypeLink {
			return nil // go-containerregistry follows it, and finds its size
		}
		if m.size > limit {
			return fmt.Errorf("%w: %s has %d bytes", ErrInvalid, p, m.size)
		}
		return nil
	}
	if err := small("manifest.json", maxManifest); err != nil {
		return nil, fmt.Errorf("%w (not a `docker save` archive?)", err)
	}
	var tag *name.Tag
	if ref.Tag != "" {
		t, err := name.NewTag(ref.Tag)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadRef, err)
		}
		tag = &t
	}
	opener := func() (io.ReadCloser, error) { return os.Open(ref.Name) }
	mf, err := tarball.LoadManifest(opener)
	if err != nil {
		return nil, fmt.Errorf("%w: manifest.json: %w", ErrInvalid, err)
	}
	if len(mf) == 0 {
		return nil, fmt.Errorf("%w: manifest.json lists no image", ErrInvalid)
	}
	if tag == nil && len(mf) > 1 {
		var tags []string
		for _, d := range mf {
			tags = append(tags, d.RepoTags...)
		}
		return nil, fmt.Errorf("%w: the archive holds %d images: say which (docker-archive:%s:TAG; it has %s)", ErrBadRef, len(mf), ref.Name, strings.Join(tags, ", "))
	}
	if tag != nil {
		var tags []string
		found := false
		for _, d := range mf {
			for _, t := range d.RepoTags {
				tags = append(tags, t)
				if rt, err := name.NewTag(t); err == nil && rt.Name() == tag.Name() {
					found = true
				}
			}
		}
		if !found {
			return nil, fmt.Errorf("%w: no image tagged %s in the archive (it has %s)", ErrNotFound, ref.Tag, strings.Join(tags, ", "))
		}
	}
	for _, d := range mf {
		if err := small(d.Config, maxConfig); err != nil {
			return nil, err
		}
		if len(d.Layers) > maxLayers {
			return nil, fmt.Errorf("%w: %d layers", ErrInvalid, len(d.Layers))
		}
		for _, l := range d.Layers {
			if _, ok := members[path.Clean(l)]; !ok {
				return nil, fmt.Errorf("%w: layer %s is not in the archive", ErrNotFound, l)
			}
		}
	}
	img, err := tarball.Image(opener, tag)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	raw, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("%w: config: %w", ErrInvalid, err)
	}
	im, err := fromConfig(raw)
	if err != nil {
		return nil, err
	}
	var desc *tarball.Descriptor
	for i := range mf {
		if tag == nil {
			desc = &mf[i]
			break
		}
		for _, t := range mf[i].RepoTags {
			if rt, err := name.NewTag(t); err == nil && rt.Name() == tag.Name() {
				desc = &mf[i]
			}
		}
	}
	if desc == nil || len(desc.Layers) != len(im.Config.RootFS.DiffIDs) {
		return nil, fmt.Errorf("%w: manifest.json and the config disagree on the layers", ErrInvalid)
	}
	for i, diffID := range im.Config.RootFS.DiffIDs {
		im.Layers = append(im.Layers, Layer{
			Index:     i,
			Size:      -1,
			DiffID:    diffID.String(),
			MediaType: string(types.DockerUncompressedLayer),
			open: func() (io.ReadCloser, error) {
				l, err := img.LayerByDiffID(diffID)
				if err != nil {
					return nil, err
				}
				return l.Uncompressed()
			},
			uncompressed: true,
		})
	}
	im.Ref = ref
	im.Resolved = ref.String()
	return im, nil
}

// openLayout opens the image of an OCI layout in dir.
func openLayout(ref Ref, dir string) (*Image, error) {
	p, err := layout.FromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: not an OCI layout: %w", ErrInvalid, err)
	}
	fi, err := os.Stat(filepath.Join(dir, "index.json"))
	if err != nil {
		return nil, fmt.Errorf("%w: not an OCI layout: %w", ErrNotFound, err)
	}
	if fi.Size() > maxManifest {
		return nil, fmt.Errorf("%w: index.json has %d bytes", ErrInvalid, fi.Size())
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("%w: index.json: %w", ErrInvalid, err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: index.json: %w", ErrInvalid, err)
	}
	var picked *v1.Descriptor
	var tags []string
	for i, d := range m.Manifests {
		t := d.Annotations["org.opencontainers.image.ref.name"]
		tags = append(tags, t)
		if ref.Tag == "" || t == ref.Tag {
			if picked != nil && ref.Tag == "" {
				return nil, fmt.Errorf("%w: the layout holds several images: say which (oci:%s:TAG; it has %s)", ErrBadRef, dir, strings.Join(tags, ", "))
			}
			picked = &m.Manifests[i]
		}
	}
	if picked == nil {
		if ref.Tag == "" {
			return nil, fmt.Errorf("%w: index.json lists no image", ErrNotFound)
		}
		return nil, fmt.Errorf("%w: no image tagged %q in the layout (it has %s)", ErrNotFound, ref.Tag, strings.Join(tags, ", "))
	}
	d := *picked
	for depth := 0; d.MediaType.IsIndex(); depth++ {
		if depth == 3 {
			return nil, fmt.Errorf("%w: indexes nested too deep", ErrInvalid)
		}
		if err := checkBlob(p, d, maxManifest); err != nil {
			return nil, err
		}
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, notFound("index "+d.Digest.String(), err)
		}
		raw, err := child.RawManifest()
		if err != nil {
			return nil, notFound("index "+d.Digest.String(), err)
		}
		if got := sha256Hash(raw); got != d.Digest.String() {
			return nil, fmt.Errorf("%w: index is %s, want %s", ErrDigest, got, d.Digest)
		}
		if d, err = pickPlatform(child); err != nil {
			return nil, err
		}
		idx = child
	}
	if !d.MediaType.IsImage() {
		return nil, fmt.Errorf("%w: %s is a %s, not an image", ErrInvalid, d.Digest, d.MediaType)
	}
	if err := checkBlob(p, d, maxManifest); err != nil {
		return nil, err
	}
	img, err := idx.Image(d.Digest)
	if err != nil {
		return nil, notFound("manifest "+d.Digest.String(), err)
	}
	if mf, err := img.Manifest(); err == nil {
		if err := checkBlob(p, mf.Config, maxConfig); err != nil {
			return nil, err
		}
	}
	im, err := fromManifest(img, d.Digest)
	if err != nil {
		return nil, err
	}
	im.Ref = ref
	im.Resolved = ref.String() + "@" + d.Digest.String()
	return im, nil
}

// checkBlob checks that a layout's blob is there, with the size its
// descriptor says and at most limit bytes, before it is read whole.
func checkBlob(p layout.Path, d v1.Descriptor, limit int64) error {
	if d.Digest.Algorithm != "sha256" || len(d.Digest.Hex) != 64 || strings.ContainsAny(d.Digest.Hex, "/.") {
		return fmt.Errorf("%w: digest %q", ErrInvalid, d.Digest)
	}
	fi, err := os.Lstat(filepath.Join(string(p), "blobs", "sha256", d.Digest.Hex))
	if err != nil {
		return fmt.Errorf("%w: blob %s: %w", ErrNotFound, d.Digest, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: blob %s is not a regular file", ErrInvalid, d.Digest)
	}
	if fi.Size() != d.Size {
		return fmt.Errorf("%w: blob %s has %d bytes, want %d", ErrDigest, d.Digest, fi.Size(), d.Size)
	}
	if fi.Size() > limit {
		return fmt.Errorf("%w: blob %s has %d bytes", ErrInvalid, d.Digest, fi.Size())
	}
	return nil
}

// openOCIArchive unpacks what an OCI layout needs of the archive (its
// index, layout marker and blobs, nothing else) into a temporary
// directory, and opens it.
func openOCIArchive(ctx context.Context, ref Ref, o Options) (*Image, error) {
	dir, err := os.MkdirTemp(o.TempDir, "oci-archive-")
	if err != nil {
		return nil, err
	}
	cleanup := func() error { return os.RemoveAll(dir) }
	if err := unpackLayout(ctx, ref.Name, dir); err != nil {
		cleanup()
		return nil, err
	}
	im, err := openLayout(ref, dir)
	if err != nil {
		cleanup()
		return nil, err
	}
	im.Resolved = ref.String() + "@" + im.ManifestDigest
	im.cleanup = cleanup
	return im, nil
}

func unpackLayout(ctx context.Context, archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o700); err != nil {
		return err
	}
	tr := tar.NewReader(f)
	for n := 0; ; n++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: not a tar archive, or a damaged one: %w", ErrInvalid, err)
		}
		if n == maxMembers {
			return fmt.Errorf("%w: more than %d files in the archive", ErrInvalid, maxMembers)
		}
		if h.Typeflag != tar.TypeReg && h.Typeflag != tar.TypeRegA {
			continue
		}
		// Only names a layout has, so nothing lands anywhere else.
		p := path.Clean(strings.TrimPrefix(h.Name, "./"))
		var dst string
		switch {
		case p == "index.json" || p == "oci-layout":
			if h.Size > maxManifest {
				return fmt.Errorf("%w: %s has %d bytes", ErrInvalid, p, h.Size)
			}
			dst = filepath.Join(dir, p)
		case strings.HasPrefix(p, "blobs/sha256/"):
			hx := strings.TrimPrefix(p, "blobs/sha256/")
			if len(hx) != 64 || strings.Trim(hx, "0123456789abcdef") != "" {
				continue
			}
			dst = filepath.Join(dir, "blobs", "sha256", hx)
		default:
			continue
		}
		out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return fmt.Errorf("%w: %s twice in the archive? %w", ErrInvalid, p, err)
		}
		_, err = io.Copy(out, tr)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: %s: archive truncated", ErrInvalid, p)
		}
		if err != nil {
			return fmt.Errorf("unpack %s: %w", p, err)
		}
	}
}
