package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/mvm-sh/mvm"
	"github.com/mvm-sh/mvm/internal/doctor"
	"github.com/mvm-sh/mvm/internal/healproc"
)

// exitDoctorFailed is doctor's status when a check failed: mvmctl exec
// cannot work on this host as it is.
const exitDoctorFailed = 1

func newDoctorCommand() *cobra.Command {
	var (
		jsonOut bool
		accel   string
	)
	cmd := &cobra.Command{
		Use:   "doctor [--json]",
		Short: "Check that this host can run microVMs, and say how to fix what cannot",
		Long: `doctor checks everything "mvmctl exec" depends on and prints one line per
check: the accelerator (KVM, or software emulation and why), /dev/kvm and
its permissions, QEMU (version, the microvm machine and devices mvm uses,
the seccomp sandbox, and as root the options that confine it), the jailer
(as root), the guest agent, the guest kernel or what building it needs, the
default image (QEMU loads it with its CPUs stopped), host tools, templates
and snapshots, free disk space, the state and run directories, and what
earlier runs left behind.

Every problem comes with the command that fixes it. doctor changes nothing
and boots no VM; it takes well under a second.

Exit status: 0 when "mvmctl exec" can work (warnings included), 1 when a
check failed. --json prints the report as one JSON object (see
docs/doctor.md for its fields).`,
		Example: `  mvmctl doctor
  mvmctl doctor --json | jq -r '.checks[] | select(.status == "fail") | .fix'
  mvmctl doctor --accel kvm        # can runs use KVM here?
  MVM_CACHE_DIR=/srv/mvm mvmctl doctor`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			h := doctor.Local(accel)
			h.DefaultSnapshot = func(ctx context.Context) (string, error) {
				return mvm.SnapshotFor(ctx, mvm.Config{Accel: mvm.Accel(accel)})
			}
			if b, err := mvm.SnapshotBudget(); err == nil {
				h.SnapshotBudget = b
			}
			h.AutoSnapshot = !healproc.Off()
			h.HealLog = mvm.HealLog(mvm.Config{})
			if st, err := mvm.PoolStatusOf(cmd.Context(), mvm.Config{}); err == nil {
				h.PoolRunning = true
				for _, s := range st.Shapes {
					h.Pool = append(h.Pool, fmt.Sprintf("%s: %d of %d ready", s.Description, s.Ready, s.Size))
					if s.LastError != "" && s.Ready == 0 && h.PoolProblem == "" {
						h.PoolProblem = s.Description + " cannot fill: " + s.LastError
					}
				}
			}
			rep := doctor.Run(cmd.Context(), h)
			out := cmd.OutOrStdout()
			if jsonOut {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else if err := rep.WriteText(out, colorful(out)); err != nil {
				return err
			}
			if !rep.OK {
				return &exitError{code: exitDoctorFailed}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print the report as JSON")
	cmd.Flags().StringVar(&accel, "accel", envOr("MVM_ACCEL", "auto"), "check for this accelerator: auto, kvm or tcg (env MVM_ACCEL)")
	return cmd
}

// colorful reports whether w is a terminal that wants colour (NO_COLOR,
// https://no-color.org, and TERM=dumb turn it off).
func colorful(w any) bool {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return false
	}
	return os.Getenv("NO_COLOR") == "" && os.Getenv("TERM") != "dumb"
}
