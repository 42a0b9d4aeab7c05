package e2e

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests here check that the guest gives real programs what a standard
// Linux gives them: a fine clock and one-shot timers, consistent inode
// numbers on the overlay, dnotify and fanotify, user namespaces, cgroup2
// (guestprobe, testdata/guestprobe), and that CPython's own regression
// tests pass in a Debian template wherever they pass on the host with the
// same Debian python.

// probe runs guestprobe's check in the VM of args (exec's flags before
// the command) and decodes its JSON answer into v.
func (e *env) probe(v any, args []string, check ...string) {
	e.t.Helper()
	cmd := append(append(append([]string{"exec", "-d", tools(e.t) + ":/tools:ro"}, args...), "--", "/tools/guestprobe"), check...)
	r := e.run(nil, cmd...)
	if r.code != 0 {
		e.t.Fatalf("guestprobe %s: %s", strings.Join(check, " "), r)
	}
	if err := json.Unmarshal(r.stdout, v); err != nil {
		e.t.Fatalf("guestprobe %s: %v: %s", strings.Join(check, " "), err, r)
	}
}

// spinCPUs keeps two spinning threads per host CPU busy until the
// returned function is called.
func spinCPUs() (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 * runtime.NumCPU() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			for {
				select {
				case <-done:
					return
				default:
				}
			}
		}()
	}
	return func() { close(done); wg.Wait() }
}

type clockProbe struct {
	Clocksource string  `json:"clocksource"`
	ResNs       int64   `json:"res_ns"`
	MinUs       float64 `json:"min_us"`
	MedianUs    float64 `json:"median_us"`
	P90Us       float64 `json:"p90_us"`
	Early       int     `json:"early"`
}

// TestGuestClock: CLOCK_MONOTONIC has at most 1 µs resolution and a 1 ms
// sleep takes under 2 ms (median) and never ends early, on a cold boot, on
// a restored snapshot and on a template. Under TCG without one-shot
// timers every sleep took 10 ms and some ended early.
//
// "cold, host busy" boots while every host CPU spins: a guest kernel
// left to calibrate its TSC against the emulated PIT then fails to, and
// runs on 10 ms jiffies (five boots out of five did before the guest was
// told the rate). Sleeps on a saturated host take what the host
// gives them, so their length is not checked there.
func TestGuestClock(t *testing.T) {
	needDebian(t)
	cases := []struct {
		name string
		args []string
		tpl  bool
		busy bool
	}{
		{"cold", []string{"--no-snapshot"}, false, false},
		{"cold, host busy", []string{"--no-snapshot"}, false, true},
		{"restored", nil, false, false},
		{"template", []string{"--template", "py"}, true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			if c.tpl {
				e = newTemplateRunEnv(t)
			}
			if c.busy {
				stop := spinCPUs()
				defer stop()
			}
			var p clockProbe
			e.probe(&p, c.args, "clock")
			t.Logf("clocksource %s, resolution %d ns, 1 ms sleeps: min %.0f µs, median %.0f µs, p90 %.0f µs",
				p.Clocksource, p.ResNs, p.MinUs, p.MedianUs, p.P90Us)
			if p.Clocksource != "tsc" && p.Clocksource != "tsc-early" && p.Clocksource != "kvm-clock" {
				t.Errorf("the guest's clocksource is %s, want tsc (or kvm-clock under KVM)", p.Clocksource)
			}
			if p.ResNs > 1000 {
				t.Errorf("CLOCK_MONOTONIC resolution is %d ns, want at most 1 µs", p.ResNs)
			}
			if p.Early > 0 || p.MinUs < 1000 {
				t.Errorf("%d of 200 1 ms sleeps ended early by CLOCK_MONOTONIC (shortest %.0f µs)", p.Early, p.MinUs)
			}
			if p.MedianUs >= 2000 && !c.busy {
				t.Errorf("a 1 ms sleep takes %.0f µs (median), want under 2 ms", p.MedianUs)
			}
			e.assertClean()
		})
	}
}

// TestGuestLinux: what programs find on the default image and on a Debian
// template: dnotify and fanotify, user namespaces for root and for a
// user, cgroup2 with its controllers, and (on the template's overlay)
// readdir inode numbers equal to stat's and stable across a copy-up.
func TestGuestLinux(t *testing.T) {
	needDebian(t)
	for _, c := range []struct {
		name string
		args []string
		tpl  bool
	}{
		{"default", nil, false},
		{"template", []string{"--template", "py"}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			if c.tpl {
				e = newTemplateRunEnv(t)
			}
			var dn struct{ Notified bool }
			e.probe(&dn, c.args, "dnotify", "/tmp")
			if !dn.Notified {
				t.Errorf("fcntl(F_NOTIFY, DN_CREATE) on /tmp: no signal after a file was created")
			}
			var fan struct{ Events int }
			e.probe(&fan, c.args, "fanotify", "/tmp")
			if fan.Events < 1 {
				t.Errorf("fanotify on /tmp: no event after a file was written")
			}
			for _, user := range [][]string{nil, {"-u", "65534"}} {
				var un struct {
					OK        bool   `json:"ok"`
					Err       string `json:"err"`
					UIDInside string `json:"uid_inside"`
				}
				e.probe(&un, append(slices.Clone(c.args), user...), "userns")
				if !un.OK || un.UIDInside != "0" {
					t.Errorf("a new user namespace (as %v): ok %v, uid inside %q, %s", user, un.OK, un.UIDInside, un.Err)
				}
			}
			// cgroup2 with the controllers on for children, and a limit
			// that holds: a cgroup of at most 3 tasks cannot start 10.
			script := `cat /sys/fs/cgroup/cgroup.controllers; cat /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/probe && echo 3 > /sys/fs/cgroup/probe/pids.max && echo 64M > /sys/fs/cgroup/probe/memory.max || exit 1
sh -c 'echo $$ > /sys/fs/cgroup/probe/cgroup.procs; cat /proc/self/cgroup; n=0; for i in 1 2 3 4 5 6 7 8 9 10; do (sleep 1) 2>/dev/null & done; wait' 2>&1 | head -2
cat /sys/fs/cgroup/probe/pids.events`
			r := e.run(nil, append(append([]string{"exec"}, c.args...), "--", "sh", "-c", script)...)
			out := string(r.stdout) + string(r.stderr)
			lines := strings.Split(out, "\n")
			if r.code != 0 || len(lines) < 4 {
				t.Fatalf("cgroup2: %s", r)
			}
			for _, ctl := range []string{"cpu", "memory", "pids"} {
				if !slices.Contains(strings.Fields(lines[0]), ctl) || !slices.Contains(strings.Fields(lines[1]), ctl) {
					t.Errorf("cgroup2 controller %s is not offered and enabled: controllers %q, subtree_control %q", ctl, lines[0], lines[1])
				}
			}
			if !strings.Contains(out, "0::/probe") {
				t.Errorf("a process moved to /probe is not in it: %s", out)
			}
			if m := regexp.MustCompile(`max (\d+)`).FindStringSubmatch(out); m == nil || m[1] == "0" {
				t.Errorf("pids.max of 3 stopped no fork of 10: %s", out)
			}
			if c.tpl {
				var ino struct {
					Checked    int      `json:"checked"`
					Mismatched []string `json:"mismatched"`
				}
				e.probe(&ino, c.args, "inodes", "/usr/lib/python3.11", "/usr/bin", "/etc")
				if ino.Checked < 500 || len(ino.Mismatched) > 0 {
					t.Errorf("readdir and stat disagree on the overlay: %d entries checked, mismatched: %q", ino.Checked, ino.Mismatched)
				}
				r := e.run(nil, append(append([]string{"exec"}, c.args...), "--", "sh", "-c",
					`a=$(stat -c %i /etc/debian_version); chmod 600 /etc/debian_version; b=$(stat -c %i /etc/debian_version); c=$(ls -i /etc | awk '$2 == "debian_version" {print $1}'); echo "$a $b $c"`)...)
				if f := strings.Fields(string(r.stdout)); r.code != 0 || len(f) != 3 || f[0] != f[1] || f[1] != f[2] {
					t.Errorf("a file's inode number changes with its copy-up (before, after, readdir): %s", r)
				}
			}
			e.assertClean()
		})
	}
}

var compatFull = flag.Bool("compat-full", false, "TestCPythonSuite runs the whole module list (make compat), not the short one")

// cpythonShort are the modules TestCPythonSuite runs in make test (about a
// minute in the VM under TCG on 2 cores); cpythonFull are make compat's.
// test_sysconfig is left out: it needs libpython3.11-dev, a package
// difference between host and template rather than a guest one.
var (
	cpythonShort = []string{
		"test_os", "test_fcntl", "test_posix", "test_pty", "test_time", "test_select",
		"test_selectors", "test_mmap", "test_resource", "test_tempfile", "test_stat",
		"test_fileio", "test_glob", "test_grp", "test_pwd", "test_eintr", "test_genericpath",
		"test_posixpath", "test_fnmatch", "test_syslog", "test_platform", "test_sched",
		"test_uuid", "test_file_eintr", "test_unicode_file_functions", "test_epoll",
		"test_poll", "test_popen", "test_filecmp", "test_wait4",
	}
	cpythonFull = append(slices.Clone(cpythonShort),
		"test_signal", "test_subprocess", "test_threading", "test_shutil", "test_pathlib",
		"test_tarfile", "test_zipfile", "test_logging", "test_faulthandler", "test_io",
		"test_fork1", "test_wait3", "test_threadsignals", "test_zlib", "test_gzip",
		"test_random", "test_largefile", "test_mailbox", "test_getopt")
)

var pythonTestsTemplate fixtureOnce

// needPythonTests makes the template "pytests": Debian bookworm with
// python3 and CPython's regression suite.
func needPythonTests(t *testing.T) {
	t.Helper()
	pythonTestsTemplate.do(t, func() error {
		start := time.Now()
		err := fixtureMvmctl("template", "create", "pytests", "--from-debian", "bookworm", "--packages", "python3,libpython3.11-testsuite")
		t.Logf("template pytests (Debian bookworm + python3 + libpython3.11-testsuite) created in %s", time.Since(start).Round(time.Millisecond))
		return err
	})
}

// regrtestLine is one module's result line of `python3 -m test`.
var regrtestLine = regexp.MustCompile(`\[\s*\d+/\d+(?:/\d+)?\] (test_\w+) (passed|failed|skipped|.*?)(?: \(|$| --)`)

// regrtestResults maps each module of a regrtest run's output to how it
// ended ("passed", "failed", "skipped", "resource denied", ...).
func regrtestResults(out []byte) map[string]string {
	res := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if m := regrtestLine.FindStringSubmatch(line); m != nil {
			res[m[1]] = strings.TrimSpace(m[2])
		}
	}
	return res
}

// TestCPythonSuite runs CPython's regression tests for a list of modules
// in a Debian template and on the host with the same CPython release from
// Debian (python3.11 and libpython3.11-testsuite, which .ci/run installs),
// and fails for every
// module that passes on the host but not in the VM.
func TestCPythonSuite(t *testing.T) {
	host := "/usr/bin/python3.11"
	if _, err := os.Stat("/usr/lib/python3.11/test/libregrtest"); err != nil {
		t.Fatalf("the host lacks CPython's test suite: apt install libpython3.11-testsuite (scripts/setup.sh --deps does): %v", err)
	}
	needPythonTests(t)
	mods := cpythonShort
	if *compatFull {
		mods = cpythonFull
	}
	e := newTemplateRunEnv(t)

	// The same CPython release; the Debian revision may differ (the
	// template comes from bookworm's main archive, the host may have
	// bookworm-updates or -security): both are logged.
	version := []string{"-c", "import sys; print('.'.join(map(str, sys.version_info[:3])), sys.version.replace(chr(10), ' '))"}
	hv, err := exec.Command(host, version...).Output()
	if err != nil {
		t.Fatalf("%s: %v", host, err)
	}
	gv := e.run(nil, append([]string{"exec", "--template", "pytests", "--", "python3"}, version...)...)
	hf, gf := strings.Fields(string(hv)), strings.Fields(string(gv.stdout))
	if gv.code != 0 || len(hf) == 0 || len(gf) == 0 || hf[0] != gf[0] {
		t.Fatalf("the guest's python is not the host's release: host %q, guest %s", hv, gv)
	}
	t.Logf("python on the host: %s; in the VM: %s", strings.TrimSpace(string(hv)), strings.TrimSpace(string(gv.stdout)))

	regrtest := append([]string{"-m", "test", "-j2", "-u", "none", "--timeout", "900"}, mods...)
	start := time.Now()
	hostCmd := exec.Command(host, regrtest...)
	hostCmd.Dir = t.TempDir()
	hostOut, _ := hostCmd.CombinedOutput()
	t.Logf("host: %d modules in %s", len(mods), time.Since(start).Round(time.Second))

	start = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Minute)
	defer cancel()
	cmd := e.command(ctx, append([]string{"exec", "--template", "pytests", "--memory", "1G", "-w", "/tmp", "--", "python3"}, regrtest...)...)
	vmOut, _ := cmd.CombinedOutput()
	t.Logf("VM: %d modules in %s", len(mods), time.Since(start).Round(time.Second))

	hostRes, vmRes := regrtestResults(hostOut), regrtestResults(vmOut)
	var passedHost, retry []string
	for _, m := range mods {
		if hostRes[m] != "passed" {
			t.Logf("%s does not pass on the host either (%q): not compared", m, hostRes[m])
			continue
		}
		passedHost = append(passedHost, m)
		if vmRes[m] != "passed" {
			retry = append(retry, m)
		}
	}
	// A module that failed once is run again alone, as regrtest's own -w
	// does: timing tests (test_eintr's) can lose to a loaded host, on
	// the host as in a VM. One that passes then is logged, not failed.
	var lost []string
	if len(retry) > 0 {
		t.Logf("failed in the VM, passing on the host: %s; running them again", strings.Join(retry, ", "))
		cmd := e.command(ctx, append([]string{"exec", "--template", "pytests", "--memory", "1G", "-w", "/tmp", "--", "python3", "-m", "test", "-j1", "-u", "none", "--timeout", "900"}, retry...)...)
		again, _ := cmd.CombinedOutput()
		againRes := regrtestResults(again)
		for _, m := range retry {
			if againRes[m] == "passed" {
				t.Logf("%s passed when run again (first: %q)", m, vmRes[m])
				continue
			}
			lost = append(lost, m+" ("+vmRes[m]+", then "+againRes[m]+")")
		}
		vmOut = append(vmOut, again...)
	}
	if len(passedHost) < len(mods)*3/4 {
		t.Errorf("only %d of %d modules pass on the host: the comparison says little\n%s", len(passedHost), len(mods), tail(string(hostOut)))
	}
	if len(lost) > 0 {
		t.Errorf("passing on the host, not in the VM: %s\nVM output:\n%s", strings.Join(lost, ", "), tail(string(vmOut)))
	}
	e.assertClean()
}
