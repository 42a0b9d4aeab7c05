package agent

import (
	"slices"

	"golang.org/x/sys/unix"
)

// identity is who a command runs as: its uid, gid, supplementary groups
// and home directory.
type identity struct {
	uid, gid uint32
	groups   []uint32
	home     string
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
