package template

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mvm-sh/mvm/internal/hostdeps"
	"github.com/mvm-sh/mvm/internal/oci"
)

// Debian is a Debian userland bootstrapped with mmdebstrap: the minbase
// variant (essential packages and apt) plus Packages.
type Debian struct {
	Suite    string   // "bookworm", "trixie", "stable", "sid", ...
	Packages []string // extra packages
	// Mirror is the archive to install from (default DefaultMirror).
	Mirror string
}

// DefaultMirror is Debian's own redirector.
const DefaultMirror = "http://deb.debian.org/debian"

// DebianPath is the PATH Debian gives root (/etc/login.defs, and its
// container images).
const DebianPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

var (
	suiteRE   = regexp.MustCompile(`^[a-z][a-z0-9-]{0,40}$`)
	packageRE = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]{0,99}(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$`)
)

// ErrDebian is wrapped by errors of a Debian bootstrap: bad suite,
// package or mirror, mmdebstrap missing or failing.
var ErrDebian = errors.New("debian bootstrap")

func (d Debian) check() (Debian, error) {
	if !suiteRE.MatchString(d.Suite) {
		return d, fmt.Errorf("%w: suite %q: want a name such as bookworm or stable", ErrDebian, d.Suite)
	}
	for _, p := range d.Packages {
		if !packageRE.MatchString(p) {
			return d, fmt.Errorf("%w: %q is not a Debian package name", ErrDebian, p)
		}
	}
	if d.Mirror == "" {
		d.Mirror = DefaultMirror
	}
	u, err := url.Parse(d.Mirror)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file") || strings.ContainsAny(d.Mirror, " \t\n") {
		return d, fmt.Errorf("%w: mirror %q: want an http://, https:// or file:// URL", ErrDebian, d.Mirror)
	}
	d.Packages = slices.Clone(d.Packages)
	slices.Sort(d.Packages)
	d.Packages = slices.Compact(d.Packages)
	return d, nil
}

// DebianDeps are the host packages a Debian bootstrap needs.
func DebianDeps() []hostdeps.Dep {
	deps := []hostdeps.Dep{
		hostdeps.Program("mmdebstrap", "mmdebstrap"),
		hostdeps.File("/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring"),
	}
	if os.Geteuid() != 0 {
		deps = append(deps, hostdeps.Program("newuidmap", "uidmap"))
	}
	return deps
}

// mode is mmdebstrap's --mode: root as root; otherwise unshare, which
// needs unprivileged user namespaces and subordinate ids.
func debianMode() (string, error) {
	if os.Geteuid() == 0 {
		return "root", nil
	}
	u := os.Getenv("USER")
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		b, err := os.ReadFile(f)
		if err != nil || !hasSubIDs(string(b), u, os.Getuid()) {
			return "", fmt.Errorf("%w: without root, mmdebstrap needs subordinate ids for %s in %s (e.g. the line %s:100000:65536; see subuid(5)), or run as root", ErrDebian, u, f, u)
		}
	}
	return "unshare", nil
}

func hasSubIDs(file, user string, uid int) bool {
	for line := range strings.SplitSeq(file, "\n") {
		f := strings.Split(line, ":")
		if len(f) == 3 && (f[0] == user || f[0] == fmt.Sprint(uid)) {
			return true
		}
	}
	return false
}

// cacheKey names a bootstrap in DebianCache.
func (d Debian) cacheKey() string {
	h := sha256.Sum256([]byte(strings.Join([]string{"minbase", d.Suite, strings.Join(d.Packages, ","), d.Mirror}, "\n")))
	return "debian-" + d.Suite + "-" + hex.EncodeToString(h[:8])
}

// debianImage bootstraps (or finds in DebianCache) a Debian userland and
// converts its tarball.
func (s *Store) debianImage(ctx context.Context, w *work, d Debian, o Options) (*Template, *flock, error) {
	d, err := d.check()
	if err != nil {
		return nil, nil, err
	}
	t := &Template{
		Source: Source{Kind: "debian", Ref: d.Suite, Packages: d.Packages, Mirror: d.Mirror},
		Config: Config{Env: []string{DebianPath}, User: "root", WorkingDir: "/", Cmd: []string{"bash"}},
	}
	tarball, sum, err := s.debianTarball(ctx, w, d, o)
	if err != nil {
		return nil, nil, err
	}
	var k string
	if sum != "" {
		k = "debian-tar:" + sum + ":" + converter
		if e, l := s.lookup(k); l != nil {
			o.emit(Event{Step: "reuse", Detail: "bootstrap converted before: " + short(e.Image)})
			t.Digest, t.Rootfs = e.Image, File{Digest: e.Image, Size: e.Size}
			return t, l, nil
		}
	}
	l, err := s.convert(ctx, w, "debian "+d.Suite, o, func(f *oci.Flattener) error {
		in, err := os.Open(tarball)
		if err != nil {
			return err
		}
		defer in.Close()
		return f.Tar(ctx, bufio.NewReaderSize(in, 1<<20))
	}, t)
	if err != nil {
		return nil, nil, err
	}
	if k != "" {
		s.remember(k, t.Digest, t.Rootfs.Size)
	}
	return t, l, nil
}

// debianTarball runs mmdebstrap into a tarball in w, or takes the one
// DebianCache has; with the cache, it also returns the tarball's SHA-256.
func (s *Store) debianTarball(ctx context.Context, w *work, d Debian, o Options) (path, sum string, err error) {
	var cached string
	if s.DebianCache != "" {
		cached = filepath.Join(s.DebianCache, d.cacheKey()+".tar")
		if b, err := os.ReadFile(cached + ".sha256"); err == nil && exists(cached) {
			o.emit(Event{Step: "bootstrap", Detail: "using the cached bootstrap " + cached})
			return cached, strings.TrimSpace(string(b)), nil
		}
	}
	if err := hostdeps.Check("--from-debian", DebianDeps()...); err != nil {
		return "", "", fmt.Errorf("%w: %w", ErrDebian, err)
	}
	mode, err := debianMode()
	if err != nil {
		return "", "", err
	}
	out := filepath.Join(w.dir, "debian.tar")
	args := []string{"--variant=minbase", "--mode=" + mode, "--format=tar"}
	if len(d.Packages) > 0 {
		args = append(args, "--include="+strings.Join(d.Packages, ","))
	}
	args = append(args, "--", d.Suite, out, d.Mirror)
	o.emit(Event{Step: "bootstrap", Detail: "mmdebstrap " + strings.Join(args, " ")})
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return "", "", err
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return "", "", fmt.Errorf("%w: mmdebstrap: %w", ErrDebian, err)
	}
	var last, lastErr string
	sc := bufio.NewScanner(stderr)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		last = line
		if strings.HasPrefix(line, "E:") {
			lastErr = line
		}
		o.emit(Event{Step: "bootstrap", Detail: line})
	}
	io.Copy(io.Discard, stderr)
	if err := cmd.Wait(); err != nil {
		if ctx.Err() != nil {
			return "", "", ctx.Err()
		}
		why := lastErr
		if why == "" {
			why = last
		}
		return "", "", fmt.Errorf("%w: mmdebstrap %s failed (%w): %s", ErrDebian, d.Suite, err, why)
	}
	if cached == "" {
		return out, "", nil
	}
	return keepBootstrap(out, cached)
}

// keepBootstrap moves a fresh bootstrap into the cache, with its SHA-256
// beside it (written last: a tarball without it is not taken).
func keepBootstrap(out, cached string) (string, string, error) {
	if err := os.MkdirAll(filepath.Dir(cached), 0o755); err != nil {
		return "", "", err
	}
	f, err := os.Open(out)
	if err != nil {
		return "", "", err
	}
	h := sha256.New()
	_, err = io.Copy(h, f)
	f.Close()
	if err != nil {
		return "", "", err
	}
	sum := "sha256:" + hex.EncodeToString(h.Sum(nil))
	tmp := cached + fmt.Sprintf(".tmp-%d", os.Getpid())
	if err := os.Rename(out, tmp); err != nil {
		if err := copyFile(out, tmp); err != nil {
			return "", "", err
		}
	}
	if err := os.Rename(tmp, cached); err != nil {
		return "", "", err
	}
	if err := writeFileAtomic(cached+".sha256", []byte(sum+"\n")); err != nil {
		return "", "", err
	}
	return cached, sum, nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
