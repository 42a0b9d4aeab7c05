package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// guestSHA256 is a guest script that writes n random bytes to stdout,
// exiting as soon as the last byte is in its pipe, and their sha256 to
// stderr before them.
func guestSHA256(n int) string {
	return fmt.Sprintf("head -c %d /dev/urandom > /tmp/d && sha256sum /tmp/d >&2 && exec cat /tmp/d", n)
}

// checkSHA256 compares stdout with the sha256 the guest printed on stderr.
func checkSHA256(t *testing.T, stdout, stderr []byte, n int) {
	t.Helper()
	if len(stdout) != n {
		t.Fatalf("stdout has %d bytes, want %d", len(stdout), n)
	}
	sum := sha256.Sum256(stdout)
	if f := strings.Fields(string(stderr)); len(f) != 2 || f[0] != hex.EncodeToString(sum[:]) {
		t.Fatalf("sha256 of stdout %x, guest says %q", sum, stderr)
	}
}

// A reader that stops while the command writes its last bytes and exits,
// and resumes only after the agent's drain grace (2 s) has long passed,
// still gets every byte. The pause comes when 1.5 MB are left: that fits
// the guest's 1 MiB pipe plus the stream window, so the command ends
// during the pause with the rest of its output still in the guest.
func TestOutputSlowReaderByteExact(t *testing.T) {
	const (
		size  = 30 << 20
		left  = 1500000
		pause = 5 * time.Second
	)
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--timeout", "2m", "--", "sh", "-c", guestSHA256(size))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := io.CopyN(&got, out, size-left); err != nil {
		t.Fatalf("after %d bytes: %v (stderr %q)", got.Len(), err, stderr.Bytes())
	}
	time.Sleep(pause)
	if _, err := io.Copy(&got, out); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("mvmctl: %v (stderr %q)", err, stderr.Bytes())
	}
	checkSHA256(t, got.Bytes(), stderr.Bytes(), size)
	e.assertClean()
}

// The issue's own reproduction: 1.5 MB that the command writes at once,
// read by a pipe that sleeps before reading anything.
func TestOutputReaderSleepsFirst(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "--", "sh", "-c", "head -c 1500000 /dev/zero")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for the first byte (the VM is up and the command is writing:
	// it exits at once, the rest fitting its pipe and the stream window),
	// then stop reading for longer than the 2 s drain grace.
	first := make([]byte, 1)
	if _, err := io.ReadFull(out, first); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	rest, err := io.ReadAll(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("mvmctl: %v", err)
	}
	if n := 1 + len(rest); n != 1500000 || bytes.Count(rest, []byte{0}) != len(rest) {
		t.Fatalf("got %d bytes, want 1500000 zero bytes", n)
	}
}

// Large output from a command that exits at once, over and over (the
// 200-run version is a soak benchmark in test/bench): every byte, every
// time, at sizes around the pipe and window boundaries.
func TestOutputLargeFastExitLoop(t *testing.T) {
	sizes := []int{1500000, 1 << 20, 1<<20 + 1, 2<<20 + 12345}
	e := newEnv(t)
	for i := range 3 * len(sizes) {
		n := sizes[i%len(sizes)]
		r := e.run(nil, "exec", "--", "sh", "-c", guestSHA256(n))
		if r.code != 0 {
			t.Fatalf("run %d (%d bytes): %s", i, n, r)
		}
		checkSHA256(t, r.stdout, r.stderr, n)
	}
	e.assertClean()
}

// escape is a guest shell prelude that starts argv in a session of its
// own (out of the command's process group, holding its stdout and stderr
// open), waits until it is there, and prints its pid on stderr.
func escape(argv string) string {
	return `p=$(mktemp -u); setsid sh -c 'echo $$ > "$1"; exec ` + argv + `' sh "$p" & ` +
		`while [ ! -s "$p" ]; do sleep 0.01; done; cat "$p" >&2; rm -f "$p"; `
}

// A process that escaped the command's process group and holds stdout
// open, idle or writing without pause, does not keep the run alive: the
// run ends about the drain grace after the command, with its output.
func TestOutputEscapeeDoesNotHang(t *testing.T) {
	for _, tc := range []struct{ name, argv string }{
		{"idle", "sleep 1000"},
		{"flooding", "yes flood"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.run(nil, "exec", "--", "sh", "-c", escape(tc.argv)+"echo done >&2")
			if r.code != 0 || !strings.HasSuffix(string(r.stderr), "\ndone\n") {
				t.Fatalf("got %s", r)
			}
			// Boot (~1.5 s under TCG), the 2 s grace, teardown; far less
			// than any hang.
			if r.elapsed > 20*time.Second {
				t.Fatalf("run took %s", r.elapsed)
			}
			if tc.name == "flooding" && !bytes.HasPrefix(r.stdout, []byte("flood\nflood\n")) {
				t.Fatalf("stdout starts %q", r.stdout[:min(len(r.stdout), 20)])
			}
			e.assertClean()
		})
	}
}
