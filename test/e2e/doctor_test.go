package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// runWith runs mvmctl in e's directories with extra environment
// variables (later ones win).
func (e *env) runWith(extra []string, args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := e.command(ctx, args...)
	cmd.Env = e.environ(extra...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.Bytes(), stderr: errb.Bytes(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("run mvmctl %q: %v", args, err)
	}
	return r
}

// doctorLine returns the line of a check in doctor's text output.
func doctorLine(t *testing.T, out []byte, id string) string {
	t.Helper()
	re := regexp.MustCompile(`(?m)^(ok  |warn|FAIL|skip)  ` + regexp.QuoteMeta(id) + ` +(.*)$`)
	m := re.FindSubmatch(out)
	if m == nil {
		t.Fatalf("no line for check %q in:\n%s", id, out)
	}
	return string(m[0])
}

// doctorReport is the JSON form docs/doctor.md documents.
type doctorReport struct {
	Schema     int    `json:"schema"`
	OK         bool   `json:"ok"`
	Accel      string `json:"accel"`
	DurationMS *int64 `json:"duration_ms"`
	Checks     []struct {
		ID      string `json:"id"`
		Status  string `json:"status"`
		Message string `json:"message"`
		Fix     string `json:"fix"`
	} `json:"checks"`
}

// TestDoctorHealthy: on this machine, with the suite's image, doctor
// finds QEMU and the image fine, says that exec can work, exits 0, and
// does all of it well within 2 s.
func TestDoctorHealthy(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "doctor")
	if r.code != 0 {
		t.Fatalf("doctor on a healthy host: %s", r)
	}
	for _, id := range []string{"qemu", "qemu-features", "qemu-sandbox", "image", "kernel", "agent"} {
		if l := doctorLine(t, r.stdout, id); !strings.HasPrefix(l, "ok  ") {
			t.Errorf("check %s is not ok: %s", id, l)
		}
	}
	if l := doctorLine(t, r.stdout, "image"); !strings.Contains(l, "QEMU loads it") {
		t.Errorf("image line does not say QEMU loads it: %s", l)
	}
	// The suite's image was bootstrapped from the agent beside mvmctl.
	if l := doctorLine(t, r.stdout, "agent"); !strings.Contains(l, "the one in the default image") {
		t.Errorf("agent line does not match the image: %s", l)
	}
	if !bytes.Contains(r.stdout, []byte("mvmctl exec can work here")) || bytes.Contains(r.stdout, []byte("\033[")) {
		t.Errorf("summary or colours wrong on a pipe:\n%s", r.stdout)
	}
	if len(r.stderr) != 0 {
		t.Errorf("doctor wrote to stderr: %q", r.stderr)
	}
	if r.elapsed > 2*time.Second {
		t.Errorf("doctor took %s, want under 2 s", r.elapsed)
	}
	t.Logf("doctor took %s", r.elapsed.Round(time.Millisecond))

	// And exec agrees: a command runs.
	if r := e.run(nil, "exec", "--", "true"); r.code != 0 {
		t.Errorf("doctor said ok but exec failed: %s", r)
	}
	e.assertClean()
}

// TestDoctorEmptyCache: without an image doctor names the fix, exits
// non-zero, and mvmctl exec's error points to doctor.
func TestDoctorEmptyCache(t *testing.T) {
	e := newEnv(t)
	empty := []string{"MVM_CACHE_DIR=" + t.TempDir()}
	r := e.runWith(empty, "doctor")
	if r.code != 1 {
		t.Fatalf("doctor without an image: exit %d, want 1: %s", r.code, r)
	}
	if l := doctorLine(t, r.stdout, "image"); !strings.HasPrefix(l, "FAIL") || !strings.HasSuffix(l, "fix: mvmctl bootstrap") {
		t.Errorf("image line: %s", l)
	}
	if !bytes.Contains(r.stdout, []byte("mvmctl exec cannot work here")) {
		t.Errorf("no failing summary:\n%s", r.stdout)
	}

	x := e.runWith(empty, "exec", "--", "true")
	if x.code != 125 || !strings.Contains(string(x.stderr), "mvmctl bootstrap") ||
		!strings.HasSuffix(string(x.stderr), "\nmvmctl: run `mvmctl doctor` for a full check\n") {
		t.Errorf("exec without an image: %s", x)
	}
	// An error doctor cannot explain gets no hint.
	x = e.run(nil, "exec", "--cpus", "0", "--", "true")
	if x.code != 125 || strings.Contains(string(x.stderr), "doctor") {
		t.Errorf("exec --cpus 0: %s", x)
	}
}

// TestDoctorJSON: --json parses, has every documented field, and agrees
// with the exit status.
func TestDoctorJSON(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name  string
		extra []string
		code  int
	}{
		{"healthy", nil, 0},
		{"empty cache", []string{"MVM_CACHE_DIR=" + t.TempDir()}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.runWith(tc.extra, "doctor", "--json")
			if r.code != tc.code {
				t.Fatalf("exit %d, want %d: %s", r.code, tc.code, r)
			}
			var rep doctorReport
			dec := json.NewDecoder(bytes.NewReader(r.stdout))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&rep); err != nil {
				t.Fatalf("--json output does not parse as the documented schema: %v\n%s", err, r.stdout)
			}
			if rep.Schema != 1 || rep.OK != (tc.code == 0) || rep.DurationMS == nil || (rep.Accel != "kvm" && rep.Accel != "tcg") {
				t.Errorf("schema %d ok %v duration %v accel %q", rep.Schema, rep.OK, rep.DurationMS, rep.Accel)
			}
			statuses := map[string]string{}
			for _, c := range rep.Checks {
				statuses[c.ID] = c.Status
				switch c.Status {
				case "ok", "warn", "skip":
				case "fail":
					if c.Fix == "" && c.ID == "image" {
						t.Errorf("%s fails without a fix: %s", c.ID, c.Message)
					}
				default:
					t.Errorf("%s: status %q", c.ID, c.Status)
				}
				if c.Message == "" || strings.Contains(c.Message, "\n") {
					t.Errorf("%s: message %q is not one line", c.ID, c.Message)
				}
			}
			if len(rep.Checks) < 20 || statuses["qemu"] != "ok" {
				t.Errorf("%d checks, qemu %q", len(rep.Checks), statuses["qemu"])
			}
			wantImage := "ok"
			if tc.code != 0 {
				wantImage = "fail"
			}
			if statuses["image"] != wantImage {
				t.Errorf("image %q, want %q", statuses["image"], wantImage)
			}
		})
	}
}
