package agent

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
)

// openPTY allocates a pseudo-terminal from the devpts instance of the
// command's root (its /dev/ptmx finds the /dev/pts beside it), so the
// command finds its terminal under /dev/pts there, sized ws. It returns
// the master, pollable, for the agent, and the slave for the command.
// The slave is opened from the master (TIOCGPTPEER, Linux 4.13), never by
// name, so nothing in the root can stand in for it.
//
// This is what a pty library does in a few ioctls; creack/pty would also
// hard-code /dev/ptmx, the agent's own.
func openPTY(root *fsRoot, ws *unix.Winsize) (master, slave *os.File, err error) {
	mfd, err := root.open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	fail := func(what string, err error) (*os.File, *os.File, error) {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		return fail("unlock pty", err)
	}
	if err := unix.IoctlSetWinsize(mfd, unix.TIOCSWINSZ, ws); err != nil {
		return fail("set window size", err)
	}
	sfd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(mfd), unix.TIOCGPTPEER, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC)
	if errno != 0 {
		return fail("open pty slave", errno)
	}
	// A non-blocking descriptor makes the master pollable: reads wait in
	// the runtime's poller, and read deadlines work (drain grace).
	return os.NewFile(uintptr(mfd), "ptmx"), os.NewFile(sfd, "pts"), nil
}

// winsize converts a protocol window size, rejecting what a terminal
// cannot hold (each field is 16 bits).
func winsize(w *agentpb.WindowSize) (*unix.Winsize, error) {
	if w == nil {
		return &unix.Winsize{}, nil
	}
	for _, v := range []uint32{w.Rows, w.Cols, w.XPixels, w.YPixels} {
		if v > 0xffff {
			return nil, fmt.Errorf("window size %dx%d (%dx%d pixels): each must be below 65536", w.Cols, w.Rows, w.XPixels, w.YPixels)
		}
	}
	return &unix.Winsize{Row: uint16(w.Rows), Col: uint16(w.Cols), Xpixel: uint16(w.XPixels), Ypixel: uint16(w.YPixels)}, nil
}

// resize sets the terminal's window size; the kernel sends SIGWINCH to
// the terminal's foreground process group when it changed. The ioctl goes
// through the file's own descriptor handling, so a master that was
// closed meanwhile is an error, never another file's descriptor.
func resize(master *os.File, w *agentpb.WindowSize) error {
	ws, err := winsize(w)
	if err != nil {
		return err
	}
	rc, err := master.SyscallConn()
	if err != nil {
		return err
	}
	var ioctlErr error
	if err := rc.Control(func(fd uintptr) { ioctlErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, ws) }); err != nil {
		return err
	}
	return ioctlErr
}

// killSession sends sig to every process of session sid. A terminal's
// shell puts its jobs in process groups of their own, so killing the
// command's group alone would leave background jobs holding the terminal
// open (and the output without end-of-file) after the shell exited.
func killSession(sid int, sig unix.Signal) {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == 1 {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d, "stat"))
		if err != nil {
			continue
		}
		if s, ok := statSession(b); ok && s == sid {
			_ = unix.Kill(pid, sig)
		}
	}
}

// statSession parses the session id out of /proc/PID/stat: the sixth
// field, counted after the command name, which is in parentheses and may
// itself contain spaces and parentheses.
func statSession(stat []byte) (int, bool) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	sc := bufio.NewScanner(bytes.NewReader(stat[i+1:]))
	sc.Split(bufio.ScanWords)
	// state, ppid, pgrp, session
	for n := 0; sc.Scan(); n++ {
		if n == 3 {
			sid, err := strconv.Atoi(sc.Text())
			return sid, err == nil
		}
	}
	return 0, false
}
