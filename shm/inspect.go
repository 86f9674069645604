package shm

import (
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// RegionInfo describes one region as its header and buffer table show it.
// Operator tools (cmd/kshm) read it from a live process's memfd, read-only,
// without the process's help.
type RegionInfo struct {
	PID, PeerPID int
	Role         string // "client" or "server"
	Size         uint64
	ArenaSize    uint64
	RingOff      uint64 // offsets of the parts in the region
	RelOff       uint64
	SlotOff      uint64
	ArenaOff     uint64
	MaxMessage   uint64
	RingEntries  int
	RelEntries   int
	Slots        int
	Created      time.Time
	Heartbeat    time.Time // last housekeeping pass of the owner
	Closing      bool
	Sleepers     uint32 // owner's receivers asleep now
	RingTail     uint64 // messages the owner has published
	PeerRingHead uint64 // messages of the peer the owner has consumed
	RelTail      uint64 // peer buffers the owner has released
	PeerRelHead  uint64 // owner buffers it has got back
	Counters     RegionCounters
	Buffers      []BufferInfo // every slot not free
	// Index is 0 for a session's base region (which holds the rings, the
	// buffer table, the counters and Growth), else a grown region's index.
	Index    int
	MaxTotal uint64     // the owner's limit on all its regions of the session together
	Growth   GrowthInfo // base region only
}

// GrowthInfo describes the regions of the owner's session, from its base
// region header (published at each housekeeping pass).
type GrowthInfo struct {
	Committed, PeerMapped uint64 // bytes of the owner's regions, and of the peer's it maps
	Regions, PeerRegions  int
	Grows, Shrinks        uint64
	// Allocations refused because the regions could not grow: our maximum,
	// the peer's limit, no memory for a region.
	FallbackLimit, FallbackPeer, FallbackMemory uint64
}

// RegionCounters are the owner's counters kept in the region header.
type RegionCounters struct {
	Allocs, Frees, FailedAllocs, InUseBuffers, InUseBytes uint64
	MsgsSent, MsgsRecv, BytesSent, BytesRecv              uint64
	WakeupsSent, WakeupsSaved, Sleeps                     uint64
	FutexWakeups                                          uint64 // of WakeupsSent
	InlineSent, InlineRecv, QuotaHits, PeerHeld           uint64
}

// BufferInfo is one buffer of the owner's arena that is in use.
type BufferInfo struct {
	Slot    int
	State   string // "local" (allocated, not sent) or "peer" (held by the peer)
	Offset  uint64 // in the arena
	Size    uint64 // block size
	Len     uint64 // bytes requested
	ID, Aux uint64 // message id and user word it was sent with
	Since   time.Time
	Data    []byte // the buffer's bytes, a slice of mem (Len bytes); nil for a buffer in a grown region
	Region  int    // the region holding it: 0 the base region, else a grown one
}

// InspectRegion validates the region mapped at mem and describes it. mem is
// read, never written; every offset is checked against len(mem).
func InspectRegion(mem []byte) (RegionInfo, error) {
	if len(mem) < headerSize {
		return RegionInfo{}, fmt.Errorf("%w: %d bytes, smaller than a region header", ErrCorrupt, len(mem))
	}
	h := at[regionHeader](mem, 0)
	g, err := validateHeader(h, uint64(len(mem)))
	if err != nil {
		return RegionInfo{}, err
	}
	ld := func(p *uint64) uint64 { return atomic.LoadUint64(p) }
	c := &h.Counters
	info := RegionInfo{
		PID: int(h.PID), PeerPID: int(h.PeerPID), Size: h.Size, ArenaSize: g.arenaSize, MaxMessage: h.MaxMessage,
		RingOff: g.ringOff, RelOff: g.relOff, SlotOff: g.slotOff, ArenaOff: g.arenaOff,
		RingEntries: int(g.ringEntries), RelEntries: int(g.relEntries), Slots: int(g.slotCount),
		Created:      time.Unix(0, h.CreatedUnix),
		Heartbeat:    time.Unix(0, atomic.LoadInt64(&h.Heartbeat)),
		Closing:      atomic.LoadUint32(&h.Closing) != 0,
		Sleepers:     uint32(ld(&h.State) & sleeperCount),
		RingTail:     ld(&h.RingTail),
		PeerRingHead: ld(&h.PeerRingHead),
		RelTail:      ld(&h.RelTail),
		PeerRelHead:  ld(&h.PeerRelHead),
		Counters: RegionCounters{
			Allocs: ld(&c.Allocs), Frees: ld(&c.Frees), FailedAllocs: ld(&c.FailedAllocs),
			InUseBuffers: ld(&c.InUseBuffers), InUseBytes: ld(&c.InUseBytes),
			MsgsSent: ld(&c.MsgsSent), MsgsRecv: ld(&c.MsgsRecv), BytesSent: ld(&c.BytesSent), BytesRecv: ld(&c.BytesRecv),
			WakeupsSent: ld(&c.WakeupsSent), WakeupsSaved: ld(&c.WakeupsSaved), Sleeps: ld(&c.Sleeps),
			FutexWakeups: ld(&h.Wake.FutexWakeups),
			InlineSent:   ld(&c.InlineSent), InlineRecv: ld(&c.InlineRecv), QuotaHits: ld(&c.QuotaHits), PeerHeld: ld(&c.PeerHeld),
		},
	}
	info.Index, info.MaxTotal = int(h.Region), g.maxTotal
	gr := &h.Growth
	regs := ld(&gr.Regions)
	info.Growth = GrowthInfo{
		Committed: ld(&gr.Committed), PeerMapped: ld(&gr.PeerMapped),
		Regions: int(regs >> 32), PeerRegions: int(uint32(regs)),
		Grows: ld(&gr.Grows), Shrinks: ld(&gr.Shrinks),
		FallbackLimit: ld(&gr.FallbackLimit), FallbackPeer: ld(&gr.FallbackPeer), FallbackMemory: ld(&gr.FallbackMemory),
	}
	switch h.Role {
	case roleClient:
		info.Role = "client"
	case roleServer:
		info.Role = "server"
	default:
		info.Role = fmt.Sprintf("role %d", h.Role)
	}
	slots := sliceAt[slotMeta](mem, g.slotOff, g.slotCount)
	arena, _ := span(mem, g.arenaOff, g.arenaSize)
	for i := range slots {
		m := slots[i] // a copy: the owner may be changing it
		state := atomic.LoadUint32(&slots[i].State)
		if state == slotFree {
			continue
		}
		b := BufferInfo{Slot: i, Offset: m.Off, Size: uint64(m.Size), Len: uint64(m.Len), ID: m.ID, Aux: m.Aux,
			Since: time.Unix(0, m.Time)}
		switch state {
		case slotLocal:
			b.State = "local"
		case slotSent:
			b.State = "peer"
		default:
			b.State = fmt.Sprintf("state %d", state)
		}
		b.Region = int(m.Region)
		if m.Region != 0 {
			// Its bytes are in a grown region, another mapping.
		} else if d, ok := span(arena, m.Off, uint64(m.Len)); ok {
			b.Data = d
		}
		info.Buffers = append(info.Buffers, b)
	}
	return info, nil
}

// MapRegionFile maps a region read-only from a file, typically
// /proc/<pid>/fd/<n> of a live process. Call unmap when done with the
// RegionInfo's Data slices.
func MapRegionFile(path string) (mem []byte, unmap func(), err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if fi.Size() < headerSize || uint64(fi.Size()) > MaxRegionSize {
		return nil, nil, fmt.Errorf("%s: %d bytes is not a kshm region", path, fi.Size())
	}
	mem, err = unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	return mem, func() { unix.Munmap(mem) }, nil
}

// RegionFiles lists the /proc/<pid>/fd entries that are kshm regions owned
// by the process (memfds named kshm-*). Reading another user's process needs
// the same permission as ptrace; the error says so.
func RegionFiles(pid int) ([]string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		p := dir + "/" + e.Name()
		target, err := os.Readlink(p)
		if err != nil {
			continue
		}
		if strings.HasPrefix(target, "/memfd:kshm-") {
			out = append(out, p)
		}
	}
	return out, nil
}
