package adddir

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func fakeHome(dir string) func() (string, error) {
	return func() (string, error) { return dir, nil }
}

func TestParse(t *testing.T) {
	errNoHome := errors.New("no home")
	tests := []struct {
		name    string
		spec    string
		home    func() (string, error)
		want    Spec
		wantErr string // exact message; empty means success
	}{
		{
			name: "happy path",
			spec: "/tmp/src:/work",
			want: Spec{Raw: "/tmp/src:/work", Host: "/tmp/src", Guest: "/work", Mode: ReadOnly},
		},
		{
			name:    "missing colon",
			spec:    "/tmp/src",
			wantErr: `--add-dir "/tmp/src": expected HOST:GUEST[:ro|rw], missing ':'`,
		},
		{
			name:    "empty spec",
			spec:    "",
			wantErr: `--add-dir "": expected HOST:GUEST[:ro|rw], missing ':'`,
		},
		{
			name:    "empty host",
			spec:    ":/work",
			wantErr: `--add-dir ":/work": host path must not be empty`,
		},
		{
			name:    "empty host checked before guest",
			spec:    ":",
			wantErr: `--add-dir ":": host path must not be empty`,
		},
		{
			name:    "empty guest",
			spec:    "/tmp/src:",
			wantErr: `--add-dir "/tmp/src:": guest path must not be empty`,
		},
		{
			name:    "empty guest with mode",
			spec:    "/tmp/src::rw",
			wantErr: `--add-dir "/tmp/src::rw": guest path must not be empty`,
		},
		{
			name:    "relative guest",
			spec:    "/tmp/src:relative/path",
			wantErr: `--add-dir "/tmp/src:relative/path": guest path must be absolute (start with '/')`,
		},
		{
			name:    "mode only, no guest",
			spec:    "/tmp/src:ro",
			wantErr: `--add-dir "/tmp/src:ro": guest path must be absolute (start with '/')`,
		},
		{
			name: "tilde expansion",
			spec: "~/configs:/etc/configs",
			home: fakeHome("/tmp/fakehome"),
			want: Spec{Raw: "~/configs:/etc/configs", Host: "/tmp/fakehome/configs", Guest: "/etc/configs", Mode: ReadOnly},
		},
		{
			name: "tilde expansion with trailing slash in home",
			spec: "~/configs:/etc/configs",
			home: fakeHome("/tmp/fakehome/"),
			want: Spec{Raw: "~/configs:/etc/configs", Host: "/tmp/fakehome/configs", Guest: "/etc/configs", Mode: ReadOnly},
		},
		{
			name: "plain tilde is home",
			spec: "~:/home",
			home: fakeHome("/tmp/fakehome"),
			want: Spec{Raw: "~:/home", Host: "/tmp/fakehome", Guest: "/home", Mode: ReadOnly},
		},
		{
			name: "tilde user is not expanded",
			spec: "~bob/x:/x",
			home: fakeHome("/tmp/fakehome"),
			want: Spec{Raw: "~bob/x:/x", Host: "~bob/x", Guest: "/x", Mode: ReadOnly},
		},
		{
			name: "tilde in the middle is not expanded",
			spec: "/a/~/b:/x",
			home: fakeHome("/tmp/fakehome"),
			want: Spec{Raw: "/a/~/b:/x", Host: "/a/~/b", Guest: "/x", Mode: ReadOnly},
		},
		{
			name:    "home lookup fails",
			spec:    "~/configs:/etc/configs",
			home:    func() (string, error) { return "", errNoHome },
			wantErr: `--add-dir "~/configs:/etc/configs": expand '~': no home`,
		},
		{
			name:    "home is empty",
			spec:    "~:/x",
			home:    fakeHome(""),
			wantErr: `--add-dir "~:/x": expand '~': home directory is unknown`,
		},
		{
			name: "default is read-only",
			spec: "/a:/b",
			want: Spec{Raw: "/a:/b", Host: "/a", Guest: "/b", Mode: ReadOnly},
		},
		{
			name: "explicit ro",
			spec: "/a:/b:ro",
			want: Spec{Raw: "/a:/b:ro", Host: "/a", Guest: "/b", Mode: ReadOnly},
		},
		{
			name: "explicit rw",
			spec: "/a:/b:rw",
			want: Spec{Raw: "/a:/b:rw", Host: "/a", Guest: "/b", Mode: ReadWrite},
		},
		{
			name:    "bogus mode",
			spec:    "/tmp/src:/work:bogus",
			wantErr: `--add-dir "/tmp/src:/work:bogus": unknown mode "bogus" (expected ro or rw)`,
		},
		{
			name:    "upper-case mode is a typo",
			spec:    "/a:/b:RW",
			wantErr: `--add-dir "/a:/b:RW": unknown mode "RW" (expected ro or rw)`,
		},
		{
			name:    "digit in mode is a typo",
			spec:    "/a:/b:r0",
			wantErr: `--add-dir "/a:/b:r0": unknown mode "r0" (expected ro or rw)`,
		},
		{
			name:    "eight characters is still a mode",
			spec:    "/a:/b:readonly",
			wantErr: `--add-dir "/a:/b:readonly": unknown mode "readonly" (expected ro or rw)`,
		},
		{
			name: "long tail belongs to guest path",
			spec: "/a:/b:toolongmode1",
			want: Spec{Raw: "/a:/b:toolongmode1", Host: "/a", Guest: "/b:toolongmode1", Mode: ReadOnly},
		},
		{
			name: "extra colons belong to guest path",
			spec: "/host:/weird:path/file",
			want: Spec{Raw: "/host:/weird:path/file", Host: "/host", Guest: "/weird:path/file", Mode: ReadOnly},
		},
		{
			name: "extra colons with explicit mode",
			spec: "/host:/weird:path:rw",
			want: Spec{Raw: "/host:/weird:path:rw", Host: "/host", Guest: "/weird:path", Mode: ReadWrite},
		},
		{
			name: "dotted tail is path-shaped",
			spec: "/host:/v:1.2",
			want: Spec{Raw: "/host:/v:1.2", Host: "/host", Guest: "/v:1.2", Mode: ReadOnly},
		},
		{
			name: "empty tail belongs to guest path",
			spec: "/host:/work:",
			want: Spec{Raw: "/host:/work:", Host: "/host", Guest: "/work:", Mode: ReadOnly},
		},
		{
			name: "relative host kept as typed",
			spec: "src:/work",
			want: Spec{Raw: "src:/work", Host: "src", Guest: "/work", Mode: ReadOnly},
		},
		{
			name: "guest not cleaned by Parse",
			spec: "/a:/work/:rw",
			want: Spec{Raw: "/a:/work/:rw", Host: "/a", Guest: "/work/", Mode: ReadWrite},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			home := tt.home
			if home == nil {
				home = func() (string, error) {
					t.Error("home directory looked up for a spec without '~'")
					return "", errNoHome
				}
			}
			got, err := Parser{HomeDir: home}.Parse(tt.spec)
			if diff := cmp.Diff(tt.wantErr, errString(err)); diff != "" {
				t.Fatalf("Parse(%q) error mismatch (-want +got):\n%s", tt.spec, diff)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Parse(%q) mismatch (-want +got):\n%s", tt.spec, diff)
			}
		})
	}
}

func TestParseHomeErrorIsWrapped(t *testing.T) {
	errNoHome := errors.New("no home")
	_, err := Parser{HomeDir: func() (string, error) { return "", errNoHome }}.Parse("~/x:/x")
	if !errors.Is(err, errNoHome) {
		t.Fatalf("Parse error = %v, want it to wrap %v", err, errNoHome)
	}
}

func TestPackageParseUsesRealHome(t *testing.T) {
	home, err := os.UserHomeDir()
	if err != nil {
		t.Skipf("no home directory: %v", err)
	}
	got, err := Parse("~:/home")
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if diff := cmp.Diff(home, got.Host); diff != "" {
		t.Errorf("host mismatch (-want +got):\n%s", diff)
	}
}

func TestModeString(t *testing.T) {
	tests := []struct {
		mode Mode
		want string
	}{
		{ReadOnly, "ro"},
		{ReadWrite, "rw"},
		{Mode(7), "Mode(7)"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.mode.String()); diff != "" {
				t.Errorf("String() mismatch (-want +got):\n%s", diff)
			}
		})
	}
	var zero Mode
	if zero != ReadOnly {
		t.Errorf("zero Mode = %v, want ReadOnly", zero)
	}
}

func TestResolve(t *testing.T) {
	base := t.TempDir()
	a := filepath.Join(base, "a")
	b := filepath.Join(base, "b")
	c := filepath.Join(base, "c")
	file := filepath.Join(base, "file")
	link := filepath.Join(base, "link")
	fileLink := filepath.Join(base, "filelink")
	broken := filepath.Join(base, "broken")
	missing := filepath.Join(base, "missing")
	aOut := filepath.Join(a, "out")
	aDeep := filepath.Join(a, "x", "y")
	ab := filepath.Join(base, "ab")
	aToB := filepath.Join(a, "tob")
	for _, d := range []string{a, b, c, aOut, filepath.Dir(aDeep), aDeep, ab} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for target, name := range map[string]string{a: link, file: fileLink, missing: broken, b: aToB} {
		if err := os.Symlink(target, name); err != nil {
			t.Fatal(err)
		}
	}

	tests := []struct {
		name    string
		specs   []string
		want    []Spec
		wantErr string // exact message; empty means success
	}{
		{
			name:  "no specs",
			specs: nil,
			want:  []Spec{},
		},
		{
			name:  "single",
			specs: []string{a + ":/work"},
			want:  []Spec{{Raw: a + ":/work", Host: a, Guest: "/work", Mode: ReadOnly}},
		},
		{
			name:  "several with modes",
			specs: []string{a + ":/work:rw", b + ":/data", c + ":/opt/c:ro"},
			want: []Spec{
				{Raw: a + ":/work:rw", Host: a, Guest: "/work", Mode: ReadWrite},
				{Raw: b + ":/data", Host: b, Guest: "/data", Mode: ReadOnly},
				{Raw: c + ":/opt/c:ro", Host: c, Guest: "/opt/c", Mode: ReadOnly},
			},
		},
		{
			name:  "host and guest are cleaned",
			specs: []string{base + "/b/../a/:/work//sub/./:rw"},
			want:  []Spec{{Raw: base + "/b/../a/:/work//sub/./:rw", Host: a, Guest: "/work/sub", Mode: ReadWrite}},
		},
		{
			name:  "siblings sharing a prefix are not nested",
			specs: []string{a + ":/work", b + ":/workspace"},
			want: []Spec{
				{Raw: a + ":/work", Host: a, Guest: "/work", Mode: ReadOnly},
				{Raw: b + ":/workspace", Host: b, Guest: "/workspace", Mode: ReadOnly},
			},
		},
		{
			name:    "same host at two guest paths",
			specs:   []string{a + ":/x", a + ":/y"},
			wantErr: `--add-dir "` + a + `:/y": host path "` + a + `" is the same directory as "` + a + `" from --add-dir "` + a + `:/x"; share it once`,
		},
		{
			name:    "same host through a symlink",
			specs:   []string{a + ":/x:rw", link + ":/y"},
			wantErr: `--add-dir "` + link + `:/y": host path "` + link + `" is the same directory as "` + a + `" from --add-dir "` + a + `:/x:rw"; share it once`,
		},
		{
			name:    "same host spelled with dot-dot",
			specs:   []string{a + ":/x", b + "/../a:/y"},
			wantErr: `--add-dir "` + b + `/../a:/y": host path "` + a + `" is the same directory as "` + a + `" from --add-dir "` + a + `:/x"; share it once`,
		},
		{
			name:    "host nested inside an earlier share",
			specs:   []string{a + ":/proj:rw", aOut + ":/out:rw"},
			wantErr: `--add-dir "` + aOut + `:/out:rw": host path "` + aOut + `" is inside "` + a + `" from --add-dir "` + a + `:/proj:rw"; shared host directories must not overlap`,
		},
		{
			name:    "host containing an earlier share",
			specs:   []string{aOut + ":/out", a + ":/proj"},
			wantErr: `--add-dir "` + a + `:/proj": host path "` + a + `" contains "` + aOut + `" from --add-dir "` + aOut + `:/out"; shared host directories must not overlap`,
		},
		{
			name:    "host nested two levels down, read-only",
			specs:   []string{a + ":/proj", aDeep + ":/deep"},
			wantErr: `--add-dir "` + aDeep + `:/deep": host path "` + aDeep + `" is inside "` + a + `" from --add-dir "` + a + `:/proj"; shared host directories must not overlap`,
		},
		{
			name:    "host nested through a symlink",
			specs:   []string{link + "/out:/out:rw", a + ":/proj"},
			wantErr: `--add-dir "` + a + `:/proj": host path "` + a + `" contains "` + link + `/out" from --add-dir "` + link + `/out:/out:rw"; shared host directories must not overlap`,
		},
		{
			name:    "a symlink inside a share pointing to another share",
			specs:   []string{b + ":/b", aToB + ":/x"},
			wantErr: `--add-dir "` + aToB + `:/x": host path "` + aToB + `" is the same directory as "` + b + `" from --add-dir "` + b + `:/b"; share it once`,
		},
		{
			name:  "siblings with a common prefix do not overlap",
			specs: []string{a + ":/a", ab + ":/ab"},
			want: []Spec{
				{Raw: a + ":/a", Host: a, Guest: "/a", Mode: ReadOnly},
				{Raw: ab + ":/ab", Host: ab, Guest: "/ab", Mode: ReadOnly},
			},
		},
		{
			name:  "an inner directory beside an outer share's sibling",
			specs: []string{aOut + ":/out", b + ":/b"},
			want: []Spec{
				{Raw: aOut + ":/out", Host: aOut, Guest: "/out", Mode: ReadOnly},
				{Raw: b + ":/b", Host: b, Guest: "/b", Mode: ReadOnly},
			},
		},
		{
			name:  "symlink to directory is followed",
			specs: []string{link + ":/work"},
			want:  []Spec{{Raw: link + ":/work", Host: link, Guest: "/work", Mode: ReadOnly}},
		},
		{
			name:  "reserved-looking but allowed",
			specs: []string{a + ":/run/mvmx", b + ":/devices", c + ":/run/other"},
			want: []Spec{
				{Raw: a + ":/run/mvmx", Host: a, Guest: "/run/mvmx", Mode: ReadOnly},
				{Raw: b + ":/devices", Host: b, Guest: "/devices", Mode: ReadOnly},
				{Raw: c + ":/run/other", Host: c, Guest: "/run/other", Mode: ReadOnly},
			},
		},
		{
			name:    "parse error is returned",
			specs:   []string{a + ":/work", "nocolon"},
			wantErr: `--add-dir "nocolon": expected HOST:GUEST[:ro|rw], missing ':'`,
		},
		{
			name:    "missing host directory",
			specs:   []string{missing + ":/work"},
			wantErr: `--add-dir "` + missing + `:/work": host path "` + missing + `": no such directory`,
		},
		{
			name:    "broken symlink",
			specs:   []string{broken + ":/work"},
			wantErr: `--add-dir "` + broken + `:/work": host path "` + broken + `": no such directory`,
		},
		{
			name:    "regular file",
			specs:   []string{file + ":/work"},
			wantErr: `--add-dir "` + file + `:/work": host path "` + file + `" is not a directory`,
		},
		{
			name:    "symlink to regular file",
			specs:   []string{fileLink + ":/work"},
			wantErr: `--add-dir "` + fileLink + `:/work": host path "` + fileLink + `" is not a directory`,
		},
		{
			name:    "duplicate guest path",
			specs:   []string{a + ":/work", b + ":/work:rw"},
			wantErr: `--add-dir "` + b + `:/work:rw": guest path "/work" is already used by --add-dir "` + a + `:/work"`,
		},
		{
			name:    "duplicate guest path after cleaning",
			specs:   []string{a + ":/work", b + ":/work/"},
			wantErr: `--add-dir "` + b + `:/work/": guest path "/work" is already used by --add-dir "` + a + `:/work"`,
		},
		{
			name:    "duplicate guest path via dot-dot",
			specs:   []string{a + ":/work", b + ":/tmp/../work"},
			wantErr: `--add-dir "` + b + `:/tmp/../work": guest path "/work" is already used by --add-dir "` + a + `:/work"`,
		},
		{
			name:    "root is reserved",
			specs:   []string{a + ":/"},
			wantErr: `--add-dir "` + a + `:/": guest path "/" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "root via dot-dot is reserved",
			specs:   []string{a + ":/x/.."},
			wantErr: `--add-dir "` + a + `:/x/..": guest path "/" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "proc is reserved",
			specs:   []string{a + ":/proc"},
			wantErr: `--add-dir "` + a + `:/proc": guest path "/proc" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "under sys is reserved",
			specs:   []string{a + ":/sys/fs/cgroup:rw"},
			wantErr: `--add-dir "` + a + `:/sys/fs/cgroup:rw": guest path "/sys/fs/cgroup" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "dev with trailing slash is reserved",
			specs:   []string{a + ":/dev/"},
			wantErr: `--add-dir "` + a + `:/dev/": guest path "/dev" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "run/mvm is reserved",
			specs:   []string{a + ":/run/mvm"},
			wantErr: `--add-dir "` + a + `:/run/mvm": guest path "/run/mvm" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "under run/mvm is reserved",
			specs:   []string{a + ":/run/mvm/x"},
			wantErr: `--add-dir "` + a + `:/run/mvm/x": guest path "/run/mvm/x" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "run would hide run/mvm",
			specs:   []string{a + ":/run"},
			wantErr: `--add-dir "` + a + `:/run": guest path "/run" is reserved (the VM needs /, /proc, /sys, /dev and /run/mvm)`,
		},
		{
			name:    "nested after parent",
			specs:   []string{a + ":/work", b + ":/work/sub"},
			wantErr: `--add-dir "` + b + `:/work/sub": guest path "/work/sub" is nested inside "/work" from --add-dir "` + a + `:/work"`,
		},
		{
			name:    "parent after nested",
			specs:   []string{a + ":/work/sub/deep", b + ":/work"},
			wantErr: `--add-dir "` + b + `:/work": guest path "/work" contains "/work/sub/deep" from --add-dir "` + a + `:/work/sub/deep"`,
		},
		{
			name:    "first bad spec wins",
			specs:   []string{a + ":/work", file + ":/x", b + ":/work"},
			wantErr: `--add-dir "` + file + `:/x": host path "` + file + `" is not a directory`,
		},
		{
			name:    "conflict reported on the later spec",
			specs:   []string{a + ":/x", b + ":/y", c + ":/x", "bad"},
			wantErr: `--add-dir "` + c + `:/x": guest path "/x" is already used by --add-dir "` + a + `:/x"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parser{HomeDir: fakeHome(base)}.Resolve(tt.specs)
			if diff := cmp.Diff(tt.wantErr, errString(err)); diff != "" {
				t.Fatalf("Resolve(%q) error mismatch (-want +got):\n%s", tt.specs, diff)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Resolve(%q) mismatch (-want +got):\n%s", tt.specs, diff)
			}
		})
	}
}

func TestResolveTilde(t *testing.T) {
	home := t.TempDir()
	configs := filepath.Join(home, "configs")
	if err := os.Mkdir(configs, 0o755); err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	got, err := Parser{HomeDir: fakeHome(home)}.Resolve([]string{"~/configs:/etc/configs", data + ":/data"})
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	got2, err := Parser{HomeDir: fakeHome(home)}.Resolve([]string{"~:/home/me:rw"})
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	want := []Spec{
		{Raw: "~/configs:/etc/configs", Host: configs, Guest: "/etc/configs", Mode: ReadOnly},
		{Raw: data + ":/data", Host: data, Guest: "/data", Mode: ReadOnly},
		{Raw: "~:/home/me:rw", Host: home, Guest: "/home/me", Mode: ReadWrite},
	}
	if diff := cmp.Diff(want, append(got, got2...)); diff != "" {
		t.Errorf("Resolve mismatch (-want +got):\n%s", diff)
	}
}

func TestResolveRelativeHost(t *testing.T) {
	base := t.TempDir()
	for _, d := range []string{"src", "cwd"} {
		if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Chdir(filepath.Join(base, "cwd"))
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Resolve([]string{"../src:/work", ".:/cwd"})
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	want := []Spec{
		{Raw: "../src:/work", Host: filepath.Join(filepath.Dir(wd), "src"), Guest: "/work", Mode: ReadOnly},
		{Raw: ".:/cwd", Host: wd, Guest: "/cwd", Mode: ReadOnly},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Resolve mismatch (-want +got):\n%s", diff)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"/tmp/src:/work", ":/work", "/a:/b:rw", "/a:/b:bogus", "~/x:/y", "/host:/weird:path/file", "a", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := Parser{HomeDir: fakeHome("/home/u")}.Parse(s)
		if err != nil {
			if !strings.Contains(err.Error(), strconv.Quote(s)) {
				t.Errorf("error %q does not quote spec %q", err, s)
			}
			return
		}
		if got.Raw != s || got.Host == "" || !strings.HasPrefix(got.Guest, "/") {
			t.Errorf("Parse(%q) = %+v, violates invariants", s, got)
		}
	})
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// TestResolveBindMount checks overlaps that no path comparison sees: a
// directory bind-mounted elsewhere is the same directory, and one inside
// it is inside the other share. It runs the checks in a private mount
// namespace (unshare(1), as root or in a user namespace) so that nothing
// is mounted on the host.
func TestResolveBindMount(t *testing.T) {
	base := t.TempDir()
	for _, d := range []string{"proj/out", "mnt"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("unshare", "--mount", "--map-root-user", "--propagation", "private",
		os.Args[0], "-test.run=^TestResolveBindMountChild$", "-test.v")
	ns, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(), "ADDDIR_BIND_BASE="+base, "ADDDIR_HOST_MNTNS="+ns)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestResolveBindMountChild") {
		t.Fatalf("checks in a mount namespace: %v\n%s", err, out)
	}
}

// TestResolveBindMountChild is TestResolveBindMount's other half; on its
// own (without ADDDIR_BIND_BASE) it has nothing to check.
func TestResolveBindMountChild(t *testing.T) {
	base := os.Getenv("ADDDIR_BIND_BASE")
	if base == "" {
		return
	}
	// Never mount anything in the namespace the tests were started in.
	if ns, err := os.Readlink("/proc/self/ns/mnt"); err != nil || ns == os.Getenv("ADDDIR_HOST_MNTNS") {
		t.Fatalf("not in a private mount namespace (%s, %v)", ns, err)
	}
	proj, out, mnt := filepath.Join(base, "proj"), filepath.Join(base, "proj/out"), filepath.Join(base, "mnt")
	if err := syscall.Mount(proj, mnt, "", syscall.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount: %v", err)
	}
	tests := []struct {
		specs   []string
		wantErr string
	}{
		{[]string{proj + ":/a", mnt + ":/b"}, `--add-dir "` + mnt + `:/b": host path "` + mnt + `" is the same directory as "` + proj + `" from --add-dir "` + proj + `:/a"; share it once`},
		{[]string{mnt + ":/a:rw", out + ":/b:rw"}, `--add-dir "` + out + `:/b:rw": host path "` + out + `" is inside "` + mnt + `" from --add-dir "` + mnt + `:/a:rw"; shared host directories must not overlap`},
		{[]string{mnt + "/out:/a", proj + ":/b"}, `--add-dir "` + proj + `:/b": host path "` + proj + `" contains "` + mnt + `/out" from --add-dir "` + mnt + `/out:/a"; shared host directories must not overlap`},
	}
	for _, tt := range tests {
		_, err := Resolve(tt.specs)
		if got := errString(err); got != tt.wantErr {
			t.Errorf("Resolve(%q) = %q, want %q", tt.specs, got, tt.wantErr)
		}
	}
}
