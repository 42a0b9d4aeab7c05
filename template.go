package mvm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/template"
)

// Template is what a sandbox's template says about running commands in
// it: the image's own defaults, which Exec applies to commands that do
// not set their own.
type Template struct {
	// Name is the template's name ("" for an image reference's).
	Name string
	// Source is where it came from ("docker.io/library/python:3.12-slim@sha256:...").
	Source string
	// Digest identifies the root filesystem's content; Revision changes
	// each time the template is created again.
	Digest, Revision string
	Env              []string
	WorkingDir       string
	User             string
	Entrypoint, Cmd  []string
}

// ImageProgress reports what converting an image does.
type ImageProgress struct {
	// Step is "resolve", "layer", "image" (the disk is being written),
	// "reuse" (it was converted before) or "done".
	Step, Detail string
	// Layer (counting from 1) of Layers is being read: Bytes of Size so
	// far (Size is -1 when unknown); Done when it is complete.
	Layer, Layers int
	Digest        string
	Bytes, Size   int64
	Done          bool
}

// rootLabel is the filesystem label of a run's writable root layer.
const rootLabel = "mvm-root"

// rootPlan is a sandbox's root filesystem on a template: the template's
// disk, attached read-only, and the run's writable layer.
type rootPlan struct {
	lease      *template.Lease
	snapshots  string // where the template's snapshots live
	lower      string // the template's disk
	lowerLabel string
	upper      string // the run's writable layer (a scratch image)
}

// openTemplate leases the template of r (by name or image reference), so
// that nothing removes its files while the sandbox uses them.
func openTemplate(ctx context.Context, r resolved) (*template.Lease, *template.Store, error) {
	st, err := template.Open(r.DataDir, r.CacheDir)
	if err != nil {
		return nil, nil, err
	}
	st.Log = r.Logger
	if r.Template != "" {
		l, err := st.Use(r.Template)
		if err != nil {
			return nil, nil, err
		}
		return l, st, nil
	}
	var opts template.Options
	if r.ImageProgress != nil {
		opts.Progress = func(e template.Event) {
			p := ImageProgress{Step: e.Step, Detail: e.Detail}
			if l := e.Layer; l != nil {
				p.Layer, p.Layers, p.Digest, p.Bytes, p.Size, p.Done = l.Layer, l.Layers, l.Digest, l.Bytes, l.Size, l.Done
			}
			r.ImageProgress(p)
		}
	}
	if r.RootDigest != "" {
		l, err := st.UseTree(r.RootDigest)
		if err != nil {
			return nil, nil, fmt.Errorf("root digest: %w", err)
		}
		return l, st, nil
	}
	if r.RootDir != "" {
		start := time.Now()
		l, err := st.UseDir(ctx, r.RootDir, opts)
		if err != nil {
			return nil, nil, fmt.Errorf("root directory %s: %w", r.RootDir, err)
		}
		r.Logger.Debug("root directory written", "dir", r.RootDir, "revision", l.Template.Revision, "took", time.Since(start))
		return l, st, nil
	}
	l, err := st.UseImage(ctx, r.Image, opts)
	if err != nil {
		return nil, nil, fmt.Errorf("image %s: %w", r.Image, err)
	}
	return l, st, nil
}

// LookupTemplate returns what cfg's template (or image) says about running
// commands, without starting anything; for an image reference it is
// converted now if it never was (later starts find it cached). A command
// line tool uses it to apply docker run's rules for Entrypoint and Cmd.
func LookupTemplate(ctx context.Context, cfg Config) (*Template, error) {
	r, err := resolve(cfg)
	if err != nil {
		return nil, err
	}
	if !r.onTemplate() {
		return nil, invalid("Template", "", "no template or image in the configuration")
	}
	l, _, err := openTemplate(ctx, r)
	if err != nil {
		return nil, err
	}
	defer l.Release()
	return publicTemplate(l.Template), nil
}

func publicTemplate(t *template.Template) *Template {
	return &Template{
		Name: t.Name, Source: t.Source.String(), Digest: t.Digest, Revision: t.Revision,
		Env: t.Config.Env, WorkingDir: t.Config.WorkingDir, User: t.Config.User,
		Entrypoint: t.Config.Entrypoint, Cmd: t.Config.Cmd,
	}
}

// Template is the sandbox's template, or nil on the default image.
func (sb *Sandbox) Template() *Template {
	if sb.root == nil {
		return nil
	}
	return publicTemplate(sb.root.lease.Template)
}

// leaseTemplate is the "template" step: the lease is released at the very
// end, after the VM that had the files open is gone.
func (sb *Sandbox) leaseTemplate(ctx context.Context) (undoFunc, error) {
	l, st, err := openTemplate(ctx, sb.cfg)
	if err != nil {
		return nil, err
	}
	t := l.Template
	label, err := fsLabel(t.Rootfs.Path)
	if err == nil && (label == "" || label == rootLabel || strings.HasPrefix(label, "mvm-dir-") || strings.HasPrefix(label, "mvm-rw-")) {
		err = fmt.Errorf("its disk's filesystem label %q is empty or one mvm uses for itself; give it another (tune2fs -L NAME)", label)
	}
	if err != nil {
		l.Release()
		return nil, fmt.Errorf("template %s: %w", templateName(t), err)
	}
	sb.root = &rootPlan{lease: l, snapshots: st.SnapshotDir(t), lower: t.Rootfs.Path, lowerLabel: label}
	if t.Kernel != nil && sb.cfg.Kernel == "" {
		sb.img.Kernel = t.Kernel.Path
	}
	if t.Initrd != nil {
		sb.img.Initrd = t.Initrd.Path
	}
	sb.life.annotate(templateName(t) + " " + shortDigest(t.Digest))
	return func(context.Context) error { l.Release(); return nil }, nil
}

func templateName(t *template.Template) string {
	if t.Name != "" {
		return t.Name
	}
	return t.Source.String()
}

func shortDigest(d string) string {
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 12 {
		d = d[:12]
	}
	return d
}

// fsLabel reads the label of the ext4 filesystem in the image at path:
// how the guest finds the drive.
func fsLabel(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return "", fmt.Errorf("read the superblock of %s: %w", path, err)
	}
	if sb[0x38] != 0x53 || sb[0x39] != 0xEF {
		return "", fmt.Errorf("%s is not an ext2/3/4 filesystem", path)
	}
	return string(bytes.TrimRight(sb[0x78:0x88], "\x00")), nil
}

// prepareRoot makes the run's writable root layer: an empty sparse ext4
// image the size of RootSpace.
func (sb *Sandbox) prepareRoot(ctx context.Context) error {
	if sb.root == nil {
		return nil
	}
	sb.root.upper = filepath.Join(sb.run.Dir, "root.img")
	return dirimage.Scratch(ctx, sb.root.upper, sb.rootLayerSize(), rootLabel)
}

// rootLayerSize is the size of the root's writable layer: RootSpace free
// once ext4 has taken what it keeps for itself.
func (sb *Sandbox) rootLayerSize() int64 {
	return sb.cfg.RootSpace + sb.cfg.RootSpace/8 + 16<<20
}

// withImageDefaults fills what cmd leaves unset from the template's image
// config: docker run's rules, for a command that is given whole (a
// command line tool that takes arguments to append to the Entrypoint
// builds Argv itself; see LookupTemplate).
func (sb *Sandbox) withImageDefaults(cmd Cmd) (Cmd, error) {
	if len(sb.cfg.Env) > 0 {
		cmd.Env = append(append([]string(nil), sb.cfg.Env...), cmd.Env...)
	}
	if sb.root == nil {
		return cmd, nil
	}
	c := sb.root.lease.Template.Config
	if len(cmd.Argv) == 0 {
		cmd.Argv = append(append([]string(nil), c.Entrypoint...), c.Cmd...)
		if len(cmd.Argv) == 0 {
			return cmd, invalid("Cmd.Argv", "", "no command given, and the image has no Entrypoint or Cmd")
		}
	}
	if len(c.Env) > 0 {
		cmd.Env = append(append([]string(nil), c.Env...), cmd.Env...)
	}
	if cmd.Dir == "" {
		cmd.Dir = c.WorkingDir
	}
	if cmd.User == "" {
		cmd.User = c.User
	}
	return cmd, nil
}
