package hostclock

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestMeasureAgrees: two measurements of the rate agree to 50 parts per
// million, also with the host busy (a spinning goroutine per CPU would
// make any one unbracketed read late).
func TestMeasureAgrees(t *testing.T) {
	if !haveTSC || !constantTSC() {
		t.Skip("no constant-rate TSC on this host")
	}
	stop := make(chan struct{})
	defer close(stop)
	for range 4 {
		go func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	a, err := Measure(window)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Measure(window)
	if err != nil {
		t.Fatal(err)
	}
	diff := float64(a) - float64(b)
	if diff < 0 {
		diff = -diff
	}
	t.Logf("TSC: %d kHz, then %d kHz", a, b)
	if diff/float64(a) > 50e-6 {
		t.Errorf("two measurements differ by %.0f ppm: %d and %d kHz", diff/float64(a)*1e6, a, b)
	}
}

func TestParseCache(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "host-tsc")
	boot := []byte("6f1c2d3e-0000-4000-8000-000000000001")
	for _, c := range []struct {
		name, content string
		want          uint64
		ok            bool
	}{
		{"this boot", string(boot) + " 2599985\n", 2599985, true},
		{"another boot", "00000000-0000-4000-8000-000000000002 2599985\n", 0, false},
		{"no rate", string(boot) + "\n", 0, false},
		{"not a number", string(boot) + " fast\n", 0, false},
		{"implausible", string(boot) + " 12\n", 0, false},
		{"too large", string(boot) + " 2599985" + string(make([]byte, 200)), 0, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(c.content), 0o644); err != nil {
				t.Fatal(err)
			}
			k, ok := parseCache(path, boot)
			if k != c.want || ok != c.ok {
				t.Errorf("parseCache = %d, %v; want %d, %v", k, ok, c.want, c.ok)
			}
		})
	}
	if _, ok := parseCache(filepath.Join(dir, "missing"), boot); ok {
		t.Error("a missing cache file parsed")
	}
}

// TestTSCKHzCached: the rate is written to the cache dir for this boot.
func TestTSCKHzCached(t *testing.T) {
	if !haveTSC || !constantTSC() {
		t.Skip("no constant-rate TSC on this host")
	}
	dir := t.TempDir()
	t.Setenv("MVM_CACHE_DIR", dir)
	start := time.Now()
	k, err := cached()
	if err != nil {
		t.Fatal(err)
	}
	first := time.Since(start)
	start = time.Now()
	k2, err := cached()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d kHz: measured in %v, read back in %v", k, first, time.Since(start))
	if k2 != k {
		t.Errorf("the cached rate is %d kHz, measured %d", k2, k)
	}
	b, err := os.ReadFile(filepath.Join(dir, "host-tsc"))
	if err != nil {
		t.Fatal(err)
	}
	if len(b) == 0 {
		t.Error("empty cache file")
	}
}
