package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// mvmctl runs the CLI in-process and returns what it printed on stdout
// and its error.
func mvmctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand(&globalOptions{})
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestEveryCommandHasExamples(t *testing.T) {
	root := newRootCommand(&globalOptions{})
	if root.Example == "" {
		t.Error("mvmctl has no Example")
	}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			if sub.Name() == "completion" || sub.Name() == "help" {
				continue // cobra's own, with their own help
			}
			path := sub.CommandPath()
			if strings.TrimSpace(sub.Example) == "" {
				t.Errorf("%s has no Example for --help", path)
			} else if !strings.Contains(sub.Example, path) {
				t.Errorf("%s: the examples do not show the command: %q", path, sub.Example)
			}
			walk(sub)
		}
	}
	walk(root)
}

func TestCompletions(t *testing.T) {
	tests := []struct {
		args []string
		want []string // lines that must be printed (candidates, then ":directive")
		not  []string // lines that must not
	}{
		{[]string{"exec", "--accel", ""}, []string{"auto\t", "kvm\t", "tcg\t", ":4"}, nil},
		{[]string{"doctor", "--accel", ""}, []string{"kvm\t", ":4"}, nil},
		{[]string{"exec", "--cp"}, []string{"--cpus\t"}, nil},
		// Directories for --add-dir (16: ShellCompDirectiveFilterDirs),
		// JSON files for --launch-plan (8: FilterFileExt).
		{[]string{"exec", "-d", ""}, []string{":16"}, nil},
		{[]string{"exec", "--launch-plan", ""}, []string{"json", ":8"}, nil},
		// COMMAND runs in the guest: no host file names, and after "--"
		// or the command no mvmctl flags.
		{[]string{"exec", "--", ""}, []string{":4"}, nil},
		{[]string{"exec", "--", "ls", "--c"}, []string{":4"}, []string{"--cpus\t"}},
		{[]string{"exec", "ls", "--c"}, []string{":4"}, []string{"--cpus\t"}},
		{[]string{"do"}, []string{"doctor\t"}, nil},
		{[]string{"doctor", "--j"}, []string{"--json\t"}, nil},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err := mvmctl(t, append([]string{"__complete"}, tt.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(out, "\n")
			has := func(want string) bool {
				for _, l := range lines {
					if strings.HasPrefix(l, want) {
						return true
					}
				}
				return false
			}
			for _, w := range tt.want {
				if !has(w) {
					t.Errorf("completion does not offer %q:\n%s", w, out)
				}
			}
			for _, w := range tt.not {
				if has(w) {
					t.Errorf("completion offers %q:\n%s", w, out)
				}
			}
		})
	}
	for _, shell := range []string{"bash", "zsh", "fish"} {
		out, err := mvmctl(t, "completion", shell)
		if err != nil || !strings.Contains(out, "__complete") {
			t.Errorf("mvmctl completion %s: %v, script of %d bytes without __complete", shell, err, len(out))
		}
	}
}

// TestDoctorStatus runs doctor on this host with an empty cache: it must
// fail naming bootstrap, in both forms, with exit status 1.
func TestDoctorStatus(t *testing.T) {
	t.Setenv("MVM_CACHE_DIR", t.TempDir())
	t.Setenv("MVM_STATE_DIR", t.TempDir())
	for _, args := range [][]string{{"doctor"}, {"doctor", "--json"}} {
		out, err := mvmctl(t, args...)
		var ee *exitError
		if !errors.As(err, &ee) || ee.code != exitDoctorFailed || ee.message() != "" {
			t.Fatalf("%v: error %v, want a silent exit status %d", args, err, exitDoctorFailed)
		}
		if !strings.Contains(out, "mvmctl bootstrap") {
			t.Errorf("%v does not name mvmctl bootstrap:\n%s", args, out)
		}
		if args[len(args)-1] == "--json" {
			var rep struct {
				OK     bool `json:"ok"`
				Checks []struct{ ID, Status, Fix string }
			}
			if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.OK || len(rep.Checks) == 0 {
				t.Errorf("--json: %v, ok=%v, %d checks:\n%s", err, rep.OK, len(rep.Checks), out)
			}
		} else if strings.Contains(out, "\033[") {
			t.Error("colour on output that is not a terminal")
		}
	}
	if _, err := mvmctl(t, "doctor", "extra"); err == nil {
		t.Error("doctor accepted an argument")
	}
}
