// Package healproc starts the process that makes the snapshot a run found
// missing (mvm.Config from Sandbox.MissingSnapshot), so that the next run
// of the same configuration restores instead of booting. The process is
// detached: its own session, no terminal, none of the run's descriptors
// (a pipe the user reads would stay open until it ends), and the caller
// does not wait for it. It boots a fresh VM, nothing of the run in it.
package healproc

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm"
)

// Off reports whether MVM_NO_AUTO_SNAPSHOT turns the healing off (any
// value but "", "0" and "false").
func Off() bool {
	v := strings.TrimSpace(os.Getenv("MVM_NO_AUTO_SNAPSHOT"))
	return v != "" && v != "0" && !strings.EqualFold(v, "false")
}

// Spawn starts this executable with args, then `--config` and cfg as
// JSON, detached, and returns its pid. Failing only costs the next run
// its restore: callers log the error.
func Spawn(cfg mvm.Config, args ...string) (int, error) {
	spec, err := json.Marshal(cfg)
	if err != nil {
		return 0, err
	}
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	h := exec.Command(self, append(args, "--config", string(spec))...)
	h.Stdin, h.Stdout, h.Stderr = devnull, devnull, devnull
	h.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := h.Start(); err != nil {
		return 0, fmt.Errorf("start the snapshot's healer: %w", err)
	}
	pid := h.Process.Pid
	_ = h.Process.Release()
	return pid, nil
}

// Lower puts the calling process below everything the user runs: the VM
// it boots is only for the next run.
func Lower() { _ = unix.Setpriority(unix.PRIO_PROCESS, 0, 19) }
