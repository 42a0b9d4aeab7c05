// Package oci reads container images (from a registry, a `docker save`
// archive, an OCI archive or an OCI image layout directory) and flattens
// their layers into a dirimage.Builder: whiteouts, opaque directories,
// hard links, symlinks, modes, owners, extended attributes and device
// nodes, without root and without writing anything outside a staging
// directory. Registry, archive and layout access is go-containerregistry's;
// every blob is checked against its digest as it is read.
//
// Images are user input, and archives may come from anywhere: names,
// sizes, entry counts and link targets are bounded and checked, and a tar
// stream can only add to the tree, never reach the host's filesystem.
package oci

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// Transport is where an image comes from, named as skopeo and podman
// name them.
type Transport string

// Transports.
const (
	// Registry is a registry reference: "python:3.12-slim" (Docker Hub),
	// "registry.example.com/team/web:1.4", "host:5000/x@sha256:...".
	Registry Transport = "docker"
	// DockerArchive is the output of `docker save` (or `podman save`).
	DockerArchive Transport = "docker-archive"
	// OCIArchive is a tar of an OCI image layout.
	OCIArchive Transport = "oci-archive"
	// OCILayout is an OCI image layout directory.
	OCILayout Transport = "oci"
)

// ErrBadRef is wrapped by errors about a reference that cannot be parsed
// or names nothing.
var ErrBadRef = errors.New("bad image reference")

// Ref is a parsed image reference.
type Ref struct {
	Transport Transport
	// Name is the registry reference, in full ("index.docker.io/library/
	// python:3.12-slim"), or the absolute path of the archive or layout.
	Name string
	// Tag picks one image of an archive or layout that holds several: a
	// docker reference for a docker-archive ("app:v1"), the
	// org.opencontainers.image.ref.name annotation for an OCI layout or
	// archive. Empty: the only one.
	Tag string
}

func (r Ref) String() string {
	if r.Transport == Registry {
		return r.Name
	}
	s := string(r.Transport) + ":" + r.Name
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	return s
}

// ParseRef parses REF as `--from-oci` takes it: TRANSPORT:PATH[:TAG] for
// docker-archive, oci-archive and oci, a registry reference otherwise
// (with or without skopeo's "docker://"). Short Docker Hub names mean
// what docker means by them: "python:3.12" is
// index.docker.io/library/python:3.12, "user/app" is
// index.docker.io/user/app:latest.
func ParseRef(s string) (Ref, error) {
	for _, t := range []Transport{DockerArchive, OCIArchive, OCILayout} {
		rest, ok := strings.CutPrefix(s, string(t)+":")
		if !ok {
			continue
		}
		p, tag := splitPathTag(rest)
		if p == "" {
			return Ref{}, fmt.Errorf("%w: %q: no path after %s:", ErrBadRef, s, t)
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return Ref{}, fmt.Errorf("%w: %q: %w", ErrBadRef, s, err)
		}
		fi, err := os.Stat(abs)
		if err != nil {
			return Ref{}, fmt.Errorf("%w: %s: %w", ErrBadRef, s, err)
		}
		if want := t == OCILayout; fi.IsDir() != want {
			what := "a file"
			if want {
				what = "a directory"
			}
			return Ref{}, fmt.Errorf("%w: %s: %s is not %s", ErrBadRef, s, p, what)
		}
		if t == DockerArchive && tag != "" {
			if _, err := name.NewTag(tag); err != nil {
				return Ref{}, fmt.Errorf("%w: %s: %w", ErrBadRef, s, err)
			}
		}
		return Ref{Transport: t, Name: abs, Tag: tag}, nil
	}
	in := strings.TrimPrefix(s, "docker://")
	ref, err := name.ParseReference(in)
	if err != nil {
		hint := ""
		if _, serr := os.Stat(in); serr == nil {
			hint = " (for a file or directory, say docker-archive:, oci-archive: or oci:)"
		}
		return Ref{}, fmt.Errorf("%w: %q: %w%s", ErrBadRef, s, err, hint)
	}
	return Ref{Transport: Registry, Name: ref.Name()}, nil
}

// splitPathTag splits PATH[:TAG] at the first colon, as skopeo does,
// unless the whole of it names a file (a path with a colon in it).
func splitPathTag(s string) (p, tag string) {
	if _, err := os.Stat(s); err == nil {
		return s, ""
	}
	p, tag, _ = strings.Cut(s, ":")
	return p, tag
}
