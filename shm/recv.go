package shm

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
)

// Recv returns the next message from the peer, waiting as the session's wake
// mode says until one arrives, ctx is done (ErrTimeout at its deadline) or
// the session closes (ErrClosed). On error the Message is the zero Message
// (Release of it is a no-op). The message's segments are valid until
// Release; it keeps the peer's region mapped until then.
func (s *Session) Recv(ctx context.Context) (Message, error) {
	if err := s.takeRecvTurn(ctx); err != nil {
		return Message{}, err
	}
	if !s.recvEnter() {
		s.recvLeave()
		return Message{}, s.closedErr()
	}
	var m Message
	err := s.recvLoop(ctx, &m)
	if err == nil && m.n > 0 && !m.inline {
		s.recvHolds-- // the message's hold, dropped by Release
	}
	s.recvLeave()
	if err != nil {
		return Message{}, err
	}
	return m, nil
}

// recvEnter makes sure the Recv turn has a hold on the mappings before its
// holder reads the peer's ring; false once closing. Recv turn held.
func (s *Session) recvEnter() bool {
	if s.life.closed() {
		return false
	}
	if s.recvHolds == 0 {
		if !s.life.acquireHolds(holdBatch) {
			return false
		}
		s.recvHolds = holdBatch
	}
	return true
}

// recvLeave gives the Recv turn back. After close, the turn's holds are
// returned by whoever holds the turn then: its holder on the way out, or
// close if the turn is free. Close sets the closing bit and then tries the
// turn; a holder gives the turn and then checks the bit. Both are
// sequentially consistent, so one of the two sees the other (as in the
// wake protocol), and a later holder settles at its own leave.
func (s *Session) recvLeave() {
	if s.life.closed() {
		s.settleRecvHolds()
	}
	s.recvTurn.give()
	if s.life.closed() && s.recvTurn.tryTake() {
		s.settleRecvHolds()
		s.recvTurn.give()
	}
}

// settleRecvHolds returns the Recv turn's holds once closing. Recv turn
// held.
func (s *Session) settleRecvHolds() {
	n := s.recvHolds
	s.recvHolds = 0
	if !s.recvSettled {
		s.recvSettled = true
		s.finalHead = s.peerHead // no message is received after this
		close(s.recvDrained)
	}
	s.life.dropHolds(int(n))
}

// takeRecvTurn waits for the Recv turn, until ctx is done or the session
// closes.
func (s *Session) takeRecvTurn(ctx context.Context) error {
	t := &s.recvTurn
	if t.tryTake() {
		return nil
	}
	t.waiters.Add(1)
	defer t.waiters.Add(-1)
	for {
		if t.tryTake() {
			return nil
		}
		select {
		case <-t.free:
		case <-ctx.Done():
			return ctxErr(ctx)
		case <-s.done:
			return s.closedErr()
		}
	}
}

// recvLoop polls and waits as the wake mode says. Recv turn held, with
// its holds.
func (s *Session) recvLoop(ctx context.Context, m *Message) error {
	var start, spinStart time.Time
	var budget time.Duration
	var poll *time.Timer // timed mode, made on the first wait
	defer func() {
		if poll != nil {
			poll.Stop()
		}
	}()
	for i := 0; ; i++ {
		ok, err := s.tryRecv(m)
		if ok || err != nil {
			if i > 0 && ok {
				s.observeWait(time.Since(start))
			}
			return err
		}
		if s.life.closed() {
			return s.closedErr()
		}
		if i == 0 {
			start = time.Now()
			spinStart, budget = start, s.spinBudget()
			continue
		}
		switch s.cfg.WakeMode {
		case WakePoll:
			if i&63 == 63 {
				if ctxDone(ctx) {
					return ctxErr(ctx)
				}
				sched.refresh(time.Now().UnixNano())
			}
			s.pause(i)
		case WakeTimed:
			s.reclaim()
			if poll == nil {
				poll = time.NewTimer(s.cfg.PollInterval)
			} else {
				poll.Reset(s.cfg.PollInterval)
			}
			select { // ctx is checked at every poll
			case <-poll.C:
			case <-ctx.Done():
				return ctxErr(ctx)
			case <-s.done:
				return s.closedErr()
			case <-s.recvWake: // an inline message
			}
		default:
			if i&15 != 0 {
				// Between checks, yield at every poll while the
				// process is over-subscribed (pause, wake.go): one
				// poll in sixteen left the ring's receiver spinning
				// on a processor others waited for.
				if sched.goBusy.Load() {
					runtime.Gosched()
				}
				continue
			}
			if ctxDone(ctx) {
				return ctxErr(ctx)
			}
			if s.keepSpinning(time.Now(), spinStart, budget) {
				s.pause(i)
				continue
			}
			if err := s.sleep(ctx); err != nil {
				return err
			}
			// Woken: the message is normally there; poll briefly only.
			spinStart, budget = time.Now(), minSpin
		}
	}
}

// tryRecv takes the next message if there is one. Every value read from
// the peer's region is copied, then checked; a bad one closes the session.
// Recv turn held, with its holds.
func (s *Session) tryRecv(m *Message) (bool, error) {
	if len(s.inlineQ) > 0 {
		select {
		case *m = <-s.inlineQ:
			s.inlineBytes.Add(-int64(len(m.segs[0])))
			select {
			case s.inlineRoom <- struct{}{}:
			default:
			}
			return true, nil
		default:
		}
	}
	tail := atomic.LoadUint64(&s.peerHdr.RingTail)
	head := s.peerHead
	if tail == head {
		return false, nil
	}
	pg := &s.peer.geo
	if tail-head > pg.ringEntries {
		return false, s.corrupt("peer ring holds %d entries, capacity %d", tail-head, pg.ringEntries)
	}
	mask := pg.ringEntries - 1
	var n uint64
	for {
		if n == MaxSegments {
			return false, s.corrupt("message of more than %d segments", MaxSegments)
		}
		if head+n == tail {
			return false, s.corrupt("message's last segment missing at index %d", head+n)
		}
		d := s.peer.ring[(head+n)&mask] // a copy: the peer cannot change it under us
		if d.Seq != uint32(head+n) {
			return false, s.corrupt("descriptor %d has sequence %d", head+n, d.Seq)
		}
		if d.Flags&^descMore != 0 {
			return false, s.corrupt("descriptor %d has unknown flags %#x", head+n, d.Flags)
		}
		if n == 0 {
			m.ID, m.Aux, m.Kind = d.ID, d.Aux, d.Kind
		} else if d.ID != m.ID {
			return false, s.corrupt("segment %d of message %d has id %d", n, m.ID, d.ID)
		}
		if d.Slot == noSlot {
			if d.Len != 0 || d.Flags != 0 || n != 0 {
				return false, s.corrupt("descriptor %d without a buffer has length %d", head+n, d.Len)
			}
			m.segs[0], m.tokens[0] = nil, 0
			n = 1
			m.n = 0
			break
		}
		if uint64(d.Slot) >= pg.slotCount {
			return false, s.corrupt("descriptor %d names slot %d of %d", head+n, d.Slot, pg.slotCount)
		}
		if uint64(d.Len) > s.recvLimit {
			return false, s.corrupt("descriptor %d: segment of %d bytes, larger than the maximum message (%d)", head+n, d.Len, s.recvLimit)
		}
		arena := s.peer.arena
		if d.Region != 0 {
			// A reference keeps the grown region mapped until Release.
			var p *peerRegion
			if d.Region < MaxRegions {
				p = s.peerRegs[d.Region].Load()
			}
			if p == nil || !p.acquire() {
				return false, s.corrupt("descriptor %d names region %d, which is not mapped", head+n, d.Region)
			}
			m.regs[n] = uint8(d.Region)
			arena = p.r.arena
		} else {
			m.regs[n] = 0
		}
		seg, ok := span(arena, d.Off, uint64(d.Len))
		if !ok {
			return false, s.corrupt("descriptor %d: segment %d+%d outside the peer's arena %d of %d bytes", head+n, d.Off, d.Len, d.Region, len(arena))
		}
		m.segs[n] = seg
		m.tokens[n] = uint64(d.Slot)<<32 | uint64(d.Gen)
		n++
		m.n = uint8(n)
		if d.Flags&descMore == 0 {
			break
		}
	}
	m.inline = false
	s.peerHead = head + n
	atomic.StoreUint64(&s.localHdr.PeerRingHead, s.peerHead)
	// Counted without read-modify-writes of their own: the message count
	// rides on the store that ends the turn, and the buffers received are
	// the descriptors consumed (the index just stored) but those of empty
	// messages (segsReceived).
	s.recvTurn.count++
	if m.n > 0 {
		s.events.bytes.Add(uint64(m.Len()))
	} else {
		s.events.emptyRecv.Add(1)
	}
	return true, nil
}

func (s *Session) corrupt(format string, a ...any) error {
	err := fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, a...)...)
	s.fail(err)
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

// Release hands the message's buffers back to the peer and drops the
// message's hold on the peer's region (also after the session closed). Its
// segments must not be used after. Releasing a message twice, or a zero
// Message, is a no-op.
func (s *Session) Release(m *Message) {
	if m.inline {
		*m = Message{}
		return
	}
	n := int(m.n)
	if n == 0 {
		return
	}
	m.n = 0
	for i := range n {
		m.segs[i] = nil
		// Before the release entries: once the peer has its buffers back it
		// may release the region, and we must hold no reference by then.
		if m.regs[i] != 0 {
			s.releasePeerRef(m.regs[i])
			m.regs[i] = 0
		}
	}
	// The message's hold keeps both mappings until it is dropped or, while
	// the session is open, kept in relHolds (returned in batches).
	entries := s.local.geo.relEntries
	s.relMu.Lock()
	s.released += uint64(n)
	if s.life.closed() {
		s.relMu.Unlock()
		s.life.dropHolds(1)
		return
	}
	// As Send's ring check (send.go): the peer's consumer index of our
	// release ring, read again only when the one last read leaves no room.
	if s.relTail+uint64(n)-s.relHeadSeen > entries {
		s.relHeadSeen = atomic.LoadUint64(&s.peerHdr.PeerRelHead)
	}
	if s.relTail+uint64(n)-s.relHeadSeen > entries {
		s.relMu.Unlock()
		s.fail(fmt.Errorf("%w: peer holds back more released buffers than its quota (%d)", ErrCorrupt, entries))
		s.life.dropHolds(1)
		return
	}
	for i := range n {
		s.local.rel[s.relTail&(entries-1)] = m.tokens[i]
		s.relTail++
	}
	atomic.StoreUint64(&s.localHdr.RelTail, s.relTail) // publishes the entries
	// Close sets the closing bit before it settles relHolds under relMu,
	// so a hold kept here (the bit was clear above) is settled with them.
	var drop uint64
	if s.relHolds++; s.relHolds >= 2*holdBatch {
		drop, s.relHolds = holdBatch, s.relHolds-holdBatch
	}
	s.relMu.Unlock()
	if drop > 0 {
		s.life.dropHolds(int(drop))
	}
}

// ctxDone reports whether ctx is done, without blocking.
func ctxDone(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return true
	default:
		return false
	}
}
