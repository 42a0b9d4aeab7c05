package bench

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The network, side by side (docs/network.md):
//
//	(net a) a download through the VM's network vs the same download by
//	        the host from the same loopback server      >= 0.5x
//	(net b) a connection's setup, guest to host port (median of 50)
//	(net c) a cold exec with --net vs without
func BenchmarkNetwork(b *testing.B) {
	const size = 64 << 20
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	chunk := make([]byte, 1<<20)
	mux := http.NewServeMux()
	mux.HandleFunc("/big", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		for i := 0; i < size/len(chunk); i++ {
			_, _ = w.Write(chunk)
		}
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("x")) })
	go http.Serve(ln, mux)
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)

	var host []time.Duration
	for i := 0; i < 3; i++ {
		start := time.Now()
		resp, err := http.Get("http://127.0.0.1:" + port + "/big")
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		host = append(host, time.Since(start))
	}
	// The guest times itself (/proc/uptime, 10 ms): the download alone,
	// not the boot.
	script := `t() { cut -d' ' -f1 /proc/uptime; }; a=$(t); wget -qO /dev/null http://host.mvm.internal:` + port + `/big; b=$(t)
i=0; while [ $i -lt 50 ]; do wget -qO /dev/null http://host.mvm.internal:` + port + `/small; i=$((i+1)); done; c=$(t); echo "$a $b $c"`
	var guest, conn []time.Duration
	for i := 0; i < 3; i++ {
		out, err := exec.Command(*mvmctl, "exec", "--allow-host-loopback", port, "--", "sh", "-c", script).CombinedOutput()
		if err != nil {
			b.Fatalf("exec: %v\n%s", err, out)
		}
		var t0, t1, t2 float64
		if _, err := fmt.Sscanf(strings.TrimSpace(string(out)), "%g %g %g", &t0, &t1, &t2); err != nil {
			b.Fatalf("guest timing %q: %v", out, err)
		}
		guest = append(guest, time.Duration((t1-t0)*float64(time.Second)))
		conn = append(conn, time.Duration((t2-t1)/50*float64(time.Second)))
	}
	rate := func(d time.Duration) float64 { return float64(size) / (1 << 20) / d.Seconds() }
	hg, hh := rate(median(guest)), rate(median(host))
	fmt.Printf("(net a) %d MiB download: through the VM %.1f MiB/s, by the host %.1f MiB/s: %.3fx (target >= 0.5x)\n", size>>20, hg, hh, hg/hh)
	fmt.Printf("(net b) a new connection and one small HTTP request from the guest: median %s (wget's own start included)\n", median(conn).Round(time.Millisecond))

	var with, without []time.Duration
	for i := 0; i < *rounds; i++ {
		start := time.Now()
		if out, err := exec.Command(*mvmctl, "exec", "--no-snapshot", "--", "true").CombinedOutput(); err != nil {
			b.Fatalf("%v\n%s", err, out)
		}
		without = append(without, time.Since(start))
		start = time.Now()
		if out, err := exec.Command(*mvmctl, "exec", "--net", "--", "true").CombinedOutput(); err != nil {
			b.Fatalf("%v\n%s", err, out)
		}
		with = append(with, time.Since(start))
	}
	fmt.Printf("(net c) cold exec -- true, %d rounds: --net median %s, without %s: %.3fx\n", *rounds,
		median(with).Round(time.Millisecond), median(without).Round(time.Millisecond), float64(median(with))/float64(median(without)))
	b.ReportMetric(hg, "MiB/s-guest")
	b.ReportMetric(hg/hh, "x-host")
	b.ReportMetric(float64(median(with).Milliseconds()), "ms/net-exec")
}
