// Command guestprobe checks, from inside a guest, what real programs
// expect of a Linux system and prints what it found as one JSON object,
// for the compatibility tests to assert on:
//
//	guestprobe clock          timer resolution and 1 ms sleeps
//	guestprobe inodes DIR...  readdir's d_ino against lstat's st_ino
//	guestprobe dnotify DIR    fcntl(F_NOTIFY) sees a file created in DIR
//	guestprobe fanotify DIR   fanotify sees a file written in DIR
//	guestprobe userns         a child in a new user namespace runs
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: guestprobe clock|inodes|dnotify|fanotify|userns [ARG...]"))
	}
	var (
		res any
		err error
	)
	switch os.Args[1] {
	case "clock":
		res, err = clock()
	case "inodes":
		res, err = inodes(os.Args[2:])
	case "dnotify":
		res, err = dnotify(os.Args[2])
	case "fanotify":
		res, err = fanotify(os.Args[2])
	case "userns":
		res, err = userns()
	case "userns-child":
		// Runs in the new namespace: root there, nobody outside.
		fmt.Printf("%d\n", os.Getuid())
		return
	default:
		err = fmt.Errorf("unknown probe %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "guestprobe:", err)
	os.Exit(1)
}

func mono() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// clock sleeps 1 ms 200 times with nanosleep and measures each sleep by
// CLOCK_MONOTONIC, as time.sleep and poll timeouts are measured.
func clock() (any, error) {
	var res unix.Timespec
	if err := unix.ClockGetres(unix.CLOCK_MONOTONIC, &res); err != nil {
		return nil, err
	}
	cs, _ := os.ReadFile("/sys/devices/system/clocksource/clocksource0/current_clocksource")
	const n = 200
	d := make([]int64, 0, n)
	early := 0
	for range n {
		t0 := mono()
		ts := unix.NsecToTimespec(int64(time.Millisecond))
		for {
			err := unix.Nanosleep(&ts, &ts)
			if err != unix.EINTR {
				break
			}
		}
		dt := mono() - t0
		if dt < int64(time.Millisecond) {
			early++
		}
		d = append(d, dt)
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	us := func(ns int64) float64 { return float64(ns) / 1e3 }
	return map[string]any{
		"clocksource": string(trimNL(cs)),
		"res_ns":      res.Nano(),
		"min_us":      us(d[0]),
		"median_us":   us(d[n/2]),
		"p90_us":      us(d[n*9/10]),
		"early":       early,
	}, nil
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// inodes walks each directory tree and counts entries whose readdir
// inode number differs from lstat's, as CPython's test_os and find(1)
// compare them.
func inodes(dirs []string) (any, error) {
	checked, bad := 0, []string{}
	var walk func(dir string) error
	walk = func(dir string) error {
		ents, err := readdirIno(dir)
		if err != nil {
			return err
		}
		for name, ino := range ents {
			p := filepath.Join(dir, name)
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err != nil {
				return err
			}
			checked++
			if st.Ino != ino && len(bad) < 10 {
				bad = append(bad, fmt.Sprintf("%s: d_ino %d, st_ino %d", p, ino, st.Ino))
			}
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				if err := walk(p); err != nil {
					return err
				}
			}
		}
		return nil
	}
	for _, d := range dirs {
		if err := walk(d); err != nil {
			return nil, err
		}
	}
	return map[string]any{"checked": checked, "mismatched": bad}, nil
}

// readdirIno reads a directory's entries with their d_ino.
func readdirIno(dir string) (map[string]uint64, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	out := map[string]uint64{}
	buf := make([]byte, 32<<10)
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return nil, fmt.Errorf("getdents %s: %w", dir, err)
		}
		if n == 0 {
			return out, nil
		}
		for b := buf[:n]; len(b) >= 19; {
			ino := binary.LittleEndian.Uint64(b[0:8])
			reclen := int(binary.LittleEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				return nil, fmt.Errorf("getdents %s: bad record", dir)
			}
			name := b[19:reclen]
			for i, c := range name {
				if c == 0 {
					name = name[:i]
					break
				}
			}
			if s := string(name); s != "." && s != ".." {
				out[s] = ino
			}
			b = b[reclen:]
		}
	}
}

// dnCreate is DN_CREATE of <fcntl.h>, which x/sys/unix does not define.
const dnCreate = 0x4

// dnotify asks for SIGIO on a file created in dir, creates one, and
// waits for the signal.
func dnotify(dir string) (any, error) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGIO)
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_NOTIFY, dnCreate); err != nil {
		return nil, fmt.Errorf("fcntl(F_NOTIFY): %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dnotify-probe"), nil, 0o644); err != nil {
		return nil, err
	}
	select {
	case <-sigs:
		return map[string]any{"notified": true}, nil
	case <-time.After(5 * time.Second):
		return map[string]any{"notified": false}, nil
	}
}

// fanotify marks dir for writes to its files, writes one, and reads the
// event.
func fanotify(dir string) (any, error) {
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_NOTIF|unix.FAN_CLOEXEC|unix.FAN_NONBLOCK, unix.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("fanotify_init: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.FanotifyMark(fd, unix.FAN_MARK_ADD, unix.FAN_CLOSE_WRITE|unix.FAN_EVENT_ON_CHILD, unix.AT_FDCWD, dir); err != nil {
		return nil, fmt.Errorf("fanotify_mark: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fanotify-probe"), []byte("x"), 0o644); err != nil {
		return nil, err
	}
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, err := unix.Poll(pfd, 5000); err != nil || n == 0 {
		return map[string]any{"events": 0}, err
	}
	buf := make([]byte, 4096)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return nil, err
	}
	events := 0
	for b := buf[:n]; len(b) >= int(unix.FAN_EVENT_METADATA_LEN); {
		l := binary.LittleEndian.Uint32(b[0:4])
		if l < uint32(unix.FAN_EVENT_METADATA_LEN) || int(l) > len(b) {
			break
		}
		if efd := int32(binary.LittleEndian.Uint32(b[16:20])); efd >= 0 {
			unix.Close(int(efd))
		}
		events++
		b = b[l:]
	}
	return map[string]any{"events": events}, nil
}

// userns runs this program in a new user namespace, mapped to root there.
func userns() (any, error) {
	cmd := exec.Command("/proc/self/exe", "userns-child")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return map[string]any{"ok": false, "err": fmt.Sprintf("%v: %s", err, trimNL(out))}, nil
	}
	return map[string]any{"ok": true, "uid_inside": string(trimNL(out))}, nil
}
