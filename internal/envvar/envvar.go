// Package envvar parses and merges environment variables for the guest
// command. Names are checked here, on the host, before any VM boots; values
// travel to the guest as data and reach the command byte for byte (no
// shell ever sees them).
package envvar

import (
	"fmt"
	"regexp"
	"sort"
)

// Var is one variable.
type Var struct{ Name, Value string }

var nameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ValidName reports whether name is a portable environment variable name.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// ParseFlags parses -e/--env values in order. KEY=VALUE sets KEY to
// everything after the first '=' (the value may be empty or contain '=').
// A bare KEY copies the host's value, as docker run -e does, and is skipped
// when the host has no such variable.
func ParseFlags(specs []string, lookup func(string) (string, bool)) ([]Var, error) {
	var out []Var
	for _, s := range specs {
		name, value, hasValue := cut(s)
		if !ValidName(name) {
			return nil, fmt.Errorf("invalid --env %q: name %q must match [A-Za-z_][A-Za-z0-9_]*", s, name)
		}
		if !hasValue {
			v, ok := lookup(name)
			if !ok {
				continue
			}
			value = v
		}
		if containsNUL(value) {
			return nil, fmt.Errorf("invalid --env %q: value contains a NUL byte", name)
		}
		out = append(out, Var{Name: name, Value: value})
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

func cut(s string) (name, value string, ok bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == '=' {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

func containsNUL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return true
		}
	}
	return false
}
