package procmem

import (
	"os"
	"os/exec"
	"testing"
)

func TestParsePrivate(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want int64
		ok   bool
	}{
		{"rollup", "55a0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 40000 kB\nPss: 30000 kB\nShared_Clean: 20000 kB\nPrivate_Clean: 1000 kB\nPrivate_Dirty: 33000 kB\n", 34000 << 10, true},
		{"none", "Rss: 1 kB\n", 0, false},
		{"bad number", "Private_Clean: x kB\n", 0, false},
		{"negative", "Private_Dirty: -4 kB\n", 0, false},
		{"other unit ignored", "Private_Clean: 4 MB\nPrivate_Dirty: 8 kB\n", 8 << 10, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parsePrivate([]byte(tt.in))
			if (err == nil) != tt.ok || got != tt.want {
				t.Fatalf("parsePrivate = %d, %v; want %d, ok %v", got, err, tt.want, tt.ok)
			}
		})
	}
}

func TestPrivateSelf(t *testing.T) {
	n, err := Private(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if n < 1<<20 {
		t.Fatalf("a Go test process has %d private bytes; want at least 1 MiB", n)
	}
}

func TestPrivateTreeCountsChildren(t *testing.T) {
	self, err := Private(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	child, err := Private(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := PrivateTree(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Memory moves a little between the reads; the child's share must be
	// there.
	if tree < self+child/2 {
		t.Fatalf("tree %d < self %d + child %d / 2", tree, self, child)
	}
}
