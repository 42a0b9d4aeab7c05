package agent

import (
	"bytes"
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// identity is who a command runs as: its uid, gid, supplementary groups
// and home directory.
type identity struct {
	uid, gid uint32
	groups   []uint32
	home     string
	// explicit: the request named a user, so the credentials are set
	// (setgroups included) rather than inherited from the agent.
	explicit bool
}

// rootIdentity is the default: root, as on the agent's own root.
var rootIdentity = &identity{home: "/root"}

// mayExecute reports whether id may execute a file with attributes st, by
// the kernel's rules: root needs one execute bit; anyone else the owner's,
// the group's or the others' bit, whichever class id falls into first.
func (id *identity) mayExecute(st *unix.Stat_t) bool {
	mode := st.Mode
	switch {
	case id.uid == 0:
		return mode&0o111 != 0
	case st.Uid == id.uid:
		return mode&0o100 != 0
	case st.Gid == id.gid || slices.Contains(id.groups, st.Gid):
		return mode&0o010 != 0
	}
	return mode&0o001 != 0
}

// mayEnter reports whether id may search every directory on the way to
// dir inside root, by the same rules (a directory's execute bit is its
// search bit). Root may enter any directory. A directory that cannot be
// looked up does not count against id: the caller only uses a "no" to
// explain a failure the kernel reported.
func (id *identity) mayEnter(root *fsRoot, dir string) bool {
	if id.uid == 0 {
		return true
	}
	p := "/"
	for _, part := range strings.Split(path.Clean("/"+dir), "/") {
		p = path.Join(p, part)
		st, err := root.stat(p)
		if err != nil {
			return true
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR && !id.mayExecute(&st) {
			return false
		}
	}
	return true
}

// errUser marks a user or group that cannot be resolved (a start failure
// with REASON_USER).
var errUser = errors.New("unknown user")

// Limits on what the agent reads of an image's account files. Real ones
// are kilobytes; anything near these is not an account database.
const (
	maxAccountFile = 4 << 20
	// maxGroups is the kernel's NGROUPS_MAX.
	maxGroups = 65536
)

// account files, inside the command root.
const (
	passwdPath = "/etc/passwd"
	groupPath  = "/etc/group"
)

// resolveUser turns an Exec.user spec into an identity, with docker's
// rules: "user[:group]", each a name or a number; a name must exist in the
// root's /etc/passwd (or /etc/group), a number need not (it is used as
// is, with gid 0 and home / when the user has no entry). Without a group,
// the user's primary group from passwd applies and every group that lists
// the user joins as a supplementary group; with one, that group alone.
// An empty spec is root, whose home comes from passwd when it is there.
func resolveUser(root *fsRoot, spec string) (*identity, error) {
	if spec == "" {
		id := &identity{home: "/root"}
		if pw, err := readAccounts(root, passwdPath); err == nil {
			if e, ok := findPasswd(pw, "", 0, true); ok && e.home != "" {
				id.home = e.home
			}
		}
		return id, nil
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if userPart == "" || hasGroup && groupPart == "" {
		return nil, fmt.Errorf("%w: %q is not user[:group]", errUser, spec)
	}
	pw, pwErr := readAccounts(root, passwdPath)
	uid, numeric := parseID(userPart)
	id := &identity{uid: uid, home: "/", explicit: true}
	if numeric && uid == 0 {
		id.home = "/root"
	}
	name := ""
	if e, ok := findPasswd(pw, userPart, uid, numeric); ok {
		name, id.uid, id.gid = e.name, e.uid, e.gid
		if e.home != "" {
			id.home = e.home
		}
	} else if !numeric {
		if pwErr != nil {
			return nil, fmt.Errorf("%w: user %q: %v", errUser, userPart, pwErr)
		}
		return nil, fmt.Errorf("%w: user %q: no such user in %s", errUser, userPart, passwdPath)
	}

	gr, grErr := readAccounts(root, groupPath)
	if hasGroup {
		gid, numeric := parseID(groupPart)
		if e, ok := findGroup(gr, groupPart, gid, numeric); ok {
			gid = e.gid
		} else if !numeric {
			if grErr != nil {
				return nil, fmt.Errorf("%w: group %q: %v", errUser, groupPart, grErr)
			}
			return nil, fmt.Errorf("%w: group %q: no such group in %s", errUser, groupPart, groupPath)
		}
		id.gid = gid
		id.groups = []uint32{gid}
		return id, nil
	}
	id.groups = []uint32{id.gid}
	if name != "" {
		for _, g := range memberOf(gr, name) {
			if !slices.Contains(id.groups, g) {
				id.groups = append(id.groups, g)
			}
		}
	}
	if len(id.groups) > maxGroups {
		return nil, fmt.Errorf("%w: user %q is in %d groups, more than the kernel's %d", errUser, userPart, len(id.groups), maxGroups)
	}
	return id, nil
}

// readAccounts reads an account file of the root. A missing file is no
// entries.
func readAccounts(root *fsRoot, p string) ([]byte, error) {
	b, err := root.readFile(p, maxAccountFile)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%s does not exist", p)
		}
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return b, nil
}

// parseID parses a numeric uid or gid: decimal, no sign, below
// 4294967295 (which is (uid_t)-1, "no change" to the kernel).
func parseID(s string) (uint32, bool) {
	if s == "" || s[0] < '0' || s[0] > '9' {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 1<<32-1 {
		return 0, false
	}
	return uint32(n), true
}

// passwdEntry is the part of an /etc/passwd line the agent uses.
type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

// groupEntry is the part of an /etc/group line the agent uses.
type groupEntry struct {
	name string
	gid  uint32
}

// accountLines calls fn with the fields of each entry line of an account
// file: blank lines, comments and NIS compat entries ("+", "-") are
// skipped, and lines with fewer than minFields fields or an empty name are
// ignored, as is a line whose numeric fields do not parse. The first
// entry wins, as with the C library's files backend; fn returns true to
// stop.
func accountLines(b []byte, minFields int, fn func(fields []string) bool) {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(line) == 0 || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		fields := strings.Split(string(line), ":")
		if len(fields) < minFields || fields[0] == "" {
			continue
		}
		if fn(fields) {
			return
		}
	}
}

// findPasswd finds the first passwd entry named name, or (when byID) with
// uid id.
func findPasswd(b []byte, name string, id uint32, byID bool) (passwdEntry, bool) {
	var found passwdEntry
	ok := false
	accountLines(b, 4, func(f []string) bool {
		uid, okU := parseID(f[2])
		gid, okG := parseID(f[3])
		if !okU || !okG {
			return false
		}
		if byID && uid == id || !byID && f[0] == name {
			found = passwdEntry{name: f[0], uid: uid, gid: gid}
			if len(f) > 5 {
				found.home = f[5]
			}
			ok = true
			return true
		}
		return false
	})
	return found, ok
}

// findGroup finds the first group entry named name, or (when byID) with
// gid id.
func findGroup(b []byte, name string, id uint32, byID bool) (groupEntry, bool) {
	var found groupEntry
	ok := false
	accountLines(b, 3, func(f []string) bool {
		gid, okG := parseID(f[2])
		if !okG {
			return false
		}
		if byID && gid == id || !byID && f[0] == name {
			found, ok = groupEntry{name: f[0], gid: gid}, true
			return true
		}
		return false
	})
	return found, ok
}

// memberOf lists the gids of the groups whose member list names user, in
// file order.
func memberOf(b []byte, user string) []uint32 {
	var out []uint32
	accountLines(b, 4, func(f []string) bool {
		gid, okG := parseID(f[2])
		if okG && f[3] != "" && slices.Contains(strings.Split(f[3], ","), user) {
			out = append(out, gid)
		}
		return false
	})
	return out
}
