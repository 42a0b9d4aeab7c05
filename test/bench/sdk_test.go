package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/mvm-sh/mvm"
)

// BenchmarkSandboxExec measures the round trip of an SDK Exec of `true`
// on an already started sandbox: what a program that embeds mvm pays per
// command once its VM is up (process start in the guest included).
func BenchmarkSandboxExec(b *testing.B) {
	b.Setenv("MVM_JAILER", filepath.Join(filepath.Dir(*mvmctl), "mvm-jailer"))
	ctx := context.Background()
	sb, err := mvm.Start(ctx, mvm.Config{})
	if err != nil {
		b.Fatal(err)
	}
	defer sb.Close(ctx)
	const n = 50
	var ds []time.Duration
	for i := 0; i < n; i++ {
		start := time.Now()
		st, err := sb.Exec(ctx, mvm.Cmd{Argv: []string{"true"}})
		if err != nil || !st.Success() {
			b.Fatalf("exec: %v %v", st, err)
		}
		ds = append(ds, time.Since(start))
	}
	fmt.Printf("(f) SDK Exec of true on a running sandbox: median %s over %d (min %s)\n", median(ds).Round(10*time.Microsecond), n, minDur(ds).Round(10*time.Microsecond))
	b.ReportMetric(float64(median(ds).Microseconds())/1000, "ms/exec")
}

func minDur(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = min(m, d)
	}
	return m
}
