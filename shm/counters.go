package shm

import (
	"sync"
	"sync/atomic"
)

// Each counter has one source of truth: a plain field under a lock the hot
// path already holds, or (for rare events and the receiver, which holds no
// lock) a per-session atomic. Housekeeping copies them into the region header
// for kshm stats; ReadStats sums them over the registry of live sessions
// plus what closed sessions left behind.

// allocCounters are guarded by allocMu.
type allocCounters struct {
	allocs, frees     uint64
	failed, quotaHits uint64 // failed counts quota and no-memory refusals
	reclaimed         uint64 // buffers the peer released back to us
	inUseBufs         int64
	inUseBytes        int64
}

// growCounters are guarded by allocMu.
type growCounters struct {
	grows, shrinks      uint64 // regions added (acknowledged by the peer) and released
	limit, peer, memory uint64 // allocations refused because the regions could not grow, by reason
}

// sendCounters are guarded by sendMu.
type sendCounters struct {
	msgs, bytes, bufs uint64
	wakeupsSaved      uint64
	futexWakeups      uint64 // wake-ups through the peer's futex (wake.go)
}

// eventCounters are per-session atomics: the receiver's (written by the
// Recv turn's holder, which holds no lock) and those of rare events (the
// reader, inline sends, wake-up writes, refusals before the lock).
type eventCounters struct {
	bytes       atomic.Uint64 // bytes of the buffers received
	emptyRecv   atomic.Uint64 // messages received without a buffer
	sleeps      atomic.Uint64
	inlineRecv  atomic.Uint64
	inlineSent  atomic.Uint64
	wakeupsSent atomic.Uint64
	tooLarge    atomic.Uint64 // Alloc refusals before the lock
}

// corruptSessions counts sessions closed for corrupt peer input.
var corruptSessions atomic.Uint64

// registry holds the live sessions, and the totals of closed ones.
var registry struct {
	mu      sync.Mutex
	live    map[*Session]struct{}
	retired Stats // monotonic counters of closed sessions
}

func register(s *Session) {
	registry.mu.Lock()
	if registry.live == nil {
		registry.live = make(map[*Session]struct{})
	}
	registry.live[s] = struct{}{}
	registry.mu.Unlock()
}

// unregister removes a closing session, keeping its monotonic counters.
func unregister(s *Session) {
	st := s.counts()
	registry.mu.Lock()
	delete(registry.live, s)
	r := &registry.retired
	addStats(r, &st)
	registry.mu.Unlock()
}

func addStats(t *Stats, st *SessionStats) {
	t.Allocs += st.Allocs
	t.Frees += st.Frees
	t.FailedAllocs += st.FailedAllocs
	t.MsgsSent += st.MsgsSent
	t.MsgsRecv += st.MsgsRecv
	t.BytesSent += st.BytesSent
	t.BytesRecv += st.BytesRecv
	t.WakeupsSent += st.WakeupsSent
	t.WakeupsSaved += st.WakeupsSaved
	t.FutexWakeups += st.FutexWakeups
	t.InlineSent += st.InlineSent
	t.InlineRecv += st.InlineRecv
	t.Grows += st.Grows
	t.Shrinks += st.Shrinks
	t.GrowFallbacks.Limit += st.GrowFallbacks.Limit
	t.GrowFallbacks.PeerLimit += st.GrowFallbacks.PeerLimit
	t.GrowFallbacks.Memory += st.GrowFallbacks.Memory
}

// ReadStats returns the process-wide counters: the sum over live sessions,
// plus the monotonic counters of closed ones. Buffers of a closed session
// are not in use. Buffers the peer has released but this process has not
// yet reclaimed count as in use until a session's next allocation or
// housekeeping pass (at most a few hundred ms).
func ReadStats() Stats {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	t := registry.retired
	for s := range registry.live {
		st := s.counts()
		addStats(&t, &st)
		t.InUseBuffers += st.InUseBuffers
		t.InUseBytes += st.InUseBytes
		t.CommittedBytes += st.CommittedBytes
		t.PeerMappedBytes += st.PeerMappedBytes
		t.Regions += int64(st.Regions)
		t.PeerRegions += int64(st.PeerRegions)
	}
	t.Sessions = int64(len(registry.live))
	t.Corrupt = corruptSessions.Load()
	return t
}

// counts reads the session's counters, taking each lock briefly. It touches
// no mapping.
func (s *Session) counts() SessionStats {
	var st SessionStats
	s.allocMu.Lock()
	a := s.allocCounts
	gc := s.growCounts
	for _, lr := range s.locals {
		if lr != nil && lr.r != nil {
			st.ArenaFree += lr.buddy.freeLen
			st.ArenaSize += lr.r.geo.arenaSize
			st.CommittedBytes += lr.size
			st.Regions++
		}
	}
	s.allocMu.Unlock()
	st.PeerMappedBytes = s.peerMapped.Load()
	st.PeerRegions = 1
	for i := 1; i < MaxRegions; i++ {
		if p := s.peerRegs[i].Load(); p != nil && !p.unmapped.Load() {
			st.PeerRegions++
		}
	}
	st.Grows, st.Shrinks = gc.grows, gc.shrinks
	st.GrowFallbacks = GrowFallbacks{Limit: gc.limit, PeerLimit: gc.peer, Memory: gc.memory}
	s.sendMu.Lock()
	sc := s.sendCounts
	s.sendMu.Unlock()
	r := &s.events
	st.Allocs, st.Frees = a.allocs, a.frees
	st.FailedAllocs = a.failed + r.tooLarge.Load()
	st.QuotaHits = a.quotaHits
	st.InUseBuffers, st.InUseBytes = a.inUseBufs, a.inUseBytes
	st.PeerHeld = int64(sc.bufs - a.reclaimed)
	st.HeldFromPeer = s.heldFromPeer()
	st.MsgsSent, st.BytesSent = sc.msgs, sc.bytes
	st.WakeupsSaved = sc.wakeupsSaved
	st.MsgsRecv, st.BytesRecv = s.recvTurn.published(), r.bytes.Load()
	st.WakeupsSent = r.wakeupsSent.Load() + sc.futexWakeups
	st.FutexWakeups = sc.futexWakeups
	st.Sleeps = r.sleeps.Load()
	st.InlineSent, st.InlineRecv = r.inlineSent.Load(), r.inlineRecv.Load()
	if s.life.closed() {
		// Every buffer of ours returned with the region.
		st.InUseBuffers, st.InUseBytes, st.PeerHeld = 0, 0, 0
	}
	return st
}

// heldFromPeer is the number of the peer's buffers received and not yet
// released.
func (s *Session) heldFromPeer() int64 {
	s.relMu.Lock()
	rel := s.released
	s.relMu.Unlock()
	return int64(s.segsReceived() - rel)
}

// segsReceived is the number of the peer's buffers received: the
// descriptors consumed (our consumer index of the peer's ring, which the
// Recv turn stores in our header with each message) but those of empty
// messages. After close it is the index the Recv turn had when it settled.
func (s *Session) segsReceived() uint64 {
	if s.life.beginOp() {
		head := atomic.LoadUint64(&s.localHdr.PeerRingHead)
		s.life.endOp()
		return head - s.events.emptyRecv.Load()
	}
	<-s.recvDrained // soon after close: the turn's holder leaves at once
	return s.finalHead - s.events.emptyRecv.Load()
}

// Stats returns the session's counters, after reclaiming what the peer has
// released.
func (s *Session) Stats() SessionStats {
	s.reclaim()
	return s.counts()
}

// publishCounters copies the counters into our region's header, for
// operators (kshm stats). Called by housekeeping inside an operation.
func (s *Session) publishCounters() {
	st := s.counts()
	c := &s.localHdr.Counters
	put := func(p *uint64, v uint64) { atomic.StoreUint64(p, v) }
	put(&c.Allocs, st.Allocs)
	put(&c.Frees, st.Frees)
	put(&c.FailedAllocs, st.FailedAllocs)
	put(&c.InUseBuffers, uint64(st.InUseBuffers))
	put(&c.InUseBytes, uint64(st.InUseBytes))
	put(&c.MsgsSent, st.MsgsSent)
	put(&c.MsgsRecv, st.MsgsRecv)
	put(&c.BytesSent, st.BytesSent)
	put(&c.BytesRecv, st.BytesRecv)
	put(&c.WakeupsSent, st.WakeupsSent)
	put(&c.WakeupsSaved, st.WakeupsSaved)
	put(&c.Sleeps, st.Sleeps)
	put(&c.InlineSent, st.InlineSent)
	put(&c.InlineRecv, st.InlineRecv)
	put(&c.QuotaHits, st.QuotaHits)
	put(&c.PeerHeld, uint64(st.PeerHeld))
	g := &s.localHdr.Growth
	put(&g.Committed, st.CommittedBytes)
	put(&g.PeerMapped, st.PeerMappedBytes)
	put(&g.Regions, uint64(st.Regions)<<32|uint64(st.PeerRegions))
	put(&g.Grows, st.Grows)
	put(&g.Shrinks, st.Shrinks)
	put(&g.FallbackLimit, st.GrowFallbacks.Limit)
	put(&g.FallbackPeer, st.GrowFallbacks.PeerLimit)
	put(&g.FallbackMemory, st.GrowFallbacks.Memory)
	put(&s.localHdr.Wake.FutexWakeups, st.FutexWakeups)
}
