package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mvm-sh/mvm/internal/diskusage"
)

// healEnv is an env with a cache of its own (the default image of the
// shared one, no snapshots), where runs make the snapshots they lack.
type healEnv struct {
	*env
	cache string
	extra []string
}

func newHealEnv(t *testing.T, extra ...string) *healEnv {
	t.Helper()
	e := newEnv(t)
	cache := filepath.Join(t.TempDir(), "cache")
	if err := os.MkdirAll(filepath.Join(cache, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(cacheDir, "images", "default.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cache, "images", "default.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	h := &healEnv{env: e, cache: cache, extra: append([]string{"MVM_CACHE_DIR=" + cache, "MVM_NO_AUTO_SNAPSHOT="}, extra...)}
	// A healer still saving when the test ends would write into a
	// removed directory: wait for every one of this cache.
	t.Cleanup(func() {
		if !waitFor(2*time.Minute, func() bool { return len(h.healers()) == 0 }) {
			t.Errorf("snapshot healers still running: %v", h.healers())
		}
	})
	return h
}

func (h *healEnv) exec(args ...string) result {
	h.t.Helper()
	return h.runWith(h.extra, append([]string{"-v", "exec"}, args...)...)
}

// healers are the snapshot-heal processes working for this cache.
func (h *healEnv) healers() []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte("snapshot-heal")) || !bytes.Contains(b, []byte(h.cache)) {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(strings.TrimPrefix(filepath.Dir(p), "/proc/"), &pid); err == nil {
			if st, err := os.ReadFile(filepath.Join(filepath.Dir(p), "stat")); err == nil && !bytes.Contains(st, []byte(") Z ")) {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// snapshots are the complete snapshots of the default image's store.
func (h *healEnv) snapshots() []string {
	recs, _ := filepath.Glob(filepath.Join(h.cache, "snapshots", "*", "snapshot.json"))
	var dirs []string
	for _, r := range recs {
		if d := filepath.Dir(r); !strings.HasPrefix(filepath.Base(d), ".") {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// healLog is what the healers logged.
func (h *healEnv) healLog() string {
	b, _ := os.ReadFile(filepath.Join(h.cache, "snapshots", "heal.log"))
	return string(b)
}

// waitHealed waits until no healer runs and the log has n lines that
// contain what.
func (h *healEnv) waitHealed(what string, n int) {
	h.t.Helper()
	ok := waitFor(2*time.Minute, func() bool {
		return len(h.healers()) == 0 && strings.Count(h.healLog(), what) >= n
	})
	if !ok {
		h.t.Fatalf("no %d %q lines in the heal log after 2 minutes (healers %v):\n%s", n, what, h.healers(), h.healLog())
	}
}

func restored(r result) bool { return bytes.Contains(r.stderr, []byte("(restored from snapshot ")) }

func coldFor(r result, why string) bool {
	return bytes.Contains(r.stderr, []byte("(cold boot: "+why))
}

// TestSnapshotHeals: a run of a configuration without a snapshot boots,
// leaves one behind without the user, and the next identical run
// restores it; the same after the snapshot is damaged; a new shape heals
// after its own first run; MVM_NO_AUTO_SNAPSHOT turns it off.
func TestSnapshotHeals(t *testing.T) {
	h := newHealEnv(t)

	r := h.exec("--", "echo", "first")
	if r.code != 0 || string(r.stdout) != "first\n" || !coldFor(r, "no snapshot for this configuration") {
		t.Fatalf("first run: %s", r)
	}
	if !bytes.Contains(r.stderr, []byte("making the missing snapshot in the background")) {
		t.Errorf("first run does not say it makes the snapshot: %s", r)
	}
	h.waitHealed(" made ", 1)
	if n := len(h.snapshots()); n != 1 {
		t.Fatalf("%d snapshots after the heal, want 1: %v", n, h.snapshots())
	}
	r = h.exec("--", "echo", "second")
	if r.code != 0 || string(r.stdout) != "second\n" || !restored(r) {
		t.Fatalf("second run did not restore: %s", r)
	}
	if bytes.Contains(r.stderr, []byte("making the missing snapshot")) {
		t.Errorf("a restored run makes a snapshot: %s", r)
	}

	// Damaged: the RAM file written in place.
	snap := h.snapshots()[0]
	f, err := os.OpenFile(filepath.Join(snap, "ram"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("damage"), 4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	r = h.exec("--", "true")
	if r.code != 0 || restored(r) {
		t.Fatalf("run on a damaged snapshot: %s", r)
	}
	h.waitHealed(" made ", 2)
	if r = h.exec("--", "true"); r.code != 0 || !restored(r) {
		t.Fatalf("run after the damaged snapshot healed did not restore: %s", r)
	}

	// Another shape: its own snapshot, after its own first run.
	if r = h.exec("--cpus", "1", "--", "true"); r.code != 0 || !coldFor(r, "no snapshot for this configuration") {
		t.Fatalf("first run of --cpus 1: %s", r)
	}
	h.waitHealed(" made ", 3)
	if r = h.exec("--cpus", "1", "--", "true"); r.code != 0 || !restored(r) {
		t.Fatalf("second run of --cpus 1 did not restore: %s", r)
	}
	if n := len(h.snapshots()); n != 2 {
		t.Errorf("%d snapshots for two shapes: %v", n, h.snapshots())
	}

	// --no-snapshot and the opt-out make none.
	for _, tc := range []struct {
		env  []string
		args []string
	}{
		{nil, []string{"--no-snapshot", "--memory", "384M", "--", "true"}},
		{[]string{"MVM_NO_AUTO_SNAPSHOT=1"}, []string{"--memory", "384M", "--", "true"}},
	} {
		r := h.runWith(append(append([]string(nil), h.extra...), tc.env...), append([]string{"-v", "exec"}, tc.args...)...)
		if r.code != 0 || bytes.Contains(r.stderr, []byte("making the missing snapshot")) {
			t.Errorf("%v %v: %s", tc.env, tc.args, r)
		}
	}
	time.Sleep(2 * time.Second)
	if n := len(h.snapshots()); n != 2 || len(h.healers()) != 0 {
		t.Errorf("after runs that make no snapshot: %d snapshots, healers %v", n, h.healers())
	}
	h.assertClean()
}

// TestSnapshotHealOnce: two cold runs of one configuration at once make
// one snapshot; the second healer finds the first at work or done.
func TestSnapshotHealOnce(t *testing.T) {
	h := newHealEnv(t)
	var wg sync.WaitGroup
	rs := make([]result, 2)
	for i := range rs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rs[i] = h.exec("--", "true")
		}()
	}
	wg.Wait()
	for i, r := range rs {
		if r.code != 0 || restored(r) {
			t.Fatalf("run %d: %s", i, r)
		}
	}
	h.waitHealed(" made ", 1)
	time.Sleep(500 * time.Millisecond)
	if !waitFor(time.Minute, func() bool { return len(h.healers()) == 0 }) {
		t.Fatalf("healers still running: %v", h.healers())
	}
	if n := strings.Count(h.healLog(), " made "); n != 1 {
		t.Errorf("%d snapshots made for one configuration:\n%s", n, h.healLog())
	}
	if n := len(h.snapshots()); n != 1 {
		t.Errorf("%d snapshots: %v", n, h.snapshots())
	}
	if r := h.exec("--", "true"); !restored(r) {
		t.Errorf("the next run did not restore: %s", r)
	}
}

// TestSnapshotBudget: under churn of shapes the snapshots stay within
// MVM_SNAPSHOT_BUDGET (set, after the first, to hold two snapshots of
// its size), the least recently restored going first and the newest
// always kept.
func TestSnapshotBudget(t *testing.T) {
	h := newHealEnv(t)
	shapes := [][]string{{"--memory", "256M"}, {"--memory", "320M"}, {"--memory", "384M"}, {"--memory", "448M"}}
	var budget int64
	for i, s := range shapes {
		if r := h.exec(append(s, "--", "true")...); r.code != 0 || restored(r) {
			t.Fatalf("%v: %s", s, r)
		}
		h.waitHealed(" made ", i+1)
		if i == 0 {
			// Room for two snapshots of this size, not three.
			budget = diskusage.Of(h.snapshots()[0]) * 5 / 2
			h.extra = append(h.extra, fmt.Sprintf("MVM_SNAPSHOT_BUDGET=%dM", budget>>20))
			budget = budget >> 20 << 20
		}
		var total int64
		for _, d := range h.snapshots() {
			total += diskusage.Of(d)
		}
		if total > budget {
			t.Errorf("after %v: %d MiB of snapshots, budget %d MiB\n%s", s, total>>20, budget>>20, h.healLog())
		}
		// The newest is kept: it restores.
		if r := h.exec(append(s, "--", "true")...); !restored(r) {
			t.Errorf("%v: the snapshot just made did not restore: %s", s, r)
		}
	}
	if !strings.Contains(h.healLog(), " pruned ") {
		t.Errorf("nothing pruned under churn:\n%s", h.healLog())
	}
	// The first shape was restored longest ago: pruned, it boots again.
	if r := h.exec(append(shapes[0], "--", "true")...); restored(r) {
		t.Errorf("the least recently used shape still restores: %s", r)
	}
}

// TestSnapshotHealFailure: a save that fails (the store's filesystem is
// full) leaves no half-made snapshot, the runs still work, and doctor
// says what failed.
func TestSnapshotHealFailure(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: the full disk is a small tmpfs mounted over the store")
	}
	h := newHealEnv(t)
	store := filepath.Join(h.cache, "snapshots")
	if err := os.MkdirAll(store, 0o755); err != nil {
		t.Fatal(err)
	}
	// Room for the store's small files, not for a RAM file.
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "mvm-e2e-full", store).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() {
		waitFor(2*time.Minute, func() bool { return len(h.healers()) == 0 })
		_ = syscall.Unmount(store, syscall.MNT_DETACH)
	})
	for i := range 3 {
		r := h.exec("--", "echo", "works")
		if r.code != 0 || string(r.stdout) != "works\n" || restored(r) {
			t.Fatalf("run %d on a full store: %s", i, r)
		}
		// One try, then none for a while: not a second VM booted
		// after every run to fail again.
		h.waitHealed(" failed for ", 1)
	}
	if n := strings.Count(h.healLog(), " failed for "); n != 1 {
		t.Errorf("%d failed heals logged for three runs:\n%s", n, h.healLog())
	}
	ents, _ := os.ReadDir(store)
	for _, e := range ents {
		if e.IsDir() {
			t.Errorf("a failed save left %s in the store", e.Name())
		}
	}
	r := h.runWith(h.extra, "doctor", "--json")
	var rep struct {
		Checks []struct{ ID, Status, Message, Fix string }
	}
	if err := json.Unmarshal(r.stdout, &rep); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, r)
	}
	for _, c := range rep.Checks {
		if c.ID == "snapshots" && (c.Status != "warn" || !strings.Contains(c.Message, "the last snapshot made after a run failed")) {
			t.Errorf("doctor on a failed heal: %+v", c)
		}
	}
}

// TestCommandNotFoundHint: a command the default image lacks gets one
// line of help naming busybox and how to get the command.
func TestCommandNotFoundHint(t *testing.T) {
	e := newEnv(t)
	r := e.runWith([]string{"MVM_DATA_DIR=" + t.TempDir()}, "exec", "--", "python3", "-V")
	if r.code != 127 {
		t.Fatalf("exit %d, want 127: %s", r.code, r)
	}
	for _, want := range []string{"python3: no such file or directory", "the default image is busybox", "mvmctl template create NAME --from-debian bookworm --packages"} {
		if !bytes.Contains(r.stderr, []byte(want)) {
			t.Errorf("stderr does not say %q: %s", want, r)
		}
	}
	// A path is the user's own: no guessing.
	if r = e.run(nil, "exec", "--", "/usr/bin/python3"); r.code != 127 || bytes.Contains(r.stderr, []byte("busybox")) {
		t.Errorf("a path: %s", r)
	}
}

// TestSnapshotHealsTemplate: a template's run of a shape its snapshot
// lacks leaves that shape's snapshot in the template's store, and the
// next such run restores it.
func TestSnapshotHealsTemplate(t *testing.T) {
	tree := templateTree(t, t.TempDir())
	h := newHealEnv(t, "MVM_DATA_DIR="+filepath.Join(t.TempDir(), "data"))
	if r := h.runWith(h.extra, "template", "create", "tiny", "--from-dir", tree, "--no-snapshot"); r.code != 0 {
		t.Fatalf("template create: %s", r)
	}
	r := h.exec("--template", "tiny", "--cpus", "1", "--", "cat", "/etc/os-release")
	if r.code != 0 || restored(r) || !coldFor(r, "no snapshot for this configuration") {
		t.Fatalf("first run on the template: %s", r)
	}
	h.waitHealed(" made ", 1)
	if !strings.Contains(h.healLog(), "template tiny, 1 vCPUs") {
		t.Errorf("heal log: %s", h.healLog())
	}
	if recs, _ := filepath.Glob(filepath.Join(h.cache, "templates", "snapshots", "*", "*", "snapshot.json")); len(recs) != 1 {
		t.Errorf("template snapshots %v, want one", recs)
	}
	r2 := h.exec("--template", "tiny", "--cpus", "1", "--", "cat", "/etc/os-release")
	if r2.code != 0 || !restored(r2) || !bytes.Equal(r2.stdout, r.stdout) {
		t.Fatalf("second run on the template: %s (first printed %q)", r2, r.stdout)
	}
}

// TestSnapshotHealsAfterSandbox: a sandbox that booted for want of a
// snapshot leaves one when it stops, and the next run restores it.
func TestSnapshotHealsAfterSandbox(t *testing.T) {
	h := newHealEnv(t)
	mustRun := func(args ...string) result {
		t.Helper()
		r := h.runWith(h.extra, args...)
		if r.code != 0 {
			t.Fatalf("mvmctl %q: %s", args, r)
		}
		return r
	}
	mustRun("sandbox", "create", "--memory", "384M", "hb")
	t.Cleanup(func() { h.runWith(h.extra, "sandbox", "rm", "hb") })
	if r := mustRun("sandbox", "exec", "hb", "--", "echo", "in"); string(r.stdout) != "in\n" {
		t.Fatalf("sandbox exec: %s", r)
	}
	if len(h.snapshots()) != 0 || h.healLog() != "" {
		t.Fatalf("a snapshot was made while the sandbox ran: %v %s", h.snapshots(), h.healLog())
	}
	mustRun("sandbox", "stop", "hb")
	h.waitHealed(" made ", 1)
	if r := h.exec("--memory", "384M", "--", "true"); r.code != 0 || !restored(r) {
		t.Fatalf("the run after the sandbox did not restore: %s", r)
	}
}
