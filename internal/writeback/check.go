package writeback

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/hostdeps"
)

// checkImage runs a full e2fsck over the scratch image before anything is
// read from it: it replays the journal of a guest that did not unmount
// (a killed VM), and it refuses a filesystem with damage a preen may not
// repair.
//
// The flags are "-f -p": -f because the guest controls the superblock's
// clean flag, which plain -p trusts and would skip the check on; -p
// (preen) because it repairs only what is safe to repair without a human
// (journal replay, counters, orphans) and gives up on anything else, in
// which case the change set is kept as it is for inspection instead of
// being "fixed" into something the guest never wrote (-y would move
// damaged entries to lost+found, clear inodes, rename duplicates).
//
// e2fsck parses the same hostile image, so it runs with a deadline that
// grows with the image, under ctx, with its address space capped, and
// with WaitDelay so that a wedged child cannot hold the caller.
func checkImage(ctx context.Context, img string) error {
	fi, err := os.Stat(img)
	if err != nil {
		return fmt.Errorf("scratch image: %w", err)
	}
	timeout := checkTimeout(fi.Size())
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	bin, err := hostdeps.LookPath("e2fsck")
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(cctx, bin, "-f", "-p", img)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("e2fsck: %w", err)
	}
	limit := uint64(max(1<<30, fi.Size()/8))
	_ = unix.Prlimit(cmd.Process.Pid, unix.RLIMIT_AS, &unix.Rlimit{Cur: limit, Max: limit}, nil)
	err = cmd.Wait()
	if ctx.Err() != nil {
		return fmt.Errorf("e2fsck interrupted: %w", ctx.Err())
	}
	if cctx.Err() != nil {
		return &InvalidChangeSetError{Reason: fmt.Sprintf("e2fsck -f -p did not finish within %s", timeout)}
	}
	msg := firstLines(out.String(), 6)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code := ee.ExitCode()
		switch {
		case code >= 0 && code <= 3:
			// 1: errors corrected; 2: corrected, "reboot" (meaningless
			// for an image).
			return nil
		case code >= 0 && code&4 != 0:
			return &InvalidChangeSetError{Reason: "the scratch filesystem has errors that e2fsck -f -p does not repair: " + msg}
		case code < 0:
			// Killed by a signal: the address-space cap, for one.
			return &InvalidChangeSetError{Reason: fmt.Sprintf("e2fsck -f -p failed (%v): %s", err, msg)}
		}
		// 8, "operational error": the image exists (it was just
		// stat'ed), so e2fsck could not make sense of it.
		return &InvalidChangeSetError{Reason: fmt.Sprintf("e2fsck -f -p cannot check the scratch filesystem (%v): %s", err, msg)}
	}
	if err != nil {
		return fmt.Errorf("e2fsck -f -p %s: %w", img, err)
	}
	return nil
}

// checkTimeout is e2fsck's deadline for an image of the given size: a
// minute, and a second more per 64 MiB (a full check of a sound image
// reads a fraction of it, at disk speed).
func checkTimeout(size int64) time.Duration {
	return time.Minute + time.Duration(size/(64<<20))*time.Second
}

// firstLines is the first n non-empty lines of e2fsck's output, made safe
// to print: the output quotes names the guest chose, and a terminal must
// not receive their control characters.
func firstLines(s string, n int) string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if len(lines) == n {
			lines = append(lines, "...")
			break
		}
		lines = append(lines, printable(l))
	}
	return strings.Join(lines, "; ")
}

// printable escapes what is not printable text.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == utf8.RuneError, !unicode.IsPrint(r) && r != ' ':
			fmt.Fprintf(&b, "\\x%02x", r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
