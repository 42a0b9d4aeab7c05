package execreq

import (
	"fmt"
	"strings"
	"testing"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/envvar"
)

// checkAll checks a whole request as the SDK does, field by field.
func checkAll(argv []string, env []envvar.Var, dir string) error {
	for _, a := range argv {
		if err := Arg(a); err != nil {
			return err
		}
	}
	for _, v := range env {
		if err := Env(v); err != nil {
			return err
		}
	}
	if err := Dir(dir); err != nil {
		return err
	}
	return Total(argv, env)
}

// TestLimitsFitOneMessage is why MaxTotal is what it is: any request that
// passes the checks, however it spends its budget, fits one agent protocol
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
			if err := checkAll(c.argv, c.env, dir); err != nil {
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
