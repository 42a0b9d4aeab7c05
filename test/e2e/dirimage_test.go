package e2e

import (
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var dirsReadyRE = regexp.MustCompile(`prepare disks (\d+)ms`)

// TestAddDirImageAsTheGuestSeesIt shares a tree with every kind of file
// and attribute, and one flat directory of 30 000 files, read-only, and
// compares what the guest kernel shows (stat, contents, link targets)
// with the host; and the flat directory is ready in seconds
// (`mkfs.ext4 -d` needed about a minute for it) and answers lookups of
// any of its names.
func TestAddDirImageAsTheGuestSeesIt(t *testing.T) {
	e := newEnv(t)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "plain.txt"), "plain\n", 0o644)
	writeFile(t, filepath.Join(src, "setuid"), "#!/bin/sh\n", 0o755)
	if err := os.Chmod(filepath.Join(src, "setuid"), 0o755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, "sub dir/ünï ✓ \xff"), strings.Repeat("data", 5000), 0o600)
	writeFile(t, filepath.Join(src, "a/b/c/deep"), "deep", 0o640)
	if err := os.Link(filepath.Join(src, "plain.txt"), filepath.Join(src, "a/hardlink")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("plain.txt", filepath.Join(src, "fast-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(strings.Repeat("long/", 40)+"target", filepath.Join(src, "slow-link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "sticky"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(src, "sticky"), 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(src, "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(src, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if os.Geteuid() == 0 {
		if err := unix.Mknod(filepath.Join(src, "dev"), unix.S_IFCHR|0o644, int(unix.Mkdev(300, 70000))); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(filepath.Join(src, "a/b"), 70000, 123); err != nil {
			t.Fatal(err)
		}
	}
	// A sparse file: the guest reads zeros where the host has holes.
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("end"), 16<<20-3); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for i, name := range []string{"plain.txt", "a/b/c/deep", "sticky", "fast-link", "sparse"} {
		ts := []unix.Timespec{unix.NsecToTimespec(1e9), {Sec: int64(1600000000 + i), Nsec: int64(123456789 + i)}}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(src, name), ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
	}
	flat := t.TempDir()
	const flatFiles = 30000
	for i := range flatFiles {
		if err := os.WriteFile(filepath.Join(flat, fmt.Sprintf("file%06d.txt", i)), []byte(strconv.Itoa(i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	script := `cd /data && find . | sort | while read -r f; do
  stat -c '%n|%f|%u|%g|%s|%y|%h|%t:%T|%i' "$f"
  if [ -L "$f" ]; then echo "-> $(readlink "$f")"; elif [ -f "$f" ]; then sha256sum < "$f"; fi
done
set -- /flat/*; echo flat $# $(for f in 000000 012345 029999; do cat /flat/file$f.txt; echo; done)
test -e /flat/file030000.txt || echo no-such-file`
	r := e.run(nil, "-v", "exec", "--timeout", "5m", "-d", src+":/data", "-d", flat+":/flat", "--", "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("got %s", r)
	}
	m := dirsReadyRE.FindSubmatch(r.stderr)
	if m == nil {
		t.Fatalf("no add-dirs timing in %s", r)
	}
	if ms, _ := strconv.Atoi(string(m[1])); ms > 10000 {
		t.Errorf("images of %d flat files and a small tree took %d ms", flatFiles, ms)
	}

	// The host's view, in the guest's format.
	var want []string
	inodes := map[uint64]string{}
	var paths []string
	err = filepath.Walk(src, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if rel != "." {
			rel = "./" + rel // as find(1) prints it
		}
		paths = append(paths, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(paths)
	for _, rel := range paths {
		p := filepath.Join(src, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		ino := "same-as-" + rel
		if first, ok := inodes[st.Ino]; ok {
			ino = "same-as-" + first
		} else {
			inodes[st.Ino] = rel
		}
		mtime := time.Unix(st.Mtim.Sec, st.Mtim.Nsec).UTC().Format("2006-01-02 15:04:05.000000000 -0700")
		size := strconv.FormatInt(st.Size, 10)
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			size = "dir" // a directory's size is its history's, not its content's
		}
		want = append(want, fmt.Sprintf("%s|%x|%d|%d|%s|%s|%d|%x:%x|%s", rel, st.Mode, st.Uid, st.Gid, size, mtime, st.Nlink, unix.Major(st.Rdev), unix.Minor(st.Rdev), ino))
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			target, _ := os.Readlink(p)
			want = append(want, "-> "+target)
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			want = append(want, fmt.Sprintf("%x  -", sha256.Sum256(b)))
		}
	}
	want = append(want, fmt.Sprintf("flat %d 0 12345 29999", flatFiles), "no-such-file")

	// The guest's, with its inode numbers turned into "same as" names.
	got := strings.Split(strings.TrimSuffix(string(r.stdout), "\n"), "\n")
	firstByIno := map[string]string{}
	for i, line := range got {
		fields := strings.Split(line, "|")
		if len(fields) != 9 {
			continue
		}
		if strings.HasPrefix(fields[1], "4") && len(fields[1]) == 4 {
			fields[4] = "dir"
		}
		if first, ok := firstByIno[fields[8]]; ok {
			fields[8] = "same-as-" + first
		} else {
			firstByIno[fields[8]] = fields[0]
			fields[8] = "same-as-" + fields[0]
		}
		got[i] = strings.Join(fields, "|")
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		for i := 0; i < max(len(got), len(want)); i++ {
			var g, w string
			if i < len(got) {
				g = got[i]
			}
			if i < len(want) {
				w = want[i]
			}
			if g != w {
				t.Errorf("line %d:\n guest: %q\n host:  %q", i, g, w)
			}
		}
	}
	e.assertClean()
}
