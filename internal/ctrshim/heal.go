package ctrshim

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/healproc"
)

// HealCommand is the first argument of the shim binary run as the
// healer: a container whose VM booted for want of a snapshot of its
// image's root (the first of that image on the node, or after the
// snapshots were pruned) leaves one for the next, as `mvmctl exec` does.
// It is started once the container's VM is gone, detached (it outlives
// the shim, which exits at the task's delete), niced; it boots a fresh VM
// on the root tree from the cache (the container's mount is gone by
// then), nothing of the container in it.
const HealCommand = "snapshot-heal"

// spawnHeal starts the healer for cfg, unless MVM_NO_AUTO_SNAPSHOT is set
// in the shim's environment (containerd's).
func (s *Service) spawnHeal(cfg mvm.Config) {
	if healproc.Off() {
		return
	}
	pid, err := healproc.Spawn(cfg, HealCommand)
	if err != nil {
		s.log.Warn("no snapshot made after the task", "err", err)
		return
	}
	s.log.Info("making the root's missing snapshot in the background", "pid", pid, "log", mvm.HealLog(cfg))
}

// Heal is the healer's main: `containerd-shim-mvm-v2 snapshot-heal
// --config JSON`. It returns the process's exit code; what it did goes to
// the heal log (mvm.HealLog).
func Heal(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet(HealCommand, flag.ContinueOnError)
	fs.SetOutput(stderr)
	spec := fs.String("config", "", "the machine configuration, as the SDK's Config in JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	healproc.Lower()
	var cfg mvm.Config
	if err := json.Unmarshal([]byte(*spec), &cfg); err != nil {
		fmt.Fprintln(stderr, "snapshot-heal: --config:", err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	_, err := mvm.HealSnapshot(ctx, cfg)
	switch {
	case err == nil, errors.Is(err, mvm.ErrSnapshotExists), errors.Is(err, mvm.ErrBusy):
		return 0
	default:
		fmt.Fprintln(stderr, "snapshot-heal:", err)
		return 1
	}
}
