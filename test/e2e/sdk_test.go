package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mvm-sh/mvm"
)

// sdkConfig is an mvm.Config using the suite's image and private
// directories.
func sdkConfig(t *testing.T) mvm.Config {
	d := t.TempDir()
	return mvm.Config{CacheDir: cacheDir, StateDir: filepath.Join(d, "state"), RunDir: filepath.Join(d, "run")}
}

// Several commands at once in one real VM, each with its own bytes.
func TestSDKConcurrentExec(t *testing.T) {
	cfg := sdkConfig(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sb, err := mvm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close(context.Background())
	const n = 6
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			size := 1<<20 + i*4096
			var out, errb bytes.Buffer
			script := fmt.Sprintf(`head -c %d /dev/zero | tr '\0' '%c'; echo err%d >&2; exit %d`, size, 'a'+i, i, i)
			st, err := sb.Exec(ctx, mvm.Cmd{Argv: []string{"sh", "-c", script}, Stdout: &out, Stderr: &errb})
			want := bytes.Repeat([]byte{byte('a' + i)}, size)
			switch {
			case err != nil || st.Code != i:
				errs <- fmt.Errorf("exec %d: %v %v", i, st, err)
			case sha256.Sum256(out.Bytes()) != sha256.Sum256(want):
				errs <- fmt.Errorf("exec %d: %d bytes of stdout, not the %d expected", i, out.Len(), size)
			case errb.String() != fmt.Sprintf("err%d\n", i):
				errs <- fmt.Errorf("exec %d: stderr %q", i, errb.String())
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if _, err := sb.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(cfg.RunDir); len(entries) != 0 {
		t.Errorf("run directories left: %d", len(entries))
	}
}

// As root the VMM runs as an unprivileged uid, chrooted into the run
// directory, in network and PID namespaces of its own; otherwise as the
// user.
func TestVMMConfined(t *testing.T) {
	e := newEnv(t)
	c, _ := startReady(t, e, `echo ready; sleep 60`)
	defer func() { _ = c.Process.Kill(); _ = c.Wait() }()
	vmms := e.vmms()
	if len(vmms) != 1 {
		t.Fatalf("want one VMM, found %v", vmms)
	}
	pid := vmms[0]
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var uid, euid int
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "Uid:") {
			fmt.Sscanf(l, "Uid: %d %d", &uid, &euid)
		}
	}
	if os.Geteuid() != 0 {
		if uid != os.Getuid() {
			t.Errorf("VMM uid %d, want %d", uid, os.Getuid())
		}
		return
	}
	if uid == 0 || euid == 0 {
		t.Errorf("VMM runs as uid %d/%d, want an unprivileged one", uid, euid)
	}
	if !strings.Contains(string(status), "CapEff:\t0000000000000000") {
		t.Errorf("VMM keeps capabilities:\n%s", status)
	}
	root, err := os.Readlink(fmt.Sprintf("/proc/%d/root", pid))
	if err != nil || !strings.HasPrefix(root, e.runDir+"/") {
		t.Errorf("VMM root %q (%v), want its run directory", root, err)
	}
	for _, ns := range []string{"net", "pid", "ipc", "uts"} {
		theirs, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
		ours, _ := os.Readlink("/proc/self/ns/" + ns)
		if theirs == "" || theirs == ours {
			t.Errorf("VMM shares the host's %s namespace (%s)", ns, theirs)
		}
	}
}
