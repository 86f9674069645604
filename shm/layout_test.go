package shm

import (
	"testing"
	"unsafe"
)

// TestLayout_Pinned fails loudly when a shared structure changes size or
// shape: the peer may be another build, so the layout is a wire format.
func TestLayout_Pinned(t *testing.T) {
	var h regionHeader
	checks := []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof regionHeader", unsafe.Sizeof(h), headerSize},
		{"offset State", unsafe.Offsetof(h.State), 128},
		{"offset Heartbeat", unsafe.Offsetof(h.Heartbeat), 136},
		{"offset Closing", unsafe.Offsetof(h.Closing), 144},
		{"offset RingTail", unsafe.Offsetof(h.RingTail), 256},
		{"offset PeerRingHead", unsafe.Offsetof(h.PeerRingHead), 384},
		{"offset RelTail", unsafe.Offsetof(h.RelTail), 512},
		{"offset PeerRelHead", unsafe.Offsetof(h.PeerRelHead), 640},
		{"offset Counters", unsafe.Offsetof(h.Counters), 768},
		{"offset ArenaOff", unsafe.Offsetof(h.ArenaOff), 64},
		{"offset MaxMessage", unsafe.Offsetof(h.MaxMessage), 80},
		{"offset Role", unsafe.Offsetof(h.Role), 104},
		{"offset PeerPID", unsafe.Offsetof(h.PeerPID), 108},
		{"offset Region", unsafe.Offsetof(h.Region), 112},
		{"offset MaxTotal", unsafe.Offsetof(h.MaxTotal), 120},
		{"offset Growth", unsafe.Offsetof(h.Growth), 896},
		{"sizeof growthCounters", unsafe.Sizeof(growthCounters{}), 64},
		{"offset desc.Region", unsafe.Offsetof(desc{}.Region), 44},
		{"offset slotMeta.Region", unsafe.Offsetof(slotMeta{}.Region), 48},
		{"sizeof counters", unsafe.Sizeof(counters{}), 128},
		{"sizeof desc", unsafe.Sizeof(desc{}), descSize},
		{"offset desc.Len", unsafe.Offsetof(desc{}.Len), 24},
		{"offset desc.Seq", unsafe.Offsetof(desc{}.Seq), 36},
		{"offset desc.Flags", unsafe.Offsetof(desc{}.Flags), 42},
		{"sizeof slotMeta", unsafe.Sizeof(slotMeta{}), slotSize},
		{"offset slotMeta.Time", unsafe.Offsetof(slotMeta{}.Time), 40},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

func TestGeometry_Fits(t *testing.T) {
	for _, size := range []uint64{1 << 20, 8 << 20, 64 << 20} {
		g := computeGeometry(size, 4096, 4096, 4096)
		if g.arenaOff%pageSize != 0 || g.arenaOff+g.arenaSize > size || g.arenaSize%MinBlockSize != 0 {
			t.Fatalf("size %d: bad geometry %+v", size, g)
		}
		if g.slotOff < g.relOff+g.relEntries*relEntrySize || g.relOff < g.ringOff+g.ringEntries*descSize {
			t.Fatalf("size %d: overlapping parts %+v", size, g)
		}
	}
}
