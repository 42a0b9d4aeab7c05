package ext4

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/mvm-sh/mvm/internal/ext4/ext4craft"
)

// FuzzReader opens an image and walks everything in it (every directory
// once, every file's data into a discarding writer, symlinks, attributes),
// as a write-back does. Whatever the bytes, that must end, without a
// panic, within the reader's read budget. The seeds are real images made
// by mkfs.ext4 -d (and debugfs) and the hostile variants of
// TestHostileImages.
//
//	go test -run '^$' -fuzz FuzzReader -fuzztime 30s -fuzzminimizetime 5s ./internal/ext4/
//
// (Inputs are whole images, 64 KiB: minimizing one with the default
// minimization time would take the whole run.)
func FuzzReader(f *testing.F) {
	base := smallImage(f, "96K")
	f.Add(base)
	for _, edit := range []func(im *ext4craft.Image) error{
		func(im *ext4craft.Image) error { return im.EndlessExtents(lookup(im, "upper/three-blocks")) },
		func(im *ext4craft.Image) error { return im.SharedExtents(lookup(im, "upper/three-blocks")) },
		func(im *ext4craft.Image) error { return im.SetSize(lookup(im, "upper/many"), 256<<30) },
		func(im *ext4craft.Image) error { return im.Rename(lookup(im, "upper"), "small", []byte("../x")) },
		func(im *ext4craft.Image) error { return im.Rename(lookup(im, "upper"), "fast", []byte("gone")) },
		func(im *ext4craft.Image) error {
			return im.SetEntryIno(lookup(im, "upper/many"), strings.Repeat("n", 20)+"3", lookup(im, "upper"))
		},
	} {
		f.Add(craft(f, base, edit))
	}
	f.Fuzz(func(t *testing.T, img []byte) {
		fsys, err := Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) && !errors.Is(err, ErrNeedsRecovery) {
				t.Fatalf("Open: an error of no known class: %v", err)
			}
			return
		}
		_, _ = walkAll(fsys)
		// Again without checksums, as if the guest had recomputed
		// them all: the structural checks must hold on their own.
		fsys, err = Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			return
		}
		fsys.csum = false
		_, _ = walkAll(fsys)
		if used := BudgetFactor*int64(len(img)) + BudgetSlack - fsys.budget.Load(); used > BudgetFactor*int64(len(img))+BudgetSlack {
			t.Fatalf("read %d bytes of a %d-byte image, past the budget", used, len(img))
		}
	})
}
