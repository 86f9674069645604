package shm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Regions grow in steps. A session starts with its base region (index 0,
// InitialRegionSize bytes). When Alloc finds no block large enough in any
// region, it grows: it makes a grown region (grown, index 1 to MaxRegions-1,
// header and arena only, a sealed memfd like the base one), announces it to
// the peer with a frameGrow carrying the memfd, and allocates from it once
// the peer answers frameGrowAck (the peer has mapped it read-only after
// validation, so no descriptor can name a region the peer has not mapped).
// Our regions together stay within min(RegionSize, the peer's cap of what it
// maps from us); MaxRegions bounds their number.
//
// A grown region that has had no buffer in use (local or held by the peer)
// for ShrinkAfter is released: taken out of the allocator, unmapped, and the
// peer told with frameShrink. The peer has released every buffer of it by
// then (we got them all back), and unmaps its mapping when it holds no
// message from it; it refuses nothing, but keeps the mapping until its last
// message from the region is released, whatever the frame says.
//
// Control frames (frameGrow, frameGrowAck, frameShrink) go through one FIFO
// queue written without blocking by whoever holds the socket's writer lock
// (like wake-ups), so a frameShrink always precedes the frameGrow that
// reuses its index, and the reader, which sends acks, never blocks on a
// write.

const (
	growFrameSize   = 16 // index u32, 0 u32, size u64
	regionFrameSize = 8  // index u32, 0 u32
)

// localRegion is one of our regions as the allocator sees it. allocMu
// guards every field but region, index, base and size, which are fixed.
type localRegion struct {
	r      *region
	index  uint32
	base   uintptr // address of its arena
	size   uint64  // bytes of the region (committed)
	buddy  *buddy
	active bool  // the peer has mapped it (always true for the base region)
	inUse  int   // our buffers in it, local or held by the peer
	idle   int64 // coarse time its last buffer came back; 0 while in use
}

// arenaSpan is the address range of one of our arenas, read without a
// lock to tell our Buffers from others'.
type arenaSpan struct {
	base uintptr
	size uint64
}

// growth is one growth step in progress.
type growth struct {
	done     chan struct{} // closed when it ends; err says how
	err      error         // nil: the region is active (written before done closes)
	deadline time.Time     // an Alloc waits for it at most until then
}

// peerRegion is one of the peer's grown regions, mapped read-only. refs
// counts the received segments in it not yet released, with peerRetired set
// once the peer has released it; the one who brings it to "retired, no
// reference" unmaps it.
type peerRegion struct {
	r        *region
	size     uint64
	refs     atomic.Uint64
	unmapped atomic.Bool
}

const peerRetired = 1 << 63

func (p *peerRegion) acquire() bool {
	for {
		v := p.refs.Load()
		if v&peerRetired != 0 {
			return false
		}
		if p.refs.CompareAndSwap(v, v+1) {
			return true
		}
	}
}

// ctrlFrame is a control frame waiting for the socket; fd, when not -1, is
// passed with its first byte (the fd stays owned by its region).
type ctrlFrame struct {
	b  []byte
	fd int
}

// GrowFallbacks are allocations refused because a region could not grow,
// by reason. The message then goes over the socket.
type GrowFallbacks struct {
	Limit     uint64 // our RegionSize (or MaxRegions) was reached
	PeerLimit uint64 // the peer's cap on what it maps from us was reached, or it did not acknowledge in time
	Memory    uint64 // the machine or the memory cgroup could not back the region
}

// allocAnyLocked allocates n bytes from the first active region with room.
// allocMu held.
func (s *Session) allocAnyLocked(n uint64) (*localRegion, uint64, uint8, bool) {
	for _, lr := range s.locals {
		if lr == nil || !lr.active {
			continue
		}
		if off, k, ok := lr.buddy.alloc(n); ok {
			return lr, off, k, true
		}
	}
	return nil, 0, 0, false
}

// Why a growth step was refused; each wraps ErrNoMemory, so callers fall
// back as for a full arena.
var (
	errGrowLimit   = fmt.Errorf("%w: %w", ErrNoMemory, ErrGrowLimit)
	errGrowPeer    = fmt.Errorf("%w: %w", ErrNoMemory, ErrGrowPeerLimit)
	errGrowUnacked = fmt.Errorf("%w: %w: the peer has not acknowledged a new region in time", ErrNoMemory, ErrGrowPeerLimit)
)

// countGrowFailLocked counts an allocation refused because the regions
// could not grow, by reason. allocMu held.
func (s *Session) countGrowFailLocked(err error) {
	switch {
	case errors.Is(err, ErrGrowLimit):
		s.growCounts.limit++
	case errors.Is(err, ErrGrowPeerLimit):
		s.growCounts.peer++
	case errors.Is(err, ErrInsufficientMemory):
		s.growCounts.memory++
	}
}

// planGrowLocked returns the growth step that may make room for n bytes: the
// one in progress, or a new one (start true: the caller makes the region,
// outside allocMu). It returns an error wrapping ErrNoMemory, counted by
// reason, when the regions cannot grow. allocMu held.
func (s *Session) planGrowLocked(n uint64) (g *growth, index uint32, size uint64, start bool, err error) {
	if s.grow != nil {
		if time.Now().After(s.grow.deadline) {
			return nil, 0, 0, false, errGrowUnacked
		}
		return s.grow, 0, 0, false, nil
	}
	if !s.cfg.grows() {
		return nil, 0, 0, false, ErrNoMemory
	}
	g, index, size, err = s.planStepLocked(n)
	if err != nil && s.releaseUnusedLocked(math.MaxInt64, 0) {
		// Regions with nothing in use made way: a larger one may fit now.
		g, index, size, err = s.planStepLocked(n)
	}
	return g, index, size, err == nil, err
}

// planStepLocked plans one growth step for n bytes, or says why none fits.
// allocMu held.
func (s *Session) planStepLocked(n uint64) (g *growth, index uint32, size uint64, err error) {
	for i := uint32(1); i < MaxRegions; i++ {
		if s.locals[i] == nil {
			index = i
			break
		}
	}
	if index == 0 {
		return nil, 0, 0, errGrowLimit
	}
	need := nextPow2(max(n, MinBlockSize))
	ours := uint64(s.cfg.RegionSize)
	limit := min(ours, s.peerCap)
	room := uint64(0)
	if limit > s.committed {
		room = limit - s.committed
	}
	arena := max(need, floorPow2(s.committed)) // each step about doubles the capacity
	if headerSize+arena > room {
		arena = largestGrownArena(room)
	}
	if arena < need {
		if s.peerCap < ours && ours >= s.committed+headerSize+need {
			return nil, 0, 0, errGrowPeer
		}
		return nil, 0, 0, errGrowLimit
	}
	g = &growth{done: make(chan struct{}), deadline: time.Now().Add(s.cfg.HandshakeTimeout)}
	s.grow = g
	size = headerSize + arena
	s.committed += size                                      // reserved now, so that a concurrent step counts it
	s.locals[index] = &localRegion{index: index, size: size} // reserved: no region yet
	return g, index, size, nil
}

// startGrow makes grown region index of size bytes and announces it. The
// caller holds a hold (the session's mappings stay), not allocMu.
func (s *Session) startGrow(g *growth, index uint32, size uint64) {
	r, err := createGrownRegion(size, index, uint64(s.cfg.MaxMessageSize), uint64(s.cfg.RegionSize), s.role, s.peerPID)
	s.allocMu.Lock()
	if err != nil {
		s.locals[index] = nil
		s.committed -= size
		s.endGrowLocked(g, fmt.Errorf("%w: %w", ErrNoMemory, err))
		s.allocMu.Unlock()
		return
	}
	lr := s.locals[index]
	lr.r, lr.base, lr.buddy = r, addrOf(r.arena), newBuddy(r.geo.arenaSize)
	s.spans[index].Store(&arenaSpan{base: lr.base, size: r.geo.arenaSize})
	s.allocMu.Unlock()
	f := make([]byte, frameHeaderSize+growFrameSize)
	putFrameHeader(f, frameGrow, growFrameSize)
	binary.LittleEndian.PutUint32(f[frameHeaderSize:], index)
	binary.LittleEndian.PutUint64(f[frameHeaderSize+8:], size)
	s.queueCtrl(ctrlFrame{b: f, fd: r.fd})
}

// endGrowLocked ends the growth step in progress. allocMu held.
func (s *Session) endGrowLocked(g *growth, err error) {
	if s.grow == g {
		s.grow = nil
	}
	g.err = err
	close(g.done)
}

// waitGrow waits for a growth step to end, flushing control frames while it
// waits (the socket may have been full), until its deadline or close. nil
// means the step made a region.
func (s *Session) waitGrow(g *growth) error {
	d := 50 * time.Microsecond
	for {
		s.flushCtrl()
		t := time.NewTimer(d)
		select {
		case <-g.done:
			t.Stop()
			return g.err
		case <-s.done:
			t.Stop()
			return s.closedErr()
		case <-t.C:
		}
		if time.Now().After(g.deadline) {
			return errGrowUnacked
		}
		d = min(2*d, 10*time.Millisecond)
	}
}

// growAcked handles the peer's frameGrowAck: the region is mapped there and
// may now be allocated from. Inside an operation.
func (s *Session) growAcked(index uint32) error {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	g := s.grow
	if index == 0 || index >= MaxRegions || s.locals[index] == nil || s.locals[index].r == nil ||
		s.locals[index].active || g == nil {
		return fmt.Errorf("%w: acknowledgement of region %d, which we did not announce", ErrCorrupt, index)
	}
	lr := s.locals[index]
	lr.active = true
	lr.idle = s.coarseNow.Load()
	s.growCounts.grows++
	s.endGrowLocked(g, nil)
	return nil
}

// shrinkIdle releases our grown regions that have had no buffer in use for
// ShrinkAfter. Housekeeping, inside an operation.
func (s *Session) shrinkIdle(now int64) {
	s.allocMu.Lock()
	if s.grow == nil {
		s.releaseUnusedLocked(now, int64(s.cfg.shrinkAfter()))
	}
	s.allocMu.Unlock()
	s.flushCtrl()
}

// releaseUnusedLocked releases our grown regions with no buffer in use
// since at least minIdle before now, queueing a shrink frame for each (the
// caller flushes them after unlocking). It reports whether it released any.
// allocMu held, no growth step in progress, inside an operation or hold.
func (s *Session) releaseUnusedLocked(now, minIdle int64) bool {
	released := false
	for i := uint32(1); i < MaxRegions; i++ {
		lr := s.locals[i]
		if lr == nil || !lr.active || lr.inUse != 0 || lr.idle == 0 || now-lr.idle < minIdle {
			continue
		}
		// No buffer of it is local or held by the peer: nobody has a
		// slice into it, and the peer has released all it received.
		s.locals[i] = nil
		s.spans[i].Store(nil)
		s.committed -= lr.size
		s.growCounts.shrinks++
		lr.r.unmap()
		f := make([]byte, frameHeaderSize+regionFrameSize)
		putFrameHeader(f, frameShrink, regionFrameSize)
		binary.LittleEndian.PutUint32(f[frameHeaderSize:], i)
		// Queued under allocMu: a later growth step reusing the index
		// queues its grow frame after this one.
		s.enqueueCtrl(ctrlFrame{b: f, fd: -1})
		released = true
	}
	return released
}

// queueCtrl queues a control frame and writes what it can now. Not with
// allocMu held (use enqueueCtrl, then flushCtrl after unlocking).
func (s *Session) queueCtrl(f ctrlFrame) {
	s.enqueueCtrl(f)
	s.flushCtrl()
}

// enqueueCtrl queues a control frame without writing it.
func (s *Session) enqueueCtrl(f ctrlFrame) {
	s.ctrlMu.Lock()
	s.ctrlQ = append(s.ctrlQ, f)
	s.ctrlPending.Store(true)
	s.ctrlMu.Unlock()
}

// flushCtrl writes queued control frames, and any pending wake-up, if the
// writer lock is free now (its holder writes them when it lets go
// otherwise). A full socket is retried: by later writers, the growing
// Alloc's polls and housekeeping.
func (s *Session) flushCtrl() {
	s.ctrlStuck.Store(false)
	for s.writesPending() && s.wmu.TryLock() {
		s.flushWakeLocked() // a wake-up marked while we hold wmu is ours to write
		s.wmu.Unlock()
	}
}

// flushCtrlLocked writes queued control frames without blocking, in order,
// stopping when the socket is full. wmu held.
func (s *Session) flushCtrlLocked() {
	if !s.ctrlPending.Load() {
		return
	}
	if err := s.writeCtrlLocked(); err != nil {
		s.fail(err) // outside ctrlMu: closing takes allocMu, which may be held while queueing
	}
}

// writeCtrlLocked writes what it can of the queue. wmu held.
func (s *Session) writeCtrlLocked() error {
	s.ctrlMu.Lock()
	defer s.ctrlMu.Unlock()
	s.ctrlStuck.Store(false)
	for len(s.ctrlQ) > 0 {
		f := s.ctrlQ[0]
		var oob []byte
		if f.fd >= 0 {
			oob = unix.UnixRights(f.fd)
		}
		n, err := s.sendNonblocking(f.b, oob)
		if n <= 0 && errors.Is(err, unix.EAGAIN) {
			s.ctrlStuck.Store(true)
			return nil
		}
		if err != nil || n != len(f.b) {
			s.ctrlQ = nil
			s.ctrlPending.Store(false)
			return fmt.Errorf("%w: control frame write: %d of %d bytes, %v", ErrPeerClosed, n, len(f.b), err)
		}
		s.ctrlQ[0] = ctrlFrame{}
		s.ctrlQ = s.ctrlQ[1:]
	}
	s.ctrlPending.Store(false)
	return nil
}

// peerGrow handles the peer's frameGrow: it validates and maps the region
// whose memfd came with the frame, within our caps, and acknowledges it.
// Inside an operation, on the reader.
func (s *Session) peerGrow(body []byte, fd int) error {
	index := binary.LittleEndian.Uint32(body)
	size := binary.LittleEndian.Uint64(body[8:])
	if binary.LittleEndian.Uint32(body[4:]) != 0 {
		closeFD(fd)
		return fmt.Errorf("%w: grow frame reserved bytes", ErrCorrupt)
	}
	if fd < 0 {
		return fmt.Errorf("%w: grow frame for region %d without a descriptor", ErrCorrupt, index)
	}
	if index == 0 || index >= MaxRegions {
		closeFD(fd)
		return fmt.Errorf("%w: %w: region index %d, at most %d regions", ErrCorrupt, ErrRegionLimit, index, MaxRegions)
	}
	if s.peerRegs[index].Load() != nil {
		closeFD(fd)
		return fmt.Errorf("%w: region %d announced while the previous one is still in use", ErrCorrupt, index)
	}
	capTotal := s.cfg.maxPeerRegion()
	mapped := s.peerMapped.Load()
	if size > capTotal || mapped+size > capTotal {
		closeFD(fd)
		return fmt.Errorf("%w: %w: region %d of %d bytes would map %d bytes of the peer's, above our MaxPeerRegionSize (%d)",
			ErrCorrupt, ErrRegionLimit, index, size, mapped+size, capTotal)
	}
	r, err := mapPeerRegion(fd, size) // consumes fd
	if err != nil {
		return fmt.Errorf("%w: grown region %d: %w", ErrCorrupt, index, err)
	}
	g := r.geo
	if g.index != index || g.size != size || r.hdr.PID != s.peerHdr.PID || g.maxTotal != s.peer.geo.maxTotal {
		r.unmap()
		return fmt.Errorf("%w: grown region %d disagrees with its frame (index %d, size %d, pid %d)", ErrCorrupt, index, g.index, g.size, r.hdr.PID)
	}
	s.peerMapped.Add(size)
	s.peerRegs[index].Store(&peerRegion{r: r, size: size})
	f := make([]byte, frameHeaderSize+regionFrameSize)
	putFrameHeader(f, frameGrowAck, regionFrameSize)
	binary.LittleEndian.PutUint32(f[frameHeaderSize:], index)
	s.queueCtrl(ctrlFrame{b: f, fd: -1})
	return nil
}

// peerShrink handles the peer's frameShrink: the region is unmapped as soon
// as we hold no message from it. Inside an operation.
func (s *Session) peerShrink(index uint32) error {
	if index == 0 || index >= MaxRegions {
		return fmt.Errorf("%w: shrink of region %d", ErrCorrupt, index)
	}
	p := s.peerRegs[index].Load()
	if p == nil {
		return fmt.Errorf("%w: shrink of region %d, which is not mapped", ErrCorrupt, index)
	}
	for {
		v := p.refs.Load()
		if v&peerRetired != 0 {
			return fmt.Errorf("%w: region %d shrunk twice", ErrCorrupt, index)
		}
		if p.refs.CompareAndSwap(v, v|peerRetired) {
			if v == 0 {
				s.unmapPeerRegion(index, p)
			}
			return nil
		}
	}
}

// releasePeerRef drops one received segment's reference to the peer's
// region index, unmapping it if it was released and this was the last.
// Inside a hold.
func (s *Session) releasePeerRef(index uint8) {
	p := s.peerRegs[index].Load()
	if p == nil {
		return
	}
	if p.refs.Add(^uint64(0)) == peerRetired {
		s.unmapPeerRegion(uint32(index), p)
	}
}

// unmapPeerRegion unmaps a released peer region once.
func (s *Session) unmapPeerRegion(index uint32, p *peerRegion) {
	if !p.unmapped.CompareAndSwap(false, true) {
		return
	}
	s.peerRegs[index].CompareAndSwap(p, nil)
	s.peerMapped.Add(^(p.size - 1))
	p.r.unmap()
}

// unmapGrown unmaps every grown region, ours and the peer's. Called once by
// the lifetime, when no operation or hold is left.
func (s *Session) unmapGrown() {
	s.allocMu.Lock()
	for i := uint32(1); i < MaxRegions; i++ {
		if lr := s.locals[i]; lr != nil && lr.r != nil {
			lr.r.unmap()
		}
		s.locals[i] = nil
		s.spans[i].Store(nil)
	}
	s.allocMu.Unlock()
	for i := uint32(1); i < MaxRegions; i++ {
		if p := s.peerRegs[i].Load(); p != nil {
			s.unmapPeerRegion(i, p)
		}
	}
}

// RegionStat describes one region of a session.
type RegionStat struct {
	Index     int    // 0 for the base region
	Peer      bool   // the peer's region, mapped read-only; else ours
	Size      uint64 // bytes committed (ours) or mapped (the peer's)
	ArenaSize uint64
	InUse     int // ours: buffers in it, local or held by the peer; the peer's: its segments we hold
}

// Regions describes the session's regions, ours and the peer's, now mapped.
// It reads no mapping.
func (s *Session) Regions() []RegionStat {
	var out []RegionStat
	s.allocMu.Lock()
	for _, lr := range s.locals {
		if lr == nil || lr.r == nil {
			continue
		}
		out = append(out, RegionStat{Index: int(lr.index), Size: lr.size, ArenaSize: lr.r.geo.arenaSize, InUse: lr.inUse})
	}
	s.allocMu.Unlock()
	out = append(out, RegionStat{Index: 0, Peer: true, Size: s.peer.geo.size, ArenaSize: s.peer.geo.arenaSize, InUse: int(s.heldFromPeer())})
	for i := 1; i < MaxRegions; i++ {
		if p := s.peerRegs[i].Load(); p != nil && !p.unmapped.Load() {
			out = append(out, RegionStat{Index: i, Peer: true, Size: p.size, ArenaSize: p.r.geo.arenaSize,
				InUse: int(p.refs.Load() &^ peerRetired)})
		}
	}
	return out
}
