package template

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mvm-sh/mvm/internal/diskusage"
)

func (s *Store) objLock(r objRef) string {
	return filepath.Join(s.objDir(r.kind), digestHex(r.digest), "lock")
}

// useObject takes a shared lock on an object, or returns nil if it is not
// there.
func (s *Store) useObject(r objRef) (*flock, error) {
	l, err := lockFile(s.objLock(r), unix.LOCK_SH, false)
	if err != nil || l == nil {
		return nil, err
	}
	if _, err := os.Stat(s.objPath(r.kind, r.digest)); err != nil {
		l.release()
		return nil, nil
	}
	return l, nil
}

// commitObject moves a finished object (the directory dir, holding the
// object's file, synced) into the cache under its digest, and returns a
// shared lock on the object in place: dir's own, or, when the same
// content is there already, the existing one's (dir is then removed).
func (s *Store) commitObject(k objKind, digest, dir string) (*flock, error) {
	r := objRef{k, digest}
	l, err := lockFile(filepath.Join(dir, "lock"), unix.LOCK_SH, true)
	if err != nil {
		return nil, err
	}
	dst := filepath.Join(s.objDir(k), digestHex(digest))
	for range 10 {
		err := os.Rename(dir, dst)
		if err == nil {
			if err := syncDir(s.objDir(k)); err != nil {
				l.release()
				return nil, err
			}
			return l, nil
		}
		if !errors.Is(err, fs.ErrExist) && !errors.Is(err, unix.ENOTEMPTY) {
			l.release()
			return nil, err
		}
		existing, err := s.useObject(r)
		if err != nil {
			l.release()
			return nil, err
		}
		if existing != nil {
			l.release()
			os.RemoveAll(dir)
			return existing, nil
		}
		// Collected between the two: try again.
	}
	l.release()
	return nil, fmt.Errorf("commit %s: the object keeps changing", dst)
}

// Lease keeps a template's files in place while a run uses them: Remove,
// Prune and a new create of the same name do not delete files a lease
// holds. It is a shared flock on each file's object, so it ends with the
// process at the latest.
type Lease struct {
	Template *Template
	locks    []*flock
}

// Release ends the lease. The files may go at once.
func (l *Lease) Release() {
	for _, k := range l.locks {
		k.release()
	}
	l.locks = nil
}

// useAll leases every object of t, or none (false) if one is missing.
func (s *Store) useAll(t *Template) (*Lease, bool, error) {
	l := &Lease{Template: t}
	for _, o := range t.objects() {
		k, err := s.useObject(o)
		if err != nil || k == nil {
			l.Release()
			return nil, false, err
		}
		l.locks = append(l.locks, k)
	}
	return l, true, nil
}

// Use returns the template called name, leased: its files stay until
// Release, even if the template is removed or created again meanwhile
// (the run keeps the revision it started with). A run takes the lease
// before it opens the files and releases it once its VM has stopped.
func (s *Store) Use(name string) (*Lease, error) {
	for range 3 {
		t, err := s.Get(name)
		if err != nil {
			return nil, err
		}
		l, ok, err := s.useAll(t)
		if err != nil {
			return nil, fmt.Errorf("template %q: %w", name, err)
		}
		if ok {
			return l, nil
		}
		// Replaced, and the old files collected, since the record was
		// read: read it again.
	}
	return nil, fmt.Errorf("%w: template %q: its image is gone from %s (was the cache cleared?); create the template again", ErrMissing, name, s.cache)
}

// references are the objects records refer to: every named template's,
// and with implicit, the implicit ones' too.
func (s *Store) references(implicit bool) (map[string]bool, map[string]bool, error) {
	ts, err := s.List()
	if err != nil {
		return nil, nil, err
	}
	if implicit {
		imp, err := s.ListImplicit()
		if err != nil {
			return nil, nil, err
		}
		ts = append(ts, imp...)
	}
	objs, revs := map[string]bool{}, map[string]bool{}
	for _, t := range ts {
		for _, o := range t.objects() {
			objs[o.kind.dir+"/"+o.digest] = true
		}
		revs[t.Revision] = true
	}
	return objs, revs, nil
}

// collect removes those of the objects cands that nothing refers to and
// nothing uses, and returns the bytes freed. Each is locked exclusively
// first (one in use is skipped): with every candidate locked, no process
// can start referring to one, so the records read then say the truth.
func (s *Store) collect(cands []objRef, implicit bool) (int, int64, error) {
	type held struct {
		r objRef
		l *flock
	}
	var locked []held
	defer func() {
		for _, h := range locked {
			h.l.release()
		}
	}()
	for _, r := range cands {
		l, err := lockFile(s.objLock(r), unix.LOCK_EX|unix.LOCK_NB, false)
		if errors.Is(err, errWouldBlock) || l == nil {
			continue // in use, or gone
		}
		if err != nil {
			return 0, 0, err
		}
		locked = append(locked, held{r, l})
	}
	if len(locked) == 0 {
		return 0, 0, nil
	}
	refs, _, err := s.references(implicit)
	if err != nil {
		return 0, 0, err
	}
	n, freed := 0, int64(0)
	for _, h := range locked {
		if refs[h.r.kind.dir+"/"+h.r.digest] {
			continue
		}
		size := diskusage.Of(s.objPath(h.r.kind, h.r.digest))
		if err := s.trash(filepath.Dir(s.objLock(h.r))); err != nil {
			return n, freed, err
		}
		n++
		freed += size
	}
	if n > 0 {
		s.dropKeys()
	}
	return n, freed, nil
}

// dropKeys removes the source keys of images that are gone.
func (s *Store) dropKeys() {
	dir := filepath.Join(s.cache, "keys")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if k, err := readKey(p); err != nil || !exists(s.objPath(kindImage, k.Image)) {
			os.Remove(p)
		}
	}
}

// trash removes a directory: renamed away first (one step, so that the
// name is free at once and no reader sees it half removed), then deleted.
func (s *Store) trash(dir string) error {
	t := filepath.Join(s.tmpDir(), "trash-"+newRevision())
	if err := os.Rename(dir, t); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return os.RemoveAll(t)
}

// Remove deletes the template called name, and its files unless another
// template (named or implicit) has them or a run holds them (Prune takes
// those later).
func (s *Store) Remove(name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	nl, err := s.lockName(name)
	if err != nil {
		return err
	}
	defer s.unlockName(name, nl)
	t, err := s.Get(name)
	if errors.Is(err, ErrCorrupt) {
		// Nothing of it can be trusted to name files: the record goes,
		// and prune collects what it used.
		if err := os.Remove(s.recordPath(name)); err != nil {
			return fmt.Errorf("remove template %q: %w", name, err)
		}
		return syncDir(s.data)
	}
	if err != nil {
		return err
	}
	if err := os.Remove(s.recordPath(name)); err != nil {
		return fmt.Errorf("remove template %q: %w", name, err)
	}
	if err := syncDir(s.data); err != nil {
		return err
	}
	s.forget(t, true)
	return nil
}

// forget collects what an old template used, and its snapshots; a
// failure only leaves cache for Prune.
func (s *Store) forget(t *Template, implicit bool) {
	if _, _, err := s.collect(t.objects(), implicit); err != nil {
		s.log().Warn("template files left for prune", "template", t.Name, "err", err)
	}
	_, revs, err := s.references(true)
	if err == nil && !revs[t.Revision] {
		s.removeSnapshot(t.Revision)
	}
}

func (s *Store) removeSnapshot(rev string) bool {
	dir := filepath.Join(s.cache, "snapshots", rev)
	if _, err := os.Lstat(dir); err != nil {
		return false
	}
	l, err := lockFile(filepath.Join(dir, "lock"), unix.LOCK_EX|unix.LOCK_NB, false)
	if err != nil {
		return false // in use
	}
	defer l.release()
	return s.trash(dir) == nil
}

// PruneStats says what Prune removed.
type PruneStats struct {
	// Images and Files are converted images and kernels or initrds no
	// template refers to; Implicit the templates UseImage made; Bytes
	// what all that took on disk.
	Images, Files, Implicit int
	Bytes                   int64
	// Work counts leftovers of creates that did not finish.
	Work int
	// InUse counts objects kept because a run holds them.
	InUse int
}

// Prune removes everything of the cache no named template refers to and
// no run uses: the implicit templates of `exec --image`, the images and
// files of removed or replaced templates, snapshots of revisions that
// are gone, and what interrupted creates left.
func (s *Store) Prune() (PruneStats, error) {
	var st PruneStats
	// Interrupted creates: their work directory's lock is free.
	ents, err := os.ReadDir(s.tmpDir())
	if err != nil {
		return st, err
	}
	for _, e := range ents {
		dir := filepath.Join(s.tmpDir(), e.Name())
		if strings.HasPrefix(e.Name(), newPrefix) { // being made: only if it is old
			if fi, err := os.Lstat(dir); err != nil || time.Since(fi.ModTime()) < time.Hour {
				continue
			}
		}
		l, err := lockFile(filepath.Join(dir, "lock"), unix.LOCK_EX|unix.LOCK_NB, false)
		if errors.Is(err, errWouldBlock) {
			continue
		}
		os.RemoveAll(dir)
		l.release()
		st.Work++
	}
	// Implicit templates are cache too.
	refsDir := filepath.Join(s.cache, "refs")
	ents, err = os.ReadDir(refsDir)
	if err != nil {
		return st, err
	}
	for _, e := range ents {
		if os.Remove(filepath.Join(refsDir, e.Name())) == nil && strings.HasSuffix(e.Name(), ".json") {
			st.Implicit++
		}
	}
	for _, k := range []objKind{kindImage, kindFile} {
		ents, err := os.ReadDir(s.objDir(k))
		if err != nil {
			return st, err
		}
		var cands []objRef
		for _, e := range ents {
			if d := "sha256:" + e.Name(); validDigest(d) {
				cands = append(cands, objRef{k, d})
			}
		}
		n, freed, err := s.collect(cands, false)
		if err != nil {
			return st, err
		}
		refs, _, err := s.references(false)
		if err != nil {
			return st, err
		}
		for _, c := range cands {
			if !refs[k.dir+"/"+c.digest] && exists(s.objPath(c.kind, c.digest)) {
				st.InUse++
			}
		}
		st.Bytes += freed
		if k == kindImage {
			st.Images += n
		} else {
			st.Files += n
		}
	}
	s.dropKeys()
	// Snapshots of revisions that are gone.
	_, revs, err := s.references(false)
	if err != nil {
		return st, err
	}
	ents, _ = os.ReadDir(filepath.Join(s.cache, "snapshots"))
	for _, e := range ents {
		if !revs[e.Name()] {
			s.removeSnapshot(e.Name())
		}
	}
	return st, nil
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
