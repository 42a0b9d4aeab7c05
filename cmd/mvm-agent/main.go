// Command mvm-agent is the guest side of mvm: it runs inside every microVM,
// normally as PID 1 from the initramfs, and serves the agent protocol
// (api/agent/v1) on a virtio-serial port and on vsock. It is a static
// binary (CGO off) so it needs nothing from the guest's userland.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	agentpb "github.com/mvm-sh/mvm/api/agent/v1"
	"github.com/mvm-sh/mvm/internal/agent"
	"github.com/mvm-sh/mvm/internal/agentproto"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	startUptime := agent.Uptime()
	port := flag.String("port", agentproto.PortName, "name of the virtio-serial port to serve on")
	vsockPort := flag.Uint("vsock-port", agentproto.VsockPort, "AF_VSOCK port to listen on as well (0: none)")
	debugLog := flag.Bool("debug", false, "log debug messages to the console")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(version)
		return
	}

	level := new(slog.LevelVar)
	if *debugLog {
		level.Set(slog.LevelDebug)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "mvm-agent")

	isInit := os.Getpid() == 1
	opts := agent.Options{StartUptime: startUptime}
	if isInit {
		// As PID 1 a panic would panic the kernel; log it and power off so
		// the host sees the VM end instead of a hang.
		defer func() {
			if r := recover(); r != nil {
				log.Error("agent crashed", "panic", r, "stack", string(debug.Stack()))
				agent.PowerOff(log)
			}
		}()
		opts.Ready = agent.InitSystem(log)
		if agent.CmdlineHas("mvm.debug") {
			level.Set(slog.LevelDebug)
		}
		opts.OnHello = func(h *agentpb.Hello) error { return agent.ApplyHello(log, h) }
		opts.OnShutdown = func() { agent.PowerOff(log) }
		opts.Mounts = true
	}
	srv := agent.NewServer(log, version, opts)
	if isInit {
		agent.HandlePowerSignals(log, func() {
			srv.EndCommands()
			agent.PowerOff(log)
		})
	}
	log.Debug("agent started", "version", version, "pid", os.Getpid(), "start_uptime", startUptime)

	ctx := context.Background()
	// vsock first: listening costs three system calls and never waits,
	// and it lets a VMM without virtio-serial (Firecracker) reach the
	// agent. Without a vsock device the listener just stays idle.
	vsock := false
	if *vsockPort != 0 {
		if ln, err := agent.ListenVsock(uint32(*vsockPort)); err != nil {
			log.Debug("not serving on vsock", "err", err)
		} else {
			vsock = true
			go func() {
				if err := srv.Serve(ctx, ln); err != nil {
					log.Warn("vsock serving ended", "err", err)
				}
			}()
		}
	}
	serveSerial(ctx, log, srv, *port, isInit, vsock)
}

// serveSerial serves sessions on the virtio-serial port for as long as the
// guest runs. The port stays open across sessions (ServePort waits for a
// host that disconnected); only a port that fails is opened again.
func serveSerial(ctx context.Context, log *slog.Logger, srv *agent.Server, port string, isInit, vsock bool) {
	for {
		f, err := agent.OpenPort(port, 10*time.Second)
		if err != nil {
			if vsock && agent.VsockHasDevice() {
				log.Debug("no virtio-serial agent port; serving on vsock only", "err", err)
				select {}
			}
			log.Error("no agent port", "err", err)
			if isInit {
				agent.PowerOff(log)
			}
			os.Exit(1)
		}
		err = srv.ServePort(ctx, f)
		f.Close()
		log.Warn("agent port failed; opening it again", "err", err)
		time.Sleep(100 * time.Millisecond)
	}
}
