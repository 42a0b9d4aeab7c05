package bench

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

var soakRuns = flag.Int("soak-runs", 200, "mvmctl runs in BenchmarkOutputFastExitSoak")

// BenchmarkOutputFastExitSoak runs "large output, fast exit" soak-runs
// times (about 2-3 s each under TCG) and fails on the first run whose
// stdout is not byte-exact:
//
//	go test -run '^$' -bench OutputFastExitSoak -benchtime 1x ./test/bench/
func BenchmarkOutputFastExitSoak(b *testing.B) {
	sizes := []int{1500000, 1 << 20, 1<<20 + 1, 2<<20 + 12345, 4 << 20}
	var total time.Duration
	for i := range *soakRuns {
		n := sizes[i%len(sizes)]
		script := fmt.Sprintf("head -c %d /dev/urandom > /tmp/d && sha256sum /tmp/d >&2 && exec cat /tmp/d", n)
		cmd := exec.Command(*mvmctl, "exec", "--", "sh", "-c", script)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		start := time.Now()
		if err := cmd.Run(); err != nil {
			b.Fatalf("run %d (%d bytes): %v: %s", i, n, err, errb.Bytes())
		}
		total += time.Since(start)
		sum := sha256.Sum256(out.Bytes())
		if f := strings.Fields(errb.String()); out.Len() != n || len(f) != 2 || f[0] != hex.EncodeToString(sum[:]) {
			b.Fatalf("run %d: %d bytes of stdout, want %d; sha256 %x, guest says %q", i, out.Len(), n, sum, errb.Bytes())
		}
	}
	fmt.Printf("    large output, fast exit: %d runs byte-exact, %.2f s per run\n", *soakRuns, total.Seconds()/float64(*soakRuns))
	b.ReportMetric(float64(*soakRuns), "runs")
}
