package main

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/term"

	"github.com/mvm-sh/mvm"
)

// errNotATTY is docker's wording for -it without a terminal on stdin.
var errNotATTY = errors.New("the input device is not a TTY (-t with -i needs a terminal on stdin; drop -t to pipe input)")

// defaultTermSize is the size a -t command gets when neither stdout nor
// stdin is a terminal (its output is redirected): what terminals start
// with.
var defaultTermSize = mvm.TTY{Rows: 24, Cols: 80}

// hostTerminal is the host side of -t: the size the guest's terminal
// starts with, following the host terminal's size, and raw mode on the
// host terminal while the command reads it, restored on every way out.
type hostTerminal struct {
	sizeFD int // the terminal whose size the guest follows, or -1
	rawFD  int // the terminal put into raw mode, or -1

	mu    sync.Mutex
	saved *term.State
	winch chan os.Signal
	stop  chan struct{}
}

// newHostTerminal looks at the host's stdio. interactive is -i: stdin is
// then the command's input and must be a terminal.
func newHostTerminal(interactive bool) (*hostTerminal, error) {
	t := &hostTerminal{sizeFD: -1, rawFD: -1}
	stdin, stdout := int(os.Stdin.Fd()), int(os.Stdout.Fd())
	if interactive {
		if !term.IsTerminal(stdin) {
			return nil, errNotATTY
		}
		t.rawFD = stdin
	}
	switch {
	case term.IsTerminal(stdout):
		t.sizeFD = stdout
	case term.IsTerminal(stdin):
		t.sizeFD = stdin
	}
	return t, nil
}

// size is the host terminal's size now.
func (t *hostTerminal) size() mvm.TTY {
	if t.sizeFD < 0 {
		return defaultTermSize
	}
	cols, rows, err := term.GetSize(t.sizeFD)
	if err != nil || rows <= 0 || cols <= 0 || rows > 0xffff || cols > 0xffff {
		return defaultTermSize
	}
	return mvm.TTY{Rows: uint16(rows), Cols: uint16(cols)}
}

// attach is called once the command runs: the host terminal goes raw, so
// that every key (Ctrl-C, Ctrl-Z, Ctrl-\ included) reaches the guest's
// line discipline as a byte, and the guest's terminal follows SIGWINCH.
func (t *hostTerminal) attach(p *mvm.Process) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stop != nil {
		return
	}
	if t.rawFD >= 0 {
		if st, err := term.MakeRaw(t.rawFD); err == nil {
			t.saved = st
		}
	}
	t.stop = make(chan struct{})
	if t.sizeFD < 0 {
		return
	}
	t.winch = make(chan os.Signal, 1)
	signal.Notify(t.winch, syscall.SIGWINCH)
	go func(winch <-chan os.Signal, stop <-chan struct{}) {
		for {
			select {
			case <-winch:
				sz := t.size()
				_ = p.Resize(context.Background(), sz.Rows, sz.Cols)
			case <-stop:
				return
			}
		}
	}(t.winch, t.stop)
	// The size may have changed between the start and now.
	sz := t.size()
	go func() { _ = p.Resize(context.Background(), sz.Rows, sz.Cols) }()
}

// restore puts the host terminal back as it was. It is safe to call more
// than once, and before attach.
func (t *hostTerminal) restore() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.saved != nil {
		_ = term.Restore(t.rawFD, t.saved)
		t.saved = nil
	}
	if t.winch != nil {
		signal.Stop(t.winch)
		t.winch = nil
	}
	if t.stop != nil {
		select {
		case <-t.stop:
		default:
			close(t.stop)
		}
	}
}
