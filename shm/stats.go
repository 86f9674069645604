package shm

// Stats are process-wide counters over every session of this process.
type Stats struct {
	Sessions     int64  // open sessions
	Allocs       uint64 // buffers allocated
	Frees        uint64 // buffers returned (freed locally or released by the peer)
	FailedAllocs uint64 // allocations refused (no memory, quota, too large)
	InUseBuffers int64  // buffers allocated and not yet returned
	InUseBytes   int64  // bytes of those buffers (block sizes)
	MsgsSent     uint64
	MsgsRecv     uint64
	BytesSent    uint64
	BytesRecv    uint64
	WakeupsSent  uint64 // sends that woke the peer (a system call)
	FutexWakeups uint64 // of those, through the peer's futex rather than the socket
	WakeupsSaved uint64 // sends that found the peer awake: no syscall
	InlineSent   uint64 // messages carried on the socket (fallback)
	InlineRecv   uint64
	Corrupt      uint64 // sessions closed for corrupt peer input
	// Regions (grow.go): bytes of our regions (committed) and of the
	// peers' regions we map, over open sessions, and how many regions.
	CommittedBytes  uint64
	PeerMappedBytes uint64
	Regions         int64
	PeerRegions     int64
	Grows, Shrinks  uint64        // regions added and released
	GrowFallbacks   GrowFallbacks // allocations refused because regions could not grow, by reason
}

// SessionStats are one session's counters.
type SessionStats struct {
	Allocs, Frees, FailedAllocs uint64
	InUseBuffers, InUseBytes    int64
	PeerHeld                    int64 // our buffers the peer holds now
	HeldFromPeer                int64 // peer's buffers we hold (received, not released)
	MsgsSent, MsgsRecv          uint64
	BytesSent, BytesRecv        uint64
	WakeupsSent, WakeupsSaved   uint64
	FutexWakeups                uint64 // of WakeupsSent, through the peer's futex
	Sleeps                      uint64
	InlineSent, InlineRecv      uint64
	QuotaHits                   uint64
	ArenaSize, ArenaFree        uint64 // of all our regions
	CommittedBytes              uint64 // bytes of our regions (Session.Regions has each)
	PeerMappedBytes             uint64 // bytes of the peer's regions we map
	Regions, PeerRegions        int    // our regions and the peer's mapped, base included
	Grows, Shrinks              uint64 // regions added and released
	GrowFallbacks               GrowFallbacks
}
