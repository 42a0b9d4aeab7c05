package agentclient

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// Refresh renews the guest's clock, random number generator and boot id,
// as a new session's hello would: what a VM restored ahead of time needs
// when it is handed to a run (agentproto.CapRefresh).
func (c *Client) Refresh(ctx context.Context) error {
	r := &agentpb.Refresh{HostTimeUnixNano: time.Now().UnixNano(), Entropy: make([]byte, 32), BootId: make([]byte, 16)}
	_, _ = rand.Read(r.Entropy)
	_, _ = rand.Read(r.BootId)
	if _, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Refresh{Refresh: r}}); err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	return nil
}

// ErrNoneReady is wrapped by Take's error when the pool has no VM of the
// shape ready (or keeps none of it); the error says which, in the pool's
// words.
var ErrNoneReady = errors.New("the pool has no VM of this shape ready")

type notTaken struct{ msg string }

func (e *notTaken) Error() string        { return e.msg }
func (e *notTaken) Is(target error) bool { return target == ErrNoneReady }

// Take asks a pool for a VM of shape. Once it returned, the session's
// calls go to that VM, which is destroyed when the session ends. The
// Hello it returns is the VM's agent's, as a pool relays it.
func (c *Client) Take(ctx context.Context, shape string) (name string, h *Hello, err error) {
	resp, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Take{Take: &agentpb.Take{Shape: shape}}})
	if err != nil {
		var re *RemoteError
		if errors.As(err, &re) && re.Code == agentpb.Error_CODE_NOT_FOUND.String() {
			return "", nil, &notTaken{"the pool " + re.Message}
		}
		return "", nil, fmt.Errorf("take: %w", err)
	}
	t := resp.GetTake()
	if t == nil || t.Name == "" {
		return "", nil, fmt.Errorf("take: unexpected reply %T", resp.Result)
	}
	return t.Name, &Hello{Version: t.Version, AgentVersion: t.AgentVersion, Capabilities: t.Capabilities}, nil
}

// PoolStatus asks a pool what it holds.
func (c *Client) PoolStatus(ctx context.Context) (*agentpb.PoolStatusReply, error) {
	resp, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_PoolStatus{PoolStatus: &agentpb.PoolStatus{}}})
	if err != nil {
		return nil, fmt.Errorf("pool status: %w", err)
	}
	s := resp.GetPoolStatus()
	if s == nil {
		return nil, fmt.Errorf("pool status: unexpected reply %T", resp.Result)
	}
	return s, nil
}

// CgroupStats reads a guest cgroup's counters (agentproto.CapCgroup).
func (c *Client) CgroupStats(ctx context.Context, name string) (*agentpb.CgroupStatsReply, error) {
	resp, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_CgroupStats{CgroupStats: &agentpb.CgroupStats{Name: name}}})
	if err != nil {
		return nil, fmt.Errorf("cgroup stats: %w", err)
	}
	r := resp.GetCgroupStats()
	if r == nil {
		return nil, fmt.Errorf("cgroup stats: unexpected reply %T", resp.Result)
	}
	return r, nil
}

// Release ends a guest container's cgroup and root (agentproto.CapRelease).
func (c *Client) Release(ctx context.Context, cgroup, root string) error {
	if _, err := c.call(ctx, &agentpb.Request{Call: &agentpb.Request_Release{Release: &agentpb.Release{Cgroup: cgroup, Root: root}}}); err != nil {
		return fmt.Errorf("release: %w", err)
	}
	return nil
}
