package agent

import "testing"

func TestProcState(t *testing.T) {
	tests := []struct {
		name      string
		stat      string
		ok, alive bool
	}{
		{"running", "42 (sh) R 1 42 42 0 -1 4194560 100 0 0 0", true, true},
		{"sleeping", "42 (python3) S 1 42 42 0 -1 4194304 100 0 0 0", true, true},
		{"zombie", "42 (sh) Z 1 42 42 0 -1 4194564 100 0 0 0", true, false},
		{"dead", "42 (sh) X 1 42 42 0 -1 4194564 100 0 0 0", true, false},
		{"kernel thread", "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0", true, false},
		{"name with spaces and parens", "7 (a) b (c) S 1 7 7 0 -1 4194304 0 0 0 0", true, true},
		{"name with a newline", "7 (a\n) D 1 7 7 0 -1 4194304 0 0 0 0", true, true},
		{"no closing paren", "7 (broken S 1 7", false, false},
		{"truncated", "7 (sh) S 1 7", false, false},
		{"bad flags", "7 (sh) S 1 7 7 0 -1 x 0", false, false},
		{"empty", "", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, ok := procState([]byte(tt.stat))
			if ok != tt.ok {
				t.Fatalf("procState(%q) ok = %v, want %v", tt.stat, ok, tt.ok)
			}
			if ok && st.alive() != tt.alive {
				t.Errorf("procState(%q).alive() = %v, want %v", tt.stat, st.alive(), tt.alive)
			}
		})
	}
}
