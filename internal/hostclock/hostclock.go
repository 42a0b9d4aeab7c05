// Package hostclock measures the rate of the host's time-stamp counter.
//
// Under TCG, QEMU's emulated RDTSC returns the host's own counter, so the
// host's rate is the guest's. A guest kernel that is not told the rate
// calibrates it against the emulated PIT, and on a busy host that fails:
// the vCPU thread is descheduled between the PIT reads, the kernel marks
// the TSC unstable and runs on 10 ms jiffies for the life of the VM (and
// of every snapshot taken of it). Measured here with six busy loops on two
// cores, five cold boots out of five ended on refined-jiffies. Given the
// rate (tsc_early_khz=), the kernel skips the calibration.
package hostclock

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/mvm-sh/mvm/internal/atomicfile"
	"github.com/mvm-sh/mvm/internal/xdg"
)

// ErrUnsupported is returned where the host has no usable TSC: another
// architecture, or a counter whose rate is not constant.
var ErrUnsupported = errors.New("hostclock: no constant-rate TSC on this host")

// window is how long a measurement counts: with each end read within a
// few hundred nanoseconds of the clock, the rate is good to a few parts
// per million.
const window = 40 * time.Millisecond

var (
	once   sync.Once
	khz    uint64
	errKHz error
)

// TSCKHz returns the host TSC's rate in kHz. It is measured once per host
// boot and kept in the cache directory (keyed by the kernel's boot id), so
// only the first cold boot after a host reboot pays the measurement.
func TSCKHz() (uint64, error) {
	once.Do(func() { khz, errKHz = cached() })
	return khz, errKHz
}

func cached() (uint64, error) {
	if !constantTSC() {
		return 0, ErrUnsupported
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return Measure(window)
	}
	boot = bytes.TrimSpace(boot)
	dir, err := xdg.CacheDir()
	if err != nil {
		return Measure(window)
	}
	path := filepath.Join(dir, "host-tsc")
	if k, ok := parseCache(path, boot); ok {
		return k, nil
	}
	k, err := Measure(window)
	if err != nil {
		return 0, err
	}
	// Best effort: without the cache the next process measures again.
	if os.MkdirAll(dir, 0o700) == nil {
		_ = atomicfile.WriteBytes(path, 0o644, fmt.Appendf(nil, "%s %d\n", boot, k))
	}
	return k, nil
}

// parseCache returns the rate the cache file holds for this boot id.
func parseCache(path string, boot []byte) (uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) > 128 {
		return 0, false
	}
	id, rate, ok := bytes.Cut(bytes.TrimSpace(b), []byte(" "))
	if !ok || !bytes.Equal(id, boot) {
		return 0, false
	}
	k, err := strconv.ParseUint(string(rate), 10, 64)
	if err != nil || !plausible(k) {
		return 0, false
	}
	return k, true
}

// plausible bounds a rate: 100 MHz to 10 GHz.
func plausible(k uint64) bool { return k >= 100_000 && k <= 10_000_000 }

// constantTSC reports whether the host kernel found a TSC whose rate does
// not change with the CPU's frequency or sleep states.
func constantTSC() bool {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	buf := make([]byte, 16<<10)
	n, _ := f.Read(buf)
	for line := range bytes.Lines(buf[:n]) {
		if name, flags, ok := bytes.Cut(line, []byte(":")); ok && bytes.Equal(bytes.TrimSpace(name), []byte("flags")) {
			has := func(flag string) bool {
				for _, f := range bytes.Fields(flags) {
					if string(f) == flag {
						return true
					}
				}
				return false
			}
			return has("tsc") && has("constant_tsc")
		}
	}
	return false
}

// Measure counts the TSC over d against CLOCK_MONOTONIC. Each end is the
// tightest of several reads of the counter between two reads of the
// clock, so a preemption at one end does not skew the result.
func Measure(d time.Duration) (uint64, error) {
	if !haveTSC {
		return 0, ErrUnsupported
	}
	t0, c0 := sample()
	time.Sleep(d)
	t1, c1 := sample()
	ns := t1.Sub(t0).Nanoseconds()
	if ns <= 0 || c1 <= c0 {
		return 0, fmt.Errorf("hostclock: the TSC did not advance over %v", d)
	}
	k := uint64((float64(c1-c0) * 1e6 / float64(ns)) + 0.5) // cycles per ms
	if !plausible(k) {
		return 0, fmt.Errorf("hostclock: measured an implausible TSC rate of %d kHz", k)
	}
	return k, nil
}

// sample returns a time and the counter read at it, from the read with
// the shortest gap between its two clock reads.
func sample() (time.Time, uint64) {
	var (
		best    time.Duration = 1 << 62
		at      time.Time
		counter uint64
	)
	for range 32 {
		a := time.Now()
		c := rdtsc()
		b := time.Now()
		if gap := b.Sub(a); gap < best {
			best, at, counter = gap, a.Add(gap/2), c
		}
	}
	return at, counter
}
