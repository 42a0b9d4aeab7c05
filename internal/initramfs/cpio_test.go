package initramfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// cpioEntry is one parsed newc record.
type cpioEntry struct {
	Offset               int
	Ino, Mode, UID, GID  uint32
	Nlink, Mtime         uint32
	DevMajor, DevMinor   uint32
	RdevMajor, RdevMinor uint32
	Check                uint32
	Name                 string
	Data                 []byte
}

// readCPIO parses a whole newc archive, checking its framing: every header
// starts at a 4-byte aligned offset with the 070701 magic, names are
// NUL-terminated, padding is zero bytes, TRAILER!!! is the last record and
// nothing follows it. The trailer is included in the result.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	const hdrLen = 6 + 13*8
	var entries []cpioEntry
	off := 0
	pad := func(what string) {
		for off%4 != 0 {
			if off >= len(b) {
				t.Fatalf("archive ends inside the padding after %s", what)
			}
			if b[off] != 0 {
				t.Fatalf("non-zero padding byte %#x at offset %d after %s", b[off], off, what)
			}
			off++
		}
	}
	for {
		if off%4 != 0 {
			t.Fatalf("header at unaligned offset %d", off)
		}
		if off+hdrLen > len(b) {
			t.Fatalf("truncated header at offset %d (archive is %d bytes)", off, len(b))
		}
		if magic := string(b[off : off+6]); magic != "070701" {
			t.Fatalf("magic %q at offset %d, want 070701", magic, off)
		}
		var f [13]uint32
		for i := range f {
			s := string(b[off+6+8*i : off+6+8*(i+1)])
			v, err := strconv.ParseUint(s, 16, 32)
			if err != nil {
				t.Fatalf("header field %d at offset %d = %q: %v", i, off, s, err)
			}
			f[i] = uint32(v)
		}
		e := cpioEntry{
			Offset: off, Ino: f[0], Mode: f[1], UID: f[2], GID: f[3], Nlink: f[4], Mtime: f[5],
			DevMajor: f[7], DevMinor: f[8], RdevMajor: f[9], RdevMinor: f[10], Check: f[12],
		}
		size, namesize := int(f[6]), int(f[11])
		off += hdrLen
		if namesize < 1 || off+namesize > len(b) {
			t.Fatalf("name size %d at offset %d out of range", namesize, e.Offset)
		}
		if b[off+namesize-1] != 0 {
			t.Fatalf("name at offset %d is not NUL-terminated", e.Offset)
		}
		e.Name = string(b[off : off+namesize-1])
		if strings.IndexByte(e.Name, 0) >= 0 {
			t.Fatalf("name %q contains a NUL", e.Name)
		}
		off += namesize
		pad("name " + e.Name)
		if off+size > len(b) {
			t.Fatalf("%s: %d data bytes run past the end of the archive", e.Name, size)
		}
		e.Data = b[off : off+size]
		off += size
		pad("data of " + e.Name)
		entries = append(entries, e)
		if e.Name == "TRAILER!!!" {
			break
		}
	}
	if off != len(b) {
		t.Fatalf("%d bytes after the trailer", len(b)-off)
	}
	return entries
}

// byName indexes entries (without the trailer), failing on duplicates.
func byName(t *testing.T, entries []cpioEntry) map[string]cpioEntry {
	t.Helper()
	m := make(map[string]cpioEntry)
	for _, e := range entries[:len(entries)-1] {
		if _, dup := m[e.Name]; dup {
			t.Errorf("entry %q appears twice", e.Name)
		}
		m[e.Name] = e
	}
	return m
}

// checkCommon asserts what holds for every archive Writer makes: the
// trailer is last, every entry is root-owned with a fixed mtime and an
// inode numbered in order, and no name is absolute or unclean.
func checkCommon(t *testing.T, entries []cpioEntry) {
	t.Helper()
	if len(entries) == 0 {
		t.Fatal("no entries")
	}
	last := entries[len(entries)-1]
	if last.Name != "TRAILER!!!" || last.Mode != 0 || len(last.Data) != 0 {
		t.Errorf("last record = %q mode %o size %d, want an empty TRAILER!!!", last.Name, last.Mode, len(last.Data))
	}
	for i, e := range entries[:len(entries)-1] {
		if e.Name == "TRAILER!!!" {
			t.Errorf("TRAILER!!! at position %d of %d", i, len(entries))
		}
		if e.UID != 0 || e.GID != 0 {
			t.Errorf("%s: owner %d:%d, want 0:0", e.Name, e.UID, e.GID)
		}
		if e.Mtime != 0 {
			t.Errorf("%s: mtime %d, want 0", e.Name, e.Mtime)
		}
		if e.Ino != uint32(i+1) {
			t.Errorf("%s: ino %d, want %d", e.Name, e.Ino, i+1)
		}
		if e.Check != 0 || e.DevMajor != 0 || e.DevMinor != 0 {
			t.Errorf("%s: check %d dev %d:%d, want zeros", e.Name, e.Check, e.DevMajor, e.DevMinor)
		}
		if strings.HasPrefix(e.Name, "/") || path.Clean(e.Name) != e.Name || e.Name == "." {
			t.Errorf("entry name %q is not a clean relative path", e.Name)
		}
		wantNlink := uint32(1)
		if e.Mode&0o170000 == 0o040000 {
			wantNlink = 2
		}
		if e.Nlink != wantNlink {
			t.Errorf("%s: nlink %d, want %d", e.Name, e.Nlink, wantNlink)
		}
	}
}

// summary is the part of an entry that the tests compare.
type summary struct {
	Name         string
	Mode         uint32
	Rdev         string
	Data         string
	UnalignedHdr bool
}

func summarize(entries []cpioEntry) []summary {
	var s []summary
	for _, e := range entries {
		s = append(s, summary{
			Name:         e.Name,
			Mode:         e.Mode,
			Rdev:         fmt.Sprintf("%d:%d", e.RdevMajor, e.RdevMinor),
			Data:         string(e.Data),
			UnalignedHdr: e.Offset%4 != 0,
		})
	}
	return s
}

func TestWriterEntries(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	steps := []struct {
		desc string
		do   func() error
	}{
		{"dir /etc", func() error { return w.Dir("/etc", 0o755) }},
		{"sticky tmp", func() error { return w.Dir("tmp", 0o777|fs.ModeSticky) }},
		{"file /etc/motd", func() error { return w.File("/etc/motd", 0o644, []byte("hello\n")) }},
		{"empty file", func() error { return w.File("etc/empty", 0o600, nil) }},
		{"setuid file", func() error { return w.File("bin/su", 0o755|fs.ModeSetuid, []byte("su!")) }},
		{"setgid dir", func() error { return w.Dir("srv", 0o775|fs.ModeSetgid) }},
		{"file from reader", func() error { return w.FileFrom("blob", 0o600, 5, strings.NewReader("abcdefgh")) }},
		{"symlink", func() error { return w.Symlink("/bin/sh", "/bin/busybox") }},
		{"console", func() error { return w.CharDev("dev/console", 0o600, 5, 1) }},
		{"null", func() error { return w.CharDev("/dev/null", 0o666, 1, 3) }},
		{"unclean name", func() error { return w.Symlink("usr//bin/./x/../env", "../../bin/busybox") }},
		{"escaping name", func() error { return w.File("../../outside", 0o644, []byte("1234")) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.desc, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	entries := readCPIO(t, buf.Bytes())
	checkCommon(t, entries)
	want := []summary{
		{Name: "etc", Mode: 0o040755, Rdev: "0:0"},
		{Name: "tmp", Mode: 0o041777, Rdev: "0:0"},
		{Name: "etc/motd", Mode: 0o100644, Rdev: "0:0", Data: "hello\n"},
		{Name: "etc/empty", Mode: 0o100600, Rdev: "0:0"},
		{Name: "bin/su", Mode: 0o104755, Rdev: "0:0", Data: "su!"},
		{Name: "srv", Mode: 0o042775, Rdev: "0:0"},
		{Name: "blob", Mode: 0o100600, Rdev: "0:0", Data: "abcde"},
		{Name: "bin/sh", Mode: 0o120777, Rdev: "0:0", Data: "/bin/busybox"},
		{Name: "dev/console", Mode: 0o020600, Rdev: "5:1"},
		{Name: "dev/null", Mode: 0o020666, Rdev: "1:3"},
		{Name: "usr/bin/env", Mode: 0o120777, Rdev: "0:0", Data: "../../bin/busybox"},
		{Name: "outside", Mode: 0o100644, Rdev: "0:0", Data: "1234"},
		{Name: "TRAILER!!!", Mode: 0, Rdev: "0:0"},
	}
	if diff := cmp.Diff(want, summarize(entries)); diff != "" {
		t.Errorf("archive entries (-want +got):\n%s", diff)
	}
}

func TestWriterEmptyArchive(t *testing.T) {
	var buf bytes.Buffer
	if err := NewWriter(&buf).Close(); err != nil {
		t.Fatal(err)
	}
	entries := readCPIO(t, buf.Bytes())
	if len(entries) != 1 || entries[0].Name != "TRAILER!!!" {
		t.Errorf("empty archive = %+v, want only the trailer", summarize(entries))
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", buf.Len())
	}
}

func TestWriterRejectsNames(t *testing.T) {
	tests := []struct {
		name    string
		add     func(w *Writer) error
		wantErr string
	}{
		{"empty", func(w *Writer) error { return w.File("", 0o644, []byte("x")) }, `invalid entry name ""`},
		{"slash", func(w *Writer) error { return w.Dir("/", 0o755) }, `invalid entry name "/"`},
		{"dot", func(w *Writer) error { return w.Dir(".", 0o755) }, `invalid entry name "."`},
		{"dot dot", func(w *Writer) error { return w.Symlink("..", "/") }, `invalid entry name ".."`},
		{"up and back", func(w *Writer) error { return w.Dir("a/../..//.", 0o755) }, "invalid entry name"},
		{"duplicate", func(w *Writer) error { return w.File("etc", 0o644, nil) }, `duplicate entry "etc"`},
		{"duplicate after cleaning", func(w *Writer) error { return w.Symlink("/etc/./", "x") }, `duplicate entry "etc"`},
		{"duplicate char dev", func(w *Writer) error { return w.CharDev("etc", 0o600, 1, 3) }, `duplicate entry "etc"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := NewWriter(&buf)
			if err := w.Dir("etc", 0o755); err != nil {
				t.Fatal(err)
			}
			err := tt.add(w)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
			}
			// A refused entry writes nothing and the archive stays usable.
			if err := w.File("after", 0o644, []byte("ok")); err != nil {
				t.Fatalf("entry after a refused one: %v", err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			entries := readCPIO(t, buf.Bytes())
			checkCommon(t, entries)
			var names []string
			for _, e := range entries {
				names = append(names, e.Name)
			}
			if diff := cmp.Diff([]string{"etc", "after", "TRAILER!!!"}, names); diff != "" {
				t.Errorf("entries (-want +got):\n%s", diff)
			}
		})
	}
}

func TestWriterShortReader(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	err := w.FileFrom("short", 0o644, 10, strings.NewReader("abc"))
	if err == nil || !strings.Contains(err.Error(), "copied 3 of 10 bytes") || !errors.Is(err, io.EOF) {
		t.Fatalf("FileFrom with a short reader: %v, want a copied 3 of 10 bytes EOF error", err)
	}
	// The archive is broken; every later call reports that.
	if err2 := w.File("next", 0o644, nil); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("File after a failed FileFrom = %v, want %v", err2, err)
	}
	if err2 := w.Close(); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("Close after a failed FileFrom = %v, want %v", err2, err)
	}
}

// failWriter fails every write.
type failWriter struct{}

var errDiskFull = errors.New("disk full")

func (failWriter) Write(p []byte) (int, error) { return 0, errDiskFull }

func TestWriterUnderlyingError(t *testing.T) {
	w := NewWriter(failWriter{})
	if err := w.File("f", 0o644, []byte("data")); err != nil {
		// Buffered: the failure may only show at Close.
		if !errors.Is(err, errDiskFull) {
			t.Fatalf("File: %v", err)
		}
	}
	if err := w.Close(); !errors.Is(err, errDiskFull) {
		t.Errorf("Close = %v, want %v", err, errDiskFull)
	}
}

// writeFixture writes a fake agent and a fake busybox and returns a Spec
// for them.
func writeFixture(t *testing.T, applets []string) (Spec, []byte, []byte) {
	t.Helper()
	dir := t.TempDir()
	agent := []byte("\x7fELF fake mvm-agent\x00\x01\x02") // 23 bytes: exercises padding
	busybox := bytes.Repeat([]byte("BUSYBOX!"), 1000)
	busybox = append(busybox, 'z')
	spec := Spec{Agent: filepath.Join(dir, "mvm-agent"), Busybox: filepath.Join(dir, "busybox"), Applets: applets}
	if err := os.WriteFile(spec.Agent, agent, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spec.Busybox, busybox, 0o755); err != nil {
		t.Fatal(err)
	}
	return spec, agent, busybox
}

func TestWrite(t *testing.T) {
	applets := []string{"bin/sh", "usr/bin/env", "sbin/init", "linuxrc", "bin/busybox", "/bin/ls", "bin/sh", "", "/"}
	spec, agent, busybox := writeFixture(t, applets)
	var buf bytes.Buffer
	if err := Write(&buf, spec); err != nil {
		t.Fatalf("Write: %v", err)
	}
	entries := readCPIO(t, buf.Bytes())
	checkCommon(t, entries)
	m := byName(t, entries)

	files := []struct {
		name string
		mode uint32
		data []byte
	}{
		{"init", 0o100755, agent},
		{"bin/busybox", 0o100755, busybox},
		{"etc/passwd", 0o100644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{"etc/group", 0o100644, nil},
		{"etc/hostname", 0o100644, []byte("mvm\n")},
		{"etc/hosts", 0o100644, nil},
		{"etc/os-release", 0o100644, nil},
		{"sbin/mvm-agent", 0o120777, []byte("/init")},
		{"bin/sh", 0o120777, []byte("/bin/busybox")},
		{"bin/ls", 0o120777, []byte("/bin/busybox")},
		{"usr/bin/env", 0o120777, []byte("/bin/busybox")},
		{"sbin/init", 0o120777, []byte("/bin/busybox")},
		{"bin", 0o040755, nil},
		{"sbin", 0o040755, nil},
		{"usr/bin", 0o040755, nil},
		{"root", 0o040700, nil},
		{"proc", 0o040555, nil},
		{"sys", 0o040555, nil},
		{"dev", 0o040755, nil},
		{"tmp", 0o041777, nil},
		{"var/tmp", 0o041777, nil},
		{"dev/console", 0o020600, nil},
		{"dev/null", 0o020666, nil},
	}
	for _, f := range files {
		e, ok := m[f.name]
		if !ok {
			t.Errorf("no entry %q", f.name)
			continue
		}
		if e.Mode != f.mode {
			t.Errorf("%s: mode %#o, want %#o", f.name, e.Mode, f.mode)
		}
		if f.data != nil && !bytes.Equal(e.Data, f.data) {
			t.Errorf("%s: data %q, want %q", f.name, e.Data, f.data)
		}
	}
	if e := m["dev/console"]; e.RdevMajor != 5 || e.RdevMinor != 1 {
		t.Errorf("dev/console rdev = %d:%d, want 5:1", e.RdevMajor, e.RdevMinor)
	}
	if e := m["dev/null"]; e.RdevMajor != 1 || e.RdevMinor != 3 {
		t.Errorf("dev/null rdev = %d:%d, want 1:3", e.RdevMajor, e.RdevMinor)
	}
	if !strings.HasPrefix(string(m["etc/passwd"].Data), "root:x:0:0:") {
		t.Errorf("etc/passwd has no root entry first: %q", m["etc/passwd"].Data)
	}
	for _, absent := range []string{"linuxrc", "", "/"} {
		if _, ok := m[absent]; ok {
			t.Errorf("entry %q should not be in the archive", absent)
		}
	}
	var symlinks []string
	for _, e := range entries {
		if e.Mode&0o170000 == 0o120000 && string(e.Data) == "/bin/busybox" {
			symlinks = append(symlinks, e.Name)
		}
	}
	if diff := cmp.Diff([]string{"bin/ls", "bin/sh", "sbin/init", "usr/bin/env"}, symlinks); diff != "" {
		t.Errorf("applet links, in archive order (-want +got):\n%s", diff)
	}
	checkParentsFirst(t, entries)
}

// checkParentsFirst asserts that every entry's parent directory comes
// before it: the kernel's unpacker does not create missing parents.
func checkParentsFirst(t *testing.T, entries []cpioEntry) {
	t.Helper()
	dirs := map[string]bool{".": true}
	for _, e := range entries[:len(entries)-1] {
		if parent := path.Dir(e.Name); !dirs[parent] {
			t.Errorf("%s comes before its directory %s", e.Name, parent)
		}
		if e.Mode&0o170000 == 0o040000 {
			dirs[e.Name] = true
		}
	}
}

func TestWriteReproducible(t *testing.T) {
	applets := []string{"usr/bin/env", "bin/sh", "sbin/init", "linuxrc", "bin/busybox", "usr/sbin/chroot"}
	spec, _, _ := writeFixture(t, applets)
	var a, b, c bytes.Buffer
	if err := Write(&a, spec); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, spec); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatalf("two writes of the same spec differ (%d and %d bytes)", a.Len(), b.Len())
	}
	// The applet order does not matter either.
	reversed := spec
	reversed.Applets = slices.Clone(applets)
	slices.Reverse(reversed.Applets)
	if err := Write(&c, reversed); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), c.Bytes()) {
		t.Errorf("applet order changed the archive")
	}
	if slices.Equal(spec.Applets, reversed.Applets) || !slices.Equal(spec.Applets, applets) {
		t.Errorf("Write reordered the caller's applet list: %q", spec.Applets)
	}
}

func TestWriteBadInputs(t *testing.T) {
	tests := []struct {
		name    string
		modify  func(s *Spec)
		wantErr string
		is      error
	}{
		{"missing agent", func(s *Spec) { s.Agent = filepath.Join(filepath.Dir(s.Agent), "nope") }, "initramfs: ", fs.ErrNotExist},
		{"missing busybox", func(s *Spec) { s.Busybox = "" }, "initramfs: ", fs.ErrNotExist},
		{"agent is a directory", func(s *Spec) { s.Agent = filepath.Dir(s.Agent) }, "is not a regular file", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec, _, _ := writeFixture(t, []string{"bin/sh"})
			tt.modify(&spec)
			err := Write(io.Discard, spec)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Write error = %v, want it to contain %q", err, tt.wantErr)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("Write error = %v, want it to wrap %v", err, tt.is)
			}
		})
	}
}

func TestBusyboxAppletsReal(t *testing.T) {
	const bb = "/bin/busybox"
	if _, err := os.Stat(bb); err != nil {
		t.Skipf("no %s: %v", bb, err)
	}
	applets, err := BusyboxApplets(bb)
	if err != nil {
		t.Fatalf("BusyboxApplets: %v", err)
	}
	if !slices.Contains(applets, "bin/sh") {
		t.Errorf("applets %q lack bin/sh", applets)
	}
	for _, a := range applets {
		if a == "" || strings.TrimSpace(a) != a {
			t.Errorf("applet %q is empty or has surrounding space", a)
		}
	}
	// The real list lays out into an archive whose links all have their
	// directories.
	spec, _, _ := writeFixture(t, applets)
	var buf bytes.Buffer
	if err := Write(&buf, spec); err != nil {
		t.Fatalf("Write with the real applet list: %v", err)
	}
	entries := readCPIO(t, buf.Bytes())
	checkCommon(t, entries)
	checkParentsFirst(t, entries)
	if e := byName(t, entries)["bin/sh"]; string(e.Data) != "/bin/busybox" {
		t.Errorf("bin/sh links to %q, want /bin/busybox", e.Data)
	}
}

func TestBusyboxAppletsFake(t *testing.T) {
	tests := []struct {
		name    string
		script  string
		want    []string
		wantErr string
	}{
		{
			name:   "trims and skips blank lines",
			script: "printf 'bin/sh\\n  usr/bin/env  \\n\\n\\tsbin/init\\r\\n'",
			want:   []string{"bin/sh", "usr/bin/env", "sbin/init"},
		},
		{
			name:    "prints nothing",
			script:  "printf '\\n  \\n'",
			wantErr: "--list-full printed no applets",
		},
		{
			name:    "fails",
			script:  "echo bin/sh; exit 1",
			wantErr: "--list-full: exit status 1",
		},
		{
			name:   "gets --list-full",
			script: `[ "$#" -eq 1 ] && [ "$1" = --list-full ] && echo ok || exit 2`,
			want:   []string{"ok"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bb := filepath.Join(t.TempDir(), "busybox")
			if err := os.WriteFile(bb, []byte("#!/bin/sh\n"+tt.script+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			got, err := BusyboxApplets(bb)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("BusyboxApplets = %q, %v; want error containing %q", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("applets (-want +got):\n%s", diff)
			}
		})
	}
}

func TestBusyboxAppletsMissing(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "busybox")
	if _, err := BusyboxApplets(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("BusyboxApplets(missing) error = %v, want one naming %s", err, missing)
	}
}
