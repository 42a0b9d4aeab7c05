// Package agentproto holds what both ends of the guest agent protocol share:
// the version numbers, capability names, the session (stream multiplexer)
// settings and the message framing. The messages themselves are generated
// from api/agent/v1/agent.proto; docs/protocol.md is the prose spec.
//
// Both the host client (internal/agentclient) and the guest server
// (internal/agent) go through this package, so a change to framing or
// session settings cannot drift between the two.
package agentproto

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/mux"
)

// Protocol versions. A session runs at the highest version both sides speak;
// a peer whose range does not overlap is refused with an Error of code
// VERSION, never left hanging. Version 2 adds calls and fields, each
// announced as a capability, and keeps every version 1 message meaning
// what it meant, so both ends still accept version 1 peers.
const (
	Version    uint32 = 2
	MinVersion uint32 = 1
)

// Capability names announced in HelloReply.capabilities.
const (
	CapExec        = "exec"
	CapExecStdin   = "exec.stdin"
	CapExecTimeout = "exec.timeout"
	CapSignal      = "signal"
	CapShutdown    = "shutdown"
	CapPing        = "ping"
	CapMount       = "mount"
	// CapMountLabel: Mount finds drives by filesystem label
	// (Mount.device_label, Mount.upper_label), not only by serial.
	CapMountLabel = "mount.label"
	// CapRoot: the Root call (version 2): commands run in a template's
	// root filesystem under a writable overlay.
	CapRoot = "root"
	// CapExecUser: Exec.user runs the command as another user, resolved
	// in the command root's /etc/passwd and /etc/group (version 2).
	CapExecUser = "exec.user"
	// CapSnapshot: the agent can be snapshotted and restored (version
	// 2): the Quiesce call, a new session on a connection that carried
	// one, Hello.boot_id, a reseed of the kernel's random number
	// generator at every hello, and drive caches flushed before a drive
	// is first mounted (its image may have been swapped at restore).
	CapSnapshot = "snapshot"
	// CapHelloHostname: Hello.hostname sets the guest's host name
	// (version 2).
	CapHelloHostname = "hello.hostname"
	// CapExecTTY: Exec.tty runs the command on a pseudo-terminal of the
	// size Exec.window, resized by ExecInput.resize (version 2).
	CapExecTTY = "exec.tty"
	// CapNetwork: the Network call (version 2) configures the guest's
	// network interface, default route and resolv.conf.
	CapNetwork = "network"
	// CapFiles: the CopyIn, CopyOut and Stat calls (version 2) move
	// files and trees in and out of the command root.
	CapFiles = "files"
	// CapPause: Quiesce.keep_drives (version 2), for a machine paused
	// to disk and resumed with its drives.
	CapPause = "pause"
	// CapRefresh: the Refresh call (version 2) renews the clock, the
	// random number generator and the boot id of a running guest, as a
	// hello does: what a pool's VM gets when it is handed out.
	CapRefresh = "refresh"
	// CapCgroup: Exec.cgroup starts a command in a cgroup of its own,
	// and the CgroupStats call reads it (version 2).
	CapCgroup = "cgroup"
	// CapExecRoot: Exec.root runs a command in a directory of the
	// command root as its root, with kernel filesystems of its own
	// (version 2): a pod's containers, each in its root, in one VM.
	CapExecRoot = "exec.root"
	// CapFilesOwners: CopyIn.keep_owners (version 2), served by an
	// agent that runs as root.
	CapFilesOwners = "files.owners"
	// CapFilesRoot: CopyIn.root and Stat.root resolve a path inside a
	// container's root (as Exec.root), and CopyIn.parents makes the
	// missing parents (version 2): a pod container's volumes.
	CapFilesRoot = "files.root"
	// CapRelease: the Release call (version 2) ends a container's
	// cgroup and Exec.root.
	CapRelease = "release"
)

// MaxCgroupName bounds Exec.cgroup and CgroupStats.name.
const MaxCgroupName = 64

// CheckCgroupName says whether name can name a child of the guest's
// cgroup root: one path component of letters, digits, '.', '_' and '-',
// at most MaxCgroupName bytes, not "." or "..". The host checks it before
// asking and the agent again before it touches the hierarchy.
func CheckCgroupName(name string) error {
	if name == "" || len(name) > MaxCgroupName || name == "." || name == ".." {
		return fmt.Errorf("cgroup name %q: want 1 to %d characters, not . or ..", name, MaxCgroupName)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("cgroup name %q: only letters, digits, '.', '_' and '-'", name)
		}
	}
	return nil
}

// PortName is the virtio-serial port name the agent looks for. The host
// names the port this way; the guest finds /dev/vportNpM through sysfs.
const PortName = "org.mvm.agent.0"

// VsockPort is the AF_VSOCK port the agent listens on (any guest CID), for
// VMMs whose agent channel is vsock (Firecracker). Each connection is one
// session.
const VsockPort = 5252

// MaxMessageSize caps one framed message. Output is cut into ChunkSize
// pieces, so only a hostile or broken peer ever comes near it.
const MaxMessageSize = 1 << 20

// MaxResponseSize caps a Response, which is always small (a hello reply, a
// pong echoing the host's payload, an error). The cap matters because a
// HelloReply's repeated capabilities decode into far more memory than
// they take on the wire (an empty string is 2 bytes there and 16 in a Go
// slice): a 1 MiB reply of them makes a reader allocate over 40 MiB, one
// of this size about 3 MiB.
const MaxResponseSize = 64 << 10

// ChunkSize is how much stdout/stderr/stdin one message carries at most.
// Larger chunks mean fewer frames and syscalls per byte, which is what
// bulk output costs in an emulated guest; the agent enlarges its pipes so
// that a read can return this much.
const ChunkSize = 128 << 10

// SessionConfig is the stream multiplexer's configuration on both ends. An
// 8 MiB window (yamux starts at 256 KiB) keeps a bulk output stream from
// stalling on window updates when the guest is slow to be scheduled
// (TCG): a command's stdout measured 173-176 MiB/s with 1 MiB, 222-243
// with 4, 261-313 with 8 and 233-279 with 16. The window is also what a
// guest can make the host buffer per stream while the host's reader lags:
// mvmctl's peak RSS under a flood into a slow reader
// (TestOutputFloodIntoSlowReader, which allows 64 MiB) is 37 MiB with
// 8 MiB, since a stream's buffer never grows past its window (it was 54.5
// MiB when append chose the growth, and 23.6 with a 1 MiB window).
// The session sends no keepalives of its own: the peer is a VM that may be
// paused (snapshots, a debugger) and a missed ping must not end the
// session. A caller that knows the VM runs checks liveness with
// mux.Session.Ping, which the agent answers from its reader.
func SessionConfig() mux.Config {
	return mux.Config{Window: 8 << 20}
}

// Reader reads framed messages from one stream.
type Reader struct {
	br *bufio.Reader
}

// NewReader wraps r; the buffering is needed because the size prefix is a
// varint read byte by byte.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, ChunkSize+1024)}
}

// Read decodes the next message into m. It returns io.EOF only when the
// stream ended cleanly between two messages. The size prefix is checked
// against the cap (MaxMessageSize, MaxResponseSize for a Response) before
// anything is allocated; a message that fits the reader's buffer (every
// output chunk does) is decoded in place.
func (r *Reader) Read(m proto.Message) error {
	// Unknown fields are dropped: nothing re-encodes a message it read,
	// and keeping them costs several times their size in allocations.
	opts := protodelim.UnmarshalOptions{MaxSize: sizeLimit(m), UnmarshalOptions: proto.UnmarshalOptions{DiscardUnknown: true}}
	err := opts.UnmarshalFrom(r.br, m)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		return Classify(fmt.Errorf("read message: %w", err))
	}
	return nil
}

// sizeLimit is the cap on a framed m.
func sizeLimit(m proto.Message) int64 {
	if _, ok := m.(*agentpb.Response); ok {
		return MaxResponseSize
	}
	return MaxMessageSize
}

// Marshal frames m. Callers that share a stream between goroutines write the
// result with a single Write call under their own lock, so frames never
// interleave.
func Marshal(m proto.Message) ([]byte, error) {
	size := proto.Size(m)
	b := protowire.AppendVarint(make([]byte, 0, size+binary.MaxVarintLen64), uint64(size))
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
	if err != nil {
		return nil, fmt.Errorf("marshal %T: %w", m, err)
	}
	if limit := int(sizeLimit(m)); len(b) > limit {
		return nil, fmt.Errorf("marshal %T: %d bytes exceeds the %d byte limit", m, len(b), limit)
	}
	return b, nil
}

// Write frames m and writes it with one Write call.
func Write(w io.Writer, m proto.Message) error {
	b, err := Marshal(m)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return Classify(fmt.Errorf("write %T: %w", m, err))
	}
	return nil
}

// ContextWriter is a stream whose writes can be abandoned (mux.Stream).
type ContextWriter interface {
	WriteContext(ctx context.Context, p []byte) (int, error)
}

// WriteContext is Write on a stream that gives up when ctx ends: a guest
// that stops reading must not hold the caller.
func WriteContext(ctx context.Context, w ContextWriter, m proto.Message) error {
	b, err := Marshal(m)
	if err != nil {
		return err
	}
	if _, err := w.WriteContext(ctx, b); err != nil {
		return Classify(fmt.Errorf("write %T: %w", m, err))
	}
	return nil
}

// ErrClosed reports that the session or stream is gone: the peer closed it,
// the VM stopped, or the transport broke. Callers branch on it with
// errors.Is instead of matching the many transport errors behind it.
var ErrClosed = errors.New("agent connection closed")

// Classify folds the transport's "connection is gone" errors into ErrClosed,
// keeping the original error in the chain.
func Classify(err error) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, ErrClosed),
		errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, mux.ErrSessionClosed),
		errors.Is(err, mux.ErrStreamReset),
		errors.Is(err, mux.ErrWriteClosed),
		errors.Is(err, mux.ErrReadClosed):
		if errors.Is(err, ErrClosed) {
			return err
		}
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}

// Raw is what follows the messages read so far, buffered bytes first: a
// proxy that read a stream's request passes the rest through unparsed.
func (r *Reader) Raw() io.Reader { return r.br }
