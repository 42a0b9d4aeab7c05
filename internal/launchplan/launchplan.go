// Package launchplan reads the entrypoint out of an mvmforge launch.json
// (Workload IR v0) for mvmctl exec --launch-plan, so that a plan that
// mvmctl exec cannot run is rejected with a clear message before a VM is
// booted.
package launchplan

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/execreq"
)

// Entrypoint is what mvmctl exec needs from a launch plan to start the
// workload: the argv, the directory to run it in and its environment.
// Everything in it has passed internal/execreq's checks (no NUL bytes,
// lengths the guest can execute), so a plan the guest could not run fails
// here, before a VM boots.
type Entrypoint struct {
	// Command is the argv; it always has at least one element and the
	// first is never empty.
	Command []string
	// WorkingDir is an absolute guest path, or "" when the plan does not
	// set one.
	WorkingDir string
	// Env is the app-level environment overridden by the entrypoint's own,
	// so the more specific setting wins, sorted by name. It is never nil.
	Env []envvar.Var
}

// Load reads and parses the launch plan at path. It exists so callers get
// errors that name the file whether reading or parsing failed.
func Load(path string) (Entrypoint, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Entrypoint{}, fmt.Errorf("read launch plan %q: %w", path, err)
	}
	return Parse(data, path)
}

// Parse extracts the entrypoint from a launch plan document. source names
// the document in errors (normally its file name). Two shapes are
// accepted: the app shape, with exactly one element in "apps" carrying an
// "entrypoint" and optional "env", and the compiled shape, with a
// top-level "entrypoint" and optional top-level "env". Fields this package
// does not use are ignored so newer plans keep working, and a JSON null
// counts as an absent field.
func Parse(data []byte, source string) (Entrypoint, error) {
	var doc any
	if err := json.Unmarshal(data, &doc); err != nil {
		return Entrypoint{}, fmt.Errorf("parse launch plan %q: invalid JSON: %w", source, err)
	}
	top, ok := doc.(map[string]any)
	if !ok {
		return Entrypoint{}, fmt.Errorf("parse launch plan %q: top level must be a JSON object, got %s", source, jsonType(doc))
	}

	apps, hasApps := present(top, "apps")
	ep, hasEntrypoint := present(top, "entrypoint")
	switch {
	case hasApps && hasEntrypoint:
		return Entrypoint{}, fmt.Errorf("launch plan %q mixes apps[] with a top-level entrypoint; use one shape", source)
	case hasEntrypoint:
		return parseEntrypoint(source, "entrypoint", ep, top, "env")
	case !hasApps:
		return Entrypoint{}, fmt.Errorf("launch plan %q has no apps[] entries", source)
	}

	list, ok := apps.([]any)
	if !ok {
		return Entrypoint{}, fmt.Errorf("launch plan %q: apps must be an array, got %s", source, jsonType(apps))
	}
	switch len(list) {
	case 0:
		return Entrypoint{}, fmt.Errorf("launch plan %q has no apps[] entries", source)
	case 1:
	default:
		names := make([]string, len(list))
		for i, a := range list {
			names[i] = "<unnamed>"
			if obj, ok := a.(map[string]any); ok {
				if n, ok := obj["name"].(string); ok && n != "" {
					names[i] = n
				}
			}
		}
		return Entrypoint{}, fmt.Errorf("launch plan %q has %d apps (%s); mvmctl exec runs single-app workloads only",
			source, len(list), strings.Join(names, ", "))
	}

	app, ok := list[0].(map[string]any)
	if !ok {
		return Entrypoint{}, fmt.Errorf("launch plan %q: apps[0] must be an object, got %s", source, jsonType(list[0]))
	}
	ep, ok = present(app, "entrypoint")
	if !ok {
		return Entrypoint{}, fmt.Errorf("launch plan %q: apps[0] has no entrypoint", source)
	}
	return parseEntrypoint(source, "apps[0].entrypoint", ep, app, "apps[0].env")
}

// parseEntrypoint validates the entrypoint object ep found at location
// where, and merges into its environment the "env" of parent, which is
// reported as parentEnvWhere.
func parseEntrypoint(source, where string, ep any, parent map[string]any, parentEnvWhere string) (Entrypoint, error) {
	obj, ok := ep.(map[string]any)
	if !ok {
		return Entrypoint{}, fmt.Errorf("launch plan %q: %s must be an object, got %s", source, where, jsonType(ep))
	}

	var out Entrypoint
	cmd, _ := present(obj, "command")
	args, ok := cmd.([]any)
	if cmd != nil && !ok {
		return Entrypoint{}, fmt.Errorf("launch plan %q: %s.command must be an array of strings, got %s", source, where, jsonType(cmd))
	}
	if len(args) == 0 {
		return Entrypoint{}, fmt.Errorf("launch plan %q: %s.command must be non-empty", source, where)
	}
	out.Command = make([]string, len(args))
	for i, a := range args {
		s, ok := a.(string)
		if !ok {
			return Entrypoint{}, fmt.Errorf("launch plan %q: %s.command[%d] must be a string, got %s", source, where, i, jsonType(a))
		}
		if err := execreq.Arg(s); err != nil {
			return Entrypoint{}, fmt.Errorf("launch plan %q: %s.command[%d] %w", source, where, i, err)
		}
		out.Command[i] = s
	}
	if out.Command[0] == "" {
		return Entrypoint{}, fmt.Errorf("launch plan %q: %s.command[0] must not be empty", source, where)
	}

	if wd, ok := present(obj, "working_dir"); ok {
		s, ok := wd.(string)
		if !ok {
			return Entrypoint{}, fmt.Errorf("launch plan %q: %s.working_dir must be a string, got %s", source, where, jsonType(wd))
		}
		err := execreq.Dir(s)
		if s == "" {
			err = execreq.ErrNotAbsolute
		}
		if err != nil {
			return Entrypoint{}, fmt.Errorf("launch plan %q: %s.working_dir %s %w", source, where, execreq.Quote(s), err)
		}
		out.WorkingDir = s
	}

	env := map[string]string{}
	if err := mergeEnv(env, source, parentEnvWhere, parent); err != nil {
		return Entrypoint{}, err
	}
	if err := mergeEnv(env, source, where+".env", obj); err != nil {
		return Entrypoint{}, err
	}
	out.Env = envvar.FromMap(env)
	if err := execreq.Total(out.Command, out.Env); err != nil {
		return Entrypoint{}, fmt.Errorf("launch plan %q: %w", source, err)
	}
	return out, nil
}

// mergeEnv validates the "env" object of holder, reported as where, and
// copies it into dst, overwriting existing keys. Keys are checked in
// sorted order so the same bad document always gives the same error.
func mergeEnv(dst map[string]string, source, where string, holder map[string]any) error {
	v, ok := present(holder, "env")
	if !ok {
		return nil
	}
	env, ok := v.(map[string]any)
	if !ok {
		return fmt.Errorf("launch plan %q: %s must be an object, got %s", source, where, jsonType(v))
	}
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := (envvar.Var{Name: k}).Validate(); err != nil {
			return fmt.Errorf("launch plan %q: %s: %w", source, where, err)
		}
		s, ok := env[k].(string)
		if !ok {
			return fmt.Errorf("launch plan %q: %s: value of %s must be a string, got %s", source, where, execreq.Quote(k), jsonType(env[k]))
		}
		if err := execreq.Env(envvar.Var{Name: k, Value: s}); err != nil {
			if errors.Is(err, execreq.ErrNUL) {
				return fmt.Errorf("launch plan %q: %s: value of %s %w", source, where, execreq.Quote(k), execreq.ErrNUL)
			}
			return fmt.Errorf("launch plan %q: %s: %s %w", source, where, execreq.Quote(k), err)
		}
		dst[k] = s
	}
	return nil
}

// present returns obj[key] and whether it is there and not null.
func present(obj map[string]any, key string) (any, bool) {
	v, ok := obj[key]
	return v, ok && v != nil
}

// jsonType names the JSON type of a decoded value for error messages.
func jsonType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case float64:
		return "number"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	default:
		return fmt.Sprintf("%T", v)
	}
}
