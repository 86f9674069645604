package shm

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// A region is laid out as:
//
//	[0, 4096)            regionHeader: identity, geometry, hot indexes, counters
//	[ringOff, +E*64)     send ring: E descriptors of 64 bytes (E a power of two)
//	[relOff, +R*8)       release ring: R entries of 8 bytes (R a power of two)
//	[slotOff, +S*64)     buffer table: S slots of metadata for this side's buffers
//	[arenaOff, size)     payload arena, carved by the buddy allocator
//
// That is the base region (index 0), made at the handshake. A grown region
// (index 1 to MaxRegions-1, grow.go) has the same header, with Region set
// and no rings or buffer table: its arena starts at headerSize. Buffers of
// every region share the base region's buffer table and rings; a descriptor
// and a slot name the region their bytes are in.
//
// Every part is written only by the process that created the region; the
// peer maps it read-only.

const (
	regionMagic   = 0x314745524d48534b // "KSHMREG1" little-endian
	layoutVersion = 2                  // 2: regions grow (desc.Region, slotMeta.Region, header Region and MaxTotal)
	headerSize    = 4096
	descSize      = 64
	relEntrySize  = 8
	slotSize      = 64
	pageSize      = 4096
)

// regionHeader is cast over the first page of a region. Hot indexes sit
// 128 bytes apart so that the producer's and consumer's words never share a
// cache line (or an adjacent-line prefetch pair).
type regionHeader struct {
	Magic       uint64 // regionMagic
	Version     uint32 // layoutVersion
	HeaderSize  uint32 // headerSize
	Size        uint64 // bytes of the whole region
	RingOff     uint64
	RingEntries uint32
	DescSize    uint32
	RelOff      uint64
	RelEntries  uint32
	SlotCount   uint32
	SlotOff     uint64
	ArenaOff    uint64
	ArenaSize   uint64
	MaxMessage  uint64
	BlockSize   uint32
	PID         uint32 // creator's pid
	CreatedUnix int64  // creation time, unix nanoseconds
	Role        uint32 // roleClient or roleServer
	PeerPID     uint32 // the peer's pid (SO_PEERCRED), for operators
	Region      uint32 // 0 for the base region, else the grown region's index
	_           [4]byte
	MaxTotal    uint64 // the owner's limit on the bytes of all its regions together

	// State word of the owner's receiver: the low 31 bits count goroutines
	// sleeping until the peer makes progress, bit 31 says they sleep on a
	// futex (wake.go); the high 32 bits are an epoch bumped each time one
	// goes to sleep.
	State     uint64
	Heartbeat int64 // unix nanoseconds, updated by the owner's housekeeper
	Closing   uint32
	_         [108]byte

	RingTail     uint64 // producer index of our send ring
	_            [120]byte
	PeerRingHead uint64 // our consumer index of the peer's send ring
	_            [120]byte
	RelTail      uint64 // producer index of our release ring
	_            [120]byte
	PeerRelHead  uint64 // our consumer index of the peer's release ring
	_            [120]byte

	Counters counters       // owner's counters, for operators (kshm stats)
	Growth   growthCounters // owner's regions, for operators (base region only)
	Wake     wakeCounters   // after Growth, so older readers still find the fields above
	_        [headerSize - 768 - unsafe.Sizeof(counters{}) - unsafe.Sizeof(growthCounters{}) - unsafe.Sizeof(wakeCounters{})]byte
}

// wakeCounters detail the owner's wake-ups; written by the owner with
// atomics at each housekeeping pass.
type wakeCounters struct {
	FutexWakeups uint64 // of Counters.WakeupsSent, those through the peer's futex
}

// growthCounters describe the owner's regions; written by the owner with
// atomics at each housekeeping pass.
type growthCounters struct {
	Committed      uint64 // bytes of the owner's regions
	PeerMapped     uint64 // bytes of the peer's regions the owner maps
	Regions        uint64 // owner's regions << 32 | the peer's regions it maps
	Grows          uint64
	Shrinks        uint64
	FallbackLimit  uint64 // allocations refused: RegionSize or MaxRegions reached
	FallbackPeer   uint64 // allocations refused: the peer's limit reached
	FallbackMemory uint64 // allocations refused: no memory for a region
}

// counters are written by the owner with atomics and read by anyone.
type counters struct {
	Allocs       uint64
	Frees        uint64
	FailedAllocs uint64
	InUseBuffers uint64
	InUseBytes   uint64
	MsgsSent     uint64
	MsgsRecv     uint64
	BytesSent    uint64
	BytesRecv    uint64
	WakeupsSent  uint64 // sends that had to wake the peer (a system call)
	WakeupsSaved uint64 // sends that found the peer awake (no syscall)
	Sleeps       uint64 // times our receiver went to sleep
	InlineSent   uint64 // messages carried on the socket (fallback)
	InlineRecv   uint64
	QuotaHits    uint64
	PeerHeld     uint64 // our buffers currently held by the peer
}

const (
	roleClient = 1
	roleServer = 2
)

// desc is one descriptor of a send ring: one segment of a message.
type desc struct {
	ID     uint64 // message id chosen by the sender's user
	Aux    uint64 // user word (e.g. stream id)
	Off    uint64 // offset of the segment in the sender's arena
	Len    uint32 // bytes of the segment
	Slot   uint32 // sender's buffer-table slot, noSlot when Len == 0
	Gen    uint32 // generation of the slot, echoed back on release
	Seq    uint32 // per-ring sequence number, checked by the receiver
	Kind   uint16 // user kind
	Flags  uint16 // descMore: another segment of the same message follows
	Region uint32 // index of the sender's region holding the segment (0: base)
	_      [16]byte
}

const (
	descMore = 1 << 0
	noSlot   = ^uint32(0)
)

// slotMeta describes one buffer of the owner's arena. The owner keeps it in
// the region so that a dump tool can show what is in use.
type slotMeta struct {
	Off    uint64 // arena offset
	Size   uint32 // block size
	Len    uint32 // bytes requested
	State  uint32 // slotFree, slotLocal or slotSent
	Gen    uint32
	ID     uint64 // message id it was sent with
	Aux    uint64
	Time   int64  // unix nanoseconds of allocation, then of sending
	Region uint32 // index of the region holding the buffer (0: base)
	_      [12]byte
}

const (
	slotFree  = 0
	slotLocal = 1 // allocated, not sent
	slotSent  = 2 // held by the peer
)

// geometry is the computed layout of a region.
type geometry struct {
	size                 uint64
	ringOff, ringEntries uint64
	relOff, relEntries   uint64
	slotOff, slotCount   uint64
	arenaOff, arenaSize  uint64
	maxMessage           uint64 // the owner's MaxMessage, copied once at validation
	maxTotal             uint64 // the owner's MaxTotal, copied once at validation
	index                uint32 // region index: 0 base, else grown
}

func roundUp(x, to uint64) uint64 { return (x + to - 1) / to * to }

func nextPow2(x uint64) uint64 {
	p := uint64(1)
	for p < x {
		p <<= 1
	}
	return p
}

// computeGeometry lays out a region of size bytes with ringEntries
// descriptors, relEntries release entries and slotCount buffer slots.
func computeGeometry(size, ringEntries, relEntries, slotCount uint64) geometry {
	g := geometry{size: size, ringEntries: ringEntries, relEntries: relEntries, slotCount: slotCount}
	g.ringOff = headerSize
	g.relOff = g.ringOff + ringEntries*descSize
	g.slotOff = roundUp(g.relOff+relEntries*relEntrySize, 64)
	g.arenaOff = roundUp(g.slotOff+slotCount*slotSize, pageSize)
	if g.arenaOff < size {
		g.arenaSize = (size - g.arenaOff) / MinBlockSize * MinBlockSize
	}
	return g
}

// arenaCapacity is the arena a region of these settings has, assuming the
// peer's quota equals ours (used to validate a Config before a session).
func arenaCapacity(regionSize, ringEntries, maxBuffers int) int {
	g := computeGeometry(uint64(regionSize), uint64(ringEntries), nextPow2(uint64(maxBuffers)), uint64(maxBuffers))
	return int(g.arenaSize)
}

// validateHeader checks a peer's region header against the mapping size and
// our limits. Each failure is its own error wrapping ErrCorrupt.
func validateHeader(h *regionHeader, mapped uint64) (geometry, error) {
	bad := func(format string, a ...any) (geometry, error) {
		return geometry{}, fmt.Errorf("%w: region header: "+format, append([]any{ErrCorrupt}, a...)...)
	}
	if h.Magic != regionMagic {
		return bad("magic %#x, want %#x", h.Magic, uint64(regionMagic))
	}
	if h.Version != layoutVersion {
		return bad("layout version %d, want %d", h.Version, layoutVersion)
	}
	if h.HeaderSize != headerSize || h.DescSize != descSize {
		return bad("header size %d / descriptor size %d, want %d / %d", h.HeaderSize, h.DescSize, headerSize, descSize)
	}
	if h.Size != mapped {
		return bad("size %d differs from the mapping (%d bytes)", h.Size, mapped)
	}
	maxTotal := atomic.LoadUint64(&h.MaxTotal)
	if maxTotal < mapped || maxTotal > MaxRegionSize {
		return bad("maximum total %d for a region of %d bytes", maxTotal, mapped)
	}
	if h.Region != 0 {
		return validateGrownHeader(h, mapped, maxTotal)
	}
	re, rl, sc := uint64(h.RingEntries), uint64(h.RelEntries), uint64(h.SlotCount)
	if re < MinRingEntries || re > MaxRingEntries || re&(re-1) != 0 {
		return bad("ring entries %d", re)
	}
	if rl == 0 || rl > MaxRingEntries || rl&(rl-1) != 0 {
		return bad("release entries %d", rl)
	}
	if sc == 0 || sc > MaxRingEntries {
		return bad("slot count %d", sc)
	}
	g := computeGeometry(mapped, re, rl, sc)
	if h.RingOff != g.ringOff || h.RelOff != g.relOff || h.SlotOff != g.slotOff || h.ArenaOff != g.arenaOff || h.ArenaSize != g.arenaSize {
		return bad("offsets ring=%d rel=%d slot=%d arena=%d+%d, want %d %d %d %d+%d",
			h.RingOff, h.RelOff, h.SlotOff, h.ArenaOff, h.ArenaSize, g.ringOff, g.relOff, g.slotOff, g.arenaOff, g.arenaSize)
	}
	if g.arenaSize == 0 || g.arenaOff+g.arenaSize > mapped {
		return bad("arena %d+%d outside mapping of %d bytes", g.arenaOff, g.arenaSize, mapped)
	}
	if h.BlockSize != MinBlockSize {
		return bad("block size %d, want %d", h.BlockSize, MinBlockSize)
	}
	// Read once: the peer can rewrite its header after we checked it.
	maxMsg := atomic.LoadUint64(&h.MaxMessage)
	if maxMsg == 0 || maxMsg > max(g.arenaSize, maxTotal) {
		return bad("max message %d for an arena of %d (at most %d bytes of regions)", maxMsg, g.arenaSize, maxTotal)
	}
	g.maxMessage = maxMsg
	g.maxTotal = maxTotal
	return g, nil
}

// computeGrownGeometry lays out a grown region of size bytes: the header
// page, then the arena.
func computeGrownGeometry(size uint64) geometry {
	g := geometry{size: size, arenaOff: headerSize}
	if size > headerSize {
		g.arenaSize = (size - headerSize) / MinBlockSize * MinBlockSize
	}
	return g
}

// validateGrownHeader checks the header of a grown region (Region != 0):
// no rings, no buffer table, the arena right after the header.
func validateGrownHeader(h *regionHeader, mapped, maxTotal uint64) (geometry, error) {
	bad := func(format string, a ...any) (geometry, error) {
		return geometry{}, fmt.Errorf("%w: grown region header: "+format, append([]any{ErrCorrupt}, a...)...)
	}
	if h.Region >= MaxRegions {
		return bad("region index %d, at most %d", h.Region, MaxRegions-1)
	}
	if h.RingEntries != 0 || h.RelEntries != 0 || h.SlotCount != 0 || h.RingOff != 0 || h.RelOff != 0 || h.SlotOff != 0 {
		return bad("rings or buffer table (ring %d, release %d, slots %d)", h.RingEntries, h.RelEntries, h.SlotCount)
	}
	g := computeGrownGeometry(mapped)
	if h.ArenaOff != g.arenaOff || h.ArenaSize != g.arenaSize || g.arenaSize == 0 {
		return bad("arena %d+%d, want %d+%d", h.ArenaOff, h.ArenaSize, g.arenaOff, g.arenaSize)
	}
	if h.BlockSize != MinBlockSize {
		return bad("block size %d, want %d", h.BlockSize, MinBlockSize)
	}
	g.maxMessage = atomic.LoadUint64(&h.MaxMessage)
	g.maxTotal = maxTotal
	g.index = h.Region
	return g, nil
}
