// Package procmem reads what a process's memory costs the host.
package procmem

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Private is the resident memory of process pid that no other mapping
// shares (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup), in
// bytes: for a VMM whose guest RAM is a private mapping of a snapshot's
// RAM file, the pages the guest touched or wrote since the restore, plus
// the VMM's own heap.
func Private(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return 0, err
	}
	return parsePrivate(b)
}

// PrivateTree is Private of pid and of all its descendants: a VMM run
// under a supervising parent (mvm's jailer) is the parent's child.
func PrivateTree(pid int) (int64, error) {
	total, err := Private(pid)
	if err != nil {
		return 0, err
	}
	for _, c := range children(pid, 0) {
		if n, err := Private(c); err == nil {
			total += n
		}
	}
	return total, nil
}

// children lists pid's descendants (to a depth of 4) from
// /proc/PID/task/*/children.
func children(pid, depth int) []int {
	if depth >= 4 {
		return nil
	}
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/children")
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for f := range strings.FieldsSeq(string(b)) {
			if c, err := strconv.Atoi(f); err == nil && c > 0 {
				out = append(out, c)
				out = append(out, children(c, depth+1)...)
			}
		}
	}
	return out
}

// parsePrivate sums the Private_ lines of an smaps_rollup.
func parsePrivate(b []byte) (int64, error) {
	var total int64
	found := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 || (f[0] != "Private_Clean:" && f[0] != "Private_Dirty:") || f[2] != "kB" {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("smaps_rollup: bad %s %q", f[0], f[1])
		}
		total += n << 10
		found = true
	}
	if !found {
		return 0, fmt.Errorf("smaps_rollup: no Private_ lines")
	}
	return total, nil
}
