package mvm

import (
	"log/slog"
	"slices"
	"testing"

	"github.com/mvm-sh/mvm/internal/image"
)

// TestPlans: every entry point is the start plan, edited by name; a
// change to the start plan shows here in each of them.
func TestPlans(t *testing.T) {
	names := func(p plan) []string {
		var out []string
		for _, s := range p {
			out = append(out, s.name+"/"+s.undo)
		}
		return out
	}
	onImage := newSandbox(resolved{Config: Config{Logger: slog.New(slog.DiscardHandler)}}, image.Image{})
	withNet := newSandbox(resolved{Config: Config{Logger: slog.New(slog.DiscardHandler)}, net: &resolvedNetwork{}}, image.Image{})
	onTemplate := newSandbox(resolved{Config: Config{Template: "t", Logger: slog.New(slog.DiscardHandler)}}, image.Image{})
	tests := []struct {
		name string
		plan plan
		want []string
	}{
		{"start", onImage.startPlan(), []string{"reclaim/", "prepare run/clean up", "prepare disks/write back", "start vm/stop vm", "agent ready/disconnect", "mount/shut down guest"}},
		{"start on a template", onTemplate.startPlan(), []string{"reclaim/", "template/release template", "prepare run/clean up", "prepare disks/write back", "start vm/stop vm", "agent ready/disconnect", "mount/shut down guest"}},
		{"start with a network", withNet.startPlan(), []string{"reclaim/", "prepare run/clean up", "prepare disks/write back", "network/stop network", "start vm/stop vm", "agent ready/disconnect", "mount/shut down guest"}},
		{"snapshot", onImage.snapshotPlan(), []string{"prepare snapshot/clean up", "start vm/stop vm", "agent ready/", "save/"}},
		{"snapshot of a template", onTemplate.snapshotPlan(), []string{"template/release template", "prepare snapshot/clean up", "start vm/stop vm", "agent ready/", "save/"}},
	}
	for _, tt := range tests {
		if got := names(tt.plan); !slices.Equal(got, tt.want) {
			t.Errorf("%s: %q, want %q", tt.name, got, tt.want)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("replacing a step the plan does not have did not panic")
		}
	}()
	onImage.startPlan().replace("no such step")
}

func TestStatusTransitions(t *testing.T) {
	sb := newSandbox(resolved{Config: Config{Logger: slog.New(slog.DiscardHandler)}}, image.Image{})
	for _, tt := range []struct {
		to   Status
		ok   bool
		want Status
	}{
		{StatusClosed, false, StatusStarting},
		{StatusRunning, true, StatusRunning},
		{StatusStarting, false, StatusRunning},
		{StatusClosing, true, StatusClosing},
		{StatusFailed, false, StatusClosing},
		{StatusRunning, false, StatusClosing},
		{StatusClosed, true, StatusClosed},
	} {
		if ok := sb.setStatus(tt.to); ok != tt.ok || sb.Status() != tt.want {
			t.Errorf("to %s: %v, now %s; want %v, %s", tt.to, ok, sb.Status(), tt.ok, tt.want)
		}
	}
	if !sb.everFailed {
		t.Error("a failure while closing is forgotten: its console log would not be kept")
	}
}
