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

func TestKernelAtLeast(t *testing.T) {
	for _, c := range []struct {
		release string
		want    bool
	}{
		{"6.1.0-mvm", true},
		{"5.14.0", true},
		{"5.13.19", false},
		{"4.19.0-amd64", false},
		{"10.0", true},
		{"", false},
		{"x.y", false},
	} {
		if got := kernelAtLeast(c.release, 5, 14); got != c.want {
			t.Errorf("kernelAtLeast(%q, 5, 14) = %v, want %v", c.release, got, c.want)
		}
	}
}
