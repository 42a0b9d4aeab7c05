package mvm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/agentclient"
	"github.com/mvm-sh/mvm/internal/lockfile"
)

// PoolSocket is the socket the pool of cfg's user serves (in PoolDir).
func PoolSocket(cfg Config) (string, error) {
	dir, err := PoolDir(cfg)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, poolSocketName), nil
}

// ErrNoPool is PoolStatusOf's error when no pool runs for the user.
var ErrNoPool = errors.New("no pool is running")

// dialPool connects to the user's pool and says hello. It returns
// ErrNoPool when none runs.
func dialPool(ctx context.Context, cfg Config) (*agentclient.Client, error) {
	path, err := PoolSocket(cfg)
	if err != nil {
		return nil, err
	}
	conn, err := dialUnix(ctx, path)
	if errors.Is(err, errNoListener) {
		return nil, ErrNoPool
	}
	if err != nil {
		return nil, fmt.Errorf("pool: %w", err)
	}
	// Runs send the pool their commands, environment and stdin: only to
	// a pool of this user (the directory should make sure of it; a
	// shared MVM_STATE_DIR would not).
	if err := sameUser(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("pool: %s is served by another user: %w", path, err)
	}
	client, err := agentclient.Dial(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("pool: %w", err)
	}
	h, err := client.Hello(ctx)
	if err == nil && !h.Has(CapPool) {
		err = fmt.Errorf("%s does not serve a pool", path)
	}
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("pool: %w", err)
	}
	return client, nil
}

// fromPool is a sandbox of a VM the user's pool held ready for cfg, or
// nil and why it took none: "" when no pool runs (nothing to say). It
// never fails a run: anything wrong with the pool is a reason to start a
// VM instead.
func fromPool(ctx context.Context, cfg Config) (*Sandbox, string) {
	if cfg.NoPool {
		return nil, ""
	}
	start := time.Now()
	sb, why := takeFromPool(ctx, cfg, start)
	if sb == nil && why != "" && !poolSocketExists(cfg) {
		why = ""
	}
	return sb, why
}

func takeFromPool(ctx context.Context, cfg Config, start time.Time) (*Sandbox, string) {
	if os.Getenv("MVM_NO_POOL") == "1" {
		return nil, "MVM_NO_POOL=1"
	}
	if cfg.Name != "" {
		// A named sandbox is one of its own.
		return nil, "a named sandbox"
	}
	r, err := resolve(cfg)
	if err != nil {
		// Start says what is wrong.
		return nil, ""
	}
	shape, why := poolShapeOf(r)
	if why != "" {
		return nil, why
	}
	// A pool that does not answer (stopped, swamped) costs a run at
	// most these before it starts its own VM.
	hctx, cancel := context.WithTimeout(ctx, poolHelloTimeout)
	defer cancel()
	client, err := dialPool(hctx, r.Config)
	if errors.Is(err, ErrNoPool) {
		return nil, ""
	}
	if err != nil {
		return nil, err.Error()
	}
	tctx, cancel := context.WithTimeout(ctx, takeTimeout)
	defer cancel()
	name, h, err := client.Take(tctx, shape)
	if err != nil {
		client.Close()
		return nil, err.Error()
	}
	return attached(r.Config, name, client, h, "take from pool", name, start, true), ""
}

// poolSocketExists: the user's pool has (or had) a socket.
func poolSocketExists(cfg Config) bool {
	path, err := PoolSocket(cfg)
	if err != nil {
		return false
	}
	_, err = os.Stat(path)
	return err == nil
}

// PoolStatusOf asks the pool of cfg's user what it holds: ErrNoPool when
// none runs.
func PoolStatusOf(ctx context.Context, cfg Config) (PoolStatus, error) {
	client, err := dialPool(ctx, cfg)
	if err != nil {
		return PoolStatus{}, err
	}
	defer client.Close()
	r, err := client.PoolStatus(ctx)
	if err != nil {
		return PoolStatus{}, err
	}
	st := PoolStatus{PID: int(r.Pid), Started: time.Unix(0, r.StartedUnixNano), IdleLimit: time.Duration(r.IdleLimitMillis) * time.Millisecond}
	for _, s := range r.Shapes {
		st.Shapes = append(st.Shapes, PoolShapeStatus{
			Shape: s.Shape, Description: s.Description, Size: int(s.Size), Ready: int(s.Ready),
			Starting: int(s.Starting), Taken: int(s.Taken), Served: s.Served, Missed: s.Missed,
			PrivateBytes: int64(s.PrivateBytes), Idle: s.Idle, LastError: s.LastError,
		})
	}
	return st, nil
}

// privateDir makes dir (a directory of this user's, not a link) mode
// 0700.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s is not a directory of yours", dir)
	}
	return os.Chmod(dir, 0o700)
}

// ErrPoolRunning is ListenPool's error when the user's pool already runs.
var ErrPoolRunning = errors.New("a pool is already running")

// poolListener is the pool's socket. Closing it drops the pool's lock,
// unless a Pool.Run serves it: Run drops the lock when it returns, once
// the runs of the VMs it handed out have ended.
type poolListener struct {
	net.Listener
	lock    *lockfile.Lock
	running atomic.Bool
}

func (l *poolListener) Close() error {
	err := l.Listener.Close()
	if !l.running.Load() {
		l.lock.Release()
	}
	return err
}

// ListenPool makes the socket of the user's pool (PoolSocket), private to
// the user, for Pool.Run. One pool runs per user: the pool's lock is
// held until the listener is closed (or the process ends), and a second
// ListenPool fails with ErrPoolRunning meanwhile.
func ListenPool(cfg Config) (net.Listener, error) {
	dir, err := PoolDir(cfg)
	if err != nil {
		return nil, err
	}
	if err := privateDir(dir); err != nil {
		return nil, err
	}
	lock, err := lockfile.Take(filepath.Join(dir, "lock"), unix.LOCK_EX|unix.LOCK_NB, true)
	if errors.Is(err, lockfile.ErrWouldBlock) {
		return nil, ErrPoolRunning
	}
	if err != nil {
		return nil, fmt.Errorf("pool lock: %w", err)
	}
	ln, err := Listen(filepath.Join(dir, poolSocketName))
	if err != nil {
		lock.Release()
		return nil, err
	}
	return &poolListener{Listener: ln, lock: lock}, nil
}
