package writeback_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/ext4"
	"github.com/mvm-sh/mvm/internal/writeback"
)

// Whole seconds: mkfs.ext4 -d keeps no sub-second part of a timestamp.
var (
	t0    = time.Unix(1_600_000_000, 0) // default time of every tree entry
	t1    = time.Unix(1_700_000_001, 0)
	t2    = time.Unix(1_700_000_002, 0)
	t3    = time.Unix(1_700_000_003, 0)
	tHost = time.Unix(1_650_000_000, 0) // host-side changes made while the VM ran
)

type kind int

const (
	kFile kind = iota
	kDir
	kSymlink
	kHardlink
	kFifo
	kChar
	kBlock
	kWhiteout
)

// ent is one entry of a source tree that mkfs.ext4 -d turns into an image.
type ent struct {
	path     string
	kind     kind
	data     string
	perm     uint32
	target   string // symlink target, or the path a hard link points to
	mtime    time.Time
	uid, gid int
	major    uint32
	minor    uint32
	opaque   bool
}

func file(p, data string) ent         { return ent{path: p, kind: kFile, data: data, perm: 0o644} }
func dir(p string) ent                { return ent{path: p, kind: kDir, perm: 0o755} }
func symlink(p, target string) ent    { return ent{path: p, kind: kSymlink, target: target} }
func hardlink(p, existing string) ent { return ent{path: p, kind: kHardlink, target: existing} }
func fifo(p string) ent               { return ent{path: p, kind: kFifo, perm: 0o644} }
func whiteout(p string) ent           { return ent{path: p, kind: kWhiteout, perm: 0o644} }
func chardev(p string, major, minor uint32) ent {
	return ent{path: p, kind: kChar, perm: 0o644, major: major, minor: minor}
}
func blockdev(p string, major, minor uint32) ent {
	return ent{path: p, kind: kBlock, perm: 0o644, major: major, minor: minor}
}
func opaqueDir(p string) ent { e := dir(p); e.opaque = true; return e }

func (e ent) mode(m uint32) ent      { e.perm = m; return e }
func (e ent) at(t time.Time) ent     { e.mtime = t; return e }
func (e ent) owner(uid, gid int) ent { e.uid, e.gid = uid, gid; return e }

// build creates ents under root. Every entry, implicit parent directories
// and root included, gets mtime and atime t0 unless it names its own.
func build(t *testing.T, root string, ents []ent) {
	t.Helper()
	times := map[string]time.Time{}
	links := map[string]bool{}
	for _, e := range ents {
		p := filepath.Join(root, e.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		var err error
		switch e.kind {
		case kFile:
			err = os.WriteFile(p, []byte(e.data), 0o600)
		case kDir:
			err = os.Mkdir(p, 0o700)
			if err == nil && e.opaque {
				err = unix.Setxattr(p, "trusted.overlay.opaque", []byte("y"), 0)
			}
		case kSymlink:
			err = os.Symlink(e.target, p)
		case kHardlink:
			err = os.Link(filepath.Join(root, e.target), p)
			links[e.path] = true
		case kFifo:
			err = unix.Mkfifo(p, 0o600)
		case kChar, kWhiteout:
			err = unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(e.major, e.minor)))
		case kBlock:
			err = unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(e.major, e.minor)))
		}
		if err != nil {
			t.Fatalf("create %q: %v", e.path, err)
		}
		if e.kind == kHardlink {
			continue
		}
		if err := os.Lchown(p, e.uid, e.gid); err != nil {
			t.Fatal(err)
		}
		if e.kind != kSymlink {
			if err := unix.Chmod(p, e.perm); err != nil {
				t.Fatal(err)
			}
		}
		if !e.mtime.IsZero() {
			times[e.path] = e.mtime
		}
	}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if links[rel] {
			return nil
		}
		mt, ok := times[rel]
		if !ok {
			mt = t0
		}
		return setTime(p, mt, mt)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func setTime(p string, atime, mtime time.Time) error {
	ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// mkfs builds an ext4 image of src as mvm does for a shared directory and
// its scratch image (a journal included), and opens it.
func mkfs(t *testing.T, src, img string) *ext4.FS {
	t.Helper()
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", src, img, "64M").CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return open(t, img)
}

func open(t *testing.T, img string) *ext4.FS {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := ext4.Open(f, fi.Size())
	if err != nil {
		t.Fatalf("open %s: %v", img, err)
	}
	return fsys
}

// copyTree copies src to dst (which exists) keeping types, modes, owners,
// times and hard links: the host directory as it was when its image was
// built.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	linked := map[uint64]string{}
	var dirs []string
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		q := filepath.Join(dst, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if prev, ok := linked[st.Ino]; ok {
			return os.Link(prev, q)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			if rel != "." {
				if err := os.Mkdir(q, 0o700); err != nil {
					return err
				}
			}
			dirs = append(dirs, rel)
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if err := os.WriteFile(q, b, 0o600); err != nil {
				return err
			}
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if err := os.Symlink(target, q); err != nil {
				return err
			}
		case unix.S_IFIFO:
			if err := unix.Mkfifo(q, 0o600); err != nil {
				return err
			}
		default:
			if err := unix.Mknod(q, st.Mode, int(st.Rdev)); err != nil {
				return err
			}
		}
		if st.Nlink > 1 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			linked[st.Ino] = q
		}
		if err := os.Lchown(q, int(st.Uid), int(st.Gid)); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			if err := unix.Chmod(q, st.Mode&0o7777); err != nil {
				return err
			}
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return unix.UtimesNanoAt(unix.AT_FDCWD, q, []unix.Timespec{st.Atim, st.Mtim}, unix.AT_SYMLINK_NOFOLLOW)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Directory times last: creating their entries changed them.
	for _, rel := range dirs {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(src, rel), &st); err != nil {
			t.Fatal(err)
		}
		if err := unix.UtimesNano(filepath.Join(dst, rel), []unix.Timespec{st.Atim, st.Mtim}); err != nil {
			t.Fatal(err)
		}
	}
}

// layers describes a write-back: the host directory's tree when its image
// was built, and what the guest left in the overlay's upper layer.
type layers struct {
	lower, upper []ent
	// upperRootMode, when set, is the mode of the upper layer's root: the
	// guest changed the mode of the shared directory itself. Otherwise the
	// root carries the lower root's attributes, as the guest agent sets it.
	upperRootMode uint32
	// noUpperDir leaves the scratch image without its "upper" directory.
	noUpperDir bool
}

type fixture struct {
	host               string
	lowerImg, upperImg string
	lower, upper       *ext4.FS
}

func newFixture(t *testing.T, l layers) *fixture {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: whiteouts and device nodes are created with mknod")
	}
	for _, tool := range []string{"mkfs.ext4", "e2fsck", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	work := t.TempDir()
	// The images sit alone in their directory, as in a run's write-back
	// directory.
	f := &fixture{
		host:     filepath.Join(work, "host"),
		lowerImg: filepath.Join(work, "run", "lower.img"),
		upperImg: filepath.Join(work, "run", "upper.img"),
	}
	lowerSrc, upperSrc := filepath.Join(work, "lower"), filepath.Join(work, "scratch")
	for _, d := range []string{lowerSrc, f.host, filepath.Join(upperSrc, "work"), filepath.Dir(f.lowerImg)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(lowerSrc, 0o755); err != nil {
		t.Fatal(err)
	}
	build(t, lowerSrc, l.lower)
	f.lower = mkfs(t, lowerSrc, f.lowerImg)
	if !l.noUpperDir {
		up := filepath.Join(upperSrc, writeback.UpperDir)
		if err := os.Mkdir(up, 0o755); err != nil {
			t.Fatal(err)
		}
		build(t, up, l.upper)
		root, err := f.lower.Inode(ext4.RootIno)
		if err != nil {
			t.Fatal(err)
		}
		mode := uint32(root.Mode.Perm())
		if l.upperRootMode != 0 {
			mode = l.upperRootMode
		}
		if err := os.Lchown(up, int(root.UID), int(root.GID)); err != nil {
			t.Fatal(err)
		}
		if err := unix.Chmod(up, mode); err != nil {
			t.Fatal(err)
		}
		if err := setTime(up, root.Atime, root.Mtime); err != nil {
			t.Fatal(err)
		}
	}
	f.upper = mkfs(t, upperSrc, f.upperImg)
	copyTree(t, lowerSrc, f.host)
	return f
}

// pending is the fixture as a write-back record.
func (f *fixture) pending() writeback.Pending {
	return writeback.Pending{Host: f.host, Guest: "/data", Lower: f.lowerImg, Upper: f.upperImg}
}

func (f *fixture) apply(t *testing.T) writeback.Stats {
	t.Helper()
	st, err := writeback.Apply(context.Background(), f.upper, f.lower, f.host)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return st
}

// node is what a user sees of one path on disk.
type node struct {
	Type     string
	Perm     string // octal, set-id and sticky bits included; empty for symlinks
	UID, GID int
	Content  string // a regular file's bytes, or their SHA-256 when long or binary
	Target   string // symlink target
	Dev      string // "major:minor" of a device node
	Mtime    time.Time
	Links    int // hard link count, when above 1
}

func content(b []byte) string {
	if len(b) <= 64 && utf8.Valid(b) {
		return string(b)
	}
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// snapshot maps every path under root (root itself is ".") to what is
// there. Directory mtimes are left out: writing an entry changes them.
func snapshot(t *testing.T, root string) map[string]node {
	t.Helper()
	out := map[string]node{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		n := node{UID: int(st.Uid), GID: int(st.Gid), Perm: fmt.Sprintf("%04o", st.Mode&0o7777)}
		mtime := time.Unix(st.Mtim.Unix())
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			n.Type = "dir"
			mtime = time.Time{}
		case unix.S_IFREG:
			n.Type = "file"
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			n.Content = content(b)
		case unix.S_IFLNK:
			n.Type, n.Perm = "symlink", ""
			if n.Target, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFIFO:
			n.Type = "fifo"
		case unix.S_IFCHR:
			n.Type = "chardev"
			n.Dev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFBLK:
			n.Type = "blockdev"
			n.Dev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		default:
			n.Type = fmt.Sprintf("mode %o", st.Mode)
		}
		n.Mtime = mtime
		if n.Type != "dir" && st.Nlink > 1 {
			n.Links = int(st.Nlink)
		}
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Expected nodes; UID and GID default to root.
func fileNode(data string, perm string, mtime time.Time) node {
	return node{Type: "file", Perm: perm, Content: content([]byte(data)), Mtime: mtime}
}
func dirNode(perm string) node { return node{Type: "dir", Perm: perm} }
func linkNode(target string, mtime time.Time) node {
	return node{Type: "symlink", Target: target, Mtime: mtime}
}

func checkTree(t *testing.T, root string, want map[string]node) {
	t.Helper()
	if diff := cmp.Diff(want, snapshot(t, root)); diff != "" {
		t.Errorf("host tree (-want +got):\n%s", diff)
	}
}

func mtimeOf(t *testing.T, p string) time.Time {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.ModTime()
}

func touch(t *testing.T, p string, mtime time.Time) {
	t.Helper()
	if err := setTime(p, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, p, data string, mtime time.Time) {
	t.Helper()
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	touch(t, p, mtime)
}

func randomData(n int, seed uint64) string {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed)})
	if _, err := io.ReadFull(r, b); err != nil {
		panic(err)
	}
	return string(b)
}

func TestApplyFilesAndWhiteouts(t *testing.T) {
	t.Parallel()
	big := randomData(3<<20+17, 1)
	sparse := strings.Repeat("\x00", 1<<20) + "tail"
	f := newFixture(t, layers{
		lower: []ent{
			file("keep.txt", "keep me"),
			file("mod.txt", "old content").mode(0o644),
			file("gone.txt", "delete me"),
			file("tree/a.txt", "a"),
			file("tree/sub/b.txt", "b"),
			file("tree/sub/deeper/c.txt", "c"),
			file("sub/old.txt", "old"),
			file("setid", "v1").mode(0o755),
		},
		upper: []ent{
			file("new.txt", "brand new").mode(0o600).at(t1),
			file("mod.txt", "new content, longer than the old one").mode(0o640).at(t2).owner(1000, 1001),
			whiteout("gone.txt"),
			whiteout("tree"),
			dir("sub").at(t3),
			file("sub/new.txt", "n").at(t1),
			file("setid", "v2").mode(0o4755).owner(1000, 1000).at(t1),
			file("big.bin", big).at(t1),
			file("sparse.bin", sparse).at(t1),
			file("empty", "").at(t1),
		},
	})
	st := f.apply(t)

	want := map[string]node{
		".":           dirNode("0755"),
		"keep.txt":    fileNode("keep me", "0644", t0),
		"mod.txt":     fileNode("new content, longer than the old one", "0640", t2), // the share's owner, not the guest's 1000:1001
		"new.txt":     fileNode("brand new", "0600", t1),
		"sub":         dirNode("0755"),
		"sub/old.txt": fileNode("old", "0644", t0),
		"sub/new.txt": fileNode("n", "0644", t1),
		"setid":       fileNode("v2", "0755", t1), // no set-user-ID from the guest
		"big.bin":     fileNode(big, "0644", t1),
		"sparse.bin":  fileNode(sparse, "0644", t1),
		"empty":       fileNode("", "0644", t1),
	}
	checkTree(t, f.host, want)
	if got := mtimeOf(t, filepath.Join(f.host, "sub")); !got.Equal(t3) {
		t.Errorf("mtime of sub = %v, want the guest's %v", got, t3)
	}
	// mkfs.ext4 -d stores blocks of zeros as holes: of sparse.bin only
	// its last block is data, and only that is written.
	wantStats := writeback.Stats{
		Written: 7, Deleted: 2, Dirs: 1, SetIDDropped: 1,
		Bytes: int64(len("brand new") + len("new content, longer than the old one") + 1 + 2 + len(big) + len("tail")),
	}
	if diff := cmp.Diff(wantStats, st); diff != "" {
		t.Errorf("Stats (-want +got):\n%s", diff)
	}
}

func TestApplyKeepsHostChanges(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{
			file("notes.txt", "v1"),
			file("docs/readme", "r1"),
			file("docs/guide", "g1"),
		},
		upper: []ent{
			dir("docs"),
			file("docs/guide", "g2 from the guest").at(t1),
			file("guest.txt", "from the guest").at(t1),
		},
	})
	// Edits made on the host after its image was built.
	writeFile(t, filepath.Join(f.host, "notes.txt"), "v2 edited on the host", tHost)
	writeFile(t, filepath.Join(f.host, "docs/readme"), "r2 edited on the host", tHost)
	writeFile(t, filepath.Join(f.host, "docs/host-new"), "created on the host", tHost)
	writeFile(t, filepath.Join(f.host, "host-only"), "created on the host", tHost)
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":             dirNode("0755"),
		"notes.txt":     fileNode("v2 edited on the host", "0644", tHost),
		"docs":          dirNode("0755"),
		"docs/readme":   fileNode("r2 edited on the host", "0644", tHost),
		"docs/host-new": fileNode("created on the host", "0644", tHost),
		"docs/guide":    fileNode("g2 from the guest", "0644", t1),
		"host-only":     fileNode("created on the host", "0644", tHost),
		"guest.txt":     fileNode("from the guest", "0644", t1),
	})
}

func TestApplyReplacedDirectories(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{
			file("op/a.txt", "a"),
			file("op/b.txt", "b"),
			file("op/sub/x", "x"),
			file("plain/a.txt", "a"),
			file("plain/b.txt", "b"),
		},
		upper: []ent{
			opaqueDir("op").mode(0o750).at(t2),
			file("op/c.txt", "c").at(t1),
			dir("plain").at(t2),
			file("plain/c.txt", "c").at(t1),
			// No directory at this path in the lower image: the guest
			// made it, so it replaces whatever the host has there.
			dir("fresh").at(t2),
			file("fresh/g.txt", "g").at(t1),
		},
	})
	writeFile(t, filepath.Join(f.host, "op/host-new"), "h", tHost)
	if err := os.Mkdir(filepath.Join(f.host, "fresh"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(f.host, "fresh/h.txt"), "h", tHost)
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":           dirNode("0755"),
		"op":          dirNode("0750"),
		"op/c.txt":    fileNode("c", "0644", t1),
		"plain":       dirNode("0755"),
		"plain/a.txt": fileNode("a", "0644", t0),
		"plain/b.txt": fileNode("b", "0644", t0),
		"plain/c.txt": fileNode("c", "0644", t1),
		"fresh":       dirNode("0755"),
		"fresh/g.txt": fileNode("g", "0644", t1),
	})
	for _, d := range []string{"op", "plain", "fresh"} {
		if got := mtimeOf(t, filepath.Join(f.host, d)); !got.Equal(t2) {
			t.Errorf("mtime of %s = %v, want %v", d, got, t2)
		}
	}
}

func TestApplyTypeChanges(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{
			file("d2f/x", "x"),
			file("d2f/y/z", "z"),
			file("f2d", "a file"),
			file("f2d-plain", "a file"),
		},
		upper: []ent{
			file("d2f", "now a file").mode(0o600).at(t1),
			opaqueDir("f2d").mode(0o700).at(t2),
			file("f2d/inner.txt", "inner").at(t1),
			dir("f2d-plain").at(t2),
			file("f2d-plain/inner.txt", "inner").at(t1),
		},
	})
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":                   dirNode("0755"),
		"d2f":                 fileNode("now a file", "0600", t1),
		"f2d":                 dirNode("0700"),
		"f2d/inner.txt":       fileNode("inner", "0644", t1),
		"f2d-plain":           dirNode("0755"),
		"f2d-plain/inner.txt": fileNode("inner", "0644", t1),
	})
}

func TestApplySymlinks(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("long/", 30) + "end" // too long for the inode: stored in a block
	f := newFixture(t, layers{
		lower: []ent{
			file("target.txt", "target"),
			file("was-file", "plain"),
			file("was-dir/f", "f"),
		},
		upper: []ent{
			symlink("link", "target.txt").at(t1),
			symlink("was-file", "target.txt").at(t2),
			symlink("dangling", "no/such/file").at(t1),
			symlink("abs", "/nonexistent/abs").at(t1),
			symlink("long", long).at(t3),
			symlink("was-dir", "target.txt").at(t1),
		},
	})
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":          dirNode("0755"),
		"target.txt": fileNode("target", "0644", t0),
		"link":       linkNode("target.txt", t1),
		"was-file":   linkNode("target.txt", t2),
		"dangling":   linkNode("no/such/file", t1),
		"abs":        linkNode("/nonexistent/abs", t1),
		"long":       linkNode(long, t3),
		"was-dir":    linkNode("target.txt", t1),
	})
}

func TestApplyHardLinks(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{
			file("hl/b", "old b"),
		},
		upper: []ent{
			file("hl/a", "shared").mode(0o640).at(t1),
			hardlink("hl/b", "hl/a"),
			hardlink("other/c", "hl/a"),
			file("x1", "pair").at(t2),
			hardlink("x2", "x1"),
		},
	})
	st := f.apply(t)

	shared := node{Type: "file", Perm: "0640", Content: "shared", Mtime: t1, Links: 3}
	pair := node{Type: "file", Perm: "0644", Content: "pair", Mtime: t2, Links: 2}
	checkTree(t, f.host, map[string]node{
		".":       dirNode("0755"),
		"hl":      dirNode("0755"),
		"hl/a":    shared,
		"hl/b":    shared,
		"other":   dirNode("0755"),
		"other/c": shared,
		"x1":      pair,
		"x2":      pair,
	})
	for _, group := range [][]string{{"hl/a", "hl/b", "other/c"}, {"x1", "x2"}} {
		first, err := os.Lstat(filepath.Join(f.host, group[0]))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range group[1:] {
			fi, err := os.Lstat(filepath.Join(f.host, p))
			if err != nil {
				t.Fatal(err)
			}
			if !os.SameFile(first, fi) {
				t.Errorf("%s and %s are not the same file", group[0], p)
			}
		}
	}
	if st.Links != 3 {
		t.Errorf("Stats.Links = %d, want 3", st.Links)
	}
}

func TestApplySpecialFiles(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{
			file("gone", "deleted by a whiteout"),
			file("null", "a file the guest replaced by a device"),
		},
		upper: []ent{
			fifo("pipe").mode(0o640).at(t1),
			whiteout("gone"),
			// 1:3 is /dev/null, not a whiteout (0:0).
			chardev("null", 1, 3).mode(0o640).at(t2),
			chardev("bignum", 300, 70000).at(t1),
			blockdev("blk", 7, 0).mode(0o600).at(t1),
		},
	})

	st := f.apply(t)
	// Device nodes are never written back: the host keeps what it has.
	checkTree(t, f.host, map[string]node{
		".":    dirNode("0755"),
		"pipe": {Type: "fifo", Perm: "0640", Mtime: t1},
		"null": fileNode("a file the guest replaced by a device", "0644", t0),
	})
	if st.Devices != 3 || st.Deleted != 1 || st.Written != 1 {
		t.Errorf("Stats = %+v, want 3 devices not written, 1 deleted, 1 written", st)
	}
}

func TestApplyOddNames(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("n", 255)
	longUTF8 := strings.Repeat("日", 85) // 255 bytes
	if len(longUTF8) != 255 {
		t.Fatalf("name is %d bytes", len(longUTF8))
	}
	f := newFixture(t, layers{
		lower: []ent{
			file("del\nme", "x"),
			file("tab\tname", "old"),
			file("keep me", "kept"),
		},
		upper: []ent{
			file("with space.txt", "s").at(t1),
			file("new\nline", "nl").at(t1),
			file("ünïcødé 日本.txt", "u").at(t1),
			file(long, "long").at(t1),
			file(longUTF8, "long utf-8").at(t1),
			file("sp ace/in\nside", "i").at(t1),
			symlink("link\nname", "new\nline").at(t1),
			whiteout("del\nme"),
			file("tab\tname", "new").at(t2),
			file("-dash", "d").at(t1),
		},
	})
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":               dirNode("0755"),
		"keep me":         fileNode("kept", "0644", t0),
		"with space.txt":  fileNode("s", "0644", t1),
		"new\nline":       fileNode("nl", "0644", t1),
		"ünïcødé 日本.txt":  fileNode("u", "0644", t1),
		long:              fileNode("long", "0644", t1),
		longUTF8:          fileNode("long utf-8", "0644", t1),
		"sp ace":          dirNode("0755"),
		"sp ace/in\nside": fileNode("i", "0644", t1),
		"link\nname":      linkNode("new\nline", t1),
		"tab\tname":       fileNode("new", "0644", t2),
		"-dash":           fileNode("d", "0644", t1),
	})
}

func TestApplyDirectoryAttributes(t *testing.T) {
	t.Parallel()
	lower := []ent{
		file("chmod/f", "f"),
		file("same/sub/f", "f"),
		dir("owner"),
		dir("touched"),
	}
	upper := []ent{
		dir("chmod").mode(0o700),               // mode changed, mtime as in lower
		dir("same"),                            // identical to lower
		dir("same/sub"),                        // identical to lower
		dir("owner").owner(1000, 1000),         // owner changed: not applied
		dir("touched").at(t2),                  // mtime changed
		file("touched/new", "n").at(t1),        // what changed it
		dir("fresh").mode(0o1777).owner(7, 8),  // new directory: mode and times applied, not the owner
		dir("fresh/inner").mode(0o2750).at(t3), // set-id bits on a new directory: dropped
	}
	f := newFixture(t, layers{lower: lower, upper: upper})
	// Host-side changes while the VM ran.
	for _, d := range []string{"chmod", "same", "same/sub"} {
		touch(t, filepath.Join(f.host, d), tHost)
	}
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":           dirNode("0755"),
		"chmod":       dirNode("0700"),
		"chmod/f":     fileNode("f", "0644", t0),
		"same":        dirNode("0755"),
		"same/sub":    dirNode("0755"),
		"same/sub/f":  fileNode("f", "0644", t0),
		"owner":       dirNode("0755"),
		"touched":     dirNode("0755"),
		"touched/new": fileNode("n", "0644", t1),
		"fresh":       dirNode("1777"),
		"fresh/inner": dirNode("0750"),
	})
	for d, want := range map[string]time.Time{
		"chmod":       t0, // attributes applied: the guest's mtime
		"same":        tHost,
		"same/sub":    tHost,
		"owner":       t0,
		"touched":     t2,
		"fresh":       t0,
		"fresh/inner": t3,
	} {
		if got := mtimeOf(t, filepath.Join(f.host, d)); !got.Equal(want) {
			t.Errorf("mtime of %s = %v, want %v", d, got, want)
		}
	}
}

func TestApplyRootAttributes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name     string
		rootMode uint32 // 0: as the lower root
		wantPerm string
	}{
		{"unchanged", 0, "0711"},
		{"chmod by the guest", 0o750, "0750"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, layers{
				lower:         []ent{file("f", "f")},
				upper:         []ent{},
				upperRootMode: tc.rootMode,
			})
			// The host directory's own mode differs from its image's
			// root (mkfs.ext4 -d does not copy it); only a guest change
			// may override it.
			if err := os.Chmod(f.host, 0o711); err != nil {
				t.Fatal(err)
			}
			touch(t, f.host, tHost)
			f.apply(t)
			checkTree(t, f.host, map[string]node{
				".": dirNode(tc.wantPerm),
				"f": fileNode("f", "0644", t0),
			})
			got := mtimeOf(t, f.host)
			if tc.rootMode == 0 && !got.Equal(tHost) {
				t.Errorf("mtime of the host directory = %v, want it untouched (%v)", got, tHost)
			}
			if tc.rootMode != 0 && got.Equal(tHost) {
				t.Errorf("mtime of the host directory kept %v, want the guest's", got)
			}
		})
	}
}

func TestApplyDoesNotFollowHostSymlinks(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{
		lower: []ent{
			file("file", "lower"),
			file("dir/f", "lower"),
			file("gone/f", "lower"),
		},
		upper: []ent{
			file("file", "from the guest").at(t1),
			dir("dir").mode(0o750).at(t2),
			file("dir/f", "from the guest").at(t1),
			whiteout("gone"),
		},
	})
	// While the VM ran, the host replaced each path by a symlink to a
	// directory outside the shared one.
	outside := t.TempDir()
	writeFile(t, filepath.Join(outside, "f"), "outside", tHost)
	outsideBefore := snapshot(t, outside)
	for _, p := range []string{"file", "dir", "gone"} {
		if err := os.RemoveAll(filepath.Join(f.host, p)); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, filepath.Join(f.host, p)); err != nil {
			t.Fatal(err)
		}
	}
	f.apply(t)

	checkTree(t, f.host, map[string]node{
		".":     dirNode("0755"),
		"file":  fileNode("from the guest", "0644", t1),
		"dir":   dirNode("0750"),
		"dir/f": fileNode("from the guest", "0644", t1),
	})
	if diff := cmp.Diff(outsideBefore, snapshot(t, outside)); diff != "" {
		t.Errorf("directory outside the shared one changed (-before +after):\n%s", diff)
	}
}

func TestApplyWithoutUpperDirectory(t *testing.T) {
	t.Parallel()
	f := newFixture(t, layers{lower: []ent{file("f", "f")}, noUpperDir: true})
	before := snapshot(t, f.host)
	_, err := writeback.Apply(context.Background(), f.upper, f.lower, f.host)
	if err == nil || !strings.Contains(err.Error(), "upper layer") {
		t.Fatalf("Apply = %v, want an error about the upper layer", err)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Apply = %v, want it to wrap fs.ErrNotExist", err)
	}
	if diff := cmp.Diff(before, snapshot(t, f.host)); diff != "" {
		t.Errorf("host tree changed (-before +after):\n%s", diff)
	}
}

// commitLayers is a small change set used by the Commit tests.
var commitLayers = layers{
	lower: []ent{file("keep", "k"), file("mod", "old"), file("gone", "g")},
	upper: []ent{file("mod", "new").mode(0o600).at(t1), whiteout("gone"), file("add", "a").at(t2)},
}

var commitWant = map[string]node{
	".":    dirNode("0755"),
	"keep": fileNode("k", "0644", t0),
	"mod":  fileNode("new", "0600", t1),
	"add":  fileNode("a", "0644", t2),
}

func TestCommit(t *testing.T) {
	t.Parallel()
	t.Run("clean", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, commitLayers)
		st, err := writeback.Commit(context.Background(), f.pending())
		if err != nil {
			t.Fatalf("Commit: %v", err)
		}
		checkTree(t, f.host, commitWant)
		if st.Written != 2 || st.Deleted != 1 {
			t.Errorf("Stats = %+v, want 2 written, 1 deleted", st)
		}
	})
	t.Run("journal needs recovery", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, commitLayers)
		out, err := exec.Command("debugfs", "-w", "-R", "feature needs_recovery", f.upperImg).CombinedOutput()
		if err != nil {
			t.Fatalf("debugfs: %v\n%s", err, out)
		}
		img, err := os.Open(f.upperImg)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		fi, _ := img.Stat()
		if _, err := ext4.Open(img, fi.Size()); !errors.Is(err, ext4.ErrNeedsRecovery) {
			t.Fatalf("the scratch image is not marked for recovery: ext4.Open = %v", err)
		}
		if _, err := writeback.Commit(context.Background(), f.pending()); err != nil {
			t.Fatalf("Commit: %v", err)
		}
		checkTree(t, f.host, commitWant)
		if _, err := ext4.Open(img, fi.Size()); err != nil {
			t.Errorf("scratch image after Commit: %v", err)
		}
	})
	errCases := []struct {
		name    string
		damage  func(t *testing.T, f *fixture)
		wantErr string
	}{
		{"scratch image is not ext4", func(t *testing.T, f *fixture) {
			if err := os.WriteFile(f.upperImg, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "e2fsck -f -p"},
		{"scratch image missing", func(t *testing.T, f *fixture) {
			if err := os.Remove(f.upperImg); err != nil {
				t.Fatal(err)
			}
		}, "scratch image"},
		{"directory image missing", func(t *testing.T, f *fixture) {
			if err := os.Remove(f.lowerImg); err != nil {
				t.Fatal(err)
			}
		}, "lower.img"},
		{"directory image is not ext4", func(t *testing.T, f *fixture) {
			if err := os.WriteFile(f.lowerImg, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "directory image"},
	}
	for _, tc := range errCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, commitLayers)
			tc.damage(t, f)
			before := snapshot(t, f.host)
			_, err := writeback.Commit(context.Background(), f.pending())
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Commit = %v, want an error mentioning %q", err, tc.wantErr)
			}
			if diff := cmp.Diff(before, snapshot(t, f.host)); diff != "" {
				t.Errorf("host tree changed (-before +after):\n%s", diff)
			}
		})
	}
}

func TestPendingRoundTrip(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	p := writeback.Pending{
		Host:    "/home/me/project with space",
		Guest:   "/work",
		Lower:   filepath.Join(dir, "lower.img"),
		Upper:   filepath.Join(dir, "upper.img"),
		Created: time.Date(2025, 3, 4, 5, 6, 7, 8, time.UTC),
	}
	if err := writeback.SavePending(dir, p); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, writeback.PendingFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("record mode = %v, want 0600", fi.Mode().Perm())
	}
	b, err := os.ReadFile(filepath.Join(dir, writeback.PendingFile))
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatalf("record is not JSON: %v\n%s", err, b)
	}
	if raw["host"] != p.Host || raw["guest"] != p.Guest || raw["created"] != "2025-03-04T05:06:07.000000008Z" {
		t.Errorf("record = %s", b)
	}
	got, err := writeback.LoadPending(dir)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(p, got); diff != "" {
		t.Errorf("LoadPending (-want +got):\n%s", diff)
	}
}

func TestLoadPendingErrors(t *testing.T) {
	t.Parallel()
	missing := t.TempDir()
	if _, err := writeback.LoadPending(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadPending of a directory without a record = %v, want fs.ErrNotExist", err)
	}
	bad := t.TempDir()
	if err := os.WriteFile(filepath.Join(bad, writeback.PendingFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := writeback.LoadPending(bad)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(bad, writeback.PendingFile)) {
		t.Errorf("LoadPending of a corrupt record = %v, want an error naming the file", err)
	}
}

func TestStageThenRecover(t *testing.T) {
	t.Parallel()
	f := newFixture(t, commitLayers)
	// The run's write-back directory: images and record together.
	src := filepath.Dir(f.lowerImg)
	want := writeback.Pending{Host: f.host, Guest: "/data", Lower: f.lowerImg, Upper: f.upperImg, Created: time.Unix(1_700_000_000, 0).UTC()}
	if err := writeback.SavePending(src, want); err != nil {
		t.Fatal(err)
	}
	lowerBytes, err := os.ReadFile(f.lowerImg)
	if err != nil {
		t.Fatal(err)
	}

	dst := filepath.Join(t.TempDir(), "staged", "not", "yet", "there", "run-0")
	kept, err := writeback.Stage(src, dst)
	if err != nil {
		t.Fatalf("Stage: %v", err)
	}
	if kept != dst {
		t.Errorf("Stage = %q, want %q", kept, dst)
	}
	if _, err := os.Lstat(src); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("source directory after Stage: %v, want it gone", err)
	}
	p, err := writeback.LoadPending(dst)
	if err != nil {
		t.Fatal(err)
	}
	want.Lower, want.Upper = filepath.Join(dst, "lower.img"), filepath.Join(dst, "upper.img")
	// The record identifies the host directory it was made for.
	var hst unix.Stat_t
	if err := unix.Stat(f.host, &hst); err != nil {
		t.Fatal(err)
	}
	want.HostDev, want.HostIno = uint64(hst.Dev), hst.Ino
	if diff := cmp.Diff(want, p); diff != "" {
		t.Errorf("LoadPending after Stage (-want +got):\n%s", diff)
	}
	moved, err := os.ReadFile(p.Lower)
	if err != nil {
		t.Fatal(err)
	}
	if string(moved) != string(lowerBytes) {
		t.Error("staged lower image differs from the original")
	}
	if _, err := writeback.Commit(context.Background(), p); err != nil {
		t.Fatalf("Commit of the staged images: %v", err)
	}
	checkTree(t, f.host, commitWant)
}

func TestStageOntoExistingDirectory(t *testing.T) {
	t.Parallel()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "upper.img"), []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	if err := os.WriteFile(filepath.Join(dst, "other"), []byte("other"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := writeback.Stage(src, dst); err == nil || !strings.Contains(err.Error(), src) {
		t.Fatalf("Stage onto a non-empty directory = %v, want an error naming %s", err, src)
	}
	if b, err := os.ReadFile(filepath.Join(src, "upper.img")); err != nil || string(b) != "data" {
		t.Errorf("source after a failed Stage: %q, %v", b, err)
	}
	if b, err := os.ReadFile(filepath.Join(dst, "other")); err != nil || string(b) != "other" {
		t.Errorf("destination after a failed Stage: %q, %v", b, err)
	}
}

func TestStatsString(t *testing.T) {
	for _, tc := range []struct {
		st   writeback.Stats
		want string
	}{
		{writeback.Stats{Written: 3, Bytes: 42, Deleted: 2, Dirs: 1, Links: 4},
			"3 written (42 bytes), 2 deleted, 1 directories, 4 hard links"},
		{writeback.Stats{Written: 1, Devices: 2, Sockets: 1, SetIDDropped: 3},
			"1 written (0 bytes), 0 deleted, 0 directories, 0 hard links; not written back: 2 device nodes, 1 sockets; set-id bits dropped on 3"},
	} {
		if got := tc.st.String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
	}
}

// Modes wider than the umask allows (0666 fifos) arrive
// intact: the mode is set after creation.
func TestApplySpecialFileModesIgnoreUmask(t *testing.T) {
	old := unix.Umask(0o022)
	defer unix.Umask(old)
	f := newFixture(t, layers{
		upper: []ent{
			fifo("pipe").mode(0o666).at(t1),
		},
	})
	f.apply(t)
	checkTree(t, f.host, map[string]node{
		".":    dirNode("0755"),
		"pipe": {Type: "fifo", Perm: "0666", Mtime: t1},
	})
}

// A directory the guest only wrote into, which the host deleted during the
// run, comes back with the guest's attributes, not the 0700 it is created
// with.
func TestApplyRecreatesHostDeletedDirectory(t *testing.T) {
	f := newFixture(t, layers{
		lower: []ent{dir("d"), file("d/old", "x")},
		upper: []ent{dir("d"), file("d/new", "n").at(t1)},
	})
	if err := os.RemoveAll(filepath.Join(f.host, "d")); err != nil {
		t.Fatal(err)
	}
	f.apply(t)
	checkTree(t, f.host, map[string]node{
		".":     dirNode("0755"),
		"d":     dirNode("0755"),
		"d/new": fileNode("n", "0644", t1),
	})
}
