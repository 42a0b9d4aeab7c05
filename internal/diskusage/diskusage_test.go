package diskusage

import (
	"os"
	"path/filepath"
	"testing"
)

func TestOf(t *testing.T) {
	d := t.TempDir()
	sub := filepath.Join(d, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	// 1 MiB of data, and a 1 GiB sparse file that holds none.
	if err := os.WriteFile(filepath.Join(sub, "data"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(d, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Symlink("/", filepath.Join(d, "link")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path     string
		min, max int64
	}{
		{filepath.Join(sub, "data"), 1 << 20, 1<<20 + 64<<10},
		{filepath.Join(d, "sparse"), 0, 64 << 10},
		{d, 1 << 20, 1<<20 + 256<<10}, // the link is not followed
		{filepath.Join(d, "missing"), 0, 0},
	} {
		if got := Of(tc.path); got < tc.min || got > tc.max {
			t.Errorf("Of(%s) = %d, want %d..%d", tc.path, got, tc.min, tc.max)
		}
	}
}
