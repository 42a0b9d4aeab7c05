// Command hostile-agent is a guest /init that attacks the host through the
// agent's virtio-serial port instead of serving it. The end-to-end tests
// build it statically and boot it in place of mvm-agent; the word
// mvm.hostile=MODE on the kernel command line picks the attack:
//
//	huge-frame    a data frame header announcing 4 GiB, then garbage forever
//	garbage       random bytes forever
//	ping-flood    ping SYNs as fast as it can write, never reading
//	open-streams  SYNs for guest-side stream ids in a loop, never reading
//	frozen        a proper hello reply, Started for the first exec, then
//	              silence: no byte read or written again (a frozen agent)
//
// As PID 1 it must never exit (the kernel would panic), so every mode ends
// by sleeping forever.
package main

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agent"
	"github.com/mvm-sh/mvm/internal/agentproto"
	"github.com/mvm-sh/mvm/internal/mux"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", "hostile-agent")
	agent.InitSystem(log)
	mode := cmdlineValue("mvm.hostile")
	port, err := agent.OpenPort(agentproto.PortName, 10*time.Second)
	if err != nil {
		log.Error("no agent port", "err", err)
		forever()
	}
	log.Info("attacking", "mode", mode)
	switch mode {
	case "huge-frame":
		writeForever(port, header(0, 0, 1, 0xffffffff), junk(64<<10))
	case "garbage":
		writeForever(port, nil, junk(64<<10))
	case "ping-flood":
		var batch []byte
		for i := uint32(0); i < 4096; i++ {
			batch = append(batch, header(2, 1, 0, i)...)
		}
		writeForever(port, nil, batch)
	case "open-streams":
		for id := uint32(2); ; id += 2 {
			if _, err := port.Write(header(1, 1, id, 0)); err != nil {
				log.Info("write failed", "err", err)
				forever()
			}
		}
	case "frozen":
		frozen(log, port)
	default:
		log.Error("unknown mode", "mode", mode)
	}
	forever()
}

// forever sleeps for good; a timer keeps the runtime from calling an idle
// PID 1 deadlocked.
func forever() {
	for {
		time.Sleep(time.Hour)
	}
}

func cmdlineValue(key string) string {
	b, _ := os.ReadFile("/proc/cmdline")
	for _, w := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(w, key+"="); ok {
			return v
		}
	}
	return ""
}

// header is a yamux frame header.
func header(typ uint8, flags uint16, id, length uint32) []byte {
	b := make([]byte, mux.HeaderSize)
	b[1] = typ
	binary.BigEndian.PutUint16(b[2:4], flags)
	binary.BigEndian.PutUint32(b[4:8], id)
	binary.BigEndian.PutUint32(b[8:12], length)
	return b
}

func junk(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func writeForever(port *os.File, first, then []byte) {
	if first != nil {
		_, _ = port.Write(first)
	}
	for {
		if _, err := port.Write(then); err != nil {
			fmt.Fprintln(os.Stderr, "hostile-agent: write:", err)
			forever()
		}
	}
}

// freezer passes I/O through until frozen, then blocks every call for good.
type freezer struct {
	f      *os.File
	frozen atomic.Bool
}

func (z *freezer) Read(p []byte) (int, error) {
	if z.frozen.Load() {
		forever()
	}
	n, err := z.f.Read(p)
	if z.frozen.Load() {
		forever()
	}
	return n, err
}

func (z *freezer) Write(p []byte) (int, error) {
	if z.frozen.Load() {
		forever()
	}
	return z.f.Write(p)
}

func (z *freezer) Close() error {
	if z.frozen.Load() {
		forever()
	}
	return z.f.Close()
}

// frozen answers the hello and says the first exec started, as a real
// agent would, and then never reads or writes the port again.
func frozen(log *slog.Logger, port *os.File) {
	z := &freezer{f: port}
	sess := mux.Server(z, agentproto.SessionConfig())
	st, err := sess.Accept()
	if err != nil {
		log.Error("accept hello", "err", err)
		return
	}
	var req agentpb.Request
	if err := agentproto.NewReader(st).Read(&req); err != nil || req.GetHello() == nil {
		log.Error("read hello", "err", err)
		return
	}
	if err := agentproto.Write(st, &agentpb.Response{Result: &agentpb.Response_Hello{Hello: &agentpb.HelloReply{
		Version: agentproto.Version, AgentVersion: "hostile",
		Capabilities: []string{agentproto.CapPing, agentproto.CapExec, agentproto.CapExecStdin, agentproto.CapExecTimeout, agentproto.CapSignal},
	}}}); err != nil {
		log.Error("write hello reply", "err", err)
		return
	}
	_ = st.Close()
	st, err = sess.Accept()
	if err != nil {
		log.Error("accept exec", "err", err)
		return
	}
	if err := agentproto.NewReader(st).Read(&req); err != nil || req.GetExec() == nil {
		log.Error("read exec", "err", err)
		return
	}
	if err := agentproto.Write(st, &agentpb.ExecEvent{Event: &agentpb.ExecEvent_Started{Started: &agentpb.Started{Pid: 2}}}); err != nil {
		log.Error("write started", "err", err)
		return
	}
	z.frozen.Store(true)
	log.Info("frozen")
}
