package mux_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agent"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

var writeSeeds = flag.Bool("write-seeds", false, "record a real agent session and rewrite the fuzz seed corpora from it")

// teeConn records everything read from the connection: what the agent
// sent.
type teeConn struct {
	net.Conn
	mu  sync.Mutex
	got bytes.Buffer
}

func (c *teeConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.got.Write(p[:n])
	c.mu.Unlock()
	return n, err
}

// TestRecordAgentSession runs the real agent server in-process and drives
// it as the host does (hello, an exec with stdin and output on both
// streams, a ping), recording the bytes the agent sends. With
// -write-seeds it stores them as seeds for the fuzz targets of the host's
// readers: the whole byte stream for FuzzClientSession here, the messages of
// each stream for agentproto's.
func TestRecordAgentSession(t *testing.T) {
	rec := recordSession(t)
	streams := splitStreams(t, rec)
	if len(streams[1]) == 0 || len(streams[3]) == 0 {
		t.Fatalf("recorded streams: %v", streams)
	}
	// Sanity: the recording parses as what the host expects.
	var resp agentpb.Response
	if err := agentproto.NewReader(bytes.NewReader(streams[1])).Read(&resp); err != nil || resp.GetHello() == nil {
		t.Fatalf("recorded hello reply: %v %v", &resp, err)
	}
	if !*writeSeeds {
		return
	}
	write := func(dir, name string, b []byte) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		corpus := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(corpus), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("testdata/fuzz/FuzzClientSession", "agent-session", rec)
	write("../agentproto/testdata/fuzz/FuzzReadResponse", "hello-reply", streams[1])
	write("../agentproto/testdata/fuzz/FuzzReadResponse", "pong", streams[5])
	write("../agentproto/testdata/fuzz/FuzzReadExecEvent", "exec-events", streams[3])
}

func recordSession(t *testing.T) []byte {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "sp")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	host := &teeConn{Conn: conns[0]}
	srv := agent.NewServer(nil, "v1.0.0", agent.Options{Mounts: true, OnShutdown: func() {}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.ServeConn(ctx, conns[1]) }()

	sess := mux.Client(host, agentproto.SessionConfig())
	call := func(req *agentpb.Request) *mux.Stream {
		st, err := sess.OpenContext(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := agentproto.Write(st, req); err != nil {
			t.Fatal(err)
		}
		return st
	}
	hello := call(&agentpb.Request{Call: &agentpb.Request_Hello{Hello: &agentpb.Hello{MinVersion: 1, MaxVersion: 1}}})
	exec := call(&agentpb.Request{Call: &agentpb.Request_Exec{Exec: &agentpb.Exec{
		Argv:  []string{"sh", "-c", "cat; echo out; echo err >&2; exit 3"},
		Stdin: true, Id: "e1", TimeoutMillis: 10000,
	}}})
	if err := agentproto.Write(exec, &agentpb.ExecInput{Input: &agentpb.ExecInput_Stdin{Stdin: &agentpb.Stdin{Data: []byte("in\n"), Eof: true}}}); err != nil {
		t.Fatal(err)
	}
	_ = exec.CloseWrite()
	for _, st := range []*mux.Stream{hello, exec} {
		if _, err := io.ReadAll(st); err != nil {
			t.Fatal(err)
		}
	}
	ping := call(&agentpb.Request{Call: &agentpb.Request_Ping{Ping: &agentpb.Ping{Payload: []byte("p")}}})
	if _, err := io.ReadAll(ping); err != nil {
		t.Fatal(err)
	}
	if _, err := sess.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	sess.Close()
	<-served
	host.mu.Lock()
	defer host.mu.Unlock()
	return bytes.Clone(host.got.Bytes())
}

// splitStreams collects the data frames' payloads per stream id.
func splitStreams(t *testing.T, b []byte) map[uint32][]byte {
	streams := map[uint32][]byte{}
	for len(b) > 0 {
		if len(b) < mux.HeaderSize {
			t.Fatalf("%d trailing bytes", len(b))
		}
		typ, id, n := b[1], binary.BigEndian.Uint32(b[4:8]), binary.BigEndian.Uint32(b[8:12])
		b = b[mux.HeaderSize:]
		if typ == 0 {
			streams[id] = append(streams[id], b[:n]...)
			b = b[n:]
		}
	}
	return streams
}
