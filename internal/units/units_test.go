package units

import (
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestParseMemory(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    uint64
		wantErr string // substring; empty means success
	}{
		{name: "bare integer is MiB", in: "1024", want: 1024},
		{name: "bare one", in: "1", want: 1},
		{name: "M", in: "512M", want: 512},
		{name: "MB", in: "512MB", want: 512},
		{name: "MiB", in: "512MiB", want: 512},
		{name: "lower-case m", in: "512m", want: 512},
		{name: "mixed-case mib", in: "512mIb", want: 512},
		{name: "G is binary", in: "1G", want: 1024},
		{name: "GB is binary", in: "2GB", want: 2048},
		{name: "GiB", in: "4GiB", want: 4096},
		{name: "lower-case g", in: "1g", want: 1024},
		{name: "T", in: "1T", want: 1 << 20},
		{name: "TiB", in: "2TiB", want: 2 << 20},
		{name: "TB", in: "1tb", want: 1 << 20},
		{name: "K whole MiB", in: "1024K", want: 1},
		{name: "KB whole MiB", in: "2048KB", want: 2},
		{name: "KiB whole MiB", in: "524288KiB", want: 512},
		{name: "fractional G", in: "1.5G", want: 1536},
		{name: "fractional G trailing zero", in: "0.50G", want: 512},
		{name: "fractional M that is whole", in: "2.0M", want: 2},
		{name: "fractional bare that is whole", in: "16.000", want: 16},
		{name: "fractional T", in: "0.5T", want: 512 << 10},
		{name: "leading and trailing spaces", in: "  1G\t", want: 1024},
		{name: "space before unit", in: "512 M", want: 512},
		{name: "leading zeros", in: "0512", want: 512},
		{name: "largest value", in: strconv.FormatUint(math.MaxUint64, 10), want: math.MaxUint64},

		{name: "empty", in: "", wantErr: `invalid memory size "": empty`},
		{name: "only spaces", in: "   ", wantErr: `invalid memory size "   ": empty`},
		{name: "negative", in: "-1G", wantErr: `invalid memory size "-1G": must be positive`},
		{name: "zero", in: "0", wantErr: `invalid memory size "0": must be greater than zero`},
		{name: "zero with unit", in: "0G", wantErr: `invalid memory size "0G": must be greater than zero`},
		{name: "non-numeric", in: "lots", wantErr: `invalid memory size "lots": expected a number`},
		{name: "unit only", in: "G", wantErr: `invalid memory size "G": expected a number`},
		{name: "plus sign", in: "+1G", wantErr: `invalid memory size "+1G": expected a number`},
		{name: "dangling point", in: "1.G", wantErr: `invalid memory size "1.G": expected a number`},
		{name: "leading point", in: ".5G", wantErr: `invalid memory size ".5G": expected a number`},
		{
			name:    "unknown unit",
			in:      "12X",
			wantErr: `invalid memory size "12X": unknown unit "X" (use M or G, e.g. 512M, 1G)`,
		},
		{name: "bytes unit", in: "1024B", wantErr: `unknown unit "B"`},
		{name: "decimal unit spelling", in: "1GiBs", wantErr: `unknown unit "GiBs"`},
		{name: "exponent", in: "1e3", wantErr: `unknown unit "e3"`},
		{name: "two numbers", in: "1 2", wantErr: `unknown unit "2"`},
		{name: "K not whole MiB", in: "1500K", wantErr: `invalid memory size "1500K": not a whole number of MiB`},
		{name: "fraction not whole MiB", in: "1.3M", wantErr: `invalid memory size "1.3M": not a whole number of MiB`},
		{name: "bare fraction not whole MiB", in: "1.5", wantErr: `invalid memory size "1.5": not a whole number of MiB`},
		{name: "tiny fraction of G", in: "0.0001G", wantErr: "not a whole number of MiB"},
		{name: "overflow bare", in: "18446744073709551616", wantErr: `invalid memory size "18446744073709551616": too large`},
		{name: "overflow with unit", in: "18446744073709551615T", wantErr: "too large"},
		{name: "overflow many digits", in: strings.Repeat("9", 100) + "G", wantErr: "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseMemory(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseMemory(%q) = %d, want error containing %q", tt.in, got, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseMemory(%q) error = %q, want it to contain %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseMemory(%q) unexpected error: %v", tt.in, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseMemory(%q) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

func TestParseTimeout(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    time.Duration
		wantErr string
	}{
		{name: "bare seconds", in: "30", want: 30 * time.Second},
		{name: "bare zero means none", in: "0", want: 0},
		{name: "zero seconds means none", in: "0s", want: 0},
		{name: "seconds", in: "30s", want: 30 * time.Second},
		{name: "minutes", in: "2m", want: 2 * time.Minute},
		{name: "compound", in: "1h30m", want: 90 * time.Minute},
		{name: "milliseconds", in: "500ms", want: 500 * time.Millisecond},
		{name: "fractional duration", in: "1.5s", want: 1500 * time.Millisecond},
		{name: "spaces trimmed", in: " 45 ", want: 45 * time.Second},
		{name: "leading zeros", in: "007", want: 7 * time.Second},
		{name: "largest bare seconds", in: strconv.FormatInt(math.MaxInt64/int64(time.Second), 10), want: time.Duration(math.MaxInt64/int64(time.Second)) * time.Second},

		{name: "empty", in: "", wantErr: `invalid timeout "": empty, expected whole seconds or a duration (e.g. 30 for seconds`},
		{name: "negative bare", in: "-5", wantErr: `invalid timeout "-5": must not be negative`},
		{name: "negative duration", in: "-5s", wantErr: `invalid timeout "-5s": must not be negative`},
		{name: "negative zero", in: "-0", wantErr: `invalid timeout "-0": must not be negative`},
		{name: "double minus", in: "--5", wantErr: `invalid timeout "--5": expected whole seconds or a duration`},
		{name: "garbage", in: "soon", wantErr: `invalid timeout "soon": expected whole seconds or a duration (e.g. 30 for seconds, or 30s, 2m, 1h30m, 500ms; 0 means no timeout)`},
		{name: "fractional bare seconds", in: "1.5", wantErr: `invalid timeout "1.5": expected whole seconds or a duration`},
		{name: "unknown unit", in: "3d", wantErr: `invalid timeout "3d": expected whole seconds or a duration`},
		{name: "bare seconds overflow", in: "9223372037", wantErr: `invalid timeout "9223372037": too large`},
		{name: "huge bare seconds", in: strings.Repeat("9", 40), wantErr: "too large"},
		{name: "duration overflow", in: "9999999999h", wantErr: `invalid timeout "9999999999h": expected whole seconds or a duration`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseTimeout(tt.in)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ParseTimeout(%q) = %v, want error containing %q", tt.in, got, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseTimeout(%q) error = %q, want it to contain %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseTimeout(%q) unexpected error: %v", tt.in, err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseTimeout(%q) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

func TestFormatMiB(t *testing.T) {
	tests := []struct {
		in   uint64
		want string
	}{
		{0, "0M"},
		{1, "1M"},
		{512, "512M"},
		{1024, "1G"},
		{1536, "1536M"},
		{2048, "2G"},
		{1 << 20, "1T"},
		{3 << 20, "3T"},
		{(1 << 20) + 1024, "1025G"},
		{math.MaxUint64, "18446744073709551615M"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, FormatMiB(tt.in)); diff != "" {
				t.Errorf("FormatMiB(%d) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

// TestFormatMiBRoundTrip checks that every formatted size parses back to
// the same value, since messages suggest pasting it into --memory.
func TestFormatMiBRoundTrip(t *testing.T) {
	for _, mib := range []uint64{1, 511, 512, 1024, 1536, 4096, 1 << 20, 5 << 20, math.MaxUint64, math.MaxUint64 &^ (1<<20 - 1)} {
		s := FormatMiB(mib)
		got, err := ParseMemory(s)
		if err != nil {
			t.Fatalf("ParseMemory(FormatMiB(%d) = %q): %v", mib, s, err)
		}
		if got != mib {
			t.Errorf("ParseMemory(FormatMiB(%d) = %q) = %d", mib, s, got)
		}
	}
}

func FuzzParseMemory(f *testing.F) {
	for _, s := range []string{"1024", "1.5G", "12X", "-1", "", "1500K", "0.5T"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		mib, err := ParseMemory(s)
		if err != nil {
			if !strings.Contains(err.Error(), strconv.Quote(s)) {
				t.Errorf("error %q does not quote input %q", err, s)
			}
			return
		}
		if mib == 0 {
			t.Errorf("ParseMemory(%q) accepted zero", s)
		}
	})
}

func FuzzParseTimeout(f *testing.F) {
	for _, s := range []string{"30", "0", "1h30m", "-5s", "", "soon"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseTimeout(s)
		if err != nil {
			if !strings.Contains(err.Error(), strconv.Quote(s)) {
				t.Errorf("error %q does not quote input %q", err, s)
			}
			return
		}
		if d < 0 {
			t.Errorf("ParseTimeout(%q) = %v, negative", s, d)
		}
	})
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 42 << 20: "42.0 MiB", 3 << 30: "3.0 GiB", 5 << 40: "5.0 TiB"} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestAge(t *testing.T) {
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{0, "just now"},
		{59 * time.Second, "just now"},
		{time.Minute, "1 minute ago"},
		{59 * time.Minute, "59 minutes ago"},
		{time.Hour, "1 hour ago"},
		{47 * time.Hour, "47 hours ago"},
		{48 * time.Hour, "2 days ago"},
		{400 * 24 * time.Hour, "400 days ago"},
	} {
		if got := Age(tt.d); got != tt.want {
			t.Errorf("Age(%s) = %q, want %q", tt.d, got, tt.want)
		}
		short := strings.NewReplacer(" minutes", "m", " minute", "m", " hours", "h", " hour", "h", " days", "d").Replace(tt.want)
		if got := ShortAge(tt.d); got != short {
			t.Errorf("ShortAge(%s) = %q, want %q", tt.d, got, short)
		}
	}
}
