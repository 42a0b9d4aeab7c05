package mvm

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	"github.com/mvm-sh/mvm/internal/image"
)

// Error classes. Callers test them with errors.Is; the concrete types
// below carry the details.
var (
	// ErrNotBootstrapped means there is no image to boot: run
	// `mvmctl bootstrap` once.
	ErrNotBootstrapped = image.ErrNotBootstrapped
	// ErrInvalid is a configuration or command that cannot work, found
	// before anything boots (wrapped in a *RequestError).
	ErrInvalid = errors.New("invalid request")
	// ErrTimeout is a command that ran into Cmd.Timeout and was killed.
	ErrTimeout = errors.New("command timed out")
	// ErrCommandNotFound and ErrNotExecutable are commands that could not
	// be started (wrapped in a *StartError).
	ErrCommandNotFound = errors.New("command not found")
	ErrNotExecutable   = errors.New("command not executable")
	// ErrVM is the class of every *VMError: the VM or its agent failed.
	ErrVM = errors.New("vm failed")
	// ErrClosed is a call on a sandbox that is closed or closing.
	ErrClosed = errors.New("sandbox closed")
	// ErrInterrupted is a run that Run tore down because of a signal
	// (see WithSignals) before the command ended.
	ErrInterrupted = errors.New("interrupted")
)

// RequestError is an invalid configuration or command.
type RequestError struct {
	// Field names what is wrong, as the caller spelled it ("CPUs",
	// "Dirs[1]", "Cmd.Env").
	Field string
	// Value is the bad value as the message shows it, or "" when Err
	// already says it.
	Value string
	Err   error
	// Other is the field the bad one conflicts with, or "".
	Other string
	// Hint says what to do, or is "".
	Hint string
	link string // joins Err to Other ("from", "by")
}

func (e *RequestError) Error() string { return e.Describe(nil) }

// Describe is the error with its fields named by name, which is how a
// front end speaks in its own words (a command line's flags, a tool's
// parameters) with the SDK's one set of checks: name maps a field to
// what the user typed ("" drops the field's name from the message); nil
// keeps the fields' own names.
func (e *RequestError) Describe(name func(field string) string) string {
	spell := func(f string) string {
		if name != nil {
			return name(f)
		}
		return f
	}
	var b strings.Builder
	if f := spell(e.Field); f != "" {
		b.WriteString(f)
		if e.Value != "" {
			b.WriteString(" " + e.Value)
		}
		b.WriteString(": ")
	}
	b.WriteString(e.Err.Error())
	if e.Other != "" {
		link := e.link
		if link == "" {
			link = "from"
		}
		b.WriteString(" " + link + " " + spell(e.Other))
	}
	if e.Hint != "" {
		b.WriteString("; " + e.Hint)
	}
	return b.String()
}

// Unwrap returns both the cause and ErrInvalid, so either can be tested.
func (e *RequestError) Unwrap() []error { return []error{ErrInvalid, e.Err} }

func invalid(field, value string, format string, args ...any) error {
	return &RequestError{Field: field, Value: value, Err: fmt.Errorf(format, args...)}
}

// StartError is a command the guest agent could not start.
type StartError struct {
	// Argv0 is the command as given.
	Argv0 string
	// Errno is the errno of the failing step, when there is one.
	Errno syscall.Errno
	// Message is the agent's explanation.
	Message string
	// Err is the class: ErrCommandNotFound, ErrNotExecutable, ErrInvalid
	// or nil (anything else: fork failed, out of memory...).
	Err error
}

func (e *StartError) Error() string { return e.Message }

func (e *StartError) Unwrap() error { return e.Err }

// VMError is a failure of the VM or of its agent rather than of the
// command: it would not boot, it died, its agent stopped answering.
type VMError struct {
	// Op is the step that failed ("boot", "connect to guest agent",
	// "run", ...).
	Op  string
	Err error
	// ConsoleLog is the guest console log kept for diagnosis, once the
	// sandbox is closed (empty if none was kept).
	ConsoleLog string
}

func (e *VMError) Error() string {
	msg := e.Op + ": " + e.Err.Error()
	if e.ConsoleLog != "" {
		msg += " (guest console log: " + e.ConsoleLog + ")"
	}
	return msg
}

// Unwrap returns both ErrVM and the cause.
func (e *VMError) Unwrap() []error { return []error{ErrVM, e.Err} }

// WriteBackError is a read-write directory whose changes could not be
// written back. They are not lost: they are kept at Kept, which
// `mvmctl recover` applies.
type WriteBackError struct {
	Host string // the shared host directory
	Kept string // where the changes are kept; empty if they could not be
	Err  error
}

func (e *WriteBackError) Error() string {
	msg := "write back " + e.Host + ": " + e.Err.Error()
	if e.Kept != "" {
		msg += "; the changes are kept in " + e.Kept
	}
	return msg
}

func (e *WriteBackError) Unwrap() error { return e.Err }

// OutputError is a write to Cmd.Stdout or Cmd.Stderr that failed (other
// than a closed pipe, which the command sees as SIGPIPE): the command was
// stopped, since what it writes would be lost.
type OutputError struct {
	Stream string // "stdout" or "stderr"
	Err    error
}

func (e *OutputError) Error() string { return "write " + e.Stream + ": " + e.Err.Error() }

func (e *OutputError) Unwrap() error { return e.Err }
