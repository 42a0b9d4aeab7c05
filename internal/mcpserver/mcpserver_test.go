package mcpserver

import (
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// The tools' schemas are inferred when they are registered; a bad one
// panics there.
func TestRegister(t *testing.T) {
	New(Options{}).register(mcp.NewServer(&mcp.Implementation{Name: "t"}, nil))
}

func TestHeadTail(t *testing.T) {
	for _, c := range []struct {
		in      string
		limit   int
		max     int
		want    string
		wantCut bool
	}{
		{"short", 100, 10, "short", false},
		{"0123456789abcdef", 100, 8, "0123\n[... 8 bytes cut: get_output returns them ...]\ncdef", true},
		// Kept only 10 of 16 bytes: the tail shown is the kept one's.
		{"0123456789abcdef", 10, 4, "01\n[... 12 bytes cut: get_output returns them ...]\n89", true},
		{"\xff\xfeok", 100, 10, "\uFFFDok", false},
	} {
		cp := &capped{limit: c.limit}
		cp.Write([]byte(c.in))
		got, cut := headTail(cp, c.max)
		if got != c.want || cut != c.wantCut {
			t.Errorf("headTail(%q, kept %d, max %d) = %q, %v; want %q, %v", c.in, c.limit, c.max, got, cut, c.want, c.wantCut)
		}
	}
}

func TestCappedStops(t *testing.T) {
	c := &capped{limit: 4, stop: true}
	if _, err := c.Write([]byte("abcdef")); err != errFull || c.buf.String() != "abcd" || !c.lost {
		t.Errorf("err %v, kept %q", err, c.buf.String())
	}
	if !strings.HasPrefix(c.buf.String(), "ab") {
		t.Error("lost the head")
	}
}
