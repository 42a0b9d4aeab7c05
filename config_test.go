package mvm

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/mvm-sh/mvm/internal/execreq"
)

func TestCmdValidate(t *testing.T) {
	long := strings.Repeat("a", execreq.MaxString)
	tests := []struct {
		name    string
		argv    []string
		env     []string
		dir     string
		cgroup  string
		wantErr string // exact message; empty means valid
		wantIs  error
	}{
		{name: "plain", argv: []string{"sh", "-c", "echo hi"}, env: []string{"A=" + "1"}, dir: "/tmp"},
		{name: "empty args and values are fine", argv: []string{"x", ""}, env: []string{"E=" + ""}},
		{name: "bytes that are not UTF-8", argv: []string{"x", "\xff\xfe\n\t"}, env: []string{"B=" + "\x01\xff"}},
		{name: "argument at the limit", argv: []string{"x", long}},
		{name: "env string at the limit", argv: []string{"x"}, env: []string{"A=" + long[:execreq.MaxString-2]}},
		{name: "dir at the limit", argv: []string{"x"}, dir: "/" + strings.Repeat("d", execreq.MaxDir-1)},
		{
			name: "argument over the limit", argv: []string{"x", long + "a"},
			wantErr: "Cmd.Argv: argument 1 is too long: 131072 bytes, the limit is 131071", wantIs: execreq.ErrTooLong,
		},
		{
			name: "NUL in the program", argv: []string{"a\x00b"},
			wantErr: "Cmd.Argv: argument 0 contains a NUL byte", wantIs: execreq.ErrNUL,
		},
		{
			name: "NUL in an argument", argv: []string{"echo", "x", "\x00"},
			wantErr: "Cmd.Argv: argument 2 contains a NUL byte", wantIs: execreq.ErrNUL,
		},
		{
			name: "NUL in an env value", argv: []string{"x"}, env: []string{"A=" + "1\x00"},
			wantErr: `Cmd.Env "A": value contains a NUL byte`, wantIs: execreq.ErrNUL,
		},
		{
			name: "bad env name", argv: []string{"x"}, env: []string{"A-B=" + "1"},
			wantErr: `Cmd.Env "A-B": invalid variable name "A-B" (must match [A-Za-z_][A-Za-z0-9_]*)`, wantIs: execreq.ErrBadName,
		},
		{
			name: "NUL in an env name", argv: []string{"x"}, env: []string{"A\x00=" + "1"},
			wantErr: `Cmd.Env "A\x00": invalid variable name "A\x00" (must match [A-Za-z_][A-Za-z0-9_]*)`, wantIs: execreq.ErrBadName,
		},
		{
			name: "env string over the limit", argv: []string{"x"}, env: []string{"AB=" + long[:execreq.MaxString-2]},
			wantErr: `Cmd.Env "AB": is too long: NAME=VALUE is 131072 bytes, the limit is 131071`, wantIs: execreq.ErrTooLong,
		},
		{
			name: "relative dir", argv: []string{"x"}, dir: "tmp",
			wantErr: `Cmd.Dir "tmp": must be an absolute path`, wantIs: execreq.ErrNotAbsolute,
		},
		{
			name: "NUL in dir", argv: []string{"x"}, dir: "/tmp\x00/x",
			wantErr: `Cmd.Dir "/tmp\x00/x": contains a NUL byte`, wantIs: execreq.ErrNUL,
		},
		{
			name: "dir over PATH_MAX", argv: []string{"x"}, dir: "/" + strings.Repeat("d", execreq.MaxDir),
			wantErr: `Cmd.Dir "/` + strings.Repeat("d", 63) + `"...: is too long: 4096 bytes, the limit is 4095`, wantIs: execreq.ErrTooLong,
		},
		{
			name: "total over the limit", argv: []string{"x", long, long, long, long, long, long},
			wantErr: "Cmd: command and environment are too long: 786490 bytes, the limit is 786432 (each string counts its length plus 9)", wantIs: execreq.ErrTooLong,
		},
		{
			name: "cgroup with a slash", argv: []string{"x"}, cgroup: "../etc",
			wantErr: `Cmd.Cgroup "../etc": cgroup name "../etc": only letters, digits, '.', '_' and '-'`,
		},
		{
			name: "cgroup ..", argv: []string{"x"}, cgroup: "..",
			wantErr: `Cmd.Cgroup "..": cgroup name "..": want 1 to 64 characters, not . or ..`,
		},
		{name: "a cgroup", argv: []string{"x"}, cgroup: "ctr-0a1b"},
		{
			name: "many empty strings count their NULs and pointers", argv: append([]string{"x"}, make([]string, execreq.MaxTotal/9)...),
			wantErr: "Cmd: command and environment are too long: 786439 bytes, the limit is 786432 (each string counts its length plus 9)", wantIs: execreq.ErrTooLong,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Cmd{Argv: tt.argv, Env: tt.env, Dir: tt.dir, Cgroup: tt.cgroup}.Validate()
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tt.wantErr {
				t.Fatalf("Validate() = %q, want %q", got, tt.wantErr)
			}
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Errorf("Validate() = %v, not errors.Is ErrInvalid", err)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("Validate() = %v, not errors.Is %v", err, tt.wantIs)
			}
			if strings.Contains(got, "\n") {
				t.Errorf("message is not one line: %q", got)
			}
		})
	}
}

func TestConfigEnvValidate(t *testing.T) {
	for _, c := range []struct {
		env  []string
		want string
	}{
		{[]string{"A=1", "B="}, ""},
		{[]string{"NOEQUALS"}, `Env "NOEQUALS": want KEY=VALUE`},
		{[]string{"A-B=1"}, `Env "A-B": invalid variable name`},
		{[]string{"A=1\x00"}, `Env "A": value contains a NUL byte`},
	} {
		err := Config{Env: c.env, Accel: AccelTCG}.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("Env %q: %v", c.env, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrInvalid)):
			t.Errorf("Env %q: %v, want %q (ErrInvalid)", c.env, err, c.want)
		}
	}
}

// TestConfigRootValidate: a root directory must be one, and at most one of
// the ways to name a root is given.
func TestConfigRootValidate(t *testing.T) {
	dir := t.TempDir()
	file := dir + "/f"
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	digest := "sha256:" + strings.Repeat("a", 64)
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{RootDir: dir}, ""},
		{Config{RootDigest: digest}, ""},
		{Config{RootDir: dir + "/nonexistent"}, "RootDir"},
		{Config{RootDir: file}, "not a directory"},
		{Config{RootDir: dir, Template: "t"}, "give one of"},
		{Config{RootDir: dir, Image: "busybox"}, "give one of"},
		{Config{RootDigest: digest, RootDir: dir}, "RootDigest"},
		{Config{RootDigest: digest, Template: "t"}, "RootDigest"},
	} {
		c.cfg.Accel = AccelTCG
		err := c.cfg.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%+v: %v", c.cfg, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrInvalid) && !errors.Is(err, os.ErrNotExist)):
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
}

// TestConfigTAPValidate: a TAP card's guest configuration is checked
// before anything boots.
func TestConfigTAPValidate(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	good := func() *TAP {
		return &TAP{File: f, MAC: "0a:58:0a:fa:4d:05", Address: netip.MustParsePrefix("10.250.77.5/24"), Gateway: netip.MustParseAddr("10.250.77.1"), MTU: 1500}
	}
	for _, c := range []struct {
		name   string
		modify func(*TAP)
		want   string
	}{
		{"good", func(*TAP) {}, ""},
		{"no device", func(t *TAP) { t.File = nil }, "TAP.File"},
		{"a multicast MAC", func(t *TAP) { t.MAC = "01:00:5e:00:00:01" }, "TAP.MAC"},
		{"a MAC with options", func(t *TAP) { t.MAC = "0a:58:0a:fa:4d:05,x=1" }, "TAP.MAC"},
		{"IPv6", func(t *TAP) { t.Address = netip.MustParsePrefix("fd00::5/64") }, "TAP.Address"},
		{"a gateway off the network", func(t *TAP) { t.Gateway = netip.MustParseAddr("10.1.0.1") }, "TAP.Gateway"},
		{"a small MTU", func(t *TAP) { t.MTU = 100 }, "TAP.MTU"},
		{"an IPv6 nameserver", func(t *TAP) { t.DNS = []netip.Addr{netip.MustParseAddr("::1")} }, "TAP.DNS"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tap := good()
			c.modify(tap)
			err := (&Config{Accel: AccelTCG, TAP: tap}).Validate()
			switch {
			case c.want == "" && err != nil:
				t.Errorf("%v", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrInvalid)):
				t.Errorf("%v, want %q", err, c.want)
			}
		})
	}
	if err := (&Config{Accel: AccelTCG, TAP: good(), Network: &Network{}}).Validate(); err == nil || !strings.Contains(err.Error(), "not both") {
		t.Errorf("TAP and Network: %v", err)
	}
}
