package mvm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/image"
)

// SocketName is the name of the socket a sandbox's owner serves it on
// (Serve), in the sandbox's run directory.
const SocketName = "api.sock"

// ErrNotFound is wrapped by Attach's error when no sandbox of that name
// is served.
var ErrNotFound = errors.New("no such sandbox")

// SocketPath is where Attach looks for the sandbox called name: the
// socket in its run directory. Only RunDir matters in cfg.
func SocketPath(cfg Config, name string) (string, error) {
	if !namePattern.MatchString(name) {
		return "", invalid("Name", name, "not a sandbox name (letters, digits, '_', '.', '-'; at most 63)")
	}
	if err := fillDirs(&cfg); err != nil {
		return "", err
	}
	return filepath.Join(cfg.RunDir, name, SocketName), nil
}

// Listen makes the socket a sandbox is served on (SocketPath), private to
// this user like the rest of the run directory.
func Listen(path string) (net.Listener, error) {
	_ = os.Remove(path)
	var ln net.Listener
	err := withShortPath(path, func(p string) error {
		var err error
		ln, err = net.Listen("unix", p)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// withShortPath calls fn with path, or, when path is too long for a unix
// socket address (108 bytes), with a /proc/self/fd name of its directory.
func withShortPath(path string, fn func(string) error) error {
	if len(path) < 100 {
		return fn(path)
	}
	fd, err := unix.Open(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return fn("/proc/self/fd/" + strconv.Itoa(fd) + "/" + filepath.Base(path))
}

// errNoListener is dialUnix's error when nothing serves the socket (it
// is missing, or its server died).
var errNoListener = errors.New("nothing listens on the socket")

// dialUnix connects to the unix socket at path (a long one too).
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var conn net.Conn
	err := withShortPath(path, func(p string) error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "unix", p)
		return err
	})
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED) {
		return nil, errNoListener
	}
	return conn, err
}

// Attach connects to the sandbox called name that another process (mvmctl
// sandbox create, or any program's Serve) runs, and returns it as a
// Sandbox: Exec, Start, the file operations and their errors are those of
// a sandbox this process started. Close disconnects, and kills the
// commands this process started that still run; the sandbox goes on.
// Only RunDir and Logger matter in cfg.
func Attach(ctx context.Context, cfg Config, name string) (*Sandbox, error) {
	start := time.Now()
	path, err := SocketPath(cfg, name)
	if err != nil {
		return nil, err
	}
	conn, err := dialUnix(ctx, path)
	if err != nil {
		if errors.Is(err, errNoListener) {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
		}
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	client, err := agentclient.Dial(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	h, err := client.Hello(hctx)
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("attach %s: %w", name, err)
	}
	if !h.Has(CapSandbox) {
		client.Close()
		return nil, fmt.Errorf("attach %s: %s does not serve a sandbox", name, path)
	}
	return attached(cfg, name, client, h, "attach", "", start, false), nil
}

// attached is the Sandbox of a VM another process serves on client,
// whose guest said h. Its first timing is step (with detail), which began
// at start; taken says the VM came from a pool.
func attached(cfg Config, name string, client *agentclient.Client, h *agentclient.Hello, step, detail string, start time.Time, taken bool) *Sandbox {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Name = name
	sb := newSandbox(resolved{Config: cfg}, image.Image{})
	sb.client, sb.hello, sb.attached, sb.taken = client, h, true, taken
	sb.monPause, sb.monDone = make(chan struct{}), make(chan struct{})
	close(sb.monDone)
	sb.life.t0 = start
	sb.life.record(step, start, detail)
	sb.life.push("disconnect", func(context.Context) error { return client.Close() })
	sb.setStatus(StatusRunning)
	go sb.watchAttached()
	return sb
}

// watchAttached pings the serving process while the sandbox is attached:
// its end (or its VM's) fails the sandbox, as a dead VM does.
func (sb *Sandbox) watchAttached() {
	t := time.NewTicker(sb.pingEvery)
	defer t.Stop()
	for {
		select {
		case <-sb.stopMonitor:
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(context.Background(), sb.pingTimeout)
		_, err := sb.agentClient().Ping(pctx)
		cancel()
		if err != nil {
			select {
			case <-sb.stopMonitor:
			default:
				sb.fail(&VMError{Op: "run", Err: fmt.Errorf("%s went away (%w)", sb.remoteName(), err)})
			}
			return
		}
	}
}
