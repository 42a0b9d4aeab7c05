package envvar

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseFlags(t *testing.T) {
	host := map[string]string{"HOSTVAR": "from host", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := host[k]; return v, ok }
	tests := []struct {
		name    string
		in      []string
		want    []Var
		wantErr string
	}{
		{name: "simple", in: []string{"A=1"}, want: []Var{{"A", "1"}}},
		{name: "value keeps equals", in: []string{"A=b=c=="}, want: []Var{{"A", "b=c=="}}},
		{name: "empty value", in: []string{"A="}, want: []Var{{"A", ""}}},
		{name: "verbatim specials", in: []string{`X=it's "quoted" $(rm -rf /) ; *`}, want: []Var{{"X", `it's "quoted" $(rm -rf /) ; *`}}},
		{name: "spaces and newline", in: []string{"X= a  b \n c "}, want: []Var{{"X", " a  b \n c "}}},
		{name: "utf8", in: []string{"X=héllo ✓"}, want: []Var{{"X", "héllo ✓"}}},
		{name: "underscore start", in: []string{"_X1=y"}, want: []Var{{"_X1", "y"}}},
		{name: "bare copies host", in: []string{"HOSTVAR"}, want: []Var{{"HOSTVAR", "from host"}}},
		{name: "bare empty host", in: []string{"EMPTY"}, want: []Var{{"EMPTY", ""}}},
		{name: "bare missing skipped", in: []string{"NOPE"}, want: nil},
		{name: "order kept", in: []string{"B=2", "A=1", "B=3"}, want: []Var{{"B", "2"}, {"A", "1"}, {"B", "3"}}},
		{name: "digit start", in: []string{"1A=x"}, wantErr: `name "1A"`},
		{name: "dash", in: []string{"A-B=x"}, wantErr: `name "A-B"`},
		{name: "empty name", in: []string{"=x"}, wantErr: `name ""`},
		{name: "injection in name", in: []string{"A;rm -rf /=x"}, wantErr: "must match"},
		{name: "space in name", in: []string{"A B=x"}, wantErr: "must match"},
		{name: "nul value", in: []string{"A=x\x00y"}, wantErr: "NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseFlags(tt.in, lookup)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseFlags(%q) error = %v, want %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("ParseFlags(%q) mismatch (-want +got):\n%s", tt.in, d)
			}
		})
	}
}

func TestMerge(t *testing.T) {
	app := []Var{{"X", "app"}, {"Y", "y"}}
	ep := []Var{{"X", "entrypoint"}, {"Z", "z"}}
	cli := []Var{{"Z", "cli"}}
	got := Merge(app, ep, cli)
	want := []Var{{"X", "entrypoint"}, {"Y", "y"}, {"Z", "cli"}}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Merge mismatch (-want +got):\n%s", d)
	}
}

func TestFromMapSorted(t *testing.T) {
	got := FromMap(map[string]string{"b": "2", "a": "1", "c": "3"})
	want := []Var{{"a", "1"}, {"b", "2"}, {"c", "3"}}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("FromMap mismatch (-want +got):\n%s", d)
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		v      Var
		wantIs error
	}{
		{Var{"A", "1"}, nil},
		{Var{"_", ""}, nil},
		{Var{"a_B9", "x=y\n\xff"}, nil},
		{Var{"", "1"}, ErrBadName},
		{Var{"9A", "1"}, ErrBadName},
		{Var{"A=B", "1"}, ErrBadName},
		{Var{"A\x00", "1"}, ErrBadName},
		{Var{"Ä", "1"}, ErrBadName},
		{Var{"A", "\x00"}, ErrNUL},
		{Var{"A", "ab\x00cd"}, ErrNUL},
	}
	for _, tt := range tests {
		err := tt.v.Validate()
		if !errors.Is(err, tt.wantIs) || (tt.wantIs == nil) != (err == nil) {
			t.Errorf("%+v.Validate() = %v, want %v", tt.v, err, tt.wantIs)
		}
		if got := ValidName(tt.v.Name); got != !errors.Is(err, ErrBadName) {
			t.Errorf("ValidName(%q) = %v, disagrees with Validate (%v)", tt.v.Name, got, err)
		}
	}
}

func TestParseFlagsLongNameIsShortened(t *testing.T) {
	_, err := ParseFlags([]string{strings.Repeat("-", 100000) + "=x"}, nil)
	if err == nil || len(err.Error()) > 300 || !errors.Is(err, ErrBadName) {
		t.Errorf("error for a 100 kB bad name: %.300v (%d bytes)", err, len(fmt.Sprint(err)))
	}
}
