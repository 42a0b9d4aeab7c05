package kernel

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestTakesLapicTimerHz(t *testing.T) {
	filler := bytes.Repeat([]byte{0xAB}, 1<<20-5)
	tests := []struct {
		name string
		data []byte
		want bool
	}{
		{"empty", nil, false},
		{"without", bytes.Repeat([]byte("lapic_timer"), 1000), false},
		{"at the start", append([]byte("lapic_timer_hz\x00"), filler...), true},
		// The name straddles the first 1 MiB read.
		{"across reads", append(append(filler[:len(filler):len(filler)], "xxlapic_timer_hz\x00"...), filler...), true},
		{"at the end", append(filler[:len(filler):len(filler)], "lapic_timer_hz"...), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "vmlinux")
			if err := os.WriteFile(p, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := TakesLapicTimerHz(p)
			if err != nil || got != tt.want {
				t.Errorf("TakesLapicTimerHz = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	if _, err := TakesLapicTimerHz(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("a missing kernel gave no error")
	}
}
