package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/oci"
	"github.com/mvm-sh/mvm/internal/snapshot"
	"github.com/mvm-sh/mvm/internal/template"
	"github.com/mvm-sh/mvm/internal/units"
)

func newTemplateCommand(g *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use: "template",
		Example: `  mvmctl template create py --from-debian bookworm --packages python3
  mvmctl exec --template py -- python3 -c 'print(1)'
  mvmctl template ls`,
		Short: "Create and manage templates: root filesystems to run commands on",
		Long: `A template is a named, immutable root filesystem (and optionally its own
kernel and initrd) that "mvmctl exec --template NAME" runs commands on: made
from a container image, a Debian suite, a root filesystem tree or a prebuilt
ext4 disk image. Runs never change it: each gets its own writable layer.

Templates are kept in the data directory (~/.local/share/mvm, MVM_DATA_DIR);
the images they point to are cache (~/.cache/mvm, MVM_CACHE_DIR), shared by
content: a second template of the same image costs nothing. See
docs/templates.md.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newTemplateCreateCommand(g), newTemplateSnapshotCommand(g), newTemplateListCommand(), newTemplateInfoCommand(),
		newTemplateRemoveCommand(), newTemplatePruneCommand())
	return cmd
}

type templateCreateOptions struct {
	oci, debian, dir, rootfs string
	packages                 []string
	mirror                   string
	kernel, initrd           string
	noSnapshot               bool
}

func newTemplateCreateCommand(g *globalOptions) *cobra.Command {
	o := &templateCreateOptions{}
	cmd := &cobra.Command{
		Use:   "create NAME (--from-oci REF | --from-debian SUITE | --from-dir DIR | --rootfs FILE) [flags]",
		Short: "Create (or replace) a template",
		Long: `create makes the template NAME, replacing one of that name atomically (runs
already using the old one keep it).

--from-oci REF takes a container image:
  python:3.12-slim, registry.example.com/team/web:1.4   a registry (Docker Hub
        short names as docker has them; credentials from docker login;
        plain HTTP only to localhost and 127.0.0.1)
  docker-archive:FILE[:REF]   the output of docker save (or podman save)
  oci-archive:FILE[:TAG]      a tar of an OCI image layout
  oci:DIR[:TAG]               an OCI image layout directory
Multi-platform images give their linux/amd64 image. The layers are applied
in order (whiteouts, hard links, owners, modes, extended attributes, device
nodes) into one read-only ext4 image; the image's Env, WorkingDir, User,
Entrypoint and Cmd are kept for runs. An image whose content was converted
before is reused at once.

--from-debian SUITE bootstraps Debian (minbase, plus --packages) with
mmdebstrap; --mirror picks the archive (default ` + template.DefaultMirror + `).

--from-dir DIR takes a root filesystem tree as the host has it (owners
included). --rootfs FILE takes a prebuilt ext4 disk image as it is.
--kernel (an uncompressed vmlinux) and --initrd give the template its own.

NAME: lower-case letters, digits, '.', '_' and '-', starting with a letter
or digit, at most 63 bytes. Progress is shown on a terminal only.`,
		Example: `  mvmctl template create py --from-debian bookworm --packages python3
  mvmctl template create app --from-oci docker-archive:./app.tar
  mvmctl template create web --from-oci registry.example.com/team/web:1.4
  mvmctl template create rootfs --from-dir ./tree
  mvmctl template create pre --rootfs disk.ext4 --kernel vmlinux`,
		Args: exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runTemplateCreate(cmd, g, o, args[0])
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.oci, "from-oci", "", "container image: a registry reference, docker-archive:FILE, oci-archive:FILE or oci:DIR[:TAG]")
	f.StringVar(&o.debian, "from-debian", "", "Debian suite to bootstrap with mmdebstrap (bookworm, trixie, ...)")
	f.StringSliceVar(&o.packages, "packages", nil, "with --from-debian: packages to install (a,b,c; repeatable)")
	f.StringVar(&o.mirror, "mirror", "", "with --from-debian: the Debian archive (default "+template.DefaultMirror+")")
	f.StringVar(&o.dir, "from-dir", "", "a root filesystem tree")
	f.StringVar(&o.rootfs, "rootfs", "", "a prebuilt ext4 disk image")
	f.StringVar(&o.kernel, "kernel", "", "the template's own kernel (uncompressed vmlinux)")
	f.StringVar(&o.initrd, "initrd", "", "the template's own initrd")
	f.BoolVar(&o.noSnapshot, "no-snapshot", false, "do not snapshot the template's VM (runs then boot; mvmctl template snapshot makes one later)")
	return cmd
}

// exactArgs is cobra.ExactArgs with a message naming what is missing.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return fmt.Errorf("%s: want %s (see --help)", cmd.CommandPath(), what)
		}
		return nil
	}
}

func runTemplateCreate(cmd *cobra.Command, g *globalOptions, o *templateCreateOptions, name string) error {
	sp := template.Spec{OCI: o.oci, Dir: o.dir, Rootfs: o.rootfs, Kernel: o.kernel, Initrd: o.initrd}
	if o.debian != "" {
		sp.Debian = &template.Debian{Suite: o.debian, Packages: o.packages, Mirror: o.mirror}
	} else if len(o.packages) > 0 || o.mirror != "" {
		return errors.New("--packages and --mirror go with --from-debian")
	}
	if err := template.CheckName(name); err != nil {
		return err
	}
	s, err := template.Default()
	if err != nil {
		return err
	}
	s.Log = g.log
	p := newTemplateProgress(cmd.ErrOrStderr(), g.verbose)
	_, err = s.Create(cmd.Context(), name, sp, template.Options{Progress: p.event})
	p.finish()
	if err != nil || o.noSnapshot {
		return err
	}
	// The template is made; its snapshot only makes runs faster, so a
	// failure here is a warning (runs boot instead).
	if err := snapshotTemplate(cmd, g, name, mvm.Config{Template: name}); err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "mvmctl: warning: %v\n", err)
	}
	return nil
}

// snapshotTemplate boots the template's VM and saves it, saying so on a
// terminal.
func snapshotTemplate(cmd *cobra.Command, g *globalOptions, name string, cfg mvm.Config) error {
	cfg.Logger = g.log
	p := newTemplateProgress(cmd.ErrOrStderr(), g.verbose)
	p.println("snapshot: booting the template's VM to save it")
	info, err := mvm.PrepareSnapshot(cmd.Context(), cfg)
	if err != nil {
		p.finish()
		return fmt.Errorf("template %s is not snapshotted, so runs boot it (mvmctl template snapshot %s retries): %w", name, name, err)
	}
	p.println(fmt.Sprintf("snapshot: saved in %s (%s on disk)", info.Took.Round(time.Millisecond), units.FormatBytes(info.Size)))
	p.finish()
	return nil
}

type templateSnapshotOptions struct {
	cpus   int
	memory string
	accel  string
}

func newTemplateSnapshotCommand(g *globalOptions) *cobra.Command {
	o := &templateSnapshotOptions{}
	cmd := &cobra.Command{
		Use:   "snapshot NAME",
		Short: "(Re)build a template's snapshot",
		Long: `snapshot boots the template's VM to its agent and saves it, so that
"mvmctl exec --template NAME" restores it in a fraction of a boot. create
does it by default for the default machine (2 vCPUs, 512M); give --cpus and
--memory to snapshot another one, which runs with that --cpus and --memory
then restore. It replaces a snapshot of the same machine atomically.`,
		Example: `  mvmctl template snapshot py
  mvmctl template snapshot py --cpus 4 --memory 2G`,
		Args: exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			mem, err := units.ParseMemory(o.memory)
			if err != nil {
				return err
			}
			return snapshotTemplate(cmd, g, args[0], mvm.Config{
				Template: args[0], CPUs: o.cpus, Memory: int64(mem) << 20, Accel: mvm.Accel(o.accel),
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.cpus, "cpus", mvm.DefaultCPUs, "vCPUs of the machine to snapshot")
	f.StringVar(&o.memory, "memory", units.FormatMiB(mvm.DefaultMemory>>20), "guest memory of the machine to snapshot")
	f.StringVar(&o.accel, "accel", envOr("MVM_ACCEL", "auto"), "accelerator: auto, kvm or tcg (env MVM_ACCEL)")
	return cmd
}

// templateProgress shows a create's progress on a terminal: a line per
// step, the layers' download in one status line redrawn in place. Off a
// terminal it prints nothing, or with -v the steps' lines.
type templateProgress struct {
	w        io.Writer
	tty, on  bool
	inStatus bool
	layers   map[int]string
	total    int
	last     time.Time
}

func newTemplateProgress(w io.Writer, verbose bool) *templateProgress {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	return &templateProgress{w: w, tty: tty, on: tty || verbose, layers: map[int]string{}}
}

func (p *templateProgress) event(e template.Event) {
	if !p.on {
		return
	}
	if l := e.Layer; l != nil {
		p.total = l.Layers
		name := fmt.Sprintf("layer %d/%d %s", l.Layer, l.Layers, shortDigest(l.Digest))
		if l.Done {
			delete(p.layers, l.Layer)
			p.println(fmt.Sprintf("%s: %s", name, mib(l.Bytes)))
			return
		}
		size := "?"
		if l.Size >= 0 {
			size = mib(l.Size)
		}
		p.layers[l.Layer] = fmt.Sprintf("%d: %s/%s", l.Layer, mib(l.Bytes), size)
		if !p.tty || time.Since(p.last) < 100*time.Millisecond {
			return
		}
		p.last = time.Now()
		var parts []string
		for i := 1; i <= p.total; i++ {
			if s, ok := p.layers[i]; ok {
				parts = append(parts, s)
			}
		}
		fmt.Fprintf(p.w, "\r\033[Klayers: %s", strings.Join(parts, " · "))
		p.inStatus = true
		return
	}
	if e.Step == "bootstrap" && p.tty && strings.HasPrefix(e.Detail, "I: ") {
		fmt.Fprintf(p.w, "\r\033[Kdebian: %s", truncate(e.Detail, 100))
		p.inStatus = true
		return
	}
	p.println(e.Step + ": " + e.Detail)
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

func (p *templateProgress) println(s string) {
	if p.inStatus {
		fmt.Fprint(p.w, "\r\033[K")
		p.inStatus = false
	}
	fmt.Fprintln(p.w, s)
}

func (p *templateProgress) finish() {
	if p.inStatus {
		fmt.Fprint(p.w, "\r\033[K")
		p.inStatus = false
	}
}

func shortDigest(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 && len(d) > i+13 {
		return d[:i+13]
	}
	return d
}

func mib(n int64) string {
	if n < 1<<20 {
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// templateJSON is a template as ls --json and info --json show it.
type templateJSON struct {
	*template.Template
	Implicit  bool  `json:"implicit,omitempty"`
	DiskUsage int64 `json:"disk_usage"`
	// SnapshotUsage is what the template's snapshots take, beyond DiskUsage.
	SnapshotUsage int64 `json:"snapshot_usage"`
}

func newTemplateListCommand() *cobra.Command {
	var asJSON, all bool
	cmd := &cobra.Command{
		Use: "ls",
		Example: `  mvmctl template ls
  mvmctl template ls --all --json`,
		Aliases: []string{"list"},
		Short:   "List templates, with the disk space they use",
		Long: `ls lists the templates: name, source, digest, the root filesystem's size and
the disk space its files take (images are sparse; templates that share an
image each count it) and its snapshots take. With --all it also lists the implicit templates that
"exec --image" made (NAME "-"), which prune removes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := template.Default()
			if err != nil {
				return err
			}
			ts, err := s.List()
			if err != nil {
				return err
			}
			if all {
				imp, err := s.ListImplicit()
				if err != nil {
					return err
				}
				ts = append(ts, imp...)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				list := make([]templateJSON, 0, len(ts))
				for _, t := range ts {
					list = append(list, templateJSON{t, t.Implicit(), s.DiskUsage(t), s.SnapshotUsage(t)})
				}
				return writeJSON(out, list)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSOURCE\tDIGEST\tSIZE\tDISK\tSNAPSHOTS\tCREATED")
			for _, t := range ts {
				name := t.Name
				if t.Implicit() {
					name = "-"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, t.Source, shortDigest(t.Digest), mib(t.Rootfs.Size), mib(s.DiskUsage(t)), mib(s.SnapshotUsage(t)), t.Created.Local().Format("2006-01-02 15:04"))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVarP(&all, "all", "a", false, "also list implicit templates (from exec --image)")
	return cmd
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func newTemplateInfoCommand() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use: "info NAME",
		Example: `  mvmctl template info py
  mvmctl template info py --json`,
		Short: "Show a template: source, digest, files, image configuration",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := template.Default()
			if err != nil {
				return err
			}
			t, err := s.Get(args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSON(out, templateJSON{t, false, s.DiskUsage(t), s.SnapshotUsage(t)})
			}
			tw := tabwriter.NewWriter(out, 0, 4, 1, ' ', 0)
			line := func(k, v string) {
				if v != "" {
					fmt.Fprintf(tw, "%s:\t%s\n", k, v)
				}
			}
			line("name", t.Name)
			line("revision", t.Revision)
			line("source", t.Source.String())
			line("resolved", t.Source.Resolved)
			line("config digest", t.Source.ConfigDigest)
			line("digest", t.Digest)
			line("rootfs", fmt.Sprintf("%s (%s, %s on disk)", t.Rootfs.Path, mib(t.Rootfs.Size), mib(s.DiskUsage(t))))
			line("snapshots", fmt.Sprintf("%s (%s on disk)", s.SnapshotDir(t), mib(s.SnapshotUsage(t))))
			us, _ := snapshot.Store{Root: s.SnapshotDir(t)}.List()
			for _, u := range us {
				line("snapshot", fmt.Sprintf("%d vCPUs, %d MiB (%s on disk), made %s, last restored %s", u.Meta.CPUs, u.Meta.MemoryMiB, mib(u.Size),
					u.Made.Local().Format(time.RFC3339), u.LastUsed.Local().Format(time.RFC3339)))
			}
			if len(us) > 0 {
				if b, err := mvm.SnapshotBudget(); err == nil && b > 0 {
					line("kept", fmt.Sprintf("while all snapshots fit in %s (MVM_SNAPSHOT_BUDGET); the least recently restored go first", mib(b)))
				}
			}
			if t.Kernel != nil {
				line("kernel", t.Kernel.Path)
			}
			if t.Initrd != nil {
				line("initrd", t.Initrd.Path)
			}
			line("user", t.Config.User)
			line("working dir", t.Config.WorkingDir)
			for _, e := range t.Config.Env {
				line("env", e)
			}
			if len(t.Config.Entrypoint) > 0 {
				line("entrypoint", quoteArgs(t.Config.Entrypoint))
			}
			if len(t.Config.Cmd) > 0 {
				line("cmd", quoteArgs(t.Config.Cmd))
			}
			line("created", t.Created.Local().Format(time.RFC3339))
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func quoteArgs(args []string) string {
	b, _ := json.Marshal(args)
	return string(b)
}

func newTemplateRemoveCommand() *cobra.Command {
	return &cobra.Command{
		Use: "rm NAME...",
		Example: `  mvmctl template rm py
  mvmctl template rm app app2`,
		Aliases: []string{"remove"},
		Short:   "Remove templates, and their files unless another template or a run uses them",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := template.Default()
			if err != nil {
				return err
			}
			var errs []error
			for _, name := range args {
				if err := s.Remove(name); err != nil {
					errs = append(errs, err)
				}
			}
			return errors.Join(errs...)
		},
	}
}

func newTemplatePruneCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "prune",
		Example: `  mvmctl template prune`,
		Short:   "Remove cached images no template uses, and the implicit templates of exec --image",
		Long: `prune removes from the cache everything no named template refers to: images
and files of removed or replaced templates, the implicit templates that
"exec --image" made (converted again on next use), snapshots of revisions
that are gone, and what interrupted creates left. Files a running VM uses
are kept, and go with the next prune after it ends.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := template.Default()
			if err != nil {
				return err
			}
			st, err := s.Prune()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %d images, %d kernel/initrd files, %d implicit templates, %d unfinished creates: %s freed",
				st.Images, st.Files, st.Implicit, st.Work, mib(st.Bytes))
			if st.InUse > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "; %d kept while runs use them", st.InUse)
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		},
	}
}

// imageProgress shows `exec --image` converting its image, as a template
// create does (on a terminal only).
type imageProgress struct{ p *templateProgress }

func newImageProgress(w io.Writer) *imageProgress {
	return &imageProgress{p: newTemplateProgress(w, false)}
}

func (ip *imageProgress) event(e mvm.ImageProgress) {
	ev := template.Event{Step: e.Step, Detail: e.Detail}
	if e.Layer > 0 {
		ev.Layer = &oci.Progress{Layer: e.Layer, Layers: e.Layers, Digest: e.Digest, Bytes: e.Bytes, Size: e.Size, Done: e.Done}
	}
	ip.p.event(ev)
	if e.Step == "done" || e.Step == "reuse" {
		ip.p.finish()
	}
}
