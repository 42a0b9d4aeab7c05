// Package template keeps templates: named, immutable root filesystems
// that runs boot on, made from container images, Debian, a root tree or a
// prebuilt disk image.
//
// A template is user data: a small JSON record in the data directory
// (DATA/templates/NAME.json). What it points to is cache: content-
// addressed objects in the cache directory, which can be rebuilt and are
// garbage-collected (Remove, Prune). The layout, under CACHE/templates:
//
//	images/HEX/rootfs.ext4   a root filesystem image, read-only (0444);
//	                         HEX is its digest (Template.Digest)
//	images/HEX/lock          flock'ed by everyone using the image
//	files/HEX/file, lock     a kernel or initramfs brought with a template
//	keys/HEX.json            source key (an image's config digest) -> image
//	refs/HEX.json            implicit templates (Store.UseImage): reference
//	                         -> template
//	snapshots/REVISION/      reserved for snapshots of a template revision
//	tmp/WORK/                a create in progress (lock flock'ed by it)
//
// Concurrency is by flock only, so a killed process leaves no stale lock:
// a create holds DATA/templates/.locks/NAME for the whole of it (a second
// create of the same name fails at once with ErrBusy); everyone who uses
// an object, or is about to record a reference to it, holds a shared lock
// on its lock file; the garbage collector removes an object only while it
// holds an exclusive lock on it and, under that lock, sees no record
// referring to it. Records are replaced by rename, so a reader sees the
// old or the new one, whole.
package template

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/diskusage"
	"github.com/mvm-sh/mvm/internal/lockfile"
	"github.com/mvm-sh/mvm/internal/oci"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// Errors of the store. Errors about bad input from a source wrap the
// classes of internal/oci (oci.ErrInvalid, oci.ErrDigest, ...).
var (
	// ErrNotFound: no template of that name.
	ErrNotFound = errors.New("template not found")
	// ErrInvalidName: the name is not [a-z0-9][a-z0-9._-]*, at most
	// MaxNameLen bytes.
	ErrInvalidName = errors.New("invalid template name")
	// ErrBusy: another process is creating or removing the template.
	ErrBusy = errors.New("template busy")
	// ErrMissing: the template's files are gone from the cache (it was
	// cleared by hand): create the template again.
	ErrMissing = errors.New("template files missing")
	// ErrCorrupt: the template's record cannot be read (damaged, or
	// written by hand). `template rm` still removes it.
	ErrCorrupt = errors.New("corrupt template record")
)

// MaxNameLen bounds a template name.
const MaxNameLen = 63

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// CheckName validates a template name.
func CheckName(name string) error {
	if len(name) > MaxNameLen || !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, at most %d bytes", ErrInvalidName, name, MaxNameLen)
	}
	return nil
}

// Template is one template, as its record has it. Paths are filled in by
// the Store; they stay valid while a Lease on the template is held.
type Template struct {
	// Name is empty for an implicit template (Store.UseImage).
	Name string `json:"name,omitempty"`
	// Revision changes every time the name is created again; implicit
	// templates have one derived from their digest. Anything derived
	// from a template (a snapshot) is keyed by it.
	Revision string `json:"revision"`
	Source   Source `json:"source"`
	// Digest identifies the root filesystem's content: "sha256:" and
	// the digest of the tree (dirimage's tree digest: what the guest
	// sees, whatever source it came from), or for a prebuilt disk the
	// SHA-256 of the file.
	Digest string `json:"digest"`
	Rootfs File   `json:"rootfs"`
	// Kernel and Initrd, when set, replace the default image's.
	Kernel *File `json:"kernel,omitempty"`
	Initrd *File `json:"initrd,omitempty"`
	// Config is what a run uses unless told otherwise.
	Config  Config    `json:"config"`
	Created time.Time `json:"created"`
}

// Implicit reports whether t was made by UseImage.
func (t *Template) Implicit() bool { return t.Name == "" }

// File is one file of a template.
type File struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"` // bytes (an image is sparse: see Store.DiskUsage)
	Path   string `json:"path,omitempty"`
}

// Source says where a template came from.
type Source struct {
	// Kind is "oci", "debian", "dir" or "rootfs".
	Kind string `json:"kind"`
	// Ref is the reference (oci), the suite (debian), the directory or
	// the disk image (dir, rootfs) as given.
	Ref string `json:"ref"`
	// Resolved is what Ref named when the template was made: for oci,
	// repository@manifest-digest (or the archive and manifest).
	Resolved string `json:"resolved,omitempty"`
	// ConfigDigest is an OCI image's config digest (its image ID).
	ConfigDigest string   `json:"config_digest,omitempty"`
	Packages     []string `json:"packages,omitempty"`
	Mirror       string   `json:"mirror,omitempty"`
}

func (s Source) String() string {
	switch s.Kind {
	case "oci":
		return s.Ref
	case "debian":
		d := "debian:" + s.Ref
		if len(s.Packages) > 0 {
			d += "+" + strings.Join(s.Packages, ",")
		}
		return d
	}
	return s.Kind + ":" + s.Ref
}

// Config is the image configuration a run starts from, with the meaning
// OCI gives it (`docker run` semantics: arguments replace Cmd,
// Entrypoint stays unless overridden).
type Config struct {
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	// User is a name, a uid, "uid:gid", "name:group"; empty is root.
	User       string   `json:"user,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
}

// recordFormat is the version of the record's JSON.
const recordFormat = 1

type record struct {
	Format int `json:"format"`
	*Template
}

// Store is one data directory's templates and one cache directory's
// objects.
type Store struct {
	data, cache string
	// Log receives debug logs; nil discards them.
	Log *slog.Logger
	// OCI is how images are reached (credentials, HTTP transport).
	OCI oci.Options
	// Limits bound what a conversion reads (zero: oci's defaults).
	Limits oci.Limits
	// DebianCache, when set, is a directory where Debian bootstraps
	// (mmdebstrap's tarballs) are kept by suite, packages and mirror,
	// and reused: for test suites, which need the same userland many
	// times (MVM_DEBIAN_CACHE sets it in Default).
	DebianCache string
}

// Open returns the store of templates under dataDir and cacheDir (mvm's
// data and cache directories; templates live in "templates" below each).
func Open(dataDir, cacheDir string) (*Store, error) {
	s := &Store{data: filepath.Join(dataDir, "templates"), cache: filepath.Join(cacheDir, "templates")}
	for _, d := range []string{s.data, s.lockDir(), s.cache, s.objDir(kindImage), s.objDir(kindFile),
		filepath.Join(s.cache, "keys"), filepath.Join(s.cache, "refs"), s.tmpDir(), filepath.Join(s.cache, "snapshots")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("template store: %w", err)
		}
	}
	return s, nil
}

// Default opens the store in the XDG directories (MVM_DATA_DIR and
// MVM_CACHE_DIR override them), with MVM_DEBIAN_CACHE.
func Default() (*Store, error) {
	data, err := xdg.DataDir()
	if err != nil {
		return nil, err
	}
	cache, err := xdg.CacheDir()
	if err != nil {
		return nil, err
	}
	s, err := Open(data, cache)
	if err != nil {
		return nil, err
	}
	s.DebianCache = os.Getenv("MVM_DEBIAN_CACHE")
	return s, nil
}

func (s *Store) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// DataDir and CacheDir are the store's two roots.
func (s *Store) DataDir() string  { return s.data }
func (s *Store) CacheDir() string { return s.cache }

// SnapshotDir is where snapshots of a template revision belong (the
// store does not make it). Remove and Prune delete the directories of
// revisions no template has any more, under an exclusive flock on
// DIR/lock taken without waiting: whoever writes or restores a snapshot
// holds a shared flock on DIR/lock meanwhile, and writes its files
// atomically (temporary name, then rename).
func (s *Store) SnapshotDir(t *Template) string {
	return filepath.Join(s.cache, "snapshots", t.Revision)
}

func (s *Store) recordPath(name string) string { return filepath.Join(s.data, name+".json") }
func (s *Store) lockDir() string               { return filepath.Join(s.data, ".locks") }
func (s *Store) tmpDir() string                { return filepath.Join(s.cache, "tmp") }

// Object kinds: directories under the cache, each holding one file.
type objKind struct{ dir, file string }

var (
	kindImage = objKind{"images", "rootfs.ext4"}
	kindFile  = objKind{"files", "file"}
)

func (s *Store) objDir(k objKind) string { return filepath.Join(s.cache, k.dir) }

// objPath is the file of the object with digest d.
func (s *Store) objPath(k objKind, d string) string {
	return filepath.Join(s.cache, k.dir, digestHex(d), k.file)
}

func digestHex(d string) string { return strings.TrimPrefix(d, "sha256:") }

// fill sets t's paths.
func (s *Store) fill(t *Template) {
	t.Rootfs.Path = s.objPath(kindImage, t.Rootfs.Digest)
	if t.Kernel != nil {
		t.Kernel.Path = s.objPath(kindFile, t.Kernel.Digest)
	}
	if t.Initrd != nil {
		t.Initrd.Path = s.objPath(kindFile, t.Initrd.Digest)
	}
}

// objects lists what t uses.
func (t *Template) objects() []objRef {
	refs := []objRef{{kindImage, t.Rootfs.Digest}}
	if t.Kernel != nil {
		refs = append(refs, objRef{kindFile, t.Kernel.Digest})
	}
	if t.Initrd != nil {
		refs = append(refs, objRef{kindFile, t.Initrd.Digest})
	}
	return refs
}

type objRef struct {
	kind   objKind
	digest string
}

func validDigest(d string) bool {
	h, ok := strings.CutPrefix(d, "sha256:")
	return ok && len(h) == 64 && strings.Trim(h, "0123456789abcdef") == ""
}

// Get returns the template called name.
func (s *Store) Get(name string) (*Template, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	return s.readRecord(s.recordPath(name), name)
}

func (s *Store) readRecord(path, name string) (*Template, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %q (see `mvmctl template ls`)", ErrNotFound, name)
	}
	if err != nil {
		return nil, fmt.Errorf("template %q: %w", name, err)
	}
	r := record{Template: &Template{}}
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("template %q: %w %s: %w", name, ErrCorrupt, path, err)
	}
	if r.Format != recordFormat {
		return nil, fmt.Errorf("template %q: record %s has format %d, this mvmctl reads %d", name, path, r.Format, recordFormat)
	}
	t := r.Template
	// The revision names the template's snapshot directory, which Remove
	// deletes: it must be one newRevision made.
	if !revisionRE.MatchString(t.Revision) {
		return nil, fmt.Errorf("template %q: %w %s: revision %q", name, ErrCorrupt, path, t.Revision)
	}
	for _, o := range t.objects() {
		if !validDigest(o.digest) {
			return nil, fmt.Errorf("template %q: %w %s: digest %q", name, ErrCorrupt, path, o.digest)
		}
	}
	s.fill(t)
	return t, nil
}

// List returns the named templates, sorted by name.
func (s *Store) List() ([]*Template, error) {
	ents, err := os.ReadDir(s.data)
	if err != nil {
		return nil, err
	}
	var out []*Template
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || CheckName(name) != nil || !e.Type().IsRegular() {
			continue
		}
		t, err := s.readRecord(filepath.Join(s.data, e.Name()), name)
		if errors.Is(err, ErrNotFound) {
			continue // removed meanwhile
		}
		if errors.Is(err, ErrCorrupt) {
			// One bad record must not stop ls, rm or prune of the rest.
			s.log().Warn("template skipped (mvmctl template rm "+name+" removes it)", "err", err)
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

// ListImplicit returns the implicit templates UseImage made, newest
// first.
func (s *Store) ListImplicit() ([]*Template, error) {
	dir := filepath.Join(s.cache, "refs")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []*Template
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		t, err := s.readRecord(filepath.Join(dir, e.Name()), e.Name())
		if err != nil {
			continue // cache: a damaged entry is a miss
		}
		out = append(out, t)
	}
	slices.SortFunc(out, func(a, b *Template) int { return b.Created.Compare(a.Created) })
	return out, nil
}

// DiskUsage is the space t's files take on the host (they are sparse).
// Templates that share an image each count it.
func (s *Store) DiskUsage(t *Template) int64 {
	var n int64
	for _, o := range t.objects() {
		n += diskusage.Of(s.objPath(o.kind, o.digest))
	}
	return n
}

// SnapshotUsage is the disk space the snapshots of t's revision take
// (their RAM files are sparse: the pages the guest touched).
func (s *Store) SnapshotUsage(t *Template) int64 {
	return diskusage.Of(s.SnapshotDir(t))
}

// writeRecord writes a record atomically and durably: a reader sees the
// old one or the new one.
func writeRecord(path string, t *Template) error {
	c := *t // paths depend on where the cache is: not recorded
	c.Rootfs.Path = ""
	if c.Kernel != nil {
		k := *c.Kernel
		k.Path, c.Kernel = "", &k
	}
	if c.Initrd != nil {
		i := *c.Initrd
		i.Path, c.Initrd = "", &i
	}
	b, err := json.MarshalIndent(record{Format: recordFormat, Template: &c}, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(path, append(b, '\n'))
}

func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// revisionRE matches what newRevision makes, and the revisions of
// implicit templates (named by their image's or their tree's digest).
var revisionRE = regexp.MustCompile(`^(image-|tree-)?[0-9a-f]{24}$`)

func newRevision() string {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b[:])
}

// flock is a held lock on a file (see internal/lockfile).
type flock struct{ l *lockfile.Lock }

// lockFile locks path as lockfile.Take does.
func lockFile(path string, how int, create bool) (*flock, error) {
	l, err := lockfile.Take(path, how, create)
	if l == nil {
		return nil, err
	}
	return &flock{l}, nil
}

var errWouldBlock = lockfile.ErrWouldBlock

func (l *flock) release() {
	if l != nil {
		l.l.Release()
	}
}

// lockName takes the exclusive lock of a template name (creates and
// removals), failing at once with ErrBusy if another process has it. It
// writes the holder's pid into the lock file for the message.
func (s *Store) lockName(name string) (*flock, error) {
	p := filepath.Join(s.lockDir(), name)
	l, err := lockFile(p, unix.LOCK_EX|unix.LOCK_NB, true)
	if errors.Is(err, errWouldBlock) {
		holder := ""
		if b, err := os.ReadFile(p); err == nil && len(b) > 0 && len(b) < 32 {
			holder = " (pid " + strings.TrimSpace(string(b)) + ")"
		}
		return nil, fmt.Errorf("%w: %q is being created or removed by another mvmctl%s", ErrBusy, name, holder)
	}
	if err != nil {
		return nil, fmt.Errorf("template %q: %w", name, err)
	}
	_ = l.l.File().Truncate(0)
	_, _ = l.l.File().WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	return l, nil
}

// unlockName releases a name's lock, removing the lock file first when
// the name has no template (a failed create, a removal): unlinked while
// held, so that a process waiting on it notices and locks a new one.
func (s *Store) unlockName(name string, l *flock) {
	if !exists(s.recordPath(name)) {
		os.Remove(filepath.Join(s.lockDir(), name))
	}
	l.release()
}
