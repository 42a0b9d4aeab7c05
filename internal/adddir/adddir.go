// Package adddir parses and validates the -d/--add-dir HOST:GUEST[:ro|rw]
// specs of mvmctl exec, so that a typo or a missing directory is reported
// before a VM is booted rather than surfacing as a failed mount inside it.
package adddir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// Mode says whether the guest may write to a shared directory. The zero
// value is ReadOnly so that forgetting to set it never grants write access.
type Mode int

const (
	// ReadOnly shares the host directory without letting the guest modify
	// it; it is the default because exec'd commands are untrusted.
	ReadOnly Mode = iota
	// ReadWrite lets the guest modify the host directory, for commands
	// whose output must survive the throwaway VM.
	ReadWrite
)

// String returns the spelling used in specs ("ro" or "rw"), so a Mode can
// be printed back in the same form the user typed it.
func (m Mode) String() string {
	switch m {
	case ReadOnly:
		return "ro"
	case ReadWrite:
		return "rw"
	default:
		return fmt.Sprintf("Mode(%d)", int(m))
	}
}

// Spec is one parsed --add-dir value. Raw is kept so that errors found
// later (for example by Resolve) can name the spec exactly as it was typed.
type Spec struct {
	Raw   string
	Host  string
	Guest string
	Mode  Mode
}

// reservedGuestDirs are guest directories the VM itself relies on; a share
// mounted on, under or above one of them would hide what the VM needs.
var reservedGuestDirs = []string{"/proc", "/sys", "/dev", "/run/mvm"}

// Parser parses and resolves specs. It exists so the home directory used
// for "~" expansion can be substituted, e.g. in tests; the zero value uses
// os.UserHomeDir.
type Parser struct {
	// HomeDir returns the directory that a leading "~" in a host path
	// stands for. Nil means os.UserHomeDir.
	HomeDir func() (string, error)
}

// Parse parses one spec with the real home directory. It checks syntax
// only; use Resolve to also check the host filesystem and conflicts
// between specs.
func Parse(spec string) (Spec, error) {
	return Parser{}.Parse(spec)
}

// Resolve parses and checks a whole --add-dir list with the real home
// directory; see Parser.Resolve for the checks.
func Resolve(specs []string) ([]Spec, error) {
	return Parser{}.Resolve(specs)
}

// Parse parses one HOST:GUEST[:ro|rw] spec. The host is everything before
// the first ':'; a trailing ":ro" or ":rw" selects the mode, and any other
// ':' belongs to the guest path, so guest paths may contain colons. A
// short alphanumeric suffix that is neither "ro" nor "rw" is rejected as a
// mistyped mode rather than silently becoming part of the guest path. A
// host of "~" or starting with "~/" is expanded to the home directory. No
// filesystem access happens beyond looking up the home directory.
func (p Parser) Parse(spec string) (Spec, error) {
	host, rest, found := strings.Cut(spec, ":")
	if !found {
		return Spec{}, fmt.Errorf("--add-dir %q: expected HOST:GUEST[:ro|rw], missing ':'", spec)
	}
	if host == "" {
		return Spec{}, fmt.Errorf("--add-dir %q: host path must not be empty", spec)
	}

	guest, mode := rest, ReadOnly
	if i := strings.LastIndexByte(rest, ':'); i >= 0 {
		switch tail := rest[i+1:]; {
		case tail == "ro":
			guest = rest[:i]
		case tail == "rw":
			guest, mode = rest[:i], ReadWrite
		case looksLikeMode(tail):
			return Spec{}, fmt.Errorf("--add-dir %q: unknown mode %q (expected ro or rw)", spec, tail)
		}
	}
	if guest == "" {
		return Spec{}, fmt.Errorf("--add-dir %q: guest path must not be empty", spec)
	}
	if !strings.HasPrefix(guest, "/") {
		return Spec{}, fmt.Errorf("--add-dir %q: guest path must be absolute (start with '/')", spec)
	}

	if host == "~" || strings.HasPrefix(host, "~/") {
		home, err := p.homeDir()
		if err != nil {
			return Spec{}, fmt.Errorf("--add-dir %q: expand '~': %w", spec, err)
		}
		if home == "" {
			return Spec{}, fmt.Errorf("--add-dir %q: expand '~': home directory is unknown", spec)
		}
		if host == "~" {
			host = home
		} else {
			host = strings.TrimRight(home, "/") + host[1:]
		}
	}
	return Spec{Raw: spec, Host: host, Guest: guest, Mode: mode}, nil
}

// looksLikeMode reports whether the text after the last ':' is more likely
// a mistyped mode than part of a path: short, non-empty, ASCII letters and
// digits only.
func looksLikeMode(s string) bool {
	if s == "" || len(s) > 8 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}

func (p Parser) homeDir() (string, error) {
	if p.HomeDir != nil {
		return p.HomeDir()
	}
	return os.UserHomeDir()
}

// Resolve parses every spec and checks the list as Check does, reporting
// the first bad spec in order, whether its syntax or its meaning is wrong.
func (p Parser) Resolve(specs []string) ([]Spec, error) {
	c := checker{out: make([]Spec, 0, len(specs))}
	for _, raw := range specs {
		s, err := p.Parse(raw)
		if err != nil {
			return nil, err
		}
		if err := c.add(s); err != nil {
			return nil, err
		}
	}
	return c.out, nil
}

// Check checks parsed specs against the host filesystem and against each
// other, in order, returning an *Error for the first bad spec. In the
// result each Host is absolute and cleaned and each Guest is cleaned. A
// spec is rejected when:
//   - its host path does not exist or is not a directory (symlinks are
//     followed);
//   - its guest path is not absolute, is "/", or is, contains or lies
//     under one of the directories the VM needs (/proc, /sys, /dev,
//     /run/mvm);
//   - its guest path equals an earlier spec's, since only one can be
//     mounted there;
//   - its guest path is nested inside an earlier spec's or vice versa,
//     since the result would then depend on mount order;
//   - its host directory is the same as an earlier spec's, or inside it,
//     or contains it, whatever the modes (see overlap).
//
// An empty list yields an empty, non-nil slice.
func Check(specs []Spec) ([]Spec, error) {
	c := checker{out: make([]Spec, 0, len(specs))}
	for _, s := range specs {
		if err := c.add(s); err != nil {
			return nil, err
		}
	}
	return c.out, nil
}

// Error is a spec that cannot be shared. It names specs by their place in
// the list checked, so that each front end can name them its own way (a
// flag as typed, a field of a request); Error() is the command line's.
type Error struct {
	// Index is the bad spec's place in the list, Other that of the
	// earlier spec it conflicts with, or -1.
	Index, Other int
	// Err is what is wrong, without naming the spec itself; Link is the
	// word that joins it to the other spec ("from", "by").
	Err  error
	Link string
	// Hint says what to do, or is empty.
	Hint string

	raw, otherRaw string
}

func (e *Error) Error() string {
	s := "--add-dir " + strconv.Quote(e.raw) + ": " + e.Err.Error()
	if e.Other >= 0 {
		s += " " + e.Link + " --add-dir " + strconv.Quote(e.otherRaw)
	}
	if e.Hint != "" {
		s += "; " + e.Hint
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// checker accumulates the specs accepted so far, which later ones are
// checked against.
type checker struct {
	out []Spec
	ids []hostID // of out's host directories
}

func (c *checker) add(s Spec) error {
	if s.Raw == "" {
		s.Raw = s.Host + ":" + s.Guest + ":" + s.Mode.String()
	}
	fail := func(other int, link, hint string, format string, args ...any) error {
		e := &Error{Index: len(c.out), Other: other, Err: fmt.Errorf(format, args...), Link: link, Hint: hint, raw: s.Raw}
		if other >= 0 {
			e.otherRaw = c.out[other].Raw
		}
		return e
	}
	if !strings.HasPrefix(s.Guest, "/") {
		return fail(-1, "", "", "guest path must be absolute (start with '/')")
	}
	host, err := filepath.Abs(s.Host)
	if err != nil {
		return fail(-1, "", "", "host path %q: %w", s.Host, err)
	}
	s.Host = host
	fi, err := os.Stat(host)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fail(-1, "", "", "host path %q: no such directory", host)
	case err != nil:
		return fail(-1, "", "", "host path %q: %w", host, err)
	case !fi.IsDir():
		return fail(-1, "", "", "host path %q is not a directory", host)
	}

	s.Guest = path.Clean(s.Guest)
	if isReserved(s.Guest) {
		return fail(-1, "", "", "guest path %q is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)", s.Guest)
	}

	for i, prev := range c.out {
		switch {
		case prev.Guest == s.Guest:
			return fail(i, "by", "", "guest path %q is already used", s.Guest)
		case within(s.Guest, prev.Guest):
			return fail(i, "from", "", "guest path %q is nested inside %q", s.Guest, prev.Guest)
		case within(prev.Guest, s.Guest):
			return fail(i, "from", "", "guest path %q contains %q", s.Guest, prev.Guest)
		}
	}
	id, err := identify(host)
	if err != nil {
		return fail(-1, "", "", "host path %q: %w", host, err)
	}
	const overlap = "shared host directories must not overlap"
	for i, prev := range c.out {
		switch c.ids[i].relation(id) {
		case same:
			return fail(i, "from", "share it once", "host path %q is the same directory as %q", host, prev.Host)
		case contains:
			return fail(i, "from", overlap, "host path %q is inside %q", host, prev.Host)
		case inside:
			return fail(i, "from", overlap, "host path %q contains %q", host, prev.Host)
		}
	}
	c.out, c.ids = append(c.out, s), append(c.ids, id)
	return nil
}

// fileID is what makes a directory the same directory, whatever path
// reaches it (symlinks, bind mounts, a second mount of one filesystem).
type fileID struct{ dev, ino uint64 }

// hostID identifies a host directory and all its ancestors.
type hostID struct {
	self fileID
	// up holds the IDs of the directory's ancestors, from its parent to
	// "/", after symlinks are resolved.
	up []fileID
}

type relation int

const (
	disjoint relation = iota
	same              // the same directory
	contains          // the receiver is an ancestor of the argument
	inside            // the receiver lies under the argument
)

// relation tells how directory h relates to directory o.
func (h hostID) relation(o hostID) relation {
	switch {
	case h.self == o.self:
		return same
	case slices.Contains(o.up, h.self):
		return contains
	case slices.Contains(h.up, o.self):
		return inside
	}
	return disjoint
}

// identify returns the IDs of dir and of each of its ancestors. Two shares
// must not overlap: with one inside another, the guest could replace a
// subdirectory of the outer share with a symlink and the inner share's
// write-back would then follow it out of both, and even read-only, a file
// would be seen through two mounts that do not see each other's changes.
// Comparing paths is not enough: symlinks and bind mounts give one
// directory many names, so the check compares device and inode numbers of
// the directory and of every ancestor of its resolved path. What it cannot
// see is a bind mount of a subdirectory of one share placed outside it
// (the mount's ancestors are the mount point's, not the source's).
func identify(dir string) (hostID, error) {
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return hostID{}, err
	}
	var h hostID
	for p := resolved; ; p = filepath.Dir(p) {
		id, err := statID(p)
		if err != nil {
			return hostID{}, err
		}
		if p == resolved {
			h.self = id
		} else {
			h.up = append(h.up, id)
		}
		if p == filepath.Dir(p) {
			return h, nil
		}
	}
}

func statID(p string) (fileID, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return fileID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, fmt.Errorf("stat %s: no device and inode numbers", p)
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// isReserved reports whether mounting at the cleaned guest path g would
// cover "/" or one of reservedGuestDirs, or hide one by mounting above it.
func isReserved(g string) bool {
	if g == "/" {
		return true
	}
	for _, r := range reservedGuestDirs {
		if g == r || within(g, r) || within(r, g) {
			return true
		}
	}
	return false
}

// within reports whether the cleaned path child lies strictly below the
// cleaned path parent.
func within(child, parent string) bool {
	return strings.HasPrefix(child, parent+"/")
}
