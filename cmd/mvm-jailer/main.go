// Command mvm-jailer starts a VMM confined for a run, when mvm runs as
// root. It exists because the VMM drops its own privileges (QEMU's -runas,
// after it has opened the files it needs as root), and the kernel clears a
// process's parent-death signal when its credentials change: on its own,
// a de-privileged VMM would outlive an mvmctl that was killed.
//
// The backend starts mvm-jailer as the first process of fresh PID,
// network, IPC and UTS namespaces, with a parent-death signal. It forks
// the VMM into those namespaces, forwards termination signals to it, and
// exits with its status. When mvmctl dies, mvm-jailer is killed, and with
// the init of a PID namespace gone the kernel kills every process in it:
// the VMM cannot outlive its owner, whatever uid it runs as.
//
//	mvm-jailer --fds N --args-fd M
//
// File descriptors 3 to 3+N-1 are handed to the VMM under the same
// numbers; descriptor M carries the VMM's path and arguments, each ended
// by a NUL byte (not argv: they would show twice in ps, and tools that
// look for the VMM by its command line would find two).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
)

func main() {
	os.Exit(run())
}

func run() int {
	fds := flag.Int("fds", 0, "number of inherited descriptors (from 3) to pass on")
	argsFD := flag.Int("args-fd", -1, "descriptor to read the VMM's NUL-terminated path and arguments from")
	flag.Parse()
	args, err := readArgs(*argsFD)
	if err != nil || len(args) == 0 {
		fmt.Fprintf(os.Stderr, "mvm-jailer: usage: mvm-jailer --fds N --args-fd M (%v)\n", err)
		return 2
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "mvm-jailer: must be the first process of its own PID namespace (it is started by mvm)")
		return 2
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	for i := 0; i < *fds; i++ {
		cmd.ExtraFiles = append(cmd.ExtraFiles, os.NewFile(uintptr(3+i), fmt.Sprintf("fd%d", 3+i)))
	}
	// The VMM would die with us anyway; this makes it die first, and
	// also covers a jailer that is stopped rather than killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "mvm-jailer: %v\n", err)
		return 126
	}
	go func() {
		for s := range sigs {
			_ = cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	fmt.Fprintf(os.Stderr, "mvm-jailer: %v\n", err)
	return 125
}

// readArgs reads NUL-terminated strings from descriptor fd until EOF.
func readArgs(fd int) ([]string, error) {
	if fd < 0 {
		return nil, errors.New("no --args-fd")
	}
	f := os.NewFile(uintptr(fd), "args")
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, err
	}
	if len(b) == 0 || b[len(b)-1] != 0 {
		return nil, errors.New("arguments must each end with a NUL byte")
	}
	return strings.Split(string(b[:len(b)-1]), "\x00"), nil
}
