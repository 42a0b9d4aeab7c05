package runstate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/atomicfile"
)

const recordFile = "record.json"

// maxRecord bounds what List reads of a record: records are written by
// mvm, but a run directory is only as trustworthy as its user's files.
const maxRecord = 64 << 10

// Record is what a run says about itself to other processes (`mvmctl ps`,
// and whatever else finds a run by its name): written whole, atomically,
// at each change of status, and gone with the run's directory.
type Record struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	// Owner is the process that runs it (and holds its lock); VMM its
	// VMM, once started.
	Owner   int       `json:"owner_pid"`
	VMM     int       `json:"vmm_pid,omitempty"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
	// What the machine is: its root (a template's name or an image
	// reference; "" for the default image) and its shape.
	Root      string `json:"root,omitempty"`
	CPUs      int    `json:"cpus"`
	MemoryMiB uint64 `json:"memory_mib"`
	Dirs      int    `json:"dirs"`
	Restored  bool   `json:"restored,omitempty"`
}

// Save writes rec as the run's record; Name, Owner, Created and Updated
// are the run's own.
func (r *Run) Save(rec Record) error {
	rec.Name, rec.Owner, rec.Created, rec.Updated = r.Name, os.Getpid(), r.created, time.Now().UTC()
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteBytes(r.Path(recordFile), 0o600, append(b, '\n'))
}

// Listed is a run found by List.
type Listed struct {
	Record
	Dir string
	// Live: its owner still holds its lock. A run that is not live is a
	// leftover the next start reclaims.
	Live bool
}

// List returns the record of every run in root, oldest first. A run whose
// record is missing or unreadable (one being created, or too old to have
// one) is listed with its name only.
func List(root string) ([]Listed, error) {
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Listed
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		dir := filepath.Join(root, e.Name())
		l := Listed{Dir: dir, Live: held(filepath.Join(dir, lockFile))}
		if rec, err := readRecord(filepath.Join(dir, recordFile)); err == nil && rec.Name == e.Name() {
			l.Record = rec
		} else {
			l.Record = Record{Name: e.Name()}
		}
		out = append(out, l)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

func readRecord(path string) (Record, error) {
	var rec Record
	f, err := os.Open(path)
	if err != nil {
		return rec, err
	}
	defer f.Close()
	b := make([]byte, maxRecord+1)
	n, _ := f.Read(b)
	if n > maxRecord {
		return rec, fmt.Errorf("%s: too large", path)
	}
	return rec, json.Unmarshal(b[:n], &rec)
}

// held reports whether a live process holds the lock at path.
func held(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	err = unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB)
	return errors.Is(err, unix.EWOULDBLOCK)
}
