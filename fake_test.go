package mvm

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/agent"
	"github.com/mvm-sh/mvm/internal/backend"
	"github.com/mvm-sh/mvm/internal/image"
)

// fakeBackend starts fake machines: no VMM, but the real agent server
// serving the real protocol over a socketpair, in this process. The
// commands it runs are real host processes. It lets the orchestrator's
// policies (interrupts, deadlines, failures) be tested in milliseconds.
type fakeBackend struct {
	mu       sync.Mutex
	machines []*fakeMachine
	started  chan *fakeMachine
}

func newFakeBackend() *fakeBackend { return &fakeBackend{started: make(chan *fakeMachine, 16)} }

func (b *fakeBackend) Start(ctx context.Context, cfg backend.Config) (backend.Machine, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "fake")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	m := &fakeMachine{cfg: cfg, host: conns[0], guest: &freezableConn{Conn: conns[1]}, done: make(chan struct{})}
	m.freezeCond = sync.NewCond(&m.guest.mu)
	m.guest.cond = m.freezeCond
	srv := agent.NewServer(nil, "fake", agent.Options{OnShutdown: func() { m.exit(nil) }})
	ctx, m.cancel = context.WithCancel(context.Background())
	go func() { _ = srv.ServeConn(ctx, m.guest) }()
	b.mu.Lock()
	b.machines = append(b.machines, m)
	b.mu.Unlock()
	b.started <- m
	return m, nil
}

type fakeMachine struct {
	cfg    backend.Config
	host   net.Conn
	guest  *freezableConn
	cancel context.CancelFunc

	freezeCond *sync.Cond
	once       sync.Once
	done       chan struct{}
	err        error
	stopped    bool
}

func (m *fakeMachine) DialAgent(ctx context.Context) (net.Conn, error) { return m.host, nil }
func (m *fakeMachine) Done() <-chan struct{}                           { return m.done }
func (m *fakeMachine) Err() error                                      { return m.err }
func (m *fakeMachine) PID() int                                        { return os.Getpid() }

func (m *fakeMachine) Stop(ctx context.Context) error {
	m.exit(nil)
	return nil
}

// exit ends the machine as a VMM exit would: the agent and its channel go,
// and the console log is written.
func (m *fakeMachine) exit(err error) {
	m.once.Do(func() {
		m.err = err
		m.guest.thaw()
		m.cancel()
		m.host.Close()
		m.guest.Close()
		if m.cfg.ConsoleLog != "" {
			_ = os.WriteFile(m.cfg.ConsoleLog, []byte("fake console\n"), 0o600)
		}
		close(m.done)
	})
}

// crash ends the machine with an error, as a VMM killed mid-run.
func (m *fakeMachine) crash() { m.exit(errors.New("vmm exited unexpectedly: signal: killed")) }

// freeze makes the guest's agent stop reading and writing its channel, as
// a frozen or halted guest would, without the machine ending.
func (m *fakeMachine) freeze() { m.guest.freeze() }

// freezableConn blocks every Read and Write while frozen.
type freezableConn struct {
	net.Conn
	mu     sync.Mutex
	cond   *sync.Cond
	frozen bool
}

func (c *freezableConn) wait() {
	c.mu.Lock()
	for c.frozen {
		c.cond.Wait()
	}
	c.mu.Unlock()
}

func (c *freezableConn) freeze() {
	c.mu.Lock()
	c.frozen = true
	c.mu.Unlock()
}

func (c *freezableConn) thaw() {
	c.mu.Lock()
	c.frozen = false
	c.cond.Broadcast()
	c.mu.Unlock()
}

func (c *freezableConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.wait()
	return n, err
}

func (c *freezableConn) Write(p []byte) (int, error) {
	c.wait()
	return c.Conn.Write(p)
}

// fakeConfig is a Config for the fake backend, with private directories
// and an image whose files exist (nothing boots them).
func fakeConfig(t *testing.T, b *fakeBackend) Config {
	t.Helper()
	d := t.TempDir()
	cache := filepath.Join(d, "cache")
	for _, f := range []string{"vmlinux", "initrd"} {
		if err := os.MkdirAll(cache, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(cache, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	err := image.Store{Root: cache}.Save(image.Image{
		Name: image.DefaultName, Kernel: filepath.Join(cache, "vmlinux"), Initrd: filepath.Join(cache, "initrd"),
	})
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		Accel:    AccelTCG,
		CacheDir: cache,
		StateDir: filepath.Join(d, "state"),
		RunDir:   filepath.Join(d, "run"),
		backend:  b,
	}
}

// assertNoRunDirs fails if a run directory was left behind.
func assertNoRunDirs(t *testing.T, cfg Config) {
	t.Helper()
	entries, _ := os.ReadDir(cfg.RunDir)
	if len(entries) > 0 {
		t.Errorf("%d run directories left behind", len(entries))
	}
}

// within fails the test if fn takes longer than d.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	start := time.Now()
	fn()
	if el := time.Since(start); el > d {
		t.Errorf("%s took %s, want at most %s", what, el.Round(time.Millisecond), d)
	}
}
