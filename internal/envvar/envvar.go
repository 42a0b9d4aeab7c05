// Package envvar parses and merges environment variables for the guest
// command. Names are checked here, on the host, before any VM boots; values
// travel to the guest as data and reach the command byte for byte (no
// shell ever sees them).
package envvar

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Var is one variable.
type Var struct{ Name, Value string }

var (
	// ErrBadName is the class of errors for a name ValidName refuses.
	ErrBadName = errors.New("invalid variable name")
	// ErrNUL is the class of errors for a value with a NUL byte, which
	// execve cannot pass: the command would see it cut short.
	ErrNUL = errors.New("contains a NUL byte")
)

// ValidName reports whether name matches [A-Za-z_][A-Za-z0-9_]*, the
// names a POSIX shell and env(1) accept: anything else could not be read
// back as $NAME, and a name with '=' would change the value's meaning.
func ValidName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c == '_', 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// Validate checks the name and that the value has no NUL byte. Lengths
// are checked with the rest of the command (internal/execreq).
func (v Var) Validate() error {
	if !ValidName(v.Name) {
		return fmt.Errorf("%w %s (must match [A-Za-z_][A-Za-z0-9_]*)", ErrBadName, quote(v.Name))
	}
	if strings.IndexByte(v.Value, 0) >= 0 {
		return fmt.Errorf("value %w", ErrNUL)
	}
	return nil
}

// ParseFlags parses -e/--env values in order. KEY=VALUE sets KEY to
// everything after the first '=' (the value may be empty or contain '=').
// A bare KEY copies the host's value, as docker run -e does, and is skipped
// when the host has no such variable.
func ParseFlags(specs []string, lookup func(string) (string, bool)) ([]Var, error) {
	var out []Var
	for _, s := range specs {
		name, value, hasValue := strings.Cut(s, "=")
		if !ValidName(name) {
			return nil, fmt.Errorf("invalid --env %s: %w %s (must match [A-Za-z_][A-Za-z0-9_]*)", quote(s), ErrBadName, quote(name))
		}
		if !hasValue {
			v, ok := lookup(name)
			if !ok {
				continue
			}
			value = v
		}
		v := Var{Name: name, Value: value}
		if err := v.Validate(); err != nil {
			return nil, fmt.Errorf("invalid --env %s: %w", quote(name), err)
		}
		out = append(out, v)
	}
	return out, nil
}

// FromMap returns the map's variables sorted by name, so the order sent
// to the guest does not depend on map iteration.
func FromMap(m map[string]string) []Var {
	out := make([]Var, 0, len(m))
	for k, v := range m {
		out = append(out, Var{Name: k, Value: v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Merge concatenates layers from lowest to highest precedence and keeps
// the last value of each name, at the position of its first appearance.
func Merge(layers ...[]Var) []Var {
	idx := map[string]int{}
	var out []Var
	for _, layer := range layers {
		for _, v := range layer {
			if i, ok := idx[v.Name]; ok {
				out[i].Value = v.Value
				continue
			}
			idx[v.Name] = len(out)
			out = append(out, v)
		}
	}
	return out
}

// Strings is vars as NAME=VALUE strings, the SDK's shape of an
// environment.
func Strings(vars []Var) []string {
	out := make([]string, len(vars))
	for i, v := range vars {
		out[i] = v.Name + "=" + v.Value
	}
	return out
}

// quote quotes s for a one-line message, cut short when long.
func quote(s string) string {
	if len(s) > 64 {
		return fmt.Sprintf("%q...", s[:64])
	}
	return fmt.Sprintf("%q", s)
}
