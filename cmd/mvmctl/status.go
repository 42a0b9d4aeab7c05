package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/hostdeps"
)

// The exit-status contract of mvmctl exec (docs/exit-codes.md), which
// follows docker run's: the command's own status passes through, and the
// codes just above what shells use for themselves are mvmctl's.
const (
	exitTimeout       = 124 // the command ran into --timeout
	exitFailure       = 125 // mvmctl or the VM failed
	exitNotExecutable = 126
	exitNotFound      = 127
	exitSignalBase    = 128 // + N: the command died of signal N, or mvmctl was interrupted by it
)

// exitStatus maps how a run ended to mvmctl's exit status and the one line
// it prints on stderr ("" for none). This is the only place that decides
// it.
func exitStatus(res mvm.Result, err error, timeout time.Duration) (int, string) {
	var (
		start *mvm.StartError
		out   *mvm.OutputError
	)
	switch {
	case err == nil && res.Signal != 0:
		return exitSignalBase + int(res.Signal), ""
	case err == nil:
		return res.Code, ""
	case errors.Is(err, mvm.ErrInterrupted):
		return exitSignalBase + int(res.Interrupted), fmt.Sprintf("interrupted (%s); VM torn down", res.Interrupted)
	case errors.Is(err, mvm.ErrTimeout):
		var vm *mvm.VMError
		if errors.As(err, &vm) {
			return exitTimeout, err.Error()
		}
		return exitTimeout, fmt.Sprintf("command timed out after %s and was killed", timeout)
	case errors.As(err, &start) && errors.Is(err, mvm.ErrCommandNotFound):
		return exitNotFound, start.Message
	case errors.As(err, &start) && errors.Is(err, mvm.ErrNotExecutable):
		return exitNotExecutable, start.Message
	case errors.As(err, &out):
		// Writing the command's output failed (a full disk, EIO): its
		// output is lost, which is mvmctl's failure, not the command's.
		return exitFailure, out.Error()
	}
	msg := err.Error()
	if doctorExplains(err) {
		msg += "\nmvmctl: " + doctorHint
	}
	return exitFailure, msg
}

// doctorHint follows the failures that come from how the host is set up.
const doctorHint = "run `mvmctl doctor` for a full check"

// doctorExplains reports whether err is a failure that `mvmctl doctor`
// diagnoses: no image, missing host packages, an accelerator that cannot
// be used, a VM that did not start or boot (QEMU refusing its command line
// or the image), or a guest agent of another protocol version (an image
// built by another mvmctl). A guest that breaks the protocol is not the
// host's setup and gets no hint.
func doctorExplains(err error) bool {
	var (
		missing *hostdeps.MissingError
		req     *mvm.RequestError
		vm      *mvm.VMError
	)
	switch {
	case errors.Is(err, mvm.ErrNotBootstrapped), errors.As(err, &missing):
		return true
	case errors.As(err, &req):
		return req.Field == "Accel"
	case errors.As(err, &vm):
		return vm.Op == "start vm" || vm.Op == "boot" || errors.Is(err, agentclient.ErrVersion)
	}
	return false
}
