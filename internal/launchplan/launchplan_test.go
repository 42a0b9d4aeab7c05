package launchplan

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
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
			want: Entrypoint{Command: []string{"python", "-m", "hello"}, Env: map[string]string{}},
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
				Env:        map[string]string{"PORT": "8080", "LOG_LEVEL": "info"},
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
				Env:     map[string]string{"X": "from-entrypoint", "Y": "kept"},
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
			want: Entrypoint{Command: []string{"true"}, Env: map[string]string{}},
		},
		{
			name: "empty string values and empty env objects",
			doc:  `{"apps":[{"entrypoint":{"command":["sh","-c",""],"env":{"EMPTY":""}},"env":{}}]}`,
			want: Entrypoint{Command: []string{"sh", "-c", ""}, Env: map[string]string{"EMPTY": ""}},
		},
		{
			name: "null fields count as absent",
			doc:  `{"entrypoint":null,"apps":[{"entrypoint":{"command":["x"],"working_dir":null,"env":null},"env":null}]}`,
			want: Entrypoint{Command: []string{"x"}, Env: map[string]string{}},
		},
		{
			name: "env names with underscores and digits",
			doc:  `{"apps":[{"entrypoint":{"command":["x"]},"env":{"_A1":"1","a_b_2":"2","Z":"3"}}]}`,
			want: Entrypoint{Command: []string{"x"}, Env: map[string]string{"_A1": "1", "a_b_2": "2", "Z": "3"}},
		},
		{
			name: "compiled shape",
			doc:  `{"version":"0","entrypoint":{"command":["/bin/app","--flag"],"working_dir":"/srv"}}`,
			want: Entrypoint{Command: []string{"/bin/app", "--flag"}, WorkingDir: "/srv", Env: map[string]string{}},
		},
		{
			name: "compiled shape env precedence",
			doc: `{
				"entrypoint":{"command":["run"],"env":{"X":"from-entrypoint"}},
				"env":{"X":"from-top","Y":"kept"}
			}`,
			want: Entrypoint{
				Command: []string{"run"},
				Env:     map[string]string{"X": "from-entrypoint", "Y": "kept"},
			},
		},
		{
			name: "compiled shape with null apps",
			doc:  `{"apps":null,"entrypoint":{"command":["run"]}}`,
			want: Entrypoint{Command: []string{"run"}, Env: map[string]string{}},
		},
		{
			name: "app shape ignores top-level env",
			doc:  `{"env":{"TOP":"1"},"apps":[{"entrypoint":{"command":["run"]}}]}`,
			want: Entrypoint{Command: []string{"run"}, Env: map[string]string{}},
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
			want: Entrypoint{Command: []string{"python", "-m", "hello"}, WorkingDir: "/app", Env: map[string]string{"A": "1"}},
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
	})
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
