package launchplan

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/envvar"
	"github.com/mvm-sh/mvm/internal/execreq"
)

const src = "launch.json"

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		want    Entrypoint
		wantErr string // exact message; empty means success
	}{
		{
			name: "minimal app",
			doc:  `{"apps":[{"name":"hello","entrypoint":{"command":["python","-m","hello"]}}]}`,
			want: Entrypoint{Command: []string{"python", "-m", "hello"}, Env: []envvar.Var{}},
		},
		{
			name: "with working_dir and env",
			doc: `{"apps":[{
				"name":"web",
				"entrypoint":{"command":["./server"],"working_dir":"/app","env":{"PORT":"8080"}},
				"env":{"LOG_LEVEL":"info"}
			}]}`,
			want: Entrypoint{
				Command:    []string{"./server"},
				WorkingDir: "/app",
				Env:        []envvar.Var{{Name: "LOG_LEVEL", Value: "info"}, {Name: "PORT", Value: "8080"}},
			},
		},
		{
			name: "entrypoint env overrides app env",
			doc: `{"apps":[{
				"entrypoint":{"command":["run"],"env":{"X":"from-entrypoint"}},
				"env":{"X":"from-app","Y":"kept"}
			}]}`,
			want: Entrypoint{
				Command: []string{"run"},
				Env:     []envvar.Var{{Name: "X", Value: "from-entrypoint"}, {Name: "Y", Value: "kept"}},
			},
		},
		{
			name: "unknown fields ignored",
			doc: `{
				"version":"0",
				"workload":{"name":"w","anything":[1,2,3]},
				"future_field":{"nested":true},
				"apps":[{"name":"a","image":"x","entrypoint":{"command":["true"],"user":"root"},"ports":[80]}]
			}`,
			want: Entrypoint{Command: []string{"true"}, Env: []envvar.Var{}},
		},
		{
			name: "empty string values and empty env objects",
			doc:  `{"apps":[{"entrypoint":{"command":["sh","-c",""],"env":{"EMPTY":""}},"env":{}}]}`,
			want: Entrypoint{Command: []string{"sh", "-c", ""}, Env: []envvar.Var{{Name: "EMPTY", Value: ""}}},
		},
		{
			name: "null fields count as absent",
			doc:  `{"entrypoint":null,"apps":[{"entrypoint":{"command":["x"],"working_dir":null,"env":null},"env":null}]}`,
			want: Entrypoint{Command: []string{"x"}, Env: []envvar.Var{}},
		},
		{
			name: "env names with underscores and digits",
			doc:  `{"apps":[{"entrypoint":{"command":["x"]},"env":{"_A1":"1","a_b_2":"2","Z":"3"}}]}`,
			want: Entrypoint{Command: []string{"x"}, Env: []envvar.Var{{Name: "Z", Value: "3"}, {Name: "_A1", Value: "1"}, {Name: "a_b_2", Value: "2"}}},
		},
		{
			name: "compiled shape",
			doc:  `{"version":"0","entrypoint":{"command":["/bin/app","--flag"],"working_dir":"/srv"}}`,
			want: Entrypoint{Command: []string{"/bin/app", "--flag"}, WorkingDir: "/srv", Env: []envvar.Var{}},
		},
		{
			name: "compiled shape env precedence",
			doc: `{
				"entrypoint":{"command":["run"],"env":{"X":"from-entrypoint"}},
				"env":{"X":"from-top","Y":"kept"}
			}`,
			want: Entrypoint{
				Command: []string{"run"},
				Env:     []envvar.Var{{Name: "X", Value: "from-entrypoint"}, {Name: "Y", Value: "kept"}},
			},
		},
		{
			name: "compiled shape with null apps",
			doc:  `{"apps":null,"entrypoint":{"command":["run"]}}`,
			want: Entrypoint{Command: []string{"run"}, Env: []envvar.Var{}},
		},
		{
			name: "app shape ignores top-level env",
			doc:  `{"env":{"TOP":"1"},"apps":[{"entrypoint":{"command":["run"]}}]}`,
			want: Entrypoint{Command: []string{"run"}, Env: []envvar.Var{}},
		},

		{
			name:    "no apps",
			doc:     `{"apps":[]}`,
			wantErr: `launch plan "launch.json" has no apps[] entries`,
		},
		{
			name:    "no apps key and no entrypoint",
			doc:     `{"version":"0"}`,
			wantErr: `launch plan "launch.json" has no apps[] entries`,
		},
		{
			name:    "empty object",
			doc:     `{}`,
			wantErr: `launch plan "launch.json" has no apps[] entries`,
		},
		{
			name: "multi app",
			doc: `{"apps":[
				{"name":"a","entrypoint":{"command":["a"]}},
				{"name":"b","entrypoint":{"command":["b"]}}
			]}`,
			wantErr: `launch plan "launch.json" has 2 apps (a, b); mvmctl exec runs single-app workloads only`,
		},
		{
			name:    "multi app with unnamed",
			doc:     `{"apps":[{"name":"a"},{},{"name":""},{"name":7},"junk"]}`,
			wantErr: `launch plan "launch.json" has 5 apps (a, <unnamed>, <unnamed>, <unnamed>, <unnamed>); mvmctl exec runs single-app workloads only`,
		},
		{
			name:    "both shapes",
			doc:     `{"apps":[{"entrypoint":{"command":["a"]}}],"entrypoint":{"command":["b"]}}`,
			wantErr: `launch plan "launch.json" mixes apps[] with a top-level entrypoint; use one shape`,
		},
		{
			name:    "both shapes with empty apps",
			doc:     `{"apps":[],"entrypoint":{"command":["b"]}}`,
			wantErr: `launch plan "launch.json" mixes apps[] with a top-level entrypoint; use one shape`,
		},
		{
			name:    "app without entrypoint",
			doc:     `{"apps":[{"name":"a"}]}`,
			wantErr: `launch plan "launch.json": apps[0] has no entrypoint`,
		},
		{
			name:    "app entrypoint not an object",
			doc:     `{"apps":[{"entrypoint":["a"]}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint must be an object, got array`,
		},
		{
			name:    "compiled entrypoint not an object",
			doc:     `{"entrypoint":"run"}`,
			wantErr: `launch plan "launch.json": entrypoint must be an object, got string`,
		},
		{
			name:    "apps not an array",
			doc:     `{"apps":{"name":"a"}}`,
			wantErr: `launch plan "launch.json": apps must be an array, got object`,
		},
		{
			name:    "app not an object",
			doc:     `{"apps":["a"]}`,
			wantErr: `launch plan "launch.json": apps[0] must be an object, got string`,
		},
		{
			name:    "empty command",
			doc:     `{"apps":[{"entrypoint":{"command":[]}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.command must be non-empty`,
		},
		{
			name:    "missing command",
			doc:     `{"apps":[{"entrypoint":{}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.command must be non-empty`,
		},
		{
			name:    "null command",
			doc:     `{"entrypoint":{"command":null}}`,
			wantErr: `launch plan "launch.json": entrypoint.command must be non-empty`,
		},
		{
			name:    "command is a string",
			doc:     `{"entrypoint":{"command":"python -m hello"}}`,
			wantErr: `launch plan "launch.json": entrypoint.command must be an array of strings, got string`,
		},
		{
			name:    "command element not a string",
			doc:     `{"apps":[{"entrypoint":{"command":["sleep",5]}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.command[1] must be a string, got number`,
		},
		{
			name:    "command element null",
			doc:     `{"entrypoint":{"command":["a",null]}}`,
			wantErr: `launch plan "launch.json": entrypoint.command[1] must be a string, got null`,
		},
		{
			name:    "empty program name",
			doc:     `{"entrypoint":{"command":["","x"]}}`,
			wantErr: `launch plan "launch.json": entrypoint.command[0] must not be empty`,
		},
		{
			name:    "relative working_dir",
			doc:     `{"apps":[{"entrypoint":{"command":["x"],"working_dir":"app"}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.working_dir "app" must be an absolute path`,
		},
		{
			name:    "empty working_dir",
			doc:     `{"entrypoint":{"command":["x"],"working_dir":""}}`,
			wantErr: `launch plan "launch.json": entrypoint.working_dir "" must be an absolute path`,
		},
		{
			name:    "working_dir not a string",
			doc:     `{"entrypoint":{"command":["x"],"working_dir":true}}`,
			wantErr: `launch plan "launch.json": entrypoint.working_dir must be a string, got boolean`,
		},
		{
			name:    "bad env key in app env",
			doc:     `{"apps":[{"entrypoint":{"command":["x"]},"env":{"GOOD":"1","BAD-KEY":"2"}}]}`,
			wantErr: `launch plan "launch.json": apps[0].env: invalid variable name "BAD-KEY" (must match [A-Za-z_][A-Za-z0-9_]*)`,
		},
		{
			name:    "env key starting with digit in entrypoint env",
			doc:     `{"apps":[{"entrypoint":{"command":["x"],"env":{"1X":"a"}}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.env: invalid variable name "1X" (must match [A-Za-z_][A-Za-z0-9_]*)`,
		},
		{
			name:    "empty env key in top-level env",
			doc:     `{"entrypoint":{"command":["x"]},"env":{"":"a"}}`,
			wantErr: `launch plan "launch.json": env: invalid variable name "" (must match [A-Za-z_][A-Za-z0-9_]*)`,
		},
		{
			name:    "env key with equals sign",
			doc:     `{"entrypoint":{"command":["x"],"env":{"A=B":"a"}}}`,
			wantErr: `launch plan "launch.json": entrypoint.env: invalid variable name "A=B" (must match [A-Za-z_][A-Za-z0-9_]*)`,
		},
		{
			name:    "first bad env key in sorted order",
			doc:     `{"entrypoint":{"command":["x"],"env":{"b-2":"a","a-1":"b"}}}`,
			wantErr: `launch plan "launch.json": entrypoint.env: invalid variable name "a-1" (must match [A-Za-z_][A-Za-z0-9_]*)`,
		},
		{
			name:    "env value is a number",
			doc:     `{"apps":[{"entrypoint":{"command":["x"],"env":{"PORT":8080}}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.env: value of "PORT" must be a string, got number`,
		},
		{
			name:    "env value is null",
			doc:     `{"apps":[{"entrypoint":{"command":["x"]},"env":{"X":null}}]}`,
			wantErr: `launch plan "launch.json": apps[0].env: value of "X" must be a string, got null`,
		},
		{
			name:    "env not an object",
			doc:     `{"apps":[{"entrypoint":{"command":["x"]},"env":["A=1"]}]}`,
			wantErr: `launch plan "launch.json": apps[0].env must be an object, got array`,
		},
		{
			name:    "NUL in a command argument",
			doc:     `{"apps":[{"entrypoint":{"command":["sh","-c","echo a\u0000b"]}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.command[2] contains a NUL byte`,
		},
		{
			name:    "NUL in the program name",
			doc:     `{"entrypoint":{"command":["\u0000"]}}`,
			wantErr: `launch plan "launch.json": entrypoint.command[0] contains a NUL byte`,
		},
		{
			name:    "NUL in an env value",
			doc:     `{"apps":[{"entrypoint":{"command":["x"],"env":{"A":"1\u00002"}}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.env: value of "A" contains a NUL byte`,
		},
		{
			name:    "NUL in an app env value",
			doc:     `{"apps":[{"entrypoint":{"command":["x"]},"env":{"A":"\u0000"}}]}`,
			wantErr: `launch plan "launch.json": apps[0].env: value of "A" contains a NUL byte`,
		},
		{
			name:    "NUL in an env name",
			doc:     `{"entrypoint":{"command":["x"],"env":{"A\u0000B":"1"}}}`,
			wantErr: `launch plan "launch.json": entrypoint.env: invalid variable name "A\x00B" (must match [A-Za-z_][A-Za-z0-9_]*)`,
		},
		{
			name:    "NUL in working_dir",
			doc:     `{"apps":[{"entrypoint":{"command":["x"],"working_dir":"/srv\u0000/app"}}]}`,
			wantErr: `launch plan "launch.json": apps[0].entrypoint.working_dir "/srv\x00/app" contains a NUL byte`,
		},
		{
			name:    "argument over MAX_ARG_STRLEN",
			doc:     `{"entrypoint":{"command":["echo","` + strings.Repeat("a", execreq.MaxString+1) + `"]}}`,
			wantErr: `launch plan "launch.json": entrypoint.command[1] is too long: 131072 bytes, the limit is 131071`,
		},
		{
			name: "argument at MAX_ARG_STRLEN",
			doc:  `{"entrypoint":{"command":["echo","` + strings.Repeat("a", execreq.MaxString) + `"]}}`,
			want: Entrypoint{Command: []string{"echo", strings.Repeat("a", execreq.MaxString)}, Env: []envvar.Var{}},
		},
		{
			name:    "env string over MAX_ARG_STRLEN",
			doc:     `{"entrypoint":{"command":["x"],"env":{"AB":"` + strings.Repeat("v", execreq.MaxString-2) + `"}}}`,
			wantErr: `launch plan "launch.json": entrypoint.env: "AB" is too long: NAME=VALUE is 131072 bytes, the limit is 131071`,
		},
		{
			name:    "working_dir over PATH_MAX",
			doc:     `{"entrypoint":{"command":["x"],"working_dir":"/` + strings.Repeat("d", execreq.MaxDir) + `"}}`,
			wantErr: `launch plan "launch.json": entrypoint.working_dir "/` + strings.Repeat("d", 63) + `"... is too long: 4096 bytes, the limit is 4095`,
		},
		{
			name:    "command and env over the total",
			doc:     `{"entrypoint":{"command":["x","` + strings.Repeat("a", 100000) + `"],"env":` + bigEnv(7, 100000) + `}}`,
			wantErr: `launch plan "launch.json": command and environment are too long: 800103 bytes, the limit is 786432 (each string counts its length plus 9)`,
		},
		{
			name:    "invalid JSON",
			doc:     `{"apps":[`,
			wantErr: `parse launch plan "launch.json": invalid JSON: unexpected end of JSON input`,
		},
		{
			name:    "trailing data",
			doc:     `{"apps":[]} {}`,
			wantErr: `parse launch plan "launch.json": invalid JSON: invalid character '{' after top-level value`,
		},
		{
			name:    "empty document",
			doc:     ``,
			wantErr: `parse launch plan "launch.json": invalid JSON: unexpected end of JSON input`,
		},
		{
			name:    "top level is an array",
			doc:     `[{"entrypoint":{"command":["x"]}}]`,
			wantErr: `parse launch plan "launch.json": top level must be a JSON object, got array`,
		},
		{
			name:    "top level is null",
			doc:     `null`,
			wantErr: `parse launch plan "launch.json": top level must be a JSON object, got null`,
		},
		{
			name:    "top level is a string",
			doc:     `"hello"`,
			wantErr: `parse launch plan "launch.json": top level must be a JSON object, got string`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.doc), src)
			if diff := cmp.Diff(tt.wantErr, errString(err)); diff != "" {
				t.Fatalf("Parse error mismatch (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Parse mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "launch.json")
	if err := os.WriteFile(good, []byte(`{"apps":[{"name":"hello","entrypoint":{"command":["python","-m","hello"],"working_dir":"/app"},"env":{"A":"1"}}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`not json`), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.json")

	tests := []struct {
		name    string
		path    string
		want    Entrypoint
		wantErr string // substring; empty means success
		wantIs  error
	}{
		{
			name: "reads a real file",
			path: good,
			want: Entrypoint{Command: []string{"python", "-m", "hello"}, WorkingDir: "/app", Env: []envvar.Var{{Name: "A", Value: "1"}}},
		},
		{
			name:    "missing file",
			path:    missing,
			wantErr: "read launch plan " + strconv.Quote(missing) + ": ",
			wantIs:  fs.ErrNotExist,
		},
		{
			name:    "directory",
			path:    dir,
			wantErr: "read launch plan " + strconv.Quote(dir) + ": ",
		},
		{
			name:    "invalid JSON names the file",
			path:    bad,
			wantErr: "parse launch plan " + strconv.Quote(bad) + ": invalid JSON: ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Load(tt.path)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Load(%q) error = %v, want it to contain %q", tt.path, err, tt.wantErr)
				}
				if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Errorf("Load(%q) error = %v, want it to wrap %v", tt.path, err, tt.wantIs)
				}
			} else if err != nil {
				t.Fatalf("Load(%q) unexpected error: %v", tt.path, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Load(%q) mismatch (-want +got):\n%s", tt.path, diff)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		`{"apps":[{"name":"a","entrypoint":{"command":["x"],"working_dir":"/w","env":{"A":"1"}},"env":{"B":"2"}}]}`,
		`{"entrypoint":{"command":["x"]},"env":{"A":"1"}}`,
		`{"apps":[{},{}]}`,
		`[]`,
		`{`,
		`{"entrypoint":{"command":["a\u0000"],"working_dir":"/\u0000","env":{"A":"\u0000"}}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ep, err := Parse(data, src)
		if err != nil {
			if !strings.Contains(err.Error(), strconv.Quote(src)) {
				t.Errorf("error %q does not name the source", err)
			}
			return
		}
		if len(ep.Command) == 0 || ep.Command[0] == "" || ep.Env == nil {
			t.Errorf("Parse accepted %q as %+v", data, ep)
		}
		if ep.WorkingDir != "" && !strings.HasPrefix(ep.WorkingDir, "/") {
			t.Errorf("Parse accepted relative working dir %q", ep.WorkingDir)
		}
		// Whatever Parse accepts, the guest can run.
		if err := (mvm.Cmd{Argv: ep.Command, Env: envvar.Strings(ep.Env), Dir: ep.WorkingDir}).Validate(); err != nil {
			t.Errorf("Parse accepted %q, which the SDK refuses: %v", data, err)
		}
	})
}

// bigEnv returns a JSON env object of n variables V0..Vn-1, each value
// size bytes long.
func bigEnv(n, size int) string {
	var parts []string
	for i := range n {
		parts = append(parts, fmt.Sprintf("%q:%q", fmt.Sprintf("V%d", i), strings.Repeat("v", size)))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
