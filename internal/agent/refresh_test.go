package agent

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// failing is the entropy whose application the test's hook fails.
var failing []byte

// A refresh applies its clock and entropy through the hello hook, checks
// its boot id as a hello does, and is served only by an agent that owns
// the guest.
func TestRefresh(t *testing.T) {
	var mu sync.Mutex
	var got []*agentpb.Hello
	srv := NewServer(nil, "test", Options{Mounts: true, OnHello: func(h *agentpb.Hello) error {
		mu.Lock()
		got = append(got, h)
		mu.Unlock()
		if bytes.Equal(h.Entropy, failing) {
			return errors.New("RNDRESEEDCRNG: operation not permitted")
		}
		return nil
	}})
	h := serve(t, srv)
	entropy := bytes.Repeat([]byte{7}, 32)
	failing = bytes.Repeat([]byte{9}, 32)
	tests := []struct {
		name string
		req  *agentpb.Refresh
		code agentpb.Error_Code // 0: success
	}{
		// No boot id: this test must not bind a file over the test
		// machine's /proc.
		{"clock and entropy", &agentpb.Refresh{HostTimeUnixNano: 0, Entropy: entropy}, 0},
		{"short boot id", &agentpb.Refresh{Entropy: entropy, BootId: []byte{1, 2, 3}}, agentpb.Error_CODE_INVALID_ARGUMENT},
		{"no entropy", &agentpb.Refresh{}, agentpb.Error_CODE_INVALID_ARGUMENT},
		{"reseed fails", &agentpb.Refresh{Entropy: failing}, agentpb.Error_CODE_INTERNAL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mu.Lock()
			before := len(got)
			mu.Unlock()
			st, rd := h.call(&agentpb.Request{Call: &agentpb.Request_Refresh{Refresh: tt.req}})
			defer st.Close()
			var resp agentpb.Response
			if err := rd.Read(&resp); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			applied := len(got) - before
			mu.Unlock()
			if tt.code == 0 {
				if resp.GetRefresh() == nil {
					t.Fatalf("reply %v, want RefreshReply", resp.Result)
				}
				if applied != 1 || !bytes.Equal(got[len(got)-1].Entropy, entropy) {
					t.Fatalf("the hello hook got %d calls; want one with the entropy", applied)
				}
				return
			}
			if e := resp.GetError(); e == nil || e.Code != tt.code {
				t.Fatalf("reply %v, want error %s", resp.Result, tt.code)
			}
			if applied != 0 && tt.name != "reseed fails" {
				t.Fatalf("a refused refresh still reached the hello hook")
			}
		})
	}

	plain := serve(t, NewServer(nil, "test", Options{}))
	st, rd := plain.call(&agentpb.Request{Call: &agentpb.Request_Refresh{Refresh: &agentpb.Refresh{}}})
	defer st.Close()
	var resp agentpb.Response
	if err := rd.Read(&resp); err != nil {
		t.Fatal(err)
	}
	if e := resp.GetError(); e == nil || e.Code != agentpb.Error_CODE_UNSUPPORTED {
		t.Fatalf("an agent that does not own the guest: %v, want CODE_UNSUPPORTED", resp.Result)
	}
}
