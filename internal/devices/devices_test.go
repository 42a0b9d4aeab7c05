package devices

import (
	"strings"
	"testing"
)

func TestUse(t *testing.T) {
	ro, rw := false, true
	tests := []struct {
		name      string
		use       Use
		drives    int
		fits      bool
		snapshot  bool
		errSays   []string
		dirDrives int
	}{
		{name: "nothing", use: Use{}, drives: 0, fits: true, snapshot: true, dirDrives: 7},
		{name: "seven read-only dirs", use: Use{Dirs: []bool{ro, ro, ro, ro, ro, ro, ro}}, drives: 7, fits: true, dirDrives: 7},
		{name: "eight read-only dirs", use: Use{Dirs: []bool{ro, ro, ro, ro, ro, ro, ro, ro}}, drives: 8, dirDrives: 7,
			errSays: []string{"8 shared directories need 8 drives; the VM has room for 7 (a read-only directory takes one", "8 device slots, less one for the agent's channel"}},
		{name: "template and two rw dirs", use: Use{Template: true, Dirs: []bool{rw, rw}}, drives: 6, fits: true, snapshot: true, dirDrives: 5},
		{name: "template and three rw dirs", use: Use{Template: true, Dirs: []bool{rw, rw, rw}}, drives: 8, dirDrives: 5,
			errSays: []string{"3 shared directories need 8 drives; the VM has room for 7 (the template takes two, a read-only directory one, a read-write one two)"}},
		{name: "network takes a slot", use: Use{Network: true, Dirs: []bool{rw, rw, rw, ro}}, drives: 7, dirDrives: 6,
			errSays: []string{"need 7 drives; the VM has room for 6", "and one for the network card"}},
		{name: "template, network and two rw dirs fit, but a network boots", use: Use{Template: true, Network: true, Dirs: []bool{rw, rw}},
			drives: 6, fits: true, dirDrives: 4},
		{name: "three ro dirs boot, but not from a snapshot", use: Use{Dirs: []bool{ro, ro, ro}}, drives: 3, fits: true, dirDrives: 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.use.Drives(); got != tt.drives {
				t.Errorf("Drives() = %d, want %d", got, tt.drives)
			}
			if got := tt.use.MaxDirDrives(); got != tt.dirDrives {
				t.Errorf("MaxDirDrives() = %d, want %d", got, tt.dirDrives)
			}
			err := tt.use.Check()
			if (err == nil) != tt.fits {
				t.Fatalf("Check() = %v, want fits=%v", err, tt.fits)
			}
			for _, s := range tt.errSays {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Check() = %q, does not say %q", err, s)
				}
			}
			if ok, why := tt.use.Snapshottable(); ok != (tt.snapshot || !tt.fits && !tt.use.Network && len(tt.use.Dirs) <= SnapshotDirSlots) {
				t.Errorf("Snapshottable() = %v %q", ok, why)
			}
		})
	}
}

// TestSlotsFit: a machine with every snapshot slot in use, a template
// and a network card still fits, which is what makes one snapshot serve
// every run of its configuration.
func TestSlotsFit(t *testing.T) {
	u := Use{Template: true, Network: true}
	for range SnapshotDirSlots {
		u.Dirs = append(u.Dirs, true)
	}
	if err := u.Check(); err != nil {
		t.Fatal(err)
	}
	if SnapshotDirSlots < 1 || MaxDrives != Transports-1 {
		t.Errorf("SnapshotDirSlots %d, MaxDrives %d", SnapshotDirSlots, MaxDrives)
	}
}
