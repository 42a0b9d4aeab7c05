package agentproto

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

func totalAlloc() uint64 {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc
}

// framedRaw frames an already encoded message body.
func framedRaw(body []byte) []byte {
	return append(protowire.AppendVarint(nil, uint64(len(body))), body...)
}

// repeatedEmpty is a body of n-byte worth of empty strings in field num,
// the encoding that decodes into the most memory per byte.
func repeatedEmpty(num protowire.Number, n int) []byte {
	var b []byte
	for len(b) < n-2 {
		b = protowire.AppendTag(b, num, protowire.BytesType)
		b = protowire.AppendVarint(b, 0)
	}
	return b
}

// wrap puts body into field num of an outer message.
func wrap(num protowire.Number, body []byte) []byte {
	return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), body)
}

// What a hostile guest can make the host's reader allocate, message by
// message: never more than a small multiple of the cap, never anything
// scaled by a length field it did not back with bytes.
func TestReadAllocationBounded(t *testing.T) {
	cases := []struct {
		name    string
		msg     func() proto.Message
		input   []byte
		wantErr bool
		limit   uint64
	}{
		{"4 GiB prefix", func() proto.Message { return &agentpb.ExecEvent{} },
			append(protowire.AppendVarint(nil, 4<<30), "junk"...), true, 256 << 10},
		{"1 MiB prefix, no body", func() proto.Message { return &agentpb.ExecEvent{} },
			protowire.AppendVarint(nil, MaxMessageSize), true, 2 << 20},
		{"Response over its cap", func() proto.Message { return &agentpb.Response{} },
			framedRaw(wrap(1, repeatedEmpty(3, MaxMessageSize-8))), true, 256 << 10},
		{"hello reply of empty capabilities at the cap", func() proto.Message { return &agentpb.Response{} },
			framedRaw(wrap(1, repeatedEmpty(3, MaxResponseSize-8))), false, 4 << 20},
		{"exec event of 1 MiB of unknown fields", func() proto.Message { return &agentpb.ExecEvent{} },
			framedRaw(repeatedEmpty(99, MaxMessageSize-8)), false, 4 << 20},
		{"exec event repeating its output 1 MiB long", func() proto.Message { return &agentpb.ExecEvent{} },
			framedRaw(bytes.Repeat(wrap(2, wrap(2, make([]byte, 1000))), MaxMessageSize/1010)), false, 4 << 20},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.msg()
			r := NewReader(bytes.NewReader(tc.input))
			runtime.GC()
			before := totalAlloc()
			err := r.Read(m)
			grew := totalAlloc() - before
			if (err != nil) != tc.wantErr {
				t.Fatalf("Read: %v (want error: %v)", err, tc.wantErr)
			}
			if grew > tc.limit {
				t.Errorf("allocated %d KiB, limit %d KiB", grew>>10, tc.limit>>10)
			}
			t.Logf("%d KiB allocated for %d bytes of input", grew>>10, len(tc.input))
		})
	}
}

// readAll reads messages until the stream fails, as the host's loops do.
func readAll(t *testing.T, data []byte, newMsg func() proto.Message) {
	r := NewReader(bytes.NewReader(data))
	before := totalAlloc()
	for i := 0; ; i++ {
		if i > len(data) {
			t.Fatal("more messages than input bytes")
		}
		err := r.Read(newMsg())
		if errors.Is(err, io.EOF) && len(data) > 0 && i == 0 {
			t.Fatalf("clean end-of-stream reported for %d bytes that hold no message", len(data))
		}
		if err != nil {
			break
		}
	}
	// The reader's buffer, one message at its cap, and decoding's growth.
	if grew := totalAlloc() - before; grew > 8<<20+64*uint64(len(data)) {
		t.Fatalf("allocated %d bytes for %d bytes of input", grew, len(data))
	}
}

// FuzzReadResponse feeds bytes from a fake guest into the reader of the
// host's one-reply calls (hello, ping, signal, mount, shutdown).
func FuzzReadResponse(f *testing.F) {
	for _, m := range []proto.Message{
		&agentpb.Response{Result: &agentpb.Response_Error{Error: &agentpb.Error{Code: agentpb.Error_CODE_VERSION, Message: "no"}}},
		&agentpb.Response{Result: &agentpb.Response_Signal{Signal: &agentpb.SignalReply{}}},
	} {
		b, err := Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add(protowire.AppendVarint(nil, MaxResponseSize+1))
	f.Fuzz(func(t *testing.T, data []byte) {
		readAll(t, data, func() proto.Message { return &agentpb.Response{} })
	})
}

// FuzzReadExecEvent feeds bytes from a fake guest into the reader of an
// exec stream (started, output, exited).
func FuzzReadExecEvent(f *testing.F) {
	out := AppendOutputPrefix(nil, agentpb.Output_FD_STDOUT, 3)
	f.Add(append(out, "abc"...))
	f.Add(protowire.AppendVarint(nil, 4<<30))
	f.Fuzz(func(t *testing.T, data []byte) {
		readAll(t, data, func() proto.Message { return &agentpb.ExecEvent{} })
	})
}
