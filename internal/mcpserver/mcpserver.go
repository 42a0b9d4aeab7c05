// Package mcpserver is mvm's Model Context Protocol server (mvmctl mcp):
// the tools an AI agent drives sandboxes with. It is a client of the SDK
// like any other front end: each sandbox it creates is an mvm.Sandbox of
// this process, and all of them end with it.
//
// Its defaults are the safe ones for a model acting on its own: no
// network unless the server was started with one (the agent cannot ask
// for it), a timeout on every command, and output returned to the model
// bounded (head and tail, with a marker saying what was cut; the whole of
// it, up to a bound, on request with get_output).
package mcpserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/mvm-sh/mvm"
)

// Options configure the server.
type Options struct {
	// Base is the configuration every sandbox starts from: its Network
	// (nil: none), Dirs, Accel, directories. A tool call may choose the
	// template or image, CPUs and memory, nothing else.
	Base mvm.Config
	// MaxOutput bounds what one stream of a command returns to the model
	// (0: 16 KiB).
	MaxOutput int
	// KeepOutput bounds what is kept of a stream for get_output (0: 4 MiB).
	KeepOutput int
	// DefaultTimeout and MaxTimeout bound commands (0: 2 minutes, 30
	// minutes).
	DefaultTimeout, MaxTimeout time.Duration
	// MaxSandboxes bounds how many run at once (0: 8).
	MaxSandboxes int
	Version      string
	Logger       *slog.Logger
}

// Server holds the sandboxes of one MCP session.
type Server struct {
	opts Options

	mu      sync.Mutex
	boxes   map[string]*box
	seq     int
	outputs map[string]*keptOutput
	order   []string // output ids, oldest first
}

type box struct {
	sb      *mvm.Sandbox
	created time.Time
	root    string
}

type keptOutput struct {
	stdout, stderr *capped
}

// keptOutputs bounds how many commands' outputs are kept.
const keptOutputs = 32

// New returns a server.
func New(opts Options) *Server {
	if opts.MaxOutput <= 0 {
		opts.MaxOutput = 16 << 10
	}
	if opts.KeepOutput <= 0 {
		opts.KeepOutput = 4 << 20
	}
	if opts.DefaultTimeout <= 0 {
		opts.DefaultTimeout = 2 * time.Minute
	}
	if opts.MaxTimeout <= 0 {
		opts.MaxTimeout = 30 * time.Minute
	}
	if opts.MaxSandboxes <= 0 {
		opts.MaxSandboxes = 8
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{opts: opts, boxes: map[string]*box{}, outputs: map[string]*keptOutput{}}
}

// Run serves MCP on t until the client goes away or ctx ends, then
// closes every sandbox.
func (s *Server) Run(ctx context.Context, t mcp.Transport) error {
	defer s.closeAll()
	srv := mcp.NewServer(&mcp.Implementation{Name: "mvm", Version: s.opts.Version}, nil)
	s.register(srv)
	return srv.Run(ctx, t)
}

func (s *Server) closeAll() {
	s.mu.Lock()
	boxes := s.boxes
	s.boxes = map[string]*box{}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, b := range boxes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = b.sb.Close(context.Background())
		}()
	}
	wg.Wait()
}

// Tool inputs and outputs. The jsonschema tags are what the model reads.

type createIn struct {
	Template  string `json:"template,omitempty" jsonschema:"a template made with mvmctl template (default: the minimal busybox image)"`
	Image     string `json:"image,omitempty" jsonschema:"a container image reference instead of a template, converted on first use"`
	CPUs      int    `json:"cpus,omitempty" jsonschema:"vCPUs (default 2)"`
	MemoryMiB int    `json:"memory_mib,omitempty" jsonschema:"guest memory in MiB (default 512)"`
}

type createOut struct {
	Sandbox string `json:"sandbox" jsonschema:"the sandbox's id, for the other tools"`
	Network bool   `json:"network" jsonschema:"whether the sandbox has a network (set when the server was started)"`
}

type runIn struct {
	Sandbox        string   `json:"sandbox"`
	Command        []string `json:"command" jsonschema:"the command and its arguments, run without a shell; use [\"sh\",\"-c\",\"...\"] for shell syntax"`
	Stdin          string   `json:"stdin,omitempty" jsonschema:"text given to the command on its standard input"`
	Workdir        string   `json:"workdir,omitempty" jsonschema:"working directory (created if missing)"`
	Env            []string `json:"env,omitempty" jsonschema:"environment variables, each as KEY=VALUE"`
	TimeoutSeconds int      `json:"timeout_seconds,omitempty" jsonschema:"kill the command after this many seconds"`
}

type runOut struct {
	ExitCode        int     `json:"exit_code" jsonschema:"the command's exit status (128+N if killed by signal N, 124 on timeout, 127 not found)"`
	Stdout          string  `json:"stdout"`
	Stderr          string  `json:"stderr"`
	TimedOut        bool    `json:"timed_out,omitempty"`
	Truncated       bool    `json:"truncated,omitempty" jsonschema:"output was cut: get_output with output_id returns all of it"`
	OutputID        string  `json:"output_id" jsonschema:"for get_output"`
	DurationSeconds float64 `json:"duration_seconds"`
}

type outputIn struct {
	OutputID string `json:"output_id"`
	Stream   string `json:"stream,omitempty" jsonschema:"stdout (default) or stderr"`
	Offset   int    `json:"offset,omitempty" jsonschema:"byte offset to start at"`
	Length   int    `json:"length,omitempty" jsonschema:"bytes to return (default and at most 64 KiB)"`
}

type outputOut struct {
	Data       string `json:"data"`
	Total      int    `json:"total" jsonschema:"bytes kept of the stream"`
	Lost       bool   `json:"lost,omitempty" jsonschema:"the stream was longer than what is kept (its start is kept)"`
	NextOffset int    `json:"next_offset,omitempty"`
}

type writeIn struct {
	Sandbox string `json:"sandbox"`
	Path    string `json:"path" jsonschema:"absolute path in the sandbox; the parent directory must exist"`
	Content string `json:"content"`
	Mode    string `json:"mode,omitempty" jsonschema:"octal permission bits (default 644)"`
}

type readIn struct {
	Sandbox  string `json:"sandbox"`
	Path     string `json:"path"`
	MaxBytes int    `json:"max_bytes,omitempty" jsonschema:"the most to return (default and at most 256 KiB)"`
}

type readOut struct {
	Content   string `json:"content"`
	Size      int64  `json:"size"`
	Truncated bool   `json:"truncated,omitempty"`
	Binary    bool   `json:"binary,omitempty" jsonschema:"not UTF-8 text: content is shown with invalid bytes replaced"`
}

type sandboxIn struct {
	Sandbox string `json:"sandbox"`
}

type listOut struct {
	Sandboxes []sandboxInfo `json:"sandboxes"`
}

type sandboxInfo struct {
	Sandbox string `json:"sandbox"`
	Status  string `json:"status"`
	Root    string `json:"root,omitempty"`
	Age     string `json:"age"`
}

type empty struct{}

func (s *Server) register(srv *mcp.Server) {
	mcp.AddTool(srv, &mcp.Tool{Name: "create_sandbox", Description: "Start a new isolated Linux microVM sandbox and return its id. It stays up for further commands until destroy_sandbox."}, s.create)
	mcp.AddTool(srv, &mcp.Tool{Name: "run_command", Description: "Run a command in a sandbox and return its exit code and output (long output is cut; get_output returns the rest)."}, s.runCommand)
	mcp.AddTool(srv, &mcp.Tool{Name: "get_output", Description: "Return part of the full output of an earlier run_command."}, s.getOutput)
	mcp.AddTool(srv, &mcp.Tool{Name: "write_file", Description: "Write a text file in a sandbox."}, s.writeFile)
	mcp.AddTool(srv, &mcp.Tool{Name: "read_file", Description: "Read a file of a sandbox."}, s.readFile)
	mcp.AddTool(srv, &mcp.Tool{Name: "list_sandboxes", Description: "List the sandboxes of this session."}, s.list)
	mcp.AddTool(srv, &mcp.Tool{Name: "destroy_sandbox", Description: "Stop a sandbox and delete everything in it."}, s.destroy)
}

// toolError is a failure the model should see as the tool's result.
func toolError(format string, args ...any) (*mcp.CallToolResult, error) {
	return &mcp.CallToolResult{IsError: true, Content: []mcp.Content{&mcp.TextContent{Text: fmt.Sprintf(format, args...)}}}, nil
}

func (s *Server) create(ctx context.Context, _ *mcp.CallToolRequest, in createIn) (*mcp.CallToolResult, createOut, error) {
	s.mu.Lock()
	n := len(s.boxes)
	s.seq++
	name := "mcp-" + strconv.Itoa(s.seq) + "-" + strconv.FormatInt(time.Now().UnixNano()&0xffffff, 16)
	s.mu.Unlock()
	if n >= s.opts.MaxSandboxes {
		r, _ := toolError("already %d sandboxes: destroy one first", n)
		return r, createOut{}, nil
	}
	cfg := s.opts.Base
	cfg.Name, cfg.Template, cfg.Image, cfg.CPUs = name, in.Template, in.Image, in.CPUs
	cfg.Memory = int64(in.MemoryMiB) << 20
	cfg.Logger = s.opts.Logger
	sb, err := mvm.Start(ctx, cfg)
	if err != nil {
		r, _ := toolError("create_sandbox: %v", err)
		return r, createOut{}, nil
	}
	s.mu.Lock()
	s.boxes[name] = &box{sb: sb, created: time.Now(), root: in.Template + in.Image}
	s.mu.Unlock()
	return nil, createOut{Sandbox: name, Network: cfg.Network != nil}, nil
}

func (s *Server) lookup(name string) (*mvm.Sandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.boxes[name]
	if !ok {
		return nil, fmt.Errorf("no sandbox %q (list_sandboxes lists them)", name)
	}
	return b.sb, nil
}

func (s *Server) runCommand(ctx context.Context, _ *mcp.CallToolRequest, in runIn) (*mcp.CallToolResult, runOut, error) {
	sb, err := s.lookup(in.Sandbox)
	if err != nil {
		r, _ := toolError("%v", err)
		return r, runOut{}, nil
	}
	timeout := s.opts.DefaultTimeout
	if in.TimeoutSeconds > 0 {
		timeout = min(time.Duration(in.TimeoutSeconds)*time.Second, s.opts.MaxTimeout)
	}
	stdout, stderr := &capped{limit: s.opts.KeepOutput}, &capped{limit: s.opts.KeepOutput}
	cmd := mvm.Cmd{Argv: in.Command, Env: in.Env, Dir: in.Workdir, Timeout: timeout, Stdout: stdout, Stderr: stderr}
	if in.Stdin != "" {
		cmd.Stdin = strings.NewReader(in.Stdin)
	}
	start := time.Now()
	st, err := sb.Exec(ctx, cmd)
	out := runOut{ExitCode: st.Code, DurationSeconds: time.Since(start).Seconds()}
	var serr *mvm.StartError
	switch {
	case errors.Is(err, mvm.ErrTimeout):
		out.TimedOut, out.ExitCode = true, 124
	case errors.As(err, &serr) && errors.Is(err, mvm.ErrCommandNotFound):
		out.ExitCode = 127
		stderr.Write([]byte(serr.Message + "\n"))
	case errors.As(err, &serr):
		out.ExitCode = 126
		stderr.Write([]byte(serr.Message + "\n"))
	case err != nil:
		r, _ := toolError("run_command: %v", err)
		return r, runOut{}, nil
	case st.Signal != 0:
		out.ExitCode = 128 + int(st.Signal)
	}
	id := s.keep(&keptOutput{stdout: stdout, stderr: stderr})
	out.OutputID = id
	var cut1, cut2 bool
	out.Stdout, cut1 = headTail(stdout, s.opts.MaxOutput)
	out.Stderr, cut2 = headTail(stderr, s.opts.MaxOutput)
	out.Truncated = cut1 || cut2
	return nil, out, nil
}

func (s *Server) keep(o *keptOutput) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	id := "out-" + strconv.Itoa(s.seq)
	s.outputs[id] = o
	s.order = append(s.order, id)
	if len(s.order) > keptOutputs {
		delete(s.outputs, s.order[0])
		s.order = s.order[1:]
	}
	return id
}

// headTail is c's text for the model: all of it when it fits in max
// bytes, else its head and tail around a marker.
func headTail(c *capped, max int) (string, bool) {
	b := c.buf.Bytes()
	if len(b) <= max && !c.lost {
		return text(b), false
	}
	h := max / 2
	if h > len(b) {
		h = len(b)
	}
	t := len(b) - (max - h)
	if t < h {
		t = h
	}
	cut := c.total - int64(h) - int64(len(b)-t)
	return text(b[:h]) + fmt.Sprintf("\n[... %d bytes cut: get_output returns them ...]\n", cut) + text(b[t:]), true
}

func text(b []byte) string { return strings.ToValidUTF8(string(b), "\uFFFD") }

func (s *Server) getOutput(_ context.Context, _ *mcp.CallToolRequest, in outputIn) (*mcp.CallToolResult, outputOut, error) {
	s.mu.Lock()
	o, ok := s.outputs[in.OutputID]
	s.mu.Unlock()
	if !ok {
		r, _ := toolError("no output %q (only the last %d commands' are kept)", in.OutputID, keptOutputs)
		return r, outputOut{}, nil
	}
	c := o.stdout
	if in.Stream == "stderr" {
		c = o.stderr
	}
	b := c.buf.Bytes()
	length := in.Length
	if length <= 0 || length > 64<<10 {
		length = 64 << 10
	}
	off := min(max(in.Offset, 0), len(b))
	end := min(off+length, len(b))
	out := outputOut{Data: text(b[off:end]), Total: len(b), Lost: c.lost}
	if end < len(b) {
		out.NextOffset = end
	}
	return nil, out, nil
}

func (s *Server) writeFile(ctx context.Context, _ *mcp.CallToolRequest, in writeIn) (*mcp.CallToolResult, empty, error) {
	sb, err := s.lookup(in.Sandbox)
	if err != nil {
		r, _ := toolError("%v", err)
		return r, empty{}, nil
	}
	mode := uint64(0o644)
	if in.Mode != "" {
		if mode, err = strconv.ParseUint(in.Mode, 8, 32); err != nil || mode > 0o7777 {
			r, _ := toolError("mode %q: want octal permission bits like 644", in.Mode)
			return r, empty{}, nil
		}
	}
	if err := sb.WriteFile(ctx, in.Path, strings.NewReader(in.Content), fsMode(mode)); err != nil {
		r, _ := toolError("write_file: %v", err)
		return r, empty{}, nil
	}
	return nil, empty{}, nil
}

func (s *Server) readFile(ctx context.Context, _ *mcp.CallToolRequest, in readIn) (*mcp.CallToolResult, readOut, error) {
	sb, err := s.lookup(in.Sandbox)
	if err != nil {
		r, _ := toolError("%v", err)
		return r, readOut{}, nil
	}
	limit := in.MaxBytes
	if limit <= 0 || limit > 256<<10 {
		limit = 256 << 10
	}
	fi, err := sb.Stat(ctx, in.Path)
	if err != nil {
		r, _ := toolError("read_file: %v", err)
		return r, readOut{}, nil
	}
	if !fi.Mode().IsRegular() {
		r, _ := toolError("read_file: %s is not a regular file (%v)", in.Path, fi.Mode())
		return r, readOut{}, nil
	}
	c := &capped{limit: limit, stop: true}
	if _, err := sb.ReadFile(ctx, in.Path, c, mvm.CopyOptions{}); err != nil && !errors.Is(err, errFull) {
		r, _ := toolError("read_file: %v", err)
		return r, readOut{}, nil
	}
	b := c.buf.Bytes()
	return nil, readOut{Content: text(b), Size: fi.Size(), Truncated: c.lost, Binary: !utf8.Valid(b)}, nil
}

func (s *Server) list(context.Context, *mcp.CallToolRequest, empty) (*mcp.CallToolResult, listOut, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := listOut{Sandboxes: []sandboxInfo{}}
	for name, b := range s.boxes {
		out.Sandboxes = append(out.Sandboxes, sandboxInfo{Sandbox: name, Status: string(b.sb.Status()), Root: b.root, Age: time.Since(b.created).Round(time.Second).String()})
	}
	sort.Slice(out.Sandboxes, func(i, j int) bool { return out.Sandboxes[i].Sandbox < out.Sandboxes[j].Sandbox })
	return nil, out, nil
}

func (s *Server) destroy(ctx context.Context, _ *mcp.CallToolRequest, in sandboxIn) (*mcp.CallToolResult, empty, error) {
	s.mu.Lock()
	b, ok := s.boxes[in.Sandbox]
	delete(s.boxes, in.Sandbox)
	s.mu.Unlock()
	if !ok {
		r, _ := toolError("no sandbox %q", in.Sandbox)
		return r, empty{}, nil
	}
	if _, err := b.sb.Close(ctx); err != nil {
		r, _ := toolError("destroy_sandbox: %v", err)
		return r, empty{}, nil
	}
	return nil, empty{}, nil
}

// capped keeps the first limit bytes written to it and counts the rest
// (or, with stop, fails with errFull past them).
type capped struct {
	mu    sync.Mutex
	limit int
	stop  bool
	buf   bytes.Buffer
	total int64
	lost  bool
}

func (c *capped) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total += int64(len(p))
	if room := c.limit - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(room, len(p))])
	}
	if int64(c.buf.Len()) < c.total {
		c.lost = true
		if c.stop {
			return 0, errFull
		}
	}
	return len(p), nil
}

var errFull = errors.New("enough read")

// fsMode is octal permission bits as a file mode.
func fsMode(m uint64) fs.FileMode { return fs.FileMode(m & 0o777) }

var _ io.Writer = (*capped)(nil)
