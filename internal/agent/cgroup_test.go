package agent

import (
	"maps"
	"testing"
)

func TestCgroupFileParsers(t *testing.T) {
	cpu := "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\nnr_periods 0\nbogus\nneg -1\nhuge 99999999999999999999999\n"
	want := map[string]uint64{"usage_usec": 1234, "user_usec": 1000, "system_usec": 234, "nr_periods": 0}
	if got := keyed([]byte(cpu)); !maps.Equal(got, want) {
		t.Errorf("keyed(cpu.stat) = %v, want %v", got, want)
	}
	for _, c := range []struct {
		in   string
		want uint64
	}{
		{"4096\n", 4096},
		{"max\n", 0},
		{"", 0},
		{"-5\n", 0},
		{"12 34\n", 0},
	} {
		if got := single([]byte(c.in)); got != c.want {
			t.Errorf("single(%q) = %d, want %d", c.in, got, c.want)
		}
	}
}
