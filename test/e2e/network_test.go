package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// hostServer is an HTTP server on the host's loopback, which a guest
// reaches only when a run allows its port: /small is a few bytes, /big
// 100 MiB of pseudo-random data.
type hostServer struct {
	port   int
	small  []byte
	bigSum string
}

const bigSize = 100 << 20

func newHostServer(t *testing.T) *hostServer {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &hostServer{port: ln.Addr().(*net.TCPAddr).Port, small: []byte("hello from the host \x00\xff\n")}
	big := func(w io.Writer) {
		r := rand.NewChaCha8([32]byte{1, 2, 3})
		_, _ = io.CopyN(w, r, bigSize)
	}
	h := sha256.New()
	big(h)
	hs.bigSum = hex.EncodeToString(h.Sum(nil))
	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(hs.small) })
	mux.HandleFunc("/big", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(bigSize))
		big(w)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return hs
}

// TestNoNetworkByDefault: without --net the VM has no network card: only
// the kernel's own loopback and its (down) IPv6-in-IPv4 tunnel device.
func TestNoNetworkByDefault(t *testing.T) {
	e := newEnv(t)
	r := e.run(nil, "exec", "--", "ls", "/sys/class/net")
	if r.code != 0 || strings.TrimSuffix(strings.TrimPrefix(string(r.stdout), "lo\n"), "sit0\n") != "" {
		t.Fatalf("got %s\nwant only lo (and sit0)", r)
	}
}

// TestNetworkReachesWhatIsAllowed: a guest fetches byte-exact from an
// allowed port of the host's loopback (100 MiB checksum-equal, 40
// connections at once), and its network is what the docs say.
func TestNetworkReachesWhatIsAllowed(t *testing.T) {
	e := newEnv(t)
	hs := newHostServer(t)
	url := fmt.Sprintf("http://host.mvm.internal:%d", hs.port)
	script := `set -e
wget -qO /tmp/small ` + url + `/small
cat /tmp/small
wget -qO- ` + url + `/big | sha256sum
i=0; while [ $i -lt 40 ]; do wget -qO /tmp/p$i ` + url + `/small & i=$((i+1)); done; wait
cat /tmp/p* | wc -c
cat /etc/resolv.conf
ls /sys/class/net
ip -4 addr show eth0 | grep -o 'inet [0-9./]*'
ip route | grep default
echo mtu $(cat /sys/class/net/eth0/mtu)`
	start := time.Now()
	r := e.run(nil, "exec", "--allow-host-loopback", strconv.Itoa(hs.port), "--", "sh", "-c", script)
	took := time.Since(start)
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	out := string(r.stdout)
	if !strings.HasPrefix(out, string(hs.small)) {
		t.Errorf("/small: not byte-exact:\n%q", out)
	}
	if !strings.Contains(out, hs.bigSum) {
		t.Errorf("/big: the checksum %s is not in\n%s", hs.bigSum, out)
	}
	if want := fmt.Sprintf("%d\n", 40*len(hs.small)); !strings.Contains(out, want) {
		t.Errorf("40 parallel fetches: want %q bytes in\n%s", want, out)
	}
	for _, want := range []string{"nameserver 10.0.2.2", "eth0\n", "inet 10.0.2.15/24", "default via 10.0.2.2", "mtu 65520\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("the guest's network: %q missing in\n%s", want, out)
		}
	}
	t.Logf("100 MiB and 41 small fetches in %s", took.Round(time.Millisecond))
	e.assertClean()
}

// TestNetworkRefusesWhatIsNot: the host's loopback without an allowed
// port, the cloud metadata address, the host's LAN and names outside the
// allow-list are refused as the guest's programs see refusals, each
// logged with -v.
func TestNetworkRefusesWhatIsNot(t *testing.T) {
	e := newEnv(t)
	hs := newHostServer(t)
	script := fmt.Sprintf(`
for a in "10.0.2.2 %d" "169.254.169.254 80" "192.168.1.1 80" "10.0.2.3 80"; do
  if nc -w 5 $a </dev/null >/dev/null 2>&1; then echo "REACHED $a"; else echo "refused $a"; fi
done
if nslookup evil.example 10.0.2.2 >/dev/null 2>&1; then echo "RESOLVED evil.example"; else echo "no name evil.example"; fi
ping -c1 -W1 web.test 2>/dev/null | grep -c "(192.0.2.7)"
`, hs.port)
	r := e.run(nil, "-v", "exec", "--allow-host", "allowed.example", "--add-host", "web.test:192.0.2.7", "--", "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	out := string(r.stdout)
	if strings.Contains(out, "REACHED") || strings.Contains(out, "RESOLVED") {
		t.Errorf("the guest reached what it must not:\n%s", out)
	}
	for _, want := range []string{"refused 10.0.2.2", "refused 169.254.169.254", "refused 192.168.1.1", "no name evil.example", "1\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("%q missing in\n%s", want, out)
		}
	}
	for _, want := range []string{`dst=10.0.2.2:` + strconv.Itoa(hs.port), "dst=169.254.169.254:80", `name=evil.example`} {
		if !strings.Contains(string(r.stderr), want) {
			t.Errorf("-v does not log %q:\n%s", want, r.stderr)
		}
	}
	e.assertClean()
}

// TestNetworkPublish: a server in the guest is reachable on the host's
// loopback while the command runs, and the port is free again after.
func TestNetworkPublish(t *testing.T) {
	e := newEnv(t)
	port := freePort(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "exec", "-i", "-p", fmt.Sprintf("127.0.0.1:%d:8000", port), "--", "sh", "-c",
		"mkdir -p /tmp/www && echo published > /tmp/www/index.html && httpd -p 8000 -h /tmp/www && echo up && cat >/dev/null")
	stdin, _ := cmd.StdinPipe()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var body string
	ok := waitFor(60*time.Second, func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		return resp.StatusCode == 200
	})
	stdin.Close()
	err := cmd.Wait()
	if !ok || body != "published\n" {
		t.Fatalf("published port: %q (%v)\n%s", body, err, out.String())
	}
	if err != nil {
		t.Errorf("exit: %v\n%s", err, out.String())
	}
	if l, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
		t.Errorf("the published port is still held: %v", err)
	} else {
		l.Close()
	}
	// A port already in use fails the run before it boots.
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r := e.run(nil, "exec", "-p", fmt.Sprintf("%d:80", l.Addr().(*net.TCPAddr).Port), "--", "true")
	if r.code != 125 || !strings.Contains(string(r.stderr), "address already in use") || r.elapsed > 2*time.Second {
		t.Errorf("a port in use: %s", r)
	}
	e.assertClean()
}

// TestNetworkBoundsAGuest: a guest (root, its descriptor limit raised)
// that opens 10 000 connections at once to an allowed host port, and then
// floods the same port with 10 000 handshakes it never finishes, gets at
// most the documented 512 connections; mvmctl's descriptors stay bounded,
// and once the flood is over an ordinary request gets through.
func TestNetworkBoundsAGuest(t *testing.T) {
	e := newEnv(t)
	toolsDir := tools(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held, peak, accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			n := held.Add(1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			go func() {
				defer held.Add(-1)
				defer c.Close()
				// An HTTP request gets an answer; anything else is held
				// until the guest's side closes.
				buf := make([]byte, 4)
				if n, _ := io.ReadFull(c, buf); n == 4 && string(buf) == "GET " {
					_, _ = io.WriteString(c, "HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nsurvived\n")
				}
			}()
		}
	}()
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	script := fmt.Sprintf(`/tools/netattack conns host.mvm.internal:%[1]d 10000; `+
		`/tools/netattack synflood 10.0.2.2 %[1]d 10000 && i=0; `+
		// The flood's handshakes hold their slots until they fail: the
		// network must recover within 40 s.
		`until wget -qO- http://host.mvm.internal:%[1]d/; do i=$((i+1)); [ $i -lt 40 ] || break; sleep 1; done; echo done`, port)
	cmd := e.command(ctx, "exec", "-i", "-v", "--memory", "1G", "-d", toolsDir+":/tools:ro",
		"--allow-host-loopback", strconv.Itoa(port), "--", "sh", "-c", script)
	stdin, _ := cmd.StdinPipe()
	var out screen // written by the command while the test reads it
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	peakFDs := 0
	sample := func() bool {
		if n := countFDs(cmd.Process.Pid); n > peakFDs {
			peakFDs = n
		}
		return false
	}
	waitFor(180*time.Second, func() bool { sample(); return strings.Contains(out.String(), "opened ") })
	waitFor(5*time.Second, sample)
	stdin.Close() // the connections close; the flood begins
	waitFor(90*time.Second, func() bool { sample(); return strings.Contains(out.String(), "done") })
	_ = cmd.Wait()
	got := out.String()
	var opened, failed int
	if i := strings.Index(got, "opened "); i < 0 {
		t.Fatalf("the guest did not open its connections:\n%s", tail(got))
	} else if _, err := fmt.Sscanf(got[i:], "opened %d failed %d", &opened, &failed); err != nil {
		t.Fatalf("%v in %q", err, tail(got))
	}
	if opened+failed != 10000 || opened > 512 || opened < 300 {
		t.Errorf("the guest opened %d and failed %d of 10000; want at most the limit, 512, and most of it", opened, failed)
	}
	if p := peak.Load(); p > 512 {
		t.Errorf("the host held %d of the guest's connections at once; the limit is 512", p)
	}
	if peakFDs > 512+64 {
		t.Errorf("mvmctl held %d descriptors; the limit is 512 connections", peakFDs)
	}
	if !strings.Contains(got, "sent 10000") || !strings.Contains(got, "survived\ndone") {
		t.Errorf("after the flood an ordinary request did not get through:\n%s", tail(got))
	}
	if !strings.Contains(got, "too many connections") {
		t.Errorf("-v does not say connections were refused for the limit:\n%s", tail(got))
	}
	t.Logf("guest opened %d, refused %d; host accepted %d in all, at most %d at once; mvmctl descriptors at most %d",
		opened, failed, accepted.Load(), peak.Load(), peakFDs)
	e.assertClean()
}

// TestNetworkUDP: a datagram to an allowed host port is relayed and its
// answer comes back; one to a port not allowed is dropped (no answer).
func TestNetworkUDP(t *testing.T) {
	e := newEnv(t)
	toolsDir := tools(t)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("host got "), buf[:n]...), from)
		}
	}()
	port := pc.LocalAddr().(*net.UDPAddr).Port
	other := freeUDPPort(t)
	script := fmt.Sprintf(`/tools/netattack udp host.mvm.internal:%d ping; /tools/netattack udp host.mvm.internal:%d ping; echo end`, port, other)
	r := e.run(nil, "exec", "-v", "-d", toolsDir+":/tools:ro", "--allow-host-loopback", strconv.Itoa(port), "--", "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("%s", r)
	}
	if got := string(r.stdout); got != "answer \"host got ping\"\nend\n" {
		t.Errorf("stdout %q; want the allowed port's answer only", got)
	}
	if !strings.Contains(string(r.stderr), "netattack: no answer") ||
		!strings.Contains(string(r.stderr), "datagram refused") {
		t.Errorf("stderr does not show the refused datagram: %q", r.stderr)
	}
	e.assertClean()
}

func freeUDPPort(t *testing.T) int {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

func countFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestNetworkOnATemplate: on a Debian template, as an unprivileged user,
// glibc's resolver uses the resolv.conf the agent wrote into the
// template's root, names outside the allow-list fail at once, and Python
// fetches byte-exact from an allowed host port.
func TestNetworkOnATemplate(t *testing.T) {
	needDebian(t)
	e := newTemplateRunEnv(t)
	hs := newHostServer(t)
	script := fmt.Sprintf(`
import socket, time, urllib.request
print(open("/etc/resolv.conf").read().strip().splitlines()[-1])
print(socket.gethostbyname("web.test"))
t = time.monotonic()
try:
    socket.gethostbyname("evil.example")
    print("RESOLVED")
except socket.gaierror as e:
    print("refused", time.monotonic() - t < 2)
print(urllib.request.urlopen("http://host.mvm.internal:%d/small").read() == %q.encode("latin-1"))
`, hs.port, string(hs.small))
	r := e.run(nil, "exec", "--template", "py", "-u", "nobody", "--allow-host", "allowed.example",
		"--add-host", "web.test:192.0.2.7", "--allow-host-loopback", strconv.Itoa(hs.port), "--", "python3", "-c", script)
	if want := "nameserver 10.0.2.2\n192.0.2.7\nrefused True\nTrue\n"; r.code != 0 || string(r.stdout) != want {
		t.Fatalf("got %s\nwant stdout %q", r, want)
	}
	e.assertClean()
}
