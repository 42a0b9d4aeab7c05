package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Serve accepts connections on ln and serves one session on each (see
// ServeConn), concurrently, until ctx ends or ln fails for good. It is how
// the agent serves stream transports that take connections, such as
// vsock, next to its virtio-serial port. It returns once every session it
// started has ended; ending ctx ends them.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var sessions sync.WaitGroup
	defer sessions.Wait()
	backoff := time.Duration(0)
	for {
		conn, err := ln.Accept()
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return ctx.Err()
			case errors.Is(err, net.ErrClosed):
				return nil
			case temporaryAccept(err):
				// Out of descriptors or memory, or a connection that
				// went away before it was accepted: retry, slower each
				// time, as net/http does.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Debug("accept", "err", err, "retry_in", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		sessions.Add(1)
		go func() {
			defer sessions.Done()
			defer conn.Close()
			if err := s.ServeConn(ctx, conn); err != nil {
				s.log.Debug("session ended", "remote", conn.RemoteAddr(), "err", err)
			}
		}()
	}
}

// temporaryAccept reports whether an accept error is worth a retry.
func temporaryAccept(err error) bool {
	for _, errno := range []syscall.Errno{unix.ECONNABORTED, unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.EPROTO, unix.EPERM} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// ListenVsock listens for AF_VSOCK connections on port, on any local CID.
// It works on a kernel with vsock support even before (or without) a
// vsock device: the listener then simply gets no connections. Only the
// host (CID 2) may connect: a connection from anywhere else (a guest
// program through vsock loopback) is refused.
func ListenVsock(port uint32) (net.Listener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock bind port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock listen on port %d: %w", port, err)
	}
	// A non-blocking descriptor makes the os.File pollable, so Accept
	// waits in the runtime's poller and Close wakes it.
	f := os.NewFile(uintptr(fd), "vsock:"+strconv.FormatUint(uint64(port), 10))
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &vsockListener{f: f, rc: rc, addr: VsockAddr{CID: unix.VMADDR_CID_ANY, Port: port}}, nil
}

// VsockHasDevice reports whether the guest has a vsock device (a transport
// to the host with a CID of its own), as opposed to only kernel support.
func VsockHasDevice() bool {
	f, err := os.Open("/dev/vsock")
	if err != nil {
		return false
	}
	defer f.Close()
	cid, err := unix.IoctlGetUint32(int(f.Fd()), unix.IOCTL_VM_SOCKETS_GET_LOCAL_CID)
	return err == nil && cid != unix.VMADDR_CID_ANY
}

// VsockAddr is an AF_VSOCK address.
type VsockAddr struct{ CID, Port uint32 }

func (VsockAddr) Network() string { return "vsock" }

func (a VsockAddr) String() string {
	return strconv.FormatUint(uint64(a.CID), 10) + ":" + strconv.FormatUint(uint64(a.Port), 10)
}

type vsockListener struct {
	f      *os.File
	rc     syscall.RawConn
	addr   VsockAddr
	closed atomic.Bool
}

func (l *vsockListener) Accept() (net.Conn, error) {
	for {
		var nfd int
		var sa unix.Sockaddr
		var aerr error
		err := l.rc.Read(func(fd uintptr) bool {
			for {
				nfd, sa, aerr = unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
				if !errors.Is(aerr, unix.EINTR) {
					return !errors.Is(aerr, unix.EAGAIN)
				}
			}
		})
		if err != nil {
			if l.closed.Load() {
				return nil, net.ErrClosed
			}
			return nil, err
		}
		if aerr != nil {
			return nil, os.NewSyscallError("accept4", aerr)
		}
		remote, ok := sa.(*unix.SockaddrVM)
		if !ok || remote.CID != unix.VMADDR_CID_HOST {
			unix.Close(nfd)
			continue
		}
		f := os.NewFile(uintptr(nfd), "vsock:"+VsockAddr{remote.CID, remote.Port}.String())
		return &vsockConn{File: f, local: l.addr, remote: VsockAddr{CID: remote.CID, Port: remote.Port}}, nil
	}
}

func (l *vsockListener) Close() error {
	l.closed.Store(true)
	return l.f.Close()
}

func (l *vsockListener) Addr() net.Addr { return l.addr }

// vsockConn is an accepted vsock connection: an os.File (pollable, with
// deadlines) with addresses.
type vsockConn struct {
	*os.File
	local, remote VsockAddr
}

func (c *vsockConn) LocalAddr() net.Addr  { return c.local }
func (c *vsockConn) RemoteAddr() net.Addr { return c.remote }
