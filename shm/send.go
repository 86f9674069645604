package shm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"
)

// A slot word (Session.slotWords) is gen<<32 | state, slotLocal or
// slotSent. Its changes of hands are compare-and-swaps: Send local(g) →
// sent(g); Free local(g) → local(g+1); reclaiming the peer's release
// sent(g) → local(g+1). A free slot thus already reads local with the
// generation its next Alloc hands out, so Alloc needs no store: no Buffer of
// that generation exists before that Alloc (a Buffer's fields are
// unexported; one comes only from Alloc), so Send and Free cannot take a
// free slot, and a stale Buffer (an older generation) is refused as freed.
// Which slots are free is the allocator's free stack's to say, under
// allocMu; the region's buffer table shows free slots as slotFree.

func slotWord(gen, state uint32) uint64 { return uint64(gen)<<32 | uint64(state) }

// nextGen is the generation after g. Generation 0 is never handed out: a
// zero Buffer matches nothing.
func nextGen(g uint32) uint32 {
	if g++; g == 0 {
		g = 1
	}
	return g
}

// freedWord is the word of a slot freed from generation gen: ready for the
// next Alloc.
func freedWord(gen uint32) uint64 { return slotWord(nextGen(gen), slotLocal) }

// Alloc allocates a buffer of n bytes in one of our regions. It fails with
// ErrTooLarge, ErrQuota (MaxBuffers in flight), ErrNoMemory (no free block
// large enough, and the regions cannot grow: then it also wraps
// ErrGrowLimit, ErrGrowPeerLimit or ErrInsufficientMemory) or ErrClosed.
// When no region has room and the regions may grow, it adds a region and
// waits for the peer to map it (at most HandshakeTimeout; grow.go);
// otherwise it never blocks. The buffer keeps our regions mapped until it
// is sent or freed.
func (s *Session) Alloc(n int) (Buffer, error) {
	if n < 0 || n > s.cfg.MaxMessageSize {
		s.events.tooLarge.Add(1)
		return Buffer{}, fmt.Errorf("%w: %d bytes, maximum %d", ErrTooLarge, n, s.cfg.MaxMessageSize)
	}
	for attempt := 0; ; attempt++ {
		s.allocMu.Lock()
		// The closing bit fences Alloc; allocClosed says close has
		// settled the allocator's holds (lifetime.go).
		if s.allocClosed || s.life.closed() {
			s.allocMu.Unlock()
			return Buffer{}, s.closedErr()
		}
		// At least one hold in the cache before the mappings are touched:
		// the closing bit may be set from here on, and close drops the
		// session's hold before it can take allocMu to settle ours. The
		// buffer takes one; reclaim or Free gives it back.
		if s.allocHolds == 0 {
			if !s.life.acquireHolds(holdBatch) {
				s.allocMu.Unlock()
				return Buffer{}, s.closedErr()
			}
			s.allocHolds = holdBatch
		}
		// Reclaim every reclaimEvery Allocs, and whenever the slots or
		// the arenas have no room for this one, so that nothing fails or
		// grows for want of a buffer the peer has given back.
		reclaimed := false
		if s.reclaimIn--; s.reclaimIn <= 0 || len(s.freeSlots) == 0 {
			if err := s.reclaimDueLocked(); err != nil {
				return Buffer{}, err
			}
			reclaimed = true
		}
		if len(s.freeSlots) == 0 {
			s.allocCounts.failed++
			s.allocCounts.quotaHits++
			s.allocMu.Unlock()
			return Buffer{}, ErrQuota
		}
		lr, off, k, ok := s.allocAnyLocked(uint64(n))
		if !ok && !reclaimed {
			if err := s.reclaimDueLocked(); err != nil {
				return Buffer{}, err
			}
			lr, off, k, ok = s.allocAnyLocked(uint64(n))
		}
		if ok {
			s.allocHolds--
			b := s.takeSlotLocked(lr, off, k, n)
			s.allocMu.Unlock()
			return b, nil
		}
		var g *growth
		var index uint32
		var size uint64
		var start bool
		err := error(ErrNoMemory)
		if attempt < 3 { // each step made room that others took: give up after a few
			g, index, size, start, err = s.planGrowLocked(uint64(n))
		}
		if err != nil {
			s.allocCounts.failed++
			s.countGrowFailLocked(err)
			s.allocMu.Unlock()
			s.flushCtrl() // shrink frames of regions released to make way
			return Buffer{}, err
		}
		// A hold of our own while the step runs outside allocMu: the
		// region it makes must not outlive the final unmap.
		s.allocHolds--
		s.allocMu.Unlock()
		if start {
			s.startGrow(g, index, size)
		}
		err = s.waitGrow(g)
		s.allocMu.Lock()
		if err != nil && !errors.Is(err, ErrClosed) {
			s.allocCounts.failed++
			s.countGrowFailLocked(err)
		}
		drop := s.allocClosed
		if !drop {
			s.allocHolds++
		}
		s.allocMu.Unlock()
		if drop {
			s.life.dropHolds(1)
		}
		if err != nil {
			return Buffer{}, err
		}
	}
}

// takeSlotLocked makes the buffer of n bytes at off (order k) of lr.
// allocMu held, a free slot available.
func (s *Session) takeSlotLocked(lr *localRegion, off uint64, k uint8, n int) Buffer {
	slot := s.freeSlots[len(s.freeSlots)-1]
	s.freeSlots = s.freeSlots[:len(s.freeSlots)-1]
	gen := uint32(s.slotWords[slot].Load() >> 32) // local(gen) since the slot was freed
	size := uint64(MinBlockSize) << k
	m := &s.local.slots[slot]
	m.Off, m.Size, m.Len, m.Gen, m.ID, m.Aux, m.Region = off, uint32(size), uint32(n), gen, 0, 0, lr.index
	m.Time = s.coarseNow.Load()
	m.State = slotLocal
	lr.inUse++
	lr.idle = 0
	s.allocCounts.allocs++
	s.allocCounts.inUseBufs++
	s.allocCounts.inUseBytes += int64(size)
	b, _ := span(lr.r.arena, off, uint64(n))
	return Buffer{b: b, slot: slot, gen: gen}
}

// Free returns a buffer that was allocated and not sent, and drops its hold
// on our region (also after the session closed). It refuses, changing
// nothing, a buffer already freed (ErrBufferFreed), one that was sent
// (ErrBufferSent) and one this session did not allocate (ErrForeignBuffer).
func (s *Session) Free(b Buffer) error {
	if !s.ours(b) {
		return ErrForeignBuffer
	}
	if err := s.takeLocal(b, freedWord(b.gen)); err != nil {
		return err
	}
	// The slot is ours alone now, and its hold keeps the mapping.
	s.allocMu.Lock()
	s.freeSlotLocked(b.slot)
	drop := s.allocClosed // settled: the buffer's hold is in the word
	if !drop {
		s.allocHolds++
	}
	s.allocMu.Unlock()
	if drop {
		s.life.dropHolds(1)
	}
	return nil
}

// ours reports whether b can be a buffer of this session: a slot we have,
// a generation we hand out, and memory inside our arena. It reads no
// mapping (the address is only compared).
func (s *Session) ours(b Buffer) bool {
	if b.b == nil || b.gen == 0 || b.slot >= uint32(len(s.slotWords)) {
		return false
	}
	for i := range s.spans {
		if sp := s.spans[i].Load(); sp != nil && inside(b.b, sp.base, sp.size) {
			return true
		}
	}
	return false
}

// takeLocal moves b's slot from local to the word to by compare-and-swap,
// or says why b is not a local buffer of this session. A slot seen local
// again (a concurrent Send that failed and gave it back) is retried.
func (s *Session) takeLocal(b Buffer, to uint64) error {
	w := &s.slotWords[b.slot]
	for {
		if w.CompareAndSwap(slotWord(b.gen, slotLocal), to) {
			return nil
		}
		if err := notLocal(b, w.Load()); err != nil {
			return err
		}
	}
}

// notLocal says why slot word v does not make b a local buffer, or nil if
// it does.
func notLocal(b Buffer, v uint64) error {
	switch {
	case uint32(v>>32) != b.gen:
		return ErrBufferFreed
	case uint32(v) == slotSent:
		return ErrBufferSent
	}
	return nil
}

// freeSlotLocked returns a slot whose word was just set free (by Free or by
// reclaim) to the allocator. allocMu held; the caller holds the mapping.
func (s *Session) freeSlotLocked(slot uint32) {
	m := &s.local.slots[slot]
	size := uint64(m.Size)
	lr := s.locals[m.Region] // in use while it has a buffer (grow.go)
	lr.buddy.release(m.Off, orderFor(size))
	if lr.inUse--; lr.inUse == 0 {
		lr.idle = s.coarseNow.Load()
	}
	m.State = slotFree
	s.freeSlots = append(s.freeSlots, slot)
	s.allocCounts.frees++
	s.allocCounts.inUseBufs--
	s.allocCounts.inUseBytes -= int64(size)
}

// reclaimEvery is how many Allocs share one reclaim. The peer's release
// ring tail and entries are lines its receiver writes at every Release, so
// reading them costs a cache-line transfer each time something was
// released: once every eight messages, the engine's 64 B round trip took
// 1.72-1.75 µs against 2.20-2.22 µs (poll mode, three alternated pairs),
// for at most eight buffers more in use.
const reclaimEvery = 8

// reclaimDueLocked reclaims and restarts the count to the next one. On
// corrupt release entries it unlocks allocMu, closes the session and
// returns why. allocMu held, with a hold in the cache.
func (s *Session) reclaimDueLocked() error {
	s.reclaimIn = reclaimEvery
	if err := s.reclaimLocked(); err != nil {
		s.allocMu.Unlock()
		s.fail(err)
		return s.closedErr()
	}
	return nil
}

// reclaimLocked frees the buffers the peer has released. A release entry
// that names a buffer the peer does not hold is corrupt input. allocMu
// held, inside an operation or hold.
func (s *Session) reclaimLocked() error {
	if s.allocClosed {
		return nil // the holds of the buffers the peer held are settled
	}
	tail := atomic.LoadUint64(&s.peerHdr.RelTail)
	head := s.peerRelHead
	if tail == head {
		return nil
	}
	if tail-head > s.peer.geo.relEntries {
		return fmt.Errorf("%w: release ring has %d entries pending, capacity %d", ErrCorrupt, tail-head, s.peer.geo.relEntries)
	}
	mask := s.peer.geo.relEntries - 1
	for ; head != tail; head++ {
		tok := atomic.LoadUint64(&s.peer.rel[head&mask])
		slot, gen := uint32(tok>>32), uint32(tok)
		if slot >= uint32(len(s.slotWords)) {
			return fmt.Errorf("%w: release of slot %d, only %d slots", ErrCorrupt, slot, len(s.slotWords))
		}
		if !s.slotWords[slot].CompareAndSwap(slotWord(gen, slotSent), freedWord(gen)) {
			return fmt.Errorf("%w: release of slot %d generation %d, which the peer does not hold", ErrCorrupt, slot, gen)
		}
		s.freeSlotLocked(slot)
		s.allocHolds++ // the buffer's hold, back to the cache
		s.allocCounts.reclaimed++
	}
	s.peerRelHead = head
	atomic.StoreUint64(&s.localHdr.PeerRelHead, head)
	return nil
}

// reclaim frees what the peer has released, closing the session on corrupt
// release entries.
func (s *Session) reclaim() {
	if !s.life.beginOp() {
		return
	}
	s.allocMu.Lock()
	err := s.reclaimLocked()
	s.allocMu.Unlock()
	s.life.endOp()
	if err != nil {
		s.fail(err)
	}
}

// Send sends one message made of bufs (at most MaxSegments; none sends an
// empty message). On success the buffers belong to the peer until it
// releases them. On error they stay the caller's: Free them. A buffer that
// is not ours to send is refused, and nothing is sent: ErrBufferSent (sent
// already, or by a concurrent Send), ErrBufferFreed, ErrDuplicateBuffer (named
// twice in bufs), ErrForeignBuffer. Send blocks only while our ring is full,
// until there is room, ctx is done or the session closes.
//
// The buffers' holds keep the mappings (lifetime.go): a buffer is local
// until the compare-and-swap that makes it sent, and a sent buffer keeps its
// hold until the peer releases it or close settles it. Only an empty
// message needs an operation of its own.
func (s *Session) Send(ctx context.Context, id, aux uint64, kind uint16, bufs ...Buffer) error {
	if len(bufs) > MaxSegments {
		return fmt.Errorf("%w: %d segments, at most %d", ErrTooLarge, len(bufs), MaxSegments)
	}
	var total uint64
	for i, b := range bufs {
		if !s.ours(b) {
			return ErrForeignBuffer
		}
		for _, p := range bufs[:i] {
			if p.slot == b.slot {
				return fmt.Errorf("%w: slot %d", ErrDuplicateBuffer, b.slot)
			}
		}
		// Refused at once, not after a wait for room in the ring; the
		// compare-and-swap under sendMu decides.
		if err := notLocal(b, s.slotWords[b.slot].Load()); err != nil {
			return err
		}
		total += uint64(len(b.b))
	}
	if len(bufs) == 0 {
		if !s.life.beginOp() {
			return s.closedErr()
		}
		defer s.life.endOp()
	}
	return s.publish(ctx, id, aux, kind, bufs, total)
}

// takeForSend moves each buffer's slot from local to sent by
// compare-and-swap and checks that the buffer is its slot's memory. On
// error the slots it took are local again and nothing else changed. sendMu
// held; the mappings are kept by the buffers' holds once their slots are
// ours.
func (s *Session) takeForSend(bufs []Buffer) error {
	for i, b := range bufs {
		if err := s.takeLocal(b, slotWord(b.gen, slotSent)); err != nil {
			s.unsend(bufs[:i])
			return err
		}
		m := &s.local.slots[b.slot]
		sp := s.spans[m.Region%MaxRegions].Load()
		if sp == nil || uint64(len(b.b)) > uint64(m.Len) || addrOf(b.b) != sp.base+uintptr(m.Off) {
			s.unsend(bufs[:i+1])
			return ErrForeignBuffer
		}
	}
	return nil
}

// unsend gives buffers that takeForSend marked sent back to the caller. A
// slot that is no longer sent was released by a corrupt peer before we
// published it: it is free, and stays so.
func (s *Session) unsend(bufs []Buffer) {
	for _, b := range bufs {
		s.slotWords[b.slot].CompareAndSwap(slotWord(b.gen, slotSent), slotWord(b.gen, slotLocal))
	}
}

// publish writes the descriptors of one message and moves our tail, then
// wakes the peer if it sleeps. Its buffers' holds, or an operation for an
// empty message, keep the mappings.
func (s *Session) publish(ctx context.Context, id, aux uint64, kind uint16, bufs []Buffer, total uint64) error {
	nd := uint64(len(bufs))
	if nd == 0 {
		nd = 1
	}
	entries := s.local.geo.ringEntries
	s.sendMu.Lock()
	for {
		// Close settles the holds of sent buffers under sendMu after it
		// sets the closing bit: a buffer sent here was counted by then.
		if s.life.closed() {
			s.sendMu.Unlock()
			return s.closedErr()
		}
		// The peer's consumer index only grows, so the one we last read
		// leaves at most as much room as there is: it is read again (a
		// cache line the peer's receiver writes) only when that room is
		// short.
		tail := s.localTail
		if tail-s.headSeen+nd <= entries {
			break
		}
		head := atomic.LoadUint64(&s.peerHdr.PeerRingHead)
		used := tail - head
		if used > entries {
			s.sendMu.Unlock()
			s.fail(fmt.Errorf("%w: peer's consumer index %d is ahead of our producer index %d", ErrCorrupt, head, tail))
			return s.closedErr()
		}
		s.headSeen = head
		if used+nd <= entries {
			break
		}
		s.sendMu.Unlock()
		// Outside sendMu the buffers are still the caller's, and a
		// concurrent Free after close could drop their holds: the wait
		// reads the peer's header inside an operation of its own.
		if !s.life.beginOp() {
			return s.closedErr()
		}
		// tail is a copy taken under sendMu: other senders may move the
		// real one, and the peer's head may then pass our copy, so the
		// difference is signed. Ready only means "recheck under the lock".
		err := s.backoff(ctx, func() bool {
			return int64(tail+nd-atomic.LoadUint64(&s.peerHdr.PeerRingHead)) <= int64(entries)
		})
		s.life.endOp()
		if err != nil {
			return err
		}
		s.sendMu.Lock()
	}
	if err := s.takeForSend(bufs); err != nil {
		s.sendMu.Unlock()
		return err
	}
	now := s.coarseNow.Load()
	mask := entries - 1
	t := s.localTail
	if len(bufs) == 0 {
		s.local.ring[t&mask] = desc{ID: id, Aux: aux, Slot: noSlot, Seq: uint32(t), Kind: kind}
	}
	for i, b := range bufs {
		m := &s.local.slots[b.slot]
		m.ID, m.Aux, m.Time, m.State = id, aux, now, slotSent
		var flags uint16
		if i < len(bufs)-1 {
			flags = descMore
		}
		s.local.ring[(t+uint64(i))&mask] = desc{
			ID: id, Aux: aux, Off: m.Off, Len: uint32(len(b.b)), Slot: b.slot, Gen: b.gen,
			Seq: uint32(t + uint64(i)), Kind: kind, Flags: flags, Region: m.Region,
		}
	}
	s.localTail = t + nd
	atomic.StoreUint64(&s.localHdr.RingTail, s.localTail)
	sc := &s.sendCounts
	sc.msgs++
	sc.bytes += total
	sc.bufs += uint64(len(bufs))
	wake, futex := s.peerNeedsWake()
	switch {
	case !wake:
		sc.wakeupsSaved++
	case futex:
		sc.futexWakeups++
	}
	s.sendMu.Unlock()
	if futex {
		futexWakeShared(&s.localHdr.RingTail)
	} else if wake {
		s.wakePeer()
	}
	return nil
}

// backoff waits until ready() holds, polling with a growing sleep; used on
// the rare paths that wait for the peer to consume (a full ring).
func (s *Session) backoff(ctx context.Context, ready func() bool) error {
	d := time.Microsecond
	for !ready() {
		select {
		case <-s.done:
			return s.closedErr()
		case <-ctx.Done():
			return ctxErr(ctx)
		default:
		}
		time.Sleep(d)
		if d < time.Millisecond {
			d *= 2
		}
	}
	return nil
}

func ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return ErrTimeout
	}
	return ctx.Err()
}

// SendInline sends a message over the session socket instead of shared
// memory: the fallback for a message that cannot get a buffer. It is
// received like any other message (Message.Inline reports it), but is not
// ordered with respect to messages sent through the ring. It is refused
// (ErrTooLarge) above the peer's MaxInlineSize.
func (s *Session) SendInline(ctx context.Context, id, aux uint64, kind uint16, data []byte) error {
	if uint64(len(data)) > s.peerInMax {
		return fmt.Errorf("%w: inline message of %d bytes, the peer accepts at most %d", ErrTooLarge, len(data), s.peerInMax)
	}
	if !s.life.beginOp() {
		return s.closedErr()
	}
	defer s.life.endOp()
	var hdr [frameHeaderSize + inlineMetaSize]byte
	putFrameHeader(hdr[:], frameInline, uint32(inlineMetaSize+len(data)))
	putInlineMeta(hdr[frameHeaderSize:], id, aux, kind)
	bufs := net.Buffers{hdr[:], data}
	s.wmu.Lock()
	dl, hasDL := ctx.Deadline()
	if hasDL {
		s.conn.SetWriteDeadline(dl)
	}
	_, err := bufs.WriteTo(s.conn)
	if hasDL {
		s.conn.SetWriteDeadline(time.Time{})
	}
	s.unlockWriter()
	if err != nil {
		if isTimeout(err) {
			// A partial frame may have been written: the stream is lost.
			s.fail(fmt.Errorf("shm: inline write timed out: %w", err))
			return ErrTimeout
		}
		s.fail(fmt.Errorf("%w: inline write: %v", ErrPeerClosed, err))
		return s.closedErr()
	}
	s.events.inlineSent.Add(1)
	return nil
}
