// Package units parses the size and duration flags of mvmctl so that a bad
// value is rejected with a clear message before any VM is booted.
package units

import (
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"
)

// memoryUnits maps a lower-cased unit suffix to its size in KiB. All units
// are binary, matching what QEMU and Firecracker mean by the same letters,
// so a size typed for one of them means the same thing here.
var memoryUnits = map[string]int64{
	"k": 1, "kb": 1, "kib": 1,
	"m": 1 << 10, "mb": 1 << 10, "mib": 1 << 10,
	"g": 1 << 20, "gb": 1 << 20, "gib": 1 << 20,
	"t": 1 << 30, "tb": 1 << 30, "tib": 1 << 30,
}

const memoryHint = "(use M or G, e.g. 512M, 1G)"

// ParseMemory turns a --memory value into MiB, the unit the VM monitors are
// configured in. A bare number means MiB; otherwise a binary unit suffix
// (K, M, G, T, optionally followed by B or iB, any case) scales it. A decimal
// fraction is allowed as long as the result is a whole number of MiB, so
// "1.5G" gives 1536 while "1.3M" is rejected instead of being silently
// rounded. Surrounding spaces are ignored. Zero, negative and overflowing
// sizes are errors.
func ParseMemory(s string) (uint64, error) {
	in := s
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("invalid memory size %q: empty %s", in, memoryHint)
	}
	if s[0] == '-' {
		return 0, fmt.Errorf("invalid memory size %q: must be positive %s", in, memoryHint)
	}

	intPart, fracPart, rest, ok := splitDecimal(s)
	if !ok {
		return 0, fmt.Errorf("invalid memory size %q: expected a number with an optional unit %s", in, memoryHint)
	}
	unit := strings.TrimSpace(rest)
	kib := int64(1 << 10) // a bare number means MiB
	if unit != "" {
		var known bool
		kib, known = memoryUnits[strings.ToLower(unit)]
		if !known {
			return 0, fmt.Errorf("invalid memory size %q: unknown unit %q %s", in, unit, memoryHint)
		}
	}

	// Exact arithmetic: size in KiB = digits * kib / 10^len(frac), and it has
	// to come out as a whole number of MiB.
	num, _ := new(big.Int).SetString(intPart+fracPart, 10)
	num.Mul(num, big.NewInt(kib))
	den := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(fracPart))), nil)
	den.Mul(den, big.NewInt(1<<10))
	mib, rem := new(big.Int).QuoRem(num, den, new(big.Int))
	if rem.Sign() != 0 {
		return 0, fmt.Errorf("invalid memory size %q: not a whole number of MiB", in)
	}
	if mib.Sign() == 0 {
		return 0, fmt.Errorf("invalid memory size %q: must be greater than zero", in)
	}
	if !mib.IsUint64() {
		return 0, fmt.Errorf("invalid memory size %q: too large", in)
	}
	return mib.Uint64(), nil
}

// splitDecimal splits s into the digits before and after an optional
// decimal point and whatever follows the number. Both digit runs must be
// non-empty when a point is present, so "1." and ".5" are not numbers.
func splitDecimal(s string) (intPart, fracPart, rest string, ok bool) {
	i := digitRun(s)
	if i == 0 {
		return "", "", "", false
	}
	intPart, rest = s[:i], s[i:]
	if strings.HasPrefix(rest, ".") {
		j := digitRun(rest[1:])
		if j == 0 {
			return "", "", "", false
		}
		fracPart, rest = rest[1:1+j], rest[1+j:]
	}
	return intPart, fracPart, rest, true
}

// digitRun returns the length of the leading run of ASCII digits in s.
func digitRun(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}

const timeoutHint = "(e.g. 30 for seconds, or 30s, 2m, 1h30m, 500ms; 0 means no timeout)"

// ParseTimeout turns a --timeout value into a duration. A bare non-negative
// integer means seconds, because that is what people type for a command
// timeout; anything else must be Go duration syntax. Zero means "no timeout"
// and is returned as 0 so callers can test for it directly. Surrounding
// spaces are ignored; negative values are errors.
func ParseTimeout(s string) (time.Duration, error) {
	in := s
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("invalid timeout %q: empty, expected whole seconds or a duration %s", in, timeoutHint)
	}
	if strings.HasPrefix(s, "-") {
		if _, err := parseNonNegativeTimeout(s[1:]); err == nil {
			return 0, fmt.Errorf("invalid timeout %q: must not be negative %s", in, timeoutHint)
		}
		return 0, fmt.Errorf("invalid timeout %q: expected whole seconds or a duration %s", in, timeoutHint)
	}
	d, err := parseNonNegativeTimeout(s)
	if err != nil {
		return 0, fmt.Errorf("invalid timeout %q: %w", in, err)
	}
	return d, nil
}

// parseNonNegativeTimeout parses an unsigned timeout, either bare seconds or
// a duration. Its errors carry the explanation but not the input, which the
// caller adds.
func parseNonNegativeTimeout(s string) (time.Duration, error) {
	if n := digitRun(s); n > 0 && n == len(s) {
		secs, err := strconv.ParseUint(s, 10, 64)
		if err != nil || secs > math.MaxInt64/uint64(time.Second) {
			return 0, fmt.Errorf("too large %s", timeoutHint)
		}
		return time.Duration(secs) * time.Second, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("expected whole seconds or a duration %s", timeoutHint)
	}
	if d < 0 {
		return 0, fmt.Errorf("must not be negative %s", timeoutHint)
	}
	return d, nil
}

// FormatMiB renders a size in MiB the way ParseMemory accepts it, using the
// largest binary unit that divides it exactly, so messages show "1G" rather
// than "1024M" and the value can be pasted back into --memory.
func FormatMiB(mib uint64) string {
	switch {
	case mib == 0:
		return "0M"
	case mib%(1<<20) == 0:
		return strconv.FormatUint(mib>>20, 10) + "T"
	case mib%(1<<10) == 0:
		return strconv.FormatUint(mib>>10, 10) + "G"
	default:
		return strconv.FormatUint(mib, 10) + "M"
	}
}

// FormatBytes renders a byte count for people: 512 B, 1.5 KiB, 42.0 MiB,
// 3.2 GiB.
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return strconv.FormatFloat(float64(n)/float64(div), 'f', 1, 64) + " " + string("KMGTP"[exp]) + "iB"
}

// Age renders how long ago something happened, for people: "just now",
// "5 minutes ago", "3 hours ago", "2 days ago" (hours up to two days).
func Age(d time.Duration) string {
	plural := func(n int, one, many string) string {
		if n == 1 {
			return "1 " + one + " ago"
		}
		return strconv.Itoa(n) + " " + many + " ago"
	}
	switch {
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return plural(int(d/time.Minute), "minute", "minutes")
	case d < 48*time.Hour:
		return plural(int(d/time.Hour), "hour", "hours")
	}
	return plural(int(d/(24*time.Hour)), "day", "days")
}

// ShortAge is Age for a table's column: "just now", "5m ago", "3h ago",
// "2d ago".
func ShortAge(d time.Duration) string {
	switch {
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return strconv.Itoa(int(d/time.Minute)) + "m ago"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d/time.Hour)) + "h ago"
	}
	return strconv.Itoa(int(d/(24*time.Hour))) + "d ago"
}
