package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mvm-sh/mvm"
)

// TestRequestErrors: mvmctl exec words the SDK's checks in its own flags,
// as the user typed them; nothing is checked twice with another voice.
func TestRequestErrors(t *testing.T) {
	d := t.TempDir()
	proj, out := filepath.Join(d, "proj"), filepath.Join(d, "proj", "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		opts execOptions
		argv []string
		want string
		sdk  bool // the SDK's check, worded here
	}{
		{"cpus over the limit", execOptions{cpus: 65}, []string{"true"}, "--cpus 65: must be between 1 and 64", true},
		{"cpus zero", execOptions{cpus: 0}, []string{"true"}, "--cpus 0: must be at least 1", false},
		{"memory too small", execOptions{memory: "16M"}, []string{"true"}, "--memory 16M: must be a whole number of MiB, at least 64M", true},
		{"relative workdir", execOptions{workdir: "tmp"}, []string{"true"}, `--workdir "tmp": must be an absolute path`, true},
		{"NUL in an argument", execOptions{}, []string{"echo", "a\x00"}, "command: argument 1 contains a NUL byte", true},
		{"missing kernel", execOptions{kernel: "/nonexistent/vmlinux"}, []string{"true"}, "--kernel /nonexistent/vmlinux: no such file or directory", true},
		{"template and image", execOptions{template: "a", image: "b"}, []string{"true"}, "--template and --image both name the root filesystem: give one", false},
		{"overlapping dirs", execOptions{addDirs: []string{proj + ":/proj:rw", out + ":/out"}}, []string{"true"},
			`--add-dir "` + out + `:/out": host path "` + out + `" is inside "` + proj + `" from --add-dir "` + proj + `:/proj:rw"; shared host directories must not overlap`, true},
		{"too much", execOptions{}, []string{"x", strings.Repeat("a", 131071), strings.Repeat("a", 131071), strings.Repeat("a", 131071), strings.Repeat("a", 131071), strings.Repeat("a", 131071), strings.Repeat("a", 131071)},
			"command and environment are too long: 786490 bytes, the limit is 786432 (each string counts its length plus 9)", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := tt.opts
			if o.cpus == 0 && tt.name != "cpus zero" {
				o.cpus = 2
			}
			if o.memory == "" {
				o.memory = "512M"
			}
			if o.timeout == "" {
				o.timeout = "0"
			}
			if o.accel == "" {
				o.accel = "auto"
			}
			_, _, err := o.request(tt.argv)
			if err == nil {
				t.Fatal("accepted")
			}
			if got := o.explain(err).Error(); got != tt.want {
				t.Errorf("got  %q\nwant %q", got, tt.want)
			}
			if errors.Is(err, mvm.ErrInvalid) != tt.sdk {
				t.Errorf("errors.Is(ErrInvalid) = %v, want %v", !tt.sdk, tt.sdk)
			}
		})
	}
}

func TestCappedWriter(t *testing.T) {
	var buf strings.Builder
	c := &cappedWriter{w: &buf, left: 10}
	for _, s := range []string{"12345", "67890", "x", "yyyy"} {
		if n, err := c.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	if got := buf.String(); !strings.HasPrefix(got, "1234567890mvmctl: the log reached") || strings.Contains(got, "yyyy") {
		t.Errorf("wrote %q", got)
	}
}
