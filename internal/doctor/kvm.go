package doctor

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/mvm-sh/mvm/internal/accel"
)

// kvmFacts are what the KVM checks look at: the device node, the loaded
// modules, the CPU's virtualisation flag and the device's group.
type kvmFacts struct {
	statErr  error
	mode     fs.FileMode // permission bits
	uid, gid int
	openErr  error // opening it read-write, as QEMU does

	modules []string // of kvm, kvm_intel, kvm_amd, kvm_pvm: those loaded
	cpuFlag string   // "vmx", "svm", or "" when the CPU shows neither
	cpuRead bool     // /proc/cpuinfo could be read

	owner, group string   // names of uid and gid ("" if unknown)
	members      []string // the group's members in /etc/group
	inKVMGroup   bool     // this process is in the group named kvm
}

func gatherKVM(h *Host) kvmFacts {
	var k kvmFacts
	for _, m := range []string{"kvm", "kvm_intel", "kvm_amd", "kvm_pvm"} {
		if _, err := os.Stat(h.path("/sys/module/" + m)); err == nil {
			k.modules = append(k.modules, m)
		}
	}
	k.cpuFlag, k.cpuRead = cpuVirtFlag(h.path("/proc/cpuinfo"))
	fi, err := os.Stat(h.path("/dev/kvm"))
	if err != nil {
		k.statErr = err
		return k
	}
	k.mode = fi.Mode().Perm()
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		k.uid, k.gid = int(st.Uid), int(st.Gid)
	}
	if dev, err := os.OpenFile(h.path("/dev/kvm"), os.O_RDWR, 0); err != nil {
		k.openErr = err
	} else {
		dev.Close()
	}
	k.owner = lookupName(h.path("/etc/passwd"), k.uid)
	k.group, k.members = lookupGroup(h.path("/etc/group"), k.gid)
	if gid, ok := lookupGID(h.path("/etc/group"), "kvm"); ok {
		k.inKVMGroup = slices.Contains(h.Groups, gid)
	}
	return k
}

// cpuVirtFlag reports whether the first CPU in cpuinfo has Intel VT-x
// (vmx) or AMD-V (svm).
func cpuVirtFlag(path string) (string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(name) != "flags" {
			continue
		}
		flags := strings.Fields(value)
		for _, fl := range []string{"vmx", "svm"} {
			if slices.Contains(flags, fl) {
				return fl, true
			}
		}
		return "", true
	}
	return "", sc.Err() == nil
}

// lookupName finds the name of uid in a passwd file.
func lookupName(passwd string, uid int) string {
	for _, fields := range colonFile(passwd) {
		if len(fields) > 2 && fields[2] == strconv.Itoa(uid) {
			return fields[0]
		}
	}
	return ""
}

// lookupGroup finds the name and members of gid in a group file.
func lookupGroup(group string, gid int) (string, []string) {
	for _, fields := range colonFile(group) {
		if len(fields) > 3 && fields[2] == strconv.Itoa(gid) {
			var members []string
			if fields[3] != "" {
				members = strings.Split(fields[3], ",")
			}
			return fields[0], members
		}
	}
	return "", nil
}

// lookupGID finds the id of a group by name.
func lookupGID(group, name string) (int, bool) {
	for _, fields := range colonFile(group) {
		if len(fields) > 2 && fields[0] == name {
			gid, err := strconv.Atoi(fields[2])
			return gid, err == nil
		}
	}
	return 0, false
}

func colonFile(path string) [][]string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out [][]string
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, strings.Split(l, ":"))
		}
	}
	return out
}

// kvmProblem explains why /dev/kvm cannot be used and what fixes it: an
// empty message when it can.
func kvmProblem(h *Host, k kvmFacts) (msg, fix string) {
	switch {
	case errors.Is(k.statErr, fs.ErrNotExist):
		msg = "/dev/kvm does not exist"
		switch {
		case slices.Contains(k.modules, "kvm"):
			msg += " although the kvm module is loaded (udev did not create the device node)"
		case k.cpuFlag == "vmx":
			return msg + ": the kvm_intel module is not loaded", h.sudo("modprobe kvm_intel")
		case k.cpuFlag == "svm":
			return msg + ": the kvm_amd module is not loaded", h.sudo("modprobe kvm_amd")
		case k.cpuRead:
			msg += ": the CPU shows no virtualisation extensions (vmx or svm); enable VT-x/AMD-V in the firmware, or nested virtualisation for this VM"
		}
		return msg, ""
	case k.statErr != nil:
		return fmt.Sprintf("cannot inspect /dev/kvm: %v", k.statErr), ""
	case k.openErr == nil:
		return "", ""
	case !errors.Is(k.openErr, fs.ErrPermission):
		return fmt.Sprintf("cannot open /dev/kvm: %v", k.openErr), ""
	}
	desc := fmt.Sprintf("/dev/kvm (mode %04o, %s:%s) cannot be opened by %s", k.mode, nameOr(k.owner, k.uid), nameOr(k.group, k.gid), nameOr(h.User, h.Uid))
	if k.mode&0o060 != 0o060 || k.group == "" || k.gid == 0 {
		// Only its owner can use it: udev normally makes it 0660 root:kvm.
		fix := h.sudo("chgrp kvm /dev/kvm") + " && " + h.sudo("chmod 0660 /dev/kvm")
		if !k.inKVMGroup {
			return desc + "; udev normally makes it 0660 root:kvm, and you need to be in group kvm (then log in again)",
				fix + " && " + h.sudo("usermod -aG kvm "+userOr(h.User))
		}
		return desc + "; udev normally makes it 0660 root:kvm", fix
	}
	if h.User != "" && slices.Contains(k.members, h.User) && !slices.Contains(h.Groups, k.gid) {
		return desc + fmt.Sprintf(": you are in group %s, but this login session started before you were added; log in again, or for this shell", k.group), "newgrp " + k.group
	}
	return desc + fmt.Sprintf(": add yourself to group %s, then log in again", k.group), h.sudo("usermod -aG " + k.group + " " + userOr(h.User))
}

func nameOr(name string, id int) string {
	if name != "" {
		return name
	}
	return strconv.Itoa(id)
}

func userOr(u string) string {
	if u == "" {
		return "$USER"
	}
	return u
}

func checkKVM(h *Host, f *facts) Result {
	r := Result{ID: "kvm"}
	msg, fix := kvmProblem(h, f.kvm)
	if msg == "" {
		r.Status = OK
		r.Message = fmt.Sprintf("/dev/kvm (mode %04o, %s:%s) opens read-write", f.kvm.mode, nameOr(f.kvm.owner, f.kvm.uid), nameOr(f.kvm.group, f.kvm.gid))
		if len(f.kvm.modules) > 0 {
			r.Message += "; modules: " + strings.Join(f.kvm.modules, ", ")
		}
		return r
	}
	r.Status, r.Message, r.Fix = Warn, msg, fix
	if f.mode == accel.KVM {
		r.Status = Fail
	}
	return r
}

func checkAccel(h *Host, f *facts) Result {
	r := Result{ID: "accel"}
	switch {
	case f.modeErr != nil:
		r.Status, r.Message = Fail, f.modeErr.Error()+" (from --accel or MVM_ACCEL)"
		return r
	case f.accelErr != nil:
		_, fix := kvmProblem(h, f.kvm)
		r.Status, r.Message, r.Fix = Fail, f.accelErr.Error()+"; --accel auto falls back to software emulation", fix
		return r
	case f.accel.Kind == accel.KVM && !slices.Contains(f.kvm.modules, "kvm_intel") && !slices.Contains(f.kvm.modules, "kvm_amd"):
		// Forced onto a KVM without a standard vendor module (PVM): a
		// guest kernel that is not PVM-aware never boots. mvm's own
		// kernel is not; one brought with --kernel may be.
		r.Status, r.Fix = Warn, "mvmctl exec --accel auto -- COMMAND"
		r.Message = "kvm (requested) without kvm_intel or kvm_amd: only PVM-aware guest kernels boot"
		if f.imgErr == nil && !strings.HasPrefix(f.img.KernelKey, "user:") {
			r.Status = Fail
			r.Message += ", and the default image's kernel is not one"
		}
		return r
	case f.accel.Kind == accel.KVM:
		r.Status, r.Message = OK, "kvm: "+f.accel.Reason
		return r
	case f.mode == accel.TCG:
		r.Status, r.Message = OK, "tcg (requested): software emulation"
		return r
	}
	why := strings.TrimPrefix(f.accel.Reason, "software emulation: ")
	problem, fix := kvmProblem(h, f.kvm)
	if problem != "" && (f.kvm.statErr != nil || f.kvm.openErr != nil) {
		// The kvm line says why and what fixes it.
		why = "/dev/kvm cannot be used (see the kvm check)"
	}
	r.Status, r.Fix = Warn, fix
	r.Message = "tcg (software emulation, several times slower than KVM): " + why
	return r
}
