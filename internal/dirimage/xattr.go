package dirimage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Extended attributes go into the image as mke2fs puts them: in the inode
// when they fit after its 32 extra bytes, else in one attribute block.
// POSIX ACLs are converted to ext4's own, shorter encoding, as the kernel
// stores them.

// xattr is one attribute, its name split into ext4's namespace index and
// the rest.
type xattr struct {
	index uint8
	name  string
	value []byte
}

const (
	xattrMagic     = 0xEA020000
	xattrUser      = 1
	xattrACLAccess = 2
	xattrACLDflt   = 3
	xattrTrusted   = 4
	xattrSecurity  = 6
	// ibodySpace is what a 256-byte inode has after its extra fields:
	// the magic number, then entries and values.
	ibodySpace  = inodeSize - 128 - extraIsize
	compatXattr = 0x8
)

// readXattrs returns the attributes of path (not following a symlink),
// sorted as ext4 keeps them. A filesystem without attributes has none.
func readXattrs(path string) ([]xattr, error) {
	size, err := unix.Llistxattr(path, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, fmt.Errorf("list attributes of %s: %w", path, err)
	}
	if size == 0 {
		return nil, nil
	}
	list := make([]byte, size)
	if size, err = unix.Llistxattr(path, list); err != nil {
		return nil, fmt.Errorf("list attributes of %s: %w", path, err)
	}
	var out []xattr
	for _, full := range strings.Split(strings.TrimRight(string(list[:size]), "\x00"), "\x00") {
		if full == "" {
			// An empty list: overlayfs sizes its list with the names
			// it then hides (trusted.overlay.*).
			continue
		}
		value, err := getxattr(path, full)
		if errors.Is(err, unix.ENODATA) {
			continue // removed since the list
		}
		if err != nil {
			return nil, fmt.Errorf("read attribute %s of %s: %w", full, path, err)
		}
		x, err := diskXattr(full, value)
		if err != nil {
			return nil, fmt.Errorf("attribute %s of %s: %w", full, path, err)
		}
		out = append(out, x)
	}
	sortXattrs(out)
	return out, nil
}

// sortXattrs puts attributes in the order ext4 keeps them: by namespace
// index, then name length, then name.
func sortXattrs(xs []xattr) {
	slices.SortFunc(xs, func(a, b xattr) int {
		if a.index != b.index {
			return int(a.index) - int(b.index)
		}
		if len(a.name) != len(b.name) {
			return len(a.name) - len(b.name)
		}
		return strings.Compare(a.name, b.name)
	})
}

// SupportedXattr reports whether an extended attribute of this full name
// can go into an image: the user, trusted and security namespaces and
// POSIX ACLs (what ext4 stores).
func SupportedXattr(name string) bool {
	switch {
	case name == "system.posix_acl_access", name == "system.posix_acl_default":
		return true
	case strings.HasPrefix(name, "user."), strings.HasPrefix(name, "trusted."), strings.HasPrefix(name, "security."):
		return len(name) > strings.IndexByte(name, '.')+1
	}
	return false
}

func getxattr(path, name string) ([]byte, error) {
	for size := 256; ; {
		buf := make([]byte, size)
		n, err := unix.Lgetxattr(path, name, buf)
		if errors.Is(err, unix.ERANGE) {
			if size, err = unix.Lgetxattr(path, name, nil); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}

// diskXattr maps a full attribute name to ext4's namespace index and
// converts the value of an ACL.
func diskXattr(full string, value []byte) (xattr, error) {
	switch full {
	case "system.posix_acl_access", "system.posix_acl_default":
		idx := uint8(xattrACLAccess)
		if full == "system.posix_acl_default" {
			idx = xattrACLDflt
		}
		v, err := diskACL(value)
		return xattr{index: idx, value: v}, err
	}
	for prefix, idx := range map[string]uint8{"user.": xattrUser, "trusted.": xattrTrusted, "security.": xattrSecurity} {
		if name, ok := strings.CutPrefix(full, prefix); ok {
			if len(name) > maxName {
				return xattr{}, errors.New("name too long")
			}
			return xattr{index: idx, name: name, value: value}, nil
		}
	}
	return xattr{}, errors.New("namespace not supported by ext4")
}

// diskACL converts an ACL from the form the system calls use (version 2,
// 8-byte entries) to ext4's (version 1; the id only where it means
// something).
func diskACL(v []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(v) < 4 || (len(v)-4)%8 != 0 || le.Uint32(v) != 2 {
		return nil, errors.New("malformed ACL")
	}
	out := le.AppendUint32(nil, 1)
	for e := v[4:]; len(e) > 0; e = e[8:] {
		tag := le.Uint16(e)
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, le.Uint16(e[2:]))
		switch tag {
		case 0x01, 0x04, 0x10, 0x20: // user, group (owning), mask, other
		case 0x02, 0x08: // a named user or group
			out = le.AppendUint32(out, le.Uint32(e[4:]))
		default:
			return nil, fmt.Errorf("ACL entry tag %#x", tag)
		}
	}
	return out, nil
}

func pad4(n int) int { return (n + 3) &^ 3 }

// xattrHash is ext4's hash of one entry: its name, then its value in
// little-endian words.
func xattrHash(x xattr) uint32 {
	var h uint32
	for i := 0; i < len(x.name); i++ {
		h = h<<5 ^ h>>27 ^ uint32(x.name[i])
	}
	v := make([]byte, pad4(len(x.value)))
	copy(v, x.value)
	for i := 0; i < len(v); i += 4 {
		h = h<<16 ^ h>>16 ^ binary.LittleEndian.Uint32(v[i:])
	}
	return h
}

// packXattrs lays out entries from the start of region and values from
// its end; valueBase is where value offsets count from. It reports false
// when they do not fit (with the four zero bytes that end the entries).
func packXattrs(region []byte, xs []xattr, entriesAt, valueBase int) bool {
	le := binary.LittleEndian
	need := entriesAt + 4
	for _, x := range xs {
		need += 16 + pad4(len(x.name)) + pad4(len(x.value))
	}
	if need > len(region) {
		return false
	}
	off, end := entriesAt, len(region)
	for _, x := range xs {
		end -= pad4(len(x.value))
		copy(region[end:], x.value)
		e := region[off:]
		e[0] = byte(len(x.name))
		e[1] = x.index
		le.PutUint16(e[2:], uint16(end-valueBase))
		le.PutUint32(e[8:], uint32(len(x.value)))
		le.PutUint32(e[12:], xattrHash(x))
		copy(e[16:], x.name)
		off += 16 + pad4(len(x.name))
	}
	return true
}

// inodeXattrs puts the attributes in the inode's spare bytes (rec[160:]),
// if they fit.
func inodeXattrs(rec []byte, xs []xattr) bool {
	body := rec[128+extraIsize:]
	if !packXattrs(body[4:], xs, 0, 0) {
		return false
	}
	binary.LittleEndian.PutUint32(body, xattrMagic)
	return true
}

// xattrBlock returns an attribute block holding xs, or an error when they
// do not fit in one.
func xattrBlock(xs []xattr) ([]byte, error) {
	b := make([]byte, blockSize)
	if !packXattrs(b, xs, 32, 0) {
		return nil, errors.New("extended attributes larger than one block")
	}
	le := binary.LittleEndian
	le.PutUint32(b[0:], xattrMagic)
	le.PutUint32(b[4:], 1) // references
	le.PutUint32(b[8:], 1) // blocks
	var h uint32
	for _, x := range xs {
		eh := xattrHash(x)
		if eh == 0 { // as the kernel: no block hash then
			h = 0
			break
		}
		h = h<<16 ^ h>>16 ^ eh
	}
	le.PutUint32(b[12:], h)
	return b, nil
}
