package shm

import (
	"math/rand/v2"
	"testing"
)

func TestBuddy_AllocFreeMerges(t *testing.T) {
	const arena = 8<<20 + 3*MinBlockSize // not a power of two
	b := newBuddy(arena)
	if b.freeLen != arena {
		t.Fatalf("free %d, want %d", b.freeLen, arena)
	}
	r := rand.New(rand.NewPCG(7, 7))
	type blk struct {
		off uint64
		k   uint8
	}
	var live []blk
	used := map[uint64]bool{}
	for i := 0; i < 20000; i++ {
		if len(live) > 0 && (r.IntN(2) == 0 || b.freeLen < 1<<20) {
			j := r.IntN(len(live))
			x := live[j]
			live = append(live[:j], live[j+1:]...)
			b.release(x.off, x.k)
			for o := x.off; o < x.off+MinBlockSize<<x.k; o += MinBlockSize {
				delete(used, o)
			}
			continue
		}
		n := uint64(1 + r.IntN(1<<r.IntN(21)))
		off, k, ok := b.alloc(n)
		if !ok {
			continue
		}
		if MinBlockSize<<k < n || off%(MinBlockSize<<k) != 0 || off+MinBlockSize<<k > arena {
			t.Fatalf("alloc(%d) = off %d order %d: wrong size or alignment", n, off, k)
		}
		for o := off; o < off+MinBlockSize<<k; o += MinBlockSize {
			if used[o] {
				t.Fatalf("alloc(%d) = %d overlaps a live block", n, off)
			}
			used[o] = true
		}
		live = append(live, blk{off, k})
	}
	for _, x := range live {
		b.release(x.off, x.k)
	}
	if b.freeLen != arena {
		t.Fatalf("free %d after freeing all, want %d", b.freeLen, arena)
	}
	if got := b.largestFree(); got != 8<<20 {
		t.Fatalf("largest free block %d after freeing all: buddies did not merge", got)
	}
}

func TestBuddy_Exhaustion(t *testing.T) {
	b := newBuddy(1 << 20)
	var n int
	for {
		if _, _, ok := b.alloc(4096); !ok {
			break
		}
		n++
	}
	if n != (1<<20)/4096 || b.freeLen != 0 {
		t.Fatalf("allocated %d blocks of 4 KiB from 1 MiB, free %d", n, b.freeLen)
	}
	if _, _, ok := b.alloc(2 << 20); ok {
		t.Fatal("allocated more than the arena")
	}
}
