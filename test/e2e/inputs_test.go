package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestInputsCheckedBeforeBoot: input the guest could never run (NUL bytes,
// arguments and environments over the limits execve and the agent
// protocol set) and shares that overlap on the host are refused up front,
// from the command line and from a launch plan alike: exit 125, one line
// that says what and where, in well under a second, with no VM started and
// no run directory made.
func TestInputsCheckedBeforeBoot(t *testing.T) {
	dir := t.TempDir()
	plan := func(name string, entrypoint map[string]any, appEnv map[string]string) string {
		doc := map[string]any{"apps": []any{map[string]any{"name": "app", "entrypoint": entrypoint, "env": appEnv}}}
		b, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name+".json")
		writeFile(t, p, string(b), 0o644)
		return p
	}
	nulCommand := plan("nul-command", map[string]any{"command": []string{"sh", "-c", "echo a\x00b"}}, nil)
	nulEnv := plan("nul-env", map[string]any{"command": []string{"true"}, "env": map[string]string{"SECRET": "x\x00y"}}, nil)
	nulAppEnv := plan("nul-app-env", map[string]any{"command": []string{"true"}}, map[string]string{"A": "\x00"})
	nulEnvName := plan("nul-env-name", map[string]any{"command": []string{"true"}, "env": map[string]string{"A\x00B": "1"}}, nil)
	nulDir := plan("nul-dir", map[string]any{"command": []string{"true"}, "working_dir": "/srv\x00/etc"}, nil)
	relDir := plan("rel-dir", map[string]any{"command": []string{"true"}, "working_dir": "srv"}, nil)
	longArg := plan("long-arg", map[string]any{"command": []string{"echo", strings.Repeat("a", 131072)}}, nil)
	longEnv := plan("long-env", map[string]any{"command": []string{"true"}, "env": map[string]string{"BIG": strings.Repeat("v", 131068)}}, nil)
	bigEnv := map[string]string{}
	for _, k := range []string{"A", "B", "C", "D", "E", "F", "G", "H"} {
		bigEnv[k] = strings.Repeat("v", 100000)
	}
	totalPlan := plan("total", map[string]any{"command": []string{"true"}}, bigEnv)
	chunk := strings.Repeat("x", 120000) // each under MAX_ARG_STRLEN, 7 over the total
	halfPlan := plan("half", map[string]any{"command": []string{"true"}}, map[string]string{"A": chunk, "B": chunk, "C": chunk, "D": chunk})

	proj := filepath.Join(dir, "proj")
	out := filepath.Join(proj, "out")
	other := filepath.Join(dir, "other")
	for _, d := range []string{out, other} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(dir, "link-to-proj")
	if err := os.Symlink(proj, link); err != nil {
		t.Fatal(err)
	}
	var manyArgs []string
	for range 7 {
		manyArgs = append(manyArgs, chunk)
	}
	var manyEnv []string
	for _, k := range []string{"A", "B", "C", "D", "E", "F", "G"} {
		manyEnv = append(manyEnv, "-e", k+"="+chunk)
	}

	tests := []struct {
		name string
		args []string
		want string
	}{
		{"NUL in a plan's command", []string{"--launch-plan", nulCommand}, `launch plan "` + nulCommand + `": apps[0].entrypoint.command[2] contains a NUL byte`},
		{"NUL in a plan's env value", []string{"--launch-plan", nulEnv}, `launch plan "` + nulEnv + `": apps[0].entrypoint.env: value of "SECRET" contains a NUL byte`},
		{"NUL in a plan's app env", []string{"--launch-plan", nulAppEnv}, `launch plan "` + nulAppEnv + `": apps[0].env: value of "A" contains a NUL byte`},
		{"NUL in a plan's env name", []string{"--launch-plan", nulEnvName}, `launch plan "` + nulEnvName + `": apps[0].entrypoint.env: invalid variable name "A\x00B"`},
		{"NUL in a plan's working_dir", []string{"--launch-plan", nulDir}, `launch plan "` + nulDir + `": apps[0].entrypoint.working_dir "/srv\x00/etc" contains a NUL byte`},
		{"relative working_dir", []string{"--launch-plan", relDir}, `apps[0].entrypoint.working_dir "srv" must be an absolute path`},
		{"argument over MAX_ARG_STRLEN", []string{"--launch-plan", longArg}, `apps[0].entrypoint.command[1] is too long: 131072 bytes, the limit is 131071`},
		{"env over MAX_ARG_STRLEN", []string{"--launch-plan", longEnv}, `apps[0].entrypoint.env: "BIG" is too long: NAME=VALUE is 131072 bytes, the limit is 131071`},
		{"plan env over the total", []string{"--launch-plan", totalPlan}, `launch plan "` + totalPlan + `": command and environment are too long: 800101 bytes, the limit is 786432`},
		{"argv over the total", append([]string{"--", "echo"}, manyArgs...), "command and environment are too long: 840076 bytes, the limit is 786432"},
		{"env over the total", append(manyEnv, "--", "true"), "command and environment are too long: 840090 bytes, the limit is 786432"},
		{"plan and -e together over the total", []string{"--launch-plan", halfPlan, "-e", "E=" + chunk, "-e", "F=" + chunk, "-e", "G=" + chunk}, "command and environment are too long"},
		{"nested shares", []string{"-d", proj + ":/proj:rw", "-d", out + ":/out:rw", "--", "true"}, `--add-dir "` + out + `:/out:rw": host path "` + out + `" is inside "` + proj + `" from --add-dir "` + proj + `:/proj:rw"`},
		{"nested shares, read-only, inner first", []string{"-d", out + ":/out", "-d", proj + ":/proj", "--", "true"}, `host path "` + proj + `" contains "` + out + `" from --add-dir "` + out + `:/out"`},
		{"same directory twice", []string{"-d", proj + ":/a", "-d", proj + "/:/b", "--", "true"}, `is the same directory as "` + proj + `" from --add-dir "` + proj + `:/a"`},
		{"same directory through a symlink", []string{"-d", other + ":/o", "-d", proj + ":/a:rw", "-d", link + ":/b", "--", "true"}, `--add-dir "` + link + `:/b": host path "` + link + `" is the same directory as "` + proj + `"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.run(nil, append([]string{"exec"}, tt.args...)...)
			msg := string(r.stderr)
			if r.code != 125 || !strings.Contains(msg, tt.want) {
				t.Fatalf("got %s\nwant exit 125 and stderr containing %q", r, tt.want)
			}
			if !strings.HasPrefix(msg, "mvmctl: ") || strings.Count(msg, "\n") != 1 || !strings.HasSuffix(msg, "\n") || len(msg) > 1000 {
				t.Errorf("stderr is not one short line: %q", trim(r.stderr))
			}
			if r.elapsed > time.Second {
				t.Errorf("took %s; bad input must fail before any VM boots", r.elapsed)
			}
			if _, err := os.Stat(e.runDir); err == nil {
				t.Errorf("a run directory was created for bad input")
			}
			if pids := e.vmms(); len(pids) > 0 {
				t.Errorf("VMM processes started: %v", pids)
			}
		})
	}
}

// TestInputsAtTheLimitsRun: the limits are what the guest can run, not
// less: an argument and a variable of MAX_ARG_STRLEN (its NUL included),
// and most of the total budget, reach the command intact.
func TestInputsAtTheLimitsRun(t *testing.T) {
	e := newEnv(t)
	args := []string{"sh", "-c", `echo $# ${#1} ${#2} ${#5} ${#BIG}; printf %s "$1" | sha256sum`, "_", strings.Repeat("a", 131071)}
	for i := range 4 {
		args = append(args, strings.Repeat(string(rune('b'+i)), 120000))
	}
	doc, err := json.Marshal(map[string]any{"entrypoint": map[string]any{
		"command": args,
		"env":     map[string]string{"BIG": strings.Repeat("v", 131071-len("BIG="))},
	}})
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "launch.json")
	writeFile(t, p, string(doc), 0o644)
	r := e.run(nil, "exec", "--launch-plan", p)
	want := "5 131071 120000 120000 131067\n" + fmt.Sprintf("%x  -\n", sha256.Sum256([]byte(args[4])))
	if r.code != 0 || string(r.stdout) != want {
		t.Fatalf("got %s\nwant exit 0 and %q", r, want)
	}
	e.assertClean()
}
