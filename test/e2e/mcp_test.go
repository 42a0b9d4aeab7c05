package e2e

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// TestMCPServer drives `mvmctl mcp` with the MCP SDK's own client, as an
// agent would: it creates a sandbox (with no network), runs commands
// (exit codes, stdin, a timeout), gets long output cut with a marker and
// pages through all of it, writes and reads a file, lists and destroys;
// when the client goes away nothing is left.
func TestMCPServer(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.command(ctx, "mcp", "--max-output", "1K", "--timeout", "30s")
	client := mcp.NewClient(&mcp.Implementation{Name: "e2e", Version: "v1"}, nil)
	cs, err := client.Connect(ctx, &mcp.CommandTransport{Command: cmd}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()

	var names []string
	for tool, err := range cs.Tools(ctx, nil) {
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, tool.Name)
	}
	if got := strings.Join(names, ","); got != "create_sandbox,destroy_sandbox,get_output,list_sandboxes,read_file,run_command,write_file" {
		t.Errorf("tools: %s", got)
	}

	call := func(name string, args map[string]any, out any) *mcp.CallToolResult {
		t.Helper()
		res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if out != nil && !res.IsError {
			b, _ := json.Marshal(res.StructuredContent)
			if err := json.Unmarshal(b, out); err != nil {
				t.Fatalf("%s: %v in %s", name, err, b)
			}
		}
		return res
	}
	errText := func(res *mcp.CallToolResult) string {
		if !res.IsError || len(res.Content) == 0 {
			return ""
		}
		if tc, ok := res.Content[0].(*mcp.TextContent); ok {
			return tc.Text
		}
		return "?"
	}

	var created struct {
		Sandbox string `json:"sandbox"`
		Network bool   `json:"network"`
	}
	if res := call("create_sandbox", nil, &created); res.IsError || created.Sandbox == "" || created.Network {
		t.Fatalf("create_sandbox: %+v %s", created, errText(res))
	}
	sb := created.Sandbox

	type runOut struct {
		ExitCode  int    `json:"exit_code"`
		Stdout    string `json:"stdout"`
		Stderr    string `json:"stderr"`
		TimedOut  bool   `json:"timed_out"`
		Truncated bool   `json:"truncated"`
		OutputID  string `json:"output_id"`
	}
	var r runOut
	call("run_command", map[string]any{"sandbox": sb, "command": []string{"sh", "-c", "cat; echo oops >&2; ls /sys/class/net; exit 3"}, "stdin": "hello\n"}, &r)
	if r.ExitCode != 3 || !strings.HasPrefix(r.Stdout, "hello\nlo\n") || strings.Contains(r.Stdout, "eth") || r.Stderr != "oops\n" || r.Truncated {
		t.Errorf("run_command: %+v; want exit 3, stdin echoed, only lo (no network)", r)
	}
	call("run_command", map[string]any{"sandbox": sb, "command": []string{"sleep", "30"}, "timeout_seconds": 1}, &r)
	if r.ExitCode != 124 || !r.TimedOut {
		t.Errorf("timeout: %+v", r)
	}
	call("run_command", map[string]any{"sandbox": sb, "command": []string{"nosuch"}}, &r)
	if r.ExitCode != 127 {
		t.Errorf("missing command: %+v", r)
	}

	// 100 000 bytes of output: the model sees 1 KiB with a marker; all
	// of it comes back through get_output.
	call("run_command", map[string]any{"sandbox": sb, "command": []string{"sh", "-c", "seq 1 30000 | head -c 100000"}}, &r)
	if !r.Truncated || len(r.Stdout) > 1200 || !strings.Contains(r.Stdout, "bytes cut") || !strings.HasPrefix(r.Stdout, "1\n2\n3\n") {
		t.Errorf("long output: truncated %v, %d bytes shown: %.200q", r.Truncated, len(r.Stdout), r.Stdout)
	}
	var all strings.Builder
	for off := 0; ; {
		var page struct {
			Data       string `json:"data"`
			Total      int    `json:"total"`
			NextOffset int    `json:"next_offset"`
		}
		call("get_output", map[string]any{"output_id": r.OutputID, "offset": off}, &page)
		all.WriteString(page.Data)
		if page.NextOffset == 0 {
			if page.Total != 100000 {
				t.Errorf("get_output total %d", page.Total)
			}
			break
		}
		off = page.NextOffset
	}
	if all.Len() != 100000 || !strings.HasPrefix(all.String(), "1\n2\n") || !strings.Contains(all.String(), "\n17000\n") {
		t.Errorf("get_output gave %d bytes", all.Len())
	}

	if res := call("write_file", map[string]any{"sandbox": sb, "path": "/tmp/prog.sh", "content": "#!/bin/sh\necho from file\n", "mode": "755"}, nil); res.IsError {
		t.Fatalf("write_file: %s", errText(res))
	}
	call("run_command", map[string]any{"sandbox": sb, "command": []string{"/tmp/prog.sh"}}, &r)
	if r.Stdout != "from file\n" {
		t.Errorf("the written script printed %q", r.Stdout)
	}
	var read struct {
		Content string `json:"content"`
		Size    int64  `json:"size"`
	}
	call("read_file", map[string]any{"sandbox": sb, "path": "/tmp/prog.sh"}, &read)
	if read.Content != "#!/bin/sh\necho from file\n" || read.Size != 25 {
		t.Errorf("read_file: %+v", read)
	}
	if msg := errText(call("read_file", map[string]any{"sandbox": sb, "path": "/tmp/../etc/passwd"}, nil)); !strings.Contains(msg, "..") {
		t.Errorf("read_file with ..: %q", msg)
	}
	if msg := errText(call("run_command", map[string]any{"sandbox": "nosuch", "command": []string{"true"}}, nil)); !strings.Contains(msg, "no sandbox") {
		t.Errorf("unknown sandbox: %q", msg)
	}

	var list struct {
		Sandboxes []struct {
			Sandbox string `json:"sandbox"`
			Status  string `json:"status"`
		} `json:"sandboxes"`
	}
	call("list_sandboxes", nil, &list)
	if len(list.Sandboxes) != 1 || list.Sandboxes[0].Sandbox != sb || list.Sandboxes[0].Status != "running" {
		t.Errorf("list_sandboxes: %+v", list)
	}
	if res := call("destroy_sandbox", map[string]any{"sandbox": sb}, nil); res.IsError {
		t.Errorf("destroy_sandbox: %s", errText(res))
	}
	call("list_sandboxes", nil, &list)
	if len(list.Sandboxes) != 0 {
		t.Errorf("after destroy: %+v", list)
	}
	// A sandbox left when the client goes away ends with the server.
	call("create_sandbox", nil, &created)
	cs.Close()
	if !waitFor(20*time.Second, func() bool { return len(e.vmms()) == 0 }) {
		t.Errorf("VMMs left after the client went away: %v", e.vmms())
	}
	waitFor(5*time.Second, func() bool { return cmd.ProcessState != nil })
	e.assertClean()
}
