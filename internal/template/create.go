package template

import (
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/dirimage"
	"github.com/mvm-sh/mvm/internal/ext4"
	"github.com/mvm-sh/mvm/internal/oci"
)

// RootfsLabel is the filesystem label of the images the store writes (a
// prebuilt disk keeps its own).
const RootfsLabel = "mvm-template"

// converter names the conversion's output format: a key made by another
// converter does not match, so a change in what conversion keeps makes
// images anew rather than reuse old ones.
const converter = "dirimage-1"

// Spec says what to make a template from: exactly one of OCI, Debian,
// Dir and Rootfs; Kernel and Initrd are optional with any of them.
type Spec struct {
	// OCI is a reference as oci.ParseRef takes it.
	OCI    string
	Debian *Debian
	// Dir is a root filesystem tree on the host, taken as it is (owners
	// included: the host's).
	Dir string
	// Rootfs is a prebuilt ext4 disk image, used as it is.
	Rootfs string
	// Kernel (an uncompressed vmlinux) and Initrd replace the default
	// image's for runs on the template.
	Kernel, Initrd string
}

func (sp Spec) check() error {
	n := 0
	for _, set := range []bool{sp.OCI != "", sp.Debian != nil, sp.Dir != "", sp.Rootfs != ""} {
		if set {
			n++
		}
	}
	if n != 1 {
		return errors.New("give exactly one source: an OCI image, a Debian suite, a directory or a root filesystem image")
	}
	return nil
}

// Event is a progress report of a create.
type Event struct {
	// Step is "resolve", "layer" (Layer says which and how far),
	// "bootstrap" (a line of mmdebstrap's), "image" (the image is being
	// written), "copy", "reuse" (the content was converted before) or
	// "done".
	Step   string
	Detail string
	Layer  *oci.Progress
}

// Pull says when UseImage asks a registry.
type Pull int

const (
	// PullMissing uses what a reference gave before, if anything
	// (references to a registry only: archives and layouts are read
	// every time, which costs a few milliseconds).
	PullMissing Pull = iota
	// PullAlways resolves the reference again (its content is still
	// reused if it did not change).
	PullAlways
	// PullNever fails unless the reference was used before.
	PullNever
)

// Options control a create.
type Options struct {
	// Progress receives reports; nil discards them. It is called from
	// one goroutine at a time.
	Progress func(Event)
	// Pull is UseImage's policy.
	Pull Pull
}

func (o Options) emit(e Event) {
	if o.Progress != nil {
		o.Progress(e)
	}
}

// work is the private directory of one create.
type work struct {
	dir  string
	lock *flock
}

// newWork makes a work directory, its lock held before Prune can see it:
// made under a name Prune leaves alone, locked, then renamed.
func (s *Store) newWork() (*work, error) {
	tmp, err := os.MkdirTemp(s.tmpDir(), newPrefix)
	if err != nil {
		return nil, err
	}
	l, err := lockFile(filepath.Join(tmp, "lock"), unix.LOCK_EX, true)
	if err != nil {
		os.RemoveAll(tmp)
		return nil, err
	}
	dir := filepath.Join(s.tmpDir(), "create-"+strings.TrimPrefix(filepath.Base(tmp), newPrefix))
	if err := os.Rename(tmp, dir); err != nil {
		l.release()
		os.RemoveAll(tmp)
		return nil, err
	}
	return &work{dir: dir, lock: l}, nil
}

// newPrefix names work directories being made.
const newPrefix = ".new-"

func (w *work) remove() {
	os.RemoveAll(w.dir)
	w.lock.release()
}

// objDir makes a directory for an object being made.
func (w *work) objDir() (string, error) {
	return os.MkdirTemp(w.dir, "obj-")
}

// Create makes the template name from sp, replacing one of that name
// atomically: until it succeeds the old template is there as it was;
// after, new runs get the new one while runs holding the old one keep
// it. A create of a name another process is creating fails with ErrBusy.
// Nothing is left in the store by a create that fails.
func (s *Store) Create(ctx context.Context, name string, sp Spec, o Options) (*Template, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	if err := sp.check(); err != nil {
		return nil, err
	}
	nl, err := s.lockName(name)
	if err != nil {
		return nil, err
	}
	defer s.unlockName(name, nl)
	w, err := s.newWork()
	if err != nil {
		return nil, err
	}
	defer w.remove()
	start := time.Now()
	t, lease, err := s.build(ctx, w, sp, o)
	if err != nil {
		return nil, err
	}
	defer lease.Release()
	t.Name = name
	t.Revision = newRevision()
	t.Created = time.Now().UTC()
	old, _ := s.Get(name)
	if err := writeRecord(s.recordPath(name), t); err != nil {
		return nil, fmt.Errorf("template %q: %w", name, err)
	}
	lease.Release()
	if old != nil {
		s.forget(old, true)
	}
	s.fill(t)
	o.emit(Event{Step: "done", Detail: fmt.Sprintf("template %s: %s, %s, in %s", name, short(t.Digest), sizeString(t.Rootfs.Size), time.Since(start).Round(time.Millisecond))})
	return t, nil
}

// build makes (or finds) the template's files and returns the template,
// unnamed, with a lease on them.
func (s *Store) build(ctx context.Context, w *work, sp Spec, o Options) (*Template, *Lease, error) {
	var (
		t   *Template
		l   *flock
		err error
	)
	switch {
	case sp.OCI != "":
		var ref oci.Ref
		if ref, err = oci.ParseRef(sp.OCI); err != nil {
			return nil, nil, err
		}
		t, l, err = s.ociImage(ctx, w, ref, sp.OCI, o)
	case sp.Debian != nil:
		t, l, err = s.debianImage(ctx, w, *sp.Debian, o)
	case sp.Dir != "":
		t, l, err = s.dirImage(ctx, w, sp.Dir, nil, o)
	default:
		t, l, err = s.prebuiltImage(ctx, w, sp.Rootfs, o)
	}
	if err != nil {
		return nil, nil, err
	}
	lease := &Lease{Template: t, locks: []*flock{l}}
	for _, f := range []struct {
		path string
		dst  **File
		what string
	}{{sp.Kernel, &t.Kernel, "kernel"}, {sp.Initrd, &t.Initrd, "initrd"}} {
		if f.path == "" {
			continue
		}
		file, fl, err := s.addFile(ctx, w, f.path, f.what, o)
		if err != nil {
			lease.Release()
			return nil, nil, err
		}
		*f.dst = file
		lease.locks = append(lease.locks, fl)
	}
	return t, lease, nil
}

// key is a source key's entry: what it converted to.
type key struct {
	Key   string `json:"key"`
	Image string `json:"image"`
	Size  int64  `json:"size"`
}

func (s *Store) keyPath(k string) string {
	h := sha256.Sum256([]byte(k))
	return filepath.Join(s.cache, "keys", hex.EncodeToString(h[:])+".json")
}

func readKey(p string) (key, error) {
	var k key
	b, err := os.ReadFile(p)
	if err != nil {
		return k, err
	}
	if err := json.Unmarshal(b, &k); err != nil {
		return k, err
	}
	if !validDigest(k.Image) {
		return k, fmt.Errorf("%s: bad digest %q", p, k.Image)
	}
	return k, nil
}

// lookup finds the image a source key converted to, leased; nil if none
// (or it is gone).
func (s *Store) lookup(k string) (*key, *flock) {
	e, err := readKey(s.keyPath(k))
	if err != nil || e.Key != k {
		return nil, nil
	}
	l, err := s.useObject(objRef{kindImage, e.Image})
	if err != nil || l == nil {
		return nil, nil
	}
	return &e, l
}

func (s *Store) remember(k, digest string, size int64) {
	b, _ := json.Marshal(key{Key: k, Image: digest, Size: size})
	if err := writeFileAtomic(s.keyPath(k), b); err != nil {
		s.log().Warn("conversion not remembered", "key", k, "err", err)
	}
}

// ociImage converts an OCI image, or finds it converted.
func (s *Store) ociImage(ctx context.Context, w *work, ref oci.Ref, given string, o Options) (*Template, *flock, error) {
	o.emit(Event{Step: "resolve", Detail: ref.String()})
	opts := s.OCI
	opts.TempDir = w.dir
	im, err := oci.Open(ctx, ref, opts)
	if err != nil {
		return nil, nil, err
	}
	defer im.Close()
	c := im.Config.Config
	t := &Template{
		Source: Source{Kind: "oci", Ref: given, Resolved: im.Resolved, ConfigDigest: im.ConfigDigest},
		Config: Config{Env: c.Env, WorkingDir: c.WorkingDir, User: c.User, Entrypoint: c.Entrypoint, Cmd: c.Cmd},
	}
	k := "oci-config:" + im.ConfigDigest + ":" + converter
	if e, l := s.lookup(k); l != nil {
		o.emit(Event{Step: "reuse", Detail: fmt.Sprintf("%s converted before: %s", short(im.ConfigDigest), short(e.Image))})
		t.Digest, t.Rootfs = e.Image, File{Digest: e.Image, Size: e.Size}
		return t, l, nil
	}
	l, err := s.convert(ctx, w, ref.String(), o, func(f *oci.Flattener) error {
		return f.Image(ctx, im, func(p oci.Progress) { o.emit(Event{Step: "layer", Layer: &p}) })
	}, t)
	if err != nil {
		return nil, nil, err
	}
	s.remember(k, t.Digest, t.Rootfs.Size)
	return t, l, nil
}

// convert flattens what fill adds into an image, commits it and sets t's
// digest and rootfs.
func (s *Store) convert(ctx context.Context, w *work, what string, o Options, fill func(*oci.Flattener) error, t *Template) (*flock, error) {
	stage := filepath.Join(w.dir, "stage")
	if err := os.Mkdir(stage, 0o700); err != nil {
		return nil, err
	}
	b := dirimage.NewBuilder()
	f := oci.NewFlattener(b, stage, s.Limits)
	defer f.Close()
	if err := fill(f); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	o.emit(Event{Step: "image", Detail: fmt.Sprintf("writing %d files, %s", b.Len(), sizeString(f.Stats().Bytes))})
	if st := f.Stats(); st.DroppedXattrs > 0 {
		s.log().Warn("extended attributes ext4 cannot keep were dropped", "source", what, "count", st.DroppedXattrs)
	}
	obj, err := w.objDir()
	if err != nil {
		return nil, err
	}
	img := filepath.Join(obj, kindImage.file)
	st, err := b.Write(ctx, img, dirimage.Options{Label: RootfsLabel, Digest: true})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	f.Close() // the staged content is in the image now
	return s.commitFile(kindImage, st.Digest, obj, img, t)
}

// commitFile seals an object's file (read-only, on disk) and commits it;
// for an image it sets t's digest and rootfs.
func (s *Store) commitFile(k objKind, digest, obj, file string, t *Template) (*flock, error) {
	fi, err := sealFile(file)
	if err != nil {
		return nil, err
	}
	l, err := s.commitObject(k, digest, obj)
	if err != nil {
		return nil, err
	}
	if t != nil {
		t.Digest, t.Rootfs = digest, File{Digest: digest, Size: fi.Size()}
	}
	return l, nil
}

func sealFile(p string) (os.FileInfo, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Chmod(0o444); err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	return f.Stat()
}

// dirImage writes a host tree as an image; rootTime, when set, replaces
// the root directory's times (see dirimage.Options.RootTime).
func (s *Store) dirImage(ctx context.Context, w *work, dir string, rootTime *time.Time, o Options) (*Template, *flock, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, nil, err
	}
	o.emit(Event{Step: "image", Detail: "writing the tree of " + abs})
	obj, err := w.objDir()
	if err != nil {
		return nil, nil, err
	}
	img := filepath.Join(obj, kindImage.file)
	st, err := dirimage.BuildDir(ctx, abs, img, dirimage.Options{Label: RootfsLabel, Digest: true, RootTime: rootTime})
	if err != nil {
		return nil, nil, fmt.Errorf("the tree of %s: %w", abs, err)
	}
	t := &Template{Source: Source{Kind: "dir", Ref: abs}}
	l, err := s.commitFile(kindImage, st.Digest, obj, img, t)
	return t, l, err
}

// prebuiltImage copies a disk image into the cache, after checking that
// it is an ext4 filesystem the guest can mount read-only as it is.
func (s *Store) prebuiltImage(ctx context.Context, w *work, src string, o Options) (*Template, *flock, error) {
	abs, err := filepath.Abs(src)
	if err != nil {
		return nil, nil, err
	}
	obj, err := w.objDir()
	if err != nil {
		return nil, nil, err
	}
	img := filepath.Join(obj, kindImage.file)
	o.emit(Event{Step: "copy", Detail: abs})
	digest, err := copyHashed(ctx, abs, img)
	if err != nil {
		return nil, nil, fmt.Errorf("--rootfs %s: %w", src, err)
	}
	if err := checkExt4(img); err != nil {
		return nil, nil, fmt.Errorf("--rootfs %s: %w", src, err)
	}
	t := &Template{Source: Source{Kind: "rootfs", Ref: abs}}
	l, err := s.commitFile(kindImage, digest, obj, img, t)
	return t, l, err
}

// ErrNotExt4 is wrapped when a prebuilt root filesystem is not a usable
// ext4 image.
var ErrNotExt4 = errors.New("not a usable ext2/3/4 filesystem image")

func checkExt4(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	fsys, err := ext4.Open(f, fi.Size())
	switch {
	case errors.Is(err, ext4.ErrNeedsRecovery):
		return fmt.Errorf("%w: its journal needs recovery (run e2fsck -fy on it first)", ErrNotExt4)
	case errors.Is(err, ext4.ErrUnsupported):
		return nil // the kernel reads more than internal/ext4 does
	case err != nil:
		return fmt.Errorf("%w: %w", ErrNotExt4, err)
	}
	root, err := fsys.Inode(ext4.RootIno)
	if err == nil && !root.Mode.IsDir() {
		err = errors.New("root inode is not a directory")
	}
	if err == nil {
		_, err = fsys.ReadDir(root)
	}
	if err != nil && !errors.Is(err, ext4.ErrUnsupported) {
		return fmt.Errorf("%w: %w", ErrNotExt4, err)
	}
	return nil
}

// addFile copies a kernel or initrd into the cache.
func (s *Store) addFile(ctx context.Context, w *work, src, what string, o Options) (*File, *flock, error) {
	if what == "kernel" {
		if err := checkKernel(src); err != nil {
			return nil, nil, err
		}
	}
	obj, err := w.objDir()
	if err != nil {
		return nil, nil, err
	}
	dst := filepath.Join(obj, kindFile.file)
	o.emit(Event{Step: "copy", Detail: src})
	digest, err := copyHashed(ctx, src, dst)
	if err != nil {
		return nil, nil, fmt.Errorf("--%s %s: %w", what, src, err)
	}
	fi, err := sealFile(dst)
	if err != nil {
		return nil, nil, err
	}
	l, err := s.commitObject(kindFile, digest, obj)
	if err != nil {
		return nil, nil, err
	}
	return &File{Digest: digest, Size: fi.Size()}, l, nil
}

func checkKernel(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("--kernel %s: not an uncompressed vmlinux (ELF): %w (see docs/kernel.md)", p, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("--kernel %s: an ELF for %s, not x86-64", p, f.Machine)
	}
	return nil
}

// copyHashed copies src to the new file dst, keeping it sparse (holes and
// blocks of zeros are not written), and returns the SHA-256 of its
// content (holes as zeros, as sha256sum sees the file).
func copyHashed(ctx context.Context, src, dst string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("not a regular file")
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	defer out.Close()
	h := sha256.New()
	buf := make([]byte, 1<<20)
	zero := make([]byte, 4096)
	var off int64
	for {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n, err := io.ReadFull(in, buf)
		if n > 0 {
			h.Write(buf[:n])
			for i := 0; i < n; i += 4096 {
				b := buf[i:min(n, i+4096)]
				if len(b) == 4096 && string(b) == string(zero) {
					continue
				}
				if _, err := out.WriteAt(b, off+int64(i)); err != nil {
					return "", err
				}
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return "", err
		}
	}
	if err := out.Truncate(off); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), out.Close()
}

// UseImage returns the implicit template of an OCI reference, leased (see
// Use): converted if its content never was, reused otherwise. Implicit
// templates have no name; ListImplicit lists them and Prune removes
// them. With PullMissing a registry reference used before is not
// resolved again: no network, milliseconds.
func (s *Store) UseImage(ctx context.Context, refStr string, o Options) (*Lease, error) {
	ref, err := oci.ParseRef(refStr)
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256([]byte(ref.String()))
	refFile := filepath.Join(s.cache, "refs", hex.EncodeToString(h[:])+".json")
	if ref.Transport == oci.Registry && o.Pull != PullAlways {
		if t, err := s.readRecord(refFile, ref.String()); err == nil {
			if l, ok, err := s.useAll(t); err == nil && ok {
				o.emit(Event{Step: "reuse", Detail: fmt.Sprintf("%s: %s", ref, short(t.Source.Resolved))})
				return l, nil
			}
		}
		if o.Pull == PullNever {
			return nil, fmt.Errorf("%w: %s has not been pulled (and pulling is off)", oci.ErrNotFound, ref)
		}
	}
	w, err := s.newWork()
	if err != nil {
		return nil, err
	}
	defer w.remove()
	t, l, err := s.ociImage(ctx, w, ref, refStr, o)
	if err != nil {
		return nil, err
	}
	t.Revision = "image-" + digestHex(t.Source.ConfigDigest)[:24]
	t.Created = time.Now().UTC()
	if err := writeRecord(refFile, t); err != nil {
		s.log().Warn("implicit template not recorded", "ref", ref, "err", err)
	}
	s.fill(t)
	return &Lease{Template: t, locks: []*flock{l}}, nil
}

// UseDir returns the implicit template of a directory's tree, leased
// (see Use): the tree is written as an image every time (that is how its
// digest is known), and the image, the template's revision and so what is
// keyed by it, its snapshots, are shared by every use of the same
// content. The root directory's own times are not kept (the guest sees
// 1970): they say when a mount point was made, not what it holds. It is how a container's root that a runtime mounted on the
// host (containerd's snapshotter) becomes a VM's root. Prune removes it.
func (s *Store) UseDir(ctx context.Context, dir string, o Options) (*Lease, error) {
	w, err := s.newWork()
	if err != nil {
		return nil, err
	}
	defer w.remove()
	// The root directory is a mount point (a runtime's overlay, whose
	// upper directory is new): its times are not the tree's.
	epoch := time.Unix(0, 0)
	t, l, err := s.dirImage(ctx, w, dir, &epoch, o)
	if err != nil {
		return nil, err
	}
	t.Revision = "tree-" + digestHex(t.Digest)[:24]
	t.Created = time.Now().UTC()
	if err := writeRecord(s.treeRecord(t.Digest), t); err != nil {
		s.log().Warn("implicit template not recorded", "dir", dir, "err", err)
	}
	s.fill(t)
	return &Lease{Template: t, locks: []*flock{l}}, nil
}

func (s *Store) treeRecord(digest string) string {
	h := sha256.Sum256([]byte("tree " + digest))
	return filepath.Join(s.cache, "refs", hex.EncodeToString(h[:])+".json")
}

// UseTree returns, leased, the implicit template UseDir made of a tree
// whose digest (Template.Digest) is digest, without the directory: what
// starts more VMs of a tree written once, or makes its snapshot after the
// directory is gone. ErrNotFound if it is not in the cache (pruned, or
// never written).
func (s *Store) UseTree(digest string) (*Lease, error) {
	if !validDigest(digest) {
		return nil, fmt.Errorf("%w: tree digest %q: want sha256:HEX", ErrInvalidName, digest)
	}
	t, err := s.readRecord(s.treeRecord(digest), digest)
	if err == nil && t.Digest != digest {
		err = fmt.Errorf("%w %s: it is of %s", ErrCorrupt, s.treeRecord(digest), t.Digest)
	}
	if err != nil {
		return nil, err
	}
	l, ok, err := s.useAll(t)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: the tree %s: its image is gone from %s", ErrNotFound, short(digest), s.cache)
	}
	return l, nil
}

func short(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 && len(d) > i+13 {
		return d[:i+13]
	}
	return d
}

func sizeString(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
