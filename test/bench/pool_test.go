package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// A warm pool (mvmctl pool), side by side in one run, medians of
// alternating rounds:
//
//	(pool a) pooled exec -- true        <= 0.50x runsc do true
//	         and against a restored run without the pool, and a cold one
//	(pool b) time to the first byte of `exec -- echo hi`, pooled and runsc
//	(pool c) private memory per idle pool VM (beyond the snapshot's RAM file)  < 40 MiB
//	(pool d) refill rate: VMs made ready per second

type poolBenchEnv struct {
	b   *testing.B
	env []string
}

func (p *poolBenchEnv) mvmctl(args ...string) string {
	p.b.Helper()
	cmd := exec.Command(*mvmctl, args...)
	cmd.Env = p.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		p.b.Fatalf("mvmctl %q: %v\n%s", args, err, out)
	}
	return string(out)
}

type benchPoolStatus struct {
	Shapes []struct {
		Size, Ready  int
		Served       uint64
		PrivateBytes int64
	}
}

func (p *poolBenchEnv) status() benchPoolStatus {
	var st benchPoolStatus
	if err := json.Unmarshal([]byte(p.mvmctl("pool", "status", "--json")), &st); err != nil {
		p.b.Fatal(err)
	}
	return st
}

// waitFull waits until every shape of the pool is full again (not
// measured: the rounds compare runs, not refills).
func (p *poolBenchEnv) waitFull() {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		full := true
		for _, s := range p.status().Shapes {
			full = full && s.Ready >= s.Size
		}
		if full {
			// And the refill's CPU time is over.
			time.Sleep(100 * time.Millisecond)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.b.Fatal("the pool did not refill within a minute")
}

// firstByte is how long name args takes to write its first byte of
// stdout.
func firstByte(b *testing.B, env []string, name string, args ...string) time.Duration {
	b.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = env
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	rd := bufio.NewReader(out)
	if _, err := rd.ReadByte(); err != nil {
		b.Fatalf("%s %q: no output: %v", name, args, err)
	}
	d := time.Since(start)
	_, _ = rd.ReadString(0)
	if err := cmd.Wait(); err != nil {
		b.Fatalf("%s %q: %v", name, args, err)
	}
	return d
}

func BenchmarkPoolExec(b *testing.B) {
	p := &poolBenchEnv{b: b, env: snapEnv(b)}
	runsc := runscArgs(b)
	start := time.Now()
	p.mvmctl("pool", "start", "--size", "2", "--wait")
	filled := time.Since(start)
	defer p.mvmctl("pool", "stop")
	noPool := append(slices.Clone(p.env), "MVM_NO_POOL=1")

	// One of each first: page cache, runsc's files.
	runV(b, p.env, "--", "true")
	timeCmd(b, "runsc", runsc...)
	var pooled, restored, cold []vRun
	var gvisor, pooledFirst, gvisorFirst []time.Duration
	runscEcho := append(slices.Clone(runsc[:len(runsc)-1]), "echo", "hi")
	for i := 0; i < *rounds; i++ {
		p.waitFull()
		r := runV(b, p.env, "--", "true")
		if !strings.Contains(r.line, "take from pool") {
			b.Fatalf("not pooled: %s", r.line)
		}
		pooled = append(pooled, r)
		gvisor = append(gvisor, timeCmd(b, "runsc", runsc...))
		p.waitFull()
		pooledFirst = append(pooledFirst, firstByte(b, p.env, *mvmctl, "exec", "--", "echo", "hi"))
		gvisorFirst = append(gvisorFirst, firstByte(b, nil, "runsc", runscEcho...))
		p.waitFull()
		r = runV(b, noPool, "--", "true")
		if !r.restored {
			b.Fatalf("not restored: %s", r.line)
		}
		restored = append(restored, r)
		p.waitFull()
		c := runV(b, p.env, "--no-snapshot", "--", "true")
		if c.restored {
			b.Fatalf("restored with --no-snapshot: %s", c.line)
		}
		cold = append(cold, c)
	}
	mp, mg, mr, mc := median(walls(pooled)), median(gvisor), median(walls(restored)), median(walls(cold))
	fmt.Printf("(pool a) %d rounds: pooled exec -- true %s (min %s); runsc do true %s (min %s): %.2fx (target <= 0.50x); restored without the pool %s: %.2fx; cold %s: %.3fx\n",
		*rounds, mp.Round(time.Millisecond), slices.Min(walls(pooled)).Round(time.Millisecond),
		mg.Round(time.Millisecond), slices.Min(gvisor).Round(time.Millisecond), float64(mp)/float64(mg),
		mr.Round(time.Millisecond), float64(mp)/float64(mr), mc.Round(time.Millisecond), float64(mp)/float64(mc))
	fmt.Printf("    pooled, medians of -v steps: %s\n", stepMedians(pooled, "take from pool", "exec", "total"))
	fmt.Printf("    a pooled run: %s\n", pooled[len(pooled)/2].line)
	fp, fg := median(pooledFirst), median(gvisorFirst)
	fmt.Printf("(pool b) first byte of echo hi: pooled %s, runsc do %s: %.2fx\n", fp.Round(time.Millisecond), fg.Round(time.Millisecond), float64(fp)/float64(fg))

	p.waitFull()
	st := p.status().Shapes[0]
	perVM := float64(st.PrivateBytes) / float64(st.Ready) / (1 << 20)
	fmt.Printf("(pool c) private memory per idle pool VM: %.1f MiB (target < 40 MiB; %d VMs)\n", perVM, st.Ready)

	// (pool d): a pool of four, from nothing.
	p.mvmctl("pool", "stop")
	start = time.Now()
	p.mvmctl("pool", "start", "--size", "4", "--wait")
	filled4 := time.Since(start)
	fmt.Printf("(pool d) refill: 2 VMs ready in %s, 4 in %s: %.1f VMs/s on %d CPUs\n",
		filled.Round(time.Millisecond), filled4.Round(time.Millisecond), 4/filled4.Seconds(), numCPU())

	b.ReportMetric(float64(mp.Milliseconds()), "ms/pooled")
	b.ReportMetric(float64(mg.Milliseconds()), "ms/runsc")
	b.ReportMetric(float64(mp)/float64(mg), "x-runsc")
	b.ReportMetric(perVM, "MiB/idle-vm")
	b.ReportMetric(4/filled4.Seconds(), "vms/s")
}

func numCPU() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "\nprocessor") + 1
}
