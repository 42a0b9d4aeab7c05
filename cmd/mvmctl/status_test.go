package main

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/hostdeps"
)

func TestExitStatus(t *testing.T) {
	exited := func(code int) mvm.Result { return mvm.Result{ExitStatus: mvm.ExitStatus{Code: code}} }
	killed := func(sig syscall.Signal) mvm.Result {
		return mvm.Result{ExitStatus: mvm.ExitStatus{Code: -1, Signal: sig}}
	}
	notRun := mvm.Result{ExitStatus: mvm.ExitStatus{Code: -1}}
	tests := []struct {
		name     string
		res      mvm.Result
		err      error
		wantCode int
		wantMsg  string // "" means no message; "*" means any non-empty one
	}{
		{"exit 0", exited(0), nil, 0, ""},
		{"exit 7", exited(7), nil, 7, ""},
		{"exit 255", exited(255), nil, 255, ""},
		{"killed by SIGKILL", killed(syscall.SIGKILL), nil, 137, ""},
		{"killed by SIGTERM", killed(syscall.SIGTERM), nil, 143, ""},
		{"killed by SIGPIPE", killed(syscall.SIGPIPE), nil, 141, ""},
		{"timed out", mvm.Result{ExitStatus: mvm.ExitStatus{Code: -1, Signal: syscall.SIGTERM, TimedOut: true}},
			fmt.Errorf("%w after 5s", mvm.ErrTimeout), 124, "command timed out after 5s and was killed"},
		{"host gave up on the timeout", notRun,
			&mvm.VMError{Op: "run", Err: fmt.Errorf("%w: the guest did not stop the command", mvm.ErrTimeout)}, 124, "*"},
		{"not found", notRun, &mvm.StartError{Message: "nope: not found", Err: mvm.ErrCommandNotFound}, 127, "nope: not found"},
		{"not executable", notRun, &mvm.StartError{Message: "/etc: is a directory", Err: mvm.ErrNotExecutable}, 126, "/etc: is a directory"},
		{"bad working directory", notRun, &mvm.StartError{Message: "working directory: not a directory"}, 125, "working directory: not a directory"},
		{"interrupted by SIGINT", mvm.Result{ExitStatus: mvm.ExitStatus{Code: -1}, Interrupted: syscall.SIGINT},
			fmt.Errorf("%w (interrupt)", mvm.ErrInterrupted), 130, "*"},
		{"interrupted by SIGHUP", mvm.Result{ExitStatus: mvm.ExitStatus{Code: -1}, Interrupted: syscall.SIGHUP},
			fmt.Errorf("%w (hangup)", mvm.ErrInterrupted), 129, "*"},
		{"command ended after a forwarded interrupt", exited(42), nil, 42, ""},
		{"vm failed to boot", notRun, &mvm.VMError{Op: "boot", Err: errors.New("no hello")}, 125, "boot: no hello\nmvmctl: " + doctorHint},
		{"vmm failed to start", notRun, &mvm.VMError{Op: "start vm", Err: errors.New("exec: qemu: not found")}, 125, "start vm: exec: qemu: not found\nmvmctl: " + doctorHint},
		{"agent of another protocol", notRun, &mvm.VMError{Op: "connect to guest agent", Err: fmt.Errorf("%w: host speaks 2..2, agent 1", agentclient.ErrVersion)}, 125, "*doctor"},
		{"guest broke the protocol at hello", notRun, &mvm.VMError{Op: "connect to guest agent", Err: errors.New("mux: protocol error: frame too large")}, 125, "connect to guest agent: mux: protocol error: frame too large"},
		{"guest died while running", notRun, &mvm.VMError{Op: "run", Err: errors.New("the guest kernel panicked")}, 125, "run: the guest kernel panicked"},
		{"missing host packages", notRun, fmt.Errorf("wrapped: %w", &hostdeps.MissingError{Purpose: "mvm", Missing: []hostdeps.Dep{{What: "qemu-system-x86_64", Package: "qemu-system-x86"}}}), 125, "*doctor"},
		{"accelerator unusable", notRun, &mvm.RequestError{Field: "Accel", Err: errors.New("--accel kvm: /dev/kvm does not exist")}, 125, "Accel: --accel kvm: /dev/kvm does not exist\nmvmctl: " + doctorHint},
		{"output failed", exited(0), &mvm.OutputError{Stream: "stdout", Err: syscall.ENOSPC}, 125, "write stdout: no space left on device"},
		{"not bootstrapped", notRun, mvm.ErrNotBootstrapped, 125, mvm.ErrNotBootstrapped.Error() + "\nmvmctl: " + doctorHint},
		{"invalid", notRun, &mvm.RequestError{Field: "CPUs", Err: errors.New("too many")}, 125, "CPUs: too many"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, msg := exitStatus(tt.res, tt.err, 5*time.Second)
			if code != tt.wantCode {
				t.Errorf("code = %d, want %d", code, tt.wantCode)
			}
			switch {
			case tt.wantMsg == "*" && msg == "":
				t.Errorf("no message, want one")
			case tt.wantMsg == "*doctor":
				if !strings.HasSuffix(msg, "\nmvmctl: "+doctorHint) {
					t.Errorf("message = %q, want it to end with the doctor hint", msg)
				}
			case tt.wantMsg != "*" && msg != tt.wantMsg:
				t.Errorf("message = %q, want %q", msg, tt.wantMsg)
			}
		})
	}
}
