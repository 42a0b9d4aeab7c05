package agentproto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/protobuf/proto"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/mux"
)

func TestAppendOutputPrefixMatchesMarshal(t *testing.T) {
	for _, fd := range []agentpb.Output_Fd{agentpb.Output_FD_STDOUT, agentpb.Output_FD_STDERR} {
		for _, n := range []int{1, 127, 128, 16383, 16384, ChunkSize} {
			data := bytes.Repeat([]byte{0xa5}, n)
			want, err := Marshal(&agentpb.ExecEvent{Event: &agentpb.ExecEvent_Output{Output: &agentpb.Output{Fd: fd, Data: data}}})
			if err != nil {
				t.Fatal(err)
			}
			prefix := AppendOutputPrefix(nil, fd, n)
			if len(prefix) > MaxOutputPrefix {
				t.Errorf("prefix of %d bytes exceeds MaxOutputPrefix", len(prefix))
			}
			if got := append(prefix, data...); !bytes.Equal(got, want) {
				t.Errorf("fd %v n %d: hand-encoded frame differs from Marshal", fd, n)
			}
		}
	}
}

func TestReadWriteRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	msgs := []proto.Message{
		&agentpb.Request{Call: &agentpb.Request_Ping{Ping: &agentpb.Ping{Payload: []byte("x")}}},
		&agentpb.Request{Call: &agentpb.Request_Exec{Exec: &agentpb.Exec{Argv: []string{"a", "b c"}, Cwd: "/"}}},
	}
	for _, m := range msgs {
		if err := Write(&buf, m); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf)
	for _, want := range msgs {
		var got agentpb.Request
		if err := r.Read(&got); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(&got, want) {
			t.Errorf("got %v, want %v", &got, want)
		}
	}
	var extra agentpb.Request
	if err := r.Read(&extra); !errors.Is(err, io.EOF) {
		t.Errorf("read past the end: %v, want io.EOF", err)
	}
}

func TestReadRejectsOversize(t *testing.T) {
	var buf bytes.Buffer
	big := &agentpb.Ping{Payload: make([]byte, MaxMessageSize+1)}
	if err := Write(&buf, big); err == nil {
		t.Fatal("Write of an oversize message should fail")
	}
	// A peer that announces a huge message is refused before allocation.
	r := NewReader(bytes.NewReader([]byte{0xff, 0xff, 0xff, 0x7f}))
	if err := r.Read(&agentpb.Ping{}); err == nil {
		t.Fatal("oversize length prefix accepted")
	}
}

func TestClassify(t *testing.T) {
	for _, err := range []error{mux.ErrSessionClosed, mux.ErrStreamReset, io.ErrUnexpectedEOF, syscall.EPIPE} {
		if got := Classify(err); !errors.Is(got, ErrClosed) || !errors.Is(got, err) {
			t.Errorf("Classify(%v) = %v: want ErrClosed wrapping the cause", err, got)
		}
	}
	other := errors.New("other")
	if Classify(other) != other {
		t.Error("Classify changed an unrelated error")
	}
}

func TestCheckCgroupName(t *testing.T) {
	for _, c := range []struct {
		name string
		ok   bool
	}{
		{"ctr-0a1b2c3d4e5f", true},
		{"a.b_c-D9", true},
		{"", false},
		{".", false},
		{"..", false},
		{"a/b", false},
		{"../etc", false},
		{"x y", false},
		{"é", false},
		{"a\x00", false},
		{strings.Repeat("a", MaxCgroupName), true},
		{strings.Repeat("a", MaxCgroupName+1), false},
	} {
		if err := CheckCgroupName(c.name); (err == nil) != c.ok {
			t.Errorf("CheckCgroupName(%q) = %v, want ok=%v", c.name, err, c.ok)
		}
	}
}
