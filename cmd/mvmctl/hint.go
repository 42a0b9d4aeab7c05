package main

import (
	"fmt"
	"sort"
	"strings"

	"github.com/mvm-sh/mvm/internal/ext4"
	"github.com/mvm-sh/mvm/internal/template"
)

// commandDirs are where notFoundHint looks for a command in a template's
// root: the default PATH of Debian and of most images.
var commandDirs = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// maxHintTemplates bounds how many templates' roots one hint reads.
const maxHintTemplates = 64

// notFoundHint is the help that follows "NAME: not found" on the default
// image: it is busybox, and these templates have NAME, or this is how to
// make one. Templates are named in order; their disks are read without
// mounting, a few directory blocks each.
func notFoundHint(name string) string {
	if name == "" || strings.ContainsRune(name, '/') {
		return ""
	}
	hint := "the default image is busybox (" + name + " is not one of its commands)"
	have := templatesWith(name)
	if len(have) > 0 {
		return fmt.Sprintf("%s; %s %s %s it: mvmctl exec --template %s -- %s ...",
			hint, plural(len(have), "the template", "the templates"), strings.Join(have, ", "), plural(len(have), "has", "have"), have[0], name)
	}
	return fmt.Sprintf("%s; a template can bring it, for example: mvmctl template create NAME --from-debian bookworm --packages PACKAGE (the Debian package that has %s), then mvmctl exec --template NAME -- %s",
		hint, name, name)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// templatesWith names the templates whose root has the command name in
// one of commandDirs.
func templatesWith(name string) []string {
	s, err := template.Default()
	if err != nil {
		return nil
	}
	ts, err := s.List()
	if err != nil {
		return nil
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i].Name < ts[j].Name })
	var have []string
	for i, t := range ts {
		if i == maxHintTemplates {
			break
		}
		if rootHas(t.Rootfs.Path, name) {
			have = append(have, t.Name)
		}
	}
	return have
}

// rootHas reports whether the ext4 image at img has name in one of
// commandDirs (as any kind of file: a link to the interpreter counts).
func rootHas(img, name string) bool {
	fsys, closeImg, err := ext4.OpenFile(img)
	if err != nil {
		return false
	}
	defer closeImg()
	for _, d := range commandDirs {
		if _, err := fsys.Lookup(d + "/" + name); err == nil {
			return true
		}
	}
	return false
}
