package execreq

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/envvar"
)

func TestCheck(t *testing.T) {
	long := strings.Repeat("a", MaxString)
	tests := []struct {
		name    string
		argv    []string
		env     []envvar.Var
		dir     string
		wantErr string // exact message; empty means valid
		wantIs  error
	}{
		{name: "plain", argv: []string{"sh", "-c", "echo hi"}, env: []envvar.Var{{Name: "A", Value: "1"}}, dir: "/tmp"},
		{name: "empty args and values are fine", argv: []string{"x", ""}, env: []envvar.Var{{Name: "E", Value: ""}}},
		{name: "bytes that are not UTF-8", argv: []string{"x", "\xff\xfe\n\t"}, env: []envvar.Var{{Name: "B", Value: "\x01\xff"}}},
		{name: "argument at the limit", argv: []string{"x", long}},
		{name: "env string at the limit", argv: []string{"x"}, env: []envvar.Var{{Name: "A", Value: long[:MaxString-2]}}},
		{name: "dir at the limit", argv: []string{"x"}, dir: "/" + strings.Repeat("d", MaxDir-1)},
		{
			name: "argument over the limit", argv: []string{"x", long + "a"},
			wantErr: "invalid command: argument 1 is too long: 131072 bytes, the limit is 131071", wantIs: ErrTooLong,
		},
		{
			name: "NUL in the program", argv: []string{"a\x00b"},
			wantErr: "invalid command: argument 0 contains a NUL byte", wantIs: ErrNUL,
		},
		{
			name: "NUL in an argument", argv: []string{"echo", "x", "\x00"},
			wantErr: "invalid command: argument 2 contains a NUL byte", wantIs: ErrNUL,
		},
		{
			name: "NUL in an env value", argv: []string{"x"}, env: []envvar.Var{{Name: "A", Value: "1\x00"}},
			wantErr: `invalid --env "A": value contains a NUL byte`, wantIs: ErrNUL,
		},
		{
			name: "bad env name", argv: []string{"x"}, env: []envvar.Var{{Name: "A-B", Value: "1"}},
			wantErr: `invalid --env "A-B": invalid variable name "A-B" (must match [A-Za-z_][A-Za-z0-9_]*)`, wantIs: ErrBadName,
		},
		{
			name: "NUL in an env name", argv: []string{"x"}, env: []envvar.Var{{Name: "A\x00", Value: "1"}},
			wantErr: `invalid --env "A\x00": invalid variable name "A\x00" (must match [A-Za-z_][A-Za-z0-9_]*)`, wantIs: ErrBadName,
		},
		{
			name: "env string over the limit", argv: []string{"x"}, env: []envvar.Var{{Name: "AB", Value: long[:MaxString-2]}},
			wantErr: `invalid --env "AB": is too long: NAME=VALUE is 131072 bytes, the limit is 131071`, wantIs: ErrTooLong,
		},
		{
			name: "relative dir", argv: []string{"x"}, dir: "tmp",
			wantErr: `invalid --workdir "tmp": must be an absolute path`, wantIs: ErrNotAbsolute,
		},
		{
			name: "NUL in dir", argv: []string{"x"}, dir: "/tmp\x00/x",
			wantErr: `invalid --workdir "/tmp\x00/x": contains a NUL byte`, wantIs: ErrNUL,
		},
		{
			name: "dir over PATH_MAX", argv: []string{"x"}, dir: "/" + strings.Repeat("d", MaxDir),
			wantErr: `invalid --workdir "/` + strings.Repeat("d", 63) + `"...: is too long: 4096 bytes, the limit is 4095`, wantIs: ErrTooLong,
		},
		{
			name: "total over the limit", argv: []string{"x", long, long, long, long, long, long},
			wantErr: "command and environment are too long: 786490 bytes, the limit is 786432 (each string counts its length plus 9)", wantIs: ErrTooLong,
		},
		{
			name: "many empty strings count their NULs and pointers", argv: append([]string{"x"}, make([]string, MaxTotal/9)...),
			wantErr: "command and environment are too long: 786439 bytes, the limit is 786432 (each string counts its length plus 9)", wantIs: ErrTooLong,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Check(tt.argv, tt.env, tt.dir)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tt.wantErr {
				t.Fatalf("Check() = %q, want %q", got, tt.wantErr)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("Check() = %v, not errors.Is %v", err, tt.wantIs)
			}
			if strings.Contains(got, "\n") {
				t.Errorf("message is not one line: %q", got)
			}
		})
	}
}

// TestLimitsFitOneMessage is why MaxTotal is what it is: any request that
// passes Check, however it spends its budget, fits one agent protocol
// message with room to spare, so it fails on the host (here) or not at all.
func TestLimitsFitOneMessage(t *testing.T) {
	for _, per := range []int{0, 1, 7, 100, 4096, MaxString - 8} {
		s := strings.Repeat("a", per)
		argv := []string{"x"}
		for n := Size(argv, nil); n+per+perString <= MaxTotal; n += per + perString {
			argv = append(argv, s)
		}
		env := []envvar.Var{}
		for n, i := Size([]string{"x"}, nil), 0; ; i++ {
			v := envvar.Var{Name: fmt.Sprintf("V%d", i), Value: s}
			if n += Size(nil, []envvar.Var{v}); n > MaxTotal {
				break
			}
			env = append(env, v)
		}
		for _, c := range []struct {
			argv []string
			env  []envvar.Var
		}{{argv, nil}, {[]string{"x"}, env}} {
			dir := "/" + strings.Repeat("d", MaxDir-1)
			if err := Check(c.argv, c.env, dir); err != nil {
				t.Fatalf("%d-byte strings: %v", per, err)
			}
			req := &agentpb.Exec{Argv: c.argv, Cwd: dir, Stdin: true, TimeoutMillis: 1 << 60, KillGraceMillis: 1 << 60, Id: "exec-18446744073709551615"}
			for _, v := range c.env {
				req.Env = append(req.Env, &agentpb.EnvVar{Name: v.Name, Value: v.Value})
			}
			b, err := agentproto.Marshal(&agentpb.Request{Call: &agentpb.Request_Exec{Exec: req}})
			if err != nil {
				t.Fatalf("%d-byte strings, %d args, %d vars: %v", per, len(c.argv), len(c.env), err)
			}
			// The agent adds PATH and HOME when absent; the rest is margin.
			if len(b) > agentproto.MaxMessageSize-128<<10 {
				t.Errorf("%d-byte strings, %d args, %d vars: %d bytes on the wire, within 128 KiB of the %d cap",
					per, len(c.argv), len(c.env), len(b), agentproto.MaxMessageSize)
			}
			if Size(c.argv, c.env) < MaxTotal-MaxString-16 {
				t.Errorf("%d-byte strings: only %d bytes used; the case does not test the limit", per, Size(c.argv, c.env))
			}
		}
	}
}

func TestDirEmptyMeansDefault(t *testing.T) {
	if err := Dir(""); err != nil {
		t.Errorf("Dir(\"\") = %v", err)
	}
}
