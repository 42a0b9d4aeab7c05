package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/accel"
	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/qmp"
)

// The tests here take real QEMU snapshots of a VM whose agent is idle and
// restore them, to check the guest's side of snapshot restore: a new
// session on the agent the snapshot froze, a clock, a random number
// generator and an identity of its own per clone, drives swapped under
// the restored guest. The host's side (snapshot keys, RAM files, the SDK)
// is not what they test, so QEMU is driven here directly, with the
// backend's machine and kernel arguments, a migration stream to a file,
// and `-incoming`.

// snapVM is one QEMU process of the snapshot tests.
type snapVM struct {
	t     *testing.T
	cmd   *exec.Cmd
	qmp   *qmp.Client
	agent net.Conn // the host end of the agent port's socketpair, if any
	start time.Time
	cont  time.Time // when a restored guest was let run
}

// snapDrive is a drive of a snapshot test VM: a slot whose image may
// differ between the snapshot and the restore.
type snapDrive struct {
	path     string
	readOnly bool
}

// startSnapVM starts QEMU. With incoming, it waits for a migration
// stream (a restore); with agentSock, the agent port is a listening unix
// socket the test connects to (and may disconnect from), else one end of
// a socketpair, connected from the start as with the backend.
func startSnapVM(t *testing.T, drives []snapDrive, incoming bool, agentSock string) *snapVM {
	t.Helper()
	kernel, initrd := guestImage(t)
	choice, err := accel.Host{}.Resolve(accel.Auto)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	qmpHost, qmpChild := pairFiles(t)
	args := []string{
		"-M", "microvm,acpi=off", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-smp", "2", "-m", "256M", "-global", "virtio-mmio.force-legacy=false",
		"-kernel", kernel, "-initrd", initrd,
		"-serial", "file:" + filepath.Join(dir, "console.log"),
		"-chardev", "socket,id=qmp,fd=3", "-mon", "chardev=qmp,mode=control",
		"-device", "virtio-serial-device,id=vser0",
	}
	kargs := "console=ttyS0 quiet 8250.nr_uarts=1 reboot=t panic=-1 random.trust_cpu=on mitigations=off"
	if choice.Kind == accel.KVM {
		args = append(args, "-accel", "kvm", "-cpu", "host")
	} else {
		args = append(args, "-accel", "tcg", "-cpu", "max")
		kargs += " noapictimer"
	}
	args = append(args, "-append", kargs)
	files := []*os.File{qmpChild}
	vm := &snapVM{t: t}
	if agentSock != "" {
		args = append(args, "-chardev", "socket,id=agent,path="+agentSock+",server=on,wait=off")
	} else {
		host, child := pairFiles(t)
		c, err := net.FileConn(host)
		host.Close()
		if err != nil {
			t.Fatal(err)
		}
		vm.agent = c
		files = append(files, child)
		args = append(args, "-chardev", "socket,id=agent,fd=4")
	}
	args = append(args, "-device", "virtserialport,bus=vser0.0,chardev=agent,id=agentport,name="+agentproto.PortName)
	for i, d := range drives {
		opts := fmt.Sprintf("file=%s,if=none,id=drive%d,format=raw,cache=unsafe", d.path, i)
		if d.readOnly {
			opts += ",readonly=on"
		}
		args = append(args, "-drive", opts, "-device", fmt.Sprintf("virtio-blk-device,drive=drive%d", i))
	}
	if incoming {
		args = append(args, "-incoming", "defer")
	}
	vm.cmd = exec.Command("qemu-system-x86_64", args...)
	vm.cmd.ExtraFiles = files
	vm.cmd.Stderr = os.Stderr
	vm.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	vm.start = time.Now()
	if err := vm.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		f.Close()
	}
	t.Cleanup(vm.kill)
	qc, err := net.FileConn(qmpHost)
	qmpHost.Close()
	if err != nil {
		t.Fatal(err)
	}
	vm.qmp = qmp.New(qc)
	return vm
}

// pairFiles returns both ends of a unix socketpair as files.
func pairFiles(t *testing.T) (host, child *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "host"), os.NewFile(uintptr(fds[1]), "child")
}

func (vm *snapVM) kill() {
	if vm.cmd.Process != nil {
		_ = vm.cmd.Process.Kill()
		_ = vm.cmd.Wait()
	}
	if vm.agent != nil {
		vm.agent.Close()
	}
}

func (vm *snapVM) qmpDo(command string, args any) json.RawMessage {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ret, err := vm.qmp.Execute(ctx, command, args)
	if err != nil {
		vm.t.Fatalf("%s: %v", command, err)
	}
	return ret
}

// waitQMP polls command until cond accepts its result.
func (vm *snapVM) waitQMP(command string, cond func(json.RawMessage) bool) {
	vm.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond(vm.qmpDo(command, nil)) {
		if time.Now().After(deadline) {
			vm.t.Fatalf("%s: condition not reached", command)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func migrationStatus(b json.RawMessage) string {
	var st struct{ Status string }
	_ = json.Unmarshal(b, &st)
	return st.Status
}

// save pauses the VM, writes its state to file and ends QEMU, as a host
// taking a snapshot does.
func (vm *snapVM) save(file string) {
	vm.t.Helper()
	vm.qmpDo("stop", nil)
	vm.qmpDo("migrate", map[string]string{"uri": "exec:cat > " + file})
	vm.waitQMP("query-migrate", func(b json.RawMessage) bool {
		switch s := migrationStatus(b); s {
		case "completed":
			return true
		case "failed", "cancelled":
			vm.t.Fatalf("migration %s: %s", s, b)
		}
		return false
	})
	vm.kill()
}

// restore feeds file to a VM started with incoming and lets the guest run
// once the state is loaded (it was saved paused, so it loads paused).
func (vm *snapVM) restore(file string) {
	vm.t.Helper()
	vm.qmpDo("migrate-incoming", map[string]string{"uri": "exec:cat " + file})
	vm.waitQMP("query-status", func(b json.RawMessage) bool {
		var st struct{ Status string }
		_ = json.Unmarshal(b, &st)
		return st.Status == "paused" || st.Status == "running"
	})
	vm.cont = time.Now()
	vm.qmpDo("cont", nil)
}

// dial says hello to the VM's agent over conn.
func dialAgent(t *testing.T, conn net.Conn, opts agentclient.HelloOptions) *agentclient.Client {
	t.Helper()
	c, err := agentclient.DialWithOptions(conn, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := c.Hello(ctx); err != nil {
		t.Fatalf("hello: %v", err)
	}
	return c
}

// clone is what one restored VM reported.
type clone struct {
	random, bootID, hostname, osRelease string
	clock                               time.Time
	toHello, toExec, resumeToHello      time.Duration
}

var hexWords = regexp.MustCompile(`^0000000( [0-9a-f]{4}){8}\n0000020( [0-9a-f]{4}){8}\n0000040\n$`)

// TestSnapshotRestore snapshots a VM whose agent is idle and restores it
// twice, each time with other images behind its drives: each clone gets
// a new session (hello) on the agent the snapshot froze, its own random
// bytes, boot id and host name, the host's clock, and finds the drives
// attached at restore, not the ones the snapshotted kernel had cached.
func TestSnapshotRestore(t *testing.T) {
	for _, disconnect := range []bool{false, true} {
		name := "connected"
		if disconnect {
			name = "disconnected"
		}
		t.Run(name, func(t *testing.T) { testSnapshotRestore(t, disconnect) })
	}
}

func testSnapshotRestore(t *testing.T, disconnect bool) {
	const size = 32 << 20
	// Placeholders at snapshot time, real images at restore, in the
	// same slots and of the same size.
	placeholderLower := ext4Image(t, "", "placeholder", size)
	placeholderUpper := ext4Image(t, "", "placeholder-rw", size)
	tmpl := ext4Image(t, templateTree(t, t.TempDir()), "tmpl-0", size)
	state := filepath.Join(t.TempDir(), "state.bin")

	src := startSnapVM(t, []snapDrive{{placeholderLower, true}, {placeholderUpper, false}}, false, "")
	c := dialAgent(t, src.agent, agentclient.HelloOptions{})
	g := &guest{t: t, c: c}
	if h, _ := c.Hello(g.ctx()); !h.Has(agentproto.CapSnapshot) {
		t.Fatalf("the agent does not announce %q: %v", agentproto.CapSnapshot, h.Capabilities)
	}
	// The snapshotted kernel has both placeholders' blocks cached: a
	// process that left the command's session holds the drives open,
	// so closing them does not drop the cache, and reads them.
	g.sh("setsid sh -c 'exec sleep 1000' </dev/vda 3</dev/vdb >/dev/null 2>&1 & sleep 0.2; cat /dev/vda /dev/vdb >/dev/null")
	srcRandom := g.sh("head -c 32 /dev/urandom | od -x")
	if err := c.Quiesce(g.ctx()); err != nil {
		t.Fatal(err)
	}
	if disconnect {
		// The host may also close the agent channel before it saves:
		// the agent then waits for the next host without polling.
		src.agent.Close()
		time.Sleep(200 * time.Millisecond)
	}
	src.save(state)

	var clones []clone
	for i := range 2 {
		upper := ext4Image(t, "", "root-rw", size)
		vm := startSnapVM(t, []snapDrive{{tmpl, true}, {upper, false}}, true, "")
		vm.restore(state)
		hostname := "clone-" + strconv.Itoa(i)
		c := dialAgent(t, vm.agent, agentclient.HelloOptions{Hostname: hostname, RenewBootID: true})
		cl := clone{toHello: time.Since(vm.start), resumeToHello: time.Since(vm.cont)}
		g := &guest{t: t, c: c}
		g.sh("true")
		cl.toExec = time.Since(vm.start)
		if err := c.Root(g.ctx(), agentclient.Root{Template: "tmpl-0", Upper: "root-rw"}); err != nil {
			t.Fatalf("clone %d: root on the drives attached at restore: %v", i, err)
		}
		out := g.sh("head -c 32 /dev/urandom | od -x; cat /proc/sys/kernel/random/boot_id; hostname; cat /etc/hostname; date +%s; grep ^NAME= /etc/os-release")
		lines := strings.Split(out, "\n")
		if len(lines) < 8 {
			t.Fatalf("clone %d: %q", i, out)
		}
		cl.random = strings.Join(lines[:3], "\n") + "\n"
		cl.bootID, cl.hostname, cl.osRelease = lines[3], lines[4], lines[7]
		if lines[5] != hostname {
			t.Errorf("clone %d: /etc/hostname %q, want %q", i, lines[5], hostname)
		}
		if n, err := strconv.ParseInt(lines[6], 10, 64); err == nil {
			cl.clock = time.Unix(n, 0)
		}
		// Timers after the restore: sleep 1 takes about a second.
		r := g.exec(agentclient.ExecSpec{Argv: []string{"sleep", "1"}})
		if r.st.Duration < 900*time.Millisecond || r.st.Duration > 3*time.Second {
			t.Errorf("clone %d: sleep 1 took %s", i, r.st.Duration)
		}
		if cl.clock.IsZero() || time.Since(cl.clock).Abs() > 3*time.Second {
			t.Errorf("clone %d: guest clock %v, host %v", i, cl.clock, time.Now())
		}
		clones = append(clones, cl)
		t.Logf("clone %d: QEMU start to hello %s (guest resumed to hello %s), to first exec result %s",
			i, cl.toHello.Round(time.Millisecond), cl.resumeToHello.Round(time.Millisecond), cl.toExec.Round(time.Millisecond))
		c.Close()
		vm.kill()
	}
	for i, cl := range clones {
		if !hexWords.MatchString(cl.random) {
			t.Errorf("clone %d: od output %q", i, cl.random)
		}
		if cl.random == srcRandom {
			t.Errorf("clone %d: the same random bytes as the snapshotted VM", i)
		}
		if cl.hostname != "clone-"+strconv.Itoa(i) {
			t.Errorf("clone %d: host name %q", i, cl.hostname)
		}
		if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(cl.bootID) {
			t.Errorf("clone %d: boot id %q", i, cl.bootID)
		}
		if cl.osRelease != "NAME=mvm-test-template" {
			t.Errorf("clone %d: the root is not the template attached at restore: %q", i, cl.osRelease)
		}
	}
	if clones[0].random == clones[1].random {
		t.Errorf("two clones read the same random bytes:\n%s", clones[0].random)
	}
	if clones[0].bootID == clones[1].bootID {
		t.Errorf("two clones have the same boot id %s", clones[0].bootID)
	}
}

// TestAgentWaitsForHost: when the host closes the agent channel the agent
// waits for it to connect again without waking up, and answers a new host
// at once.
func TestAgentWaitsForHost(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	startSnapVM(t, nil, false, sock)
	connect := func() net.Conn {
		var conn net.Conn
		if !waitFor(time.Minute, func() bool {
			var err error
			conn, err = net.Dial("unix", sock)
			return err == nil
		}) {
			t.Fatal("cannot connect to the agent socket")
		}
		return conn
	}
	// The agent's context switches, all threads: each wake-up of a
	// polling loop is one.
	const switches = `cat /proc/1/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}'`
	count := func(g *guest) int {
		n, err := strconv.Atoi(strings.TrimSpace(g.sh(switches)))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	conn := connect()
	g := &guest{t: t, c: dialAgent(t, conn, agentclient.HelloOptions{})}
	var answers []time.Duration
	var connected, away []int
	// Long enough that a loop polling the port every 100 ms would add 50
	// wake-ups per idle spell, well above what a session costs.
	const idle = 5 * time.Second
	for round := range 4 {
		before := count(g)
		if round%2 == 0 {
			// For reference: as long idle with the host there.
			time.Sleep(idle)
			g.sh("true")
			connected = append(connected, count(g)-before)
			continue
		}
		if round == 1 {
			if err := g.c.Quiesce(g.ctx()); err != nil {
				t.Fatal(err)
			}
		}
		conn.Close()
		time.Sleep(idle)
		conn = connect()
		start := time.Now()
		g = &guest{t: t, c: dialAgent(t, conn, agentclient.HelloOptions{})}
		answers = append(answers, time.Since(start))
		away = append(away, count(g)-before)
	}
	t.Logf("reconnect to hello: %v; agent context switches over %s idle: host there %v, host away %v", answers, idle, connected, away)
	// The counts are noisy (keepalives, the kernel's own timers; spells
	// differing by 20 are seen), so the fewest wake-ups with the host away
	// are compared with the most with it there: a poller adds its 50 to
	// every spell away, noise does not.
	if extra := slices.Min(away) - slices.Max(connected); extra > 30 {
		t.Errorf("the agent woke up at least %d times more with the host away than with the host there", extra)
	}
}
