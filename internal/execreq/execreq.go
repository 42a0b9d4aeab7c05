// Package execreq checks the command, environment and working directory of
// a command for the guest against what the guest kernel can execute and
// what one agent protocol message can carry, so that input the guest could
// never run is refused on the host, before a VM boots. The SDK's
// Cmd.Validate names the field at fault; front ends word it their way.
package execreq

import (
	"errors"
	"fmt"
	"strings"

	"github.com/mvm-sh/mvm/internal/envvar"
)

// Limits. MaxString follows Linux: execve refuses any argv or envp string
// longer than MAX_ARG_STRLEN (131072) bytes, its terminating NUL included.
// MaxTotal is the budget for all of argv and the environment together,
// counted as execve counts it against ARG_MAX: each string's bytes, its
// NUL and its pointer (8 bytes). It is well under the guest's ARG_MAX (2
// MiB with the default 8 MiB stack limit) and leaves more than 128 KiB of
// the agent protocol's 1 MiB message cap (agentproto.MaxMessageSize) for
// the encoding's own bytes, the working directory and the variables the
// agent adds (PATH, HOME).
const (
	MaxString = 131072 - 1
	MaxTotal  = 768 << 10
	// MaxDir is Linux's PATH_MAX less its NUL: a longer working directory
	// cannot be entered with one chdir.
	MaxDir = 4096 - 1
	// perString is what execve charges for a string besides its bytes:
	// the NUL and the pointer to it.
	perString = 1 + 8
)

// Classes of invalid input, for errors.Is.
var (
	// ErrNUL: a NUL byte, which execve cannot pass (C strings end at the
	// first NUL): the command would silently get a truncated value. The
	// same value as envvar.ErrNUL.
	ErrNUL = envvar.ErrNUL
	// ErrBadName: an environment variable name outside
	// [A-Za-z_][A-Za-z0-9_]*. The same value as envvar.ErrBadName.
	ErrBadName = envvar.ErrBadName
	// ErrTooLong: a string, or argv and the environment together, over
	// the limits above.
	ErrTooLong = errors.New("too long")
	// ErrNotAbsolute: a working directory that is not an absolute path.
	ErrNotAbsolute = errors.New("must be an absolute path")
)

// Arg checks one argv element.
func Arg(s string) error {
	if strings.IndexByte(s, 0) >= 0 {
		return ErrNUL
	}
	if len(s) > MaxString {
		return fmt.Errorf("is %w: %d bytes, the limit is %d", ErrTooLong, len(s), MaxString)
	}
	return nil
}

// Env checks one variable: its name, the value's bytes, and the length of
// NAME=VALUE, which is the string execve gets.
func Env(v envvar.Var) error {
	if err := v.Validate(); err != nil {
		return err
	}
	if n := len(v.Name) + 1 + len(v.Value); n > MaxString {
		return fmt.Errorf("is %w: NAME=VALUE is %d bytes, the limit is %d", ErrTooLong, n, MaxString)
	}
	return nil
}

// Dir checks a working directory; "" means the default and is valid.
func Dir(s string) error {
	switch {
	case s == "":
		return nil
	case strings.IndexByte(s, 0) >= 0:
		return ErrNUL
	case !strings.HasPrefix(s, "/"):
		return ErrNotAbsolute
	case len(s) > MaxDir:
		return fmt.Errorf("is %w: %d bytes, the limit is %d", ErrTooLong, len(s), MaxDir)
	}
	return nil
}

// Size returns the bytes argv and env take as execve counts them (see
// MaxTotal).
func Size(argv []string, env []envvar.Var) int {
	n := 0
	for _, a := range argv {
		n += len(a) + perString
	}
	for _, v := range env {
		n += len(v.Name) + 1 + len(v.Value) + perString
	}
	return n
}

// Total checks argv and env together against MaxTotal.
func Total(argv []string, env []envvar.Var) error {
	if n := Size(argv, env); n > MaxTotal {
		return fmt.Errorf("command and environment are %w: %d bytes, the limit is %d (each string counts its length plus %d)",
			ErrTooLong, n, MaxTotal, perString)
	}
	return nil
}

// Quote quotes s for a one-line message, shortened when long: the bad
// input itself may be a 100 KiB string.
func Quote(s string) string {
	if len(s) > 64 {
		return fmt.Sprintf("%q...", s[:64])
	}
	return fmt.Sprintf("%q", s)
}
