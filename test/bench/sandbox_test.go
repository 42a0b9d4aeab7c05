package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/mvm-sh/mvm"
)

// BenchmarkSandboxCLI measures a sandbox of `mvmctl sandbox create`:
// `sandbox exec NAME -- true` end to end (mvmctl's start, the attach, the
// command) against an SDK Exec on the same sandbox attached once (the
// goal is under 20 ms), and `sandbox cp` of a 100 MiB file in and out
// against cp on the host.
func BenchmarkSandboxCLI(b *testing.B) {
	dir := b.TempDir()
	env := append(os.Environ(), "MVM_RUN_DIR="+filepath.Join(dir, "run"), "MVM_STATE_DIR="+filepath.Join(dir, "state"))
	run := func(args ...string) time.Duration {
		b.Helper()
		cmd := exec.Command(*mvmctl, args...)
		cmd.Env = env
		var errb bytes.Buffer
		cmd.Stderr = &errb
		start := time.Now()
		if err := cmd.Run(); err != nil {
			b.Fatalf("mvmctl %q: %v: %s", args, err, errb.String())
		}
		return time.Since(start)
	}
	created := run("sandbox", "create", "bench")
	defer run("sandbox", "rm", "bench")

	const n = 30
	var cli []time.Duration
	for i := 0; i < n; i++ {
		cli = append(cli, run("sandbox", "exec", "bench", "--", "true"))
	}
	for _, kv := range env[len(env)-2:] {
		k, v, _ := cutEnv(kv)
		b.Setenv(k, v)
	}
	ctx := context.Background()
	sb, err := mvm.Attach(ctx, mvm.Config{}, "bench")
	if err != nil {
		b.Fatal(err)
	}
	var sdk []time.Duration
	for i := 0; i < n; i++ {
		start := time.Now()
		if st, err := sb.Exec(ctx, mvm.Cmd{Argv: []string{"true"}}); err != nil || !st.Success() {
			b.Fatalf("exec: %v %v", st, err)
		}
		sdk = append(sdk, time.Since(start))
	}
	sb.Close(ctx)

	src := filepath.Join(dir, "file")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, 100<<20); err != nil {
		b.Fatal(err)
	}
	f.Close()
	hostStart := time.Now()
	if out, err := exec.Command("cp", src, filepath.Join(dir, "hostcopy")).CombinedOutput(); err != nil {
		b.Fatalf("cp: %v %s", err, out)
	}
	host := time.Since(hostStart)
	in := run("sandbox", "cp", src, "bench:/tmp/file")
	out := run("sandbox", "cp", "bench:/tmp/file", filepath.Join(dir, "back"))
	// Pause and resume of the sandbox, with the 100 MiB file in its /tmp
	// (guest RAM): what a paused sandbox takes on disk.
	var pauses, resumes []time.Duration
	for i := 0; i < 3; i++ {
		pauses = append(pauses, run("sandbox", "pause", "bench"))
		var used int64
		if fi, err := os.Stat(filepath.Join(dir, "run", "bench", "paused", "state")); err == nil {
			used = diskBlocks(fi)
		}
		if i == 0 {
			fmt.Printf("(s) a paused sandbox (512 MiB guest, 100 MiB in its /tmp) takes %d MiB of state on disk\n", used>>20)
		}
		resumes = append(resumes, run("sandbox", "resume", "bench"))
	}
	fmt.Printf("(s) sandbox pause: median %s; sandbox resume: median %s (end to end, mvmctl's start included)\n",
		median(pauses).Round(time.Millisecond), median(resumes).Round(time.Millisecond))
	mib := func(d time.Duration) float64 { return 100 / d.Seconds() }
	fmt.Printf("(s) sandbox create %s; sandbox exec -- true: median %s (min %s) end to end; attached SDK Exec: median %s (goal < 20 ms)\n",
		created.Round(time.Millisecond), median(cli).Round(100*time.Microsecond), minDur(cli).Round(100*time.Microsecond), median(sdk).Round(100*time.Microsecond))
	fmt.Printf("(s) sandbox cp of 100 MiB: in %s (%.0f MiB/s), out %s (%.0f MiB/s); cp on the host %s (%.0f MiB/s): %.2fx and %.2fx of it\n",
		in.Round(time.Millisecond), mib(in), out.Round(time.Millisecond), mib(out), host.Round(time.Millisecond), mib(host), host.Seconds()/in.Seconds(), host.Seconds()/out.Seconds())
	b.ReportMetric(float64(median(cli).Microseconds())/1000, "ms/cli-exec")
	b.ReportMetric(float64(median(sdk).Microseconds())/1000, "ms/sdk-exec")
}

func cutEnv(kv string) (string, string, bool) {
	for i := 0; i < len(kv); i++ {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}

func diskBlocks(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
