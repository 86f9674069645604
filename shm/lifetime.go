package shm

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/cloudwego/kitex/pkg/klog"
)

// The lifetime rule. Both mappings (our region and the peer's) live exactly
// as long as someone uses them, and every use is counted in one word,
// session.life:
//
//   - an operation (SendInline, an empty Send, Stats, a housekeeping pass,
//     the reader handling one frame) calls beginOp before it touches either
//     mapping and endOp after its last touch;
//   - a hold keeps the mappings for a user that has no operation: each of
//     our buffers in use (local, from Alloc until Free; sent, until the
//     peer releases it), each received Message with segments (until
//     Release), the Recv turn while a Recv reads the peer's ring, and the
//     session itself until close. Send of buffers and Release run under
//     the holds of the buffers and the message they hand over.
//
// Holds move without touching the word on the hot path: the allocator
// (under allocMu), the Recv turn and the release path (under relMu) each
// keep a cache of holds taken from or returned to the word holdBatch at a
// time, and a buffer's or a message's hold passes to and from those caches.
// Every hold in a cache is a hold in the word, so the word never counts
// fewer users than there are.
//
// beginOp and new holds fail once the closing bit is set. Close sets it,
// drops the session's hold and settles the caches (settleHolds): the
// allocator's spare holds and those of the buffers the peer still holds,
// the release path's, and the Recv turn's (returned by whoever holds the
// turn after the bit is set). Close waits until no operation is in flight
// and the Recv turn has settled; the mappings are unmapped by whoever brings
// the word to "closing, no operation, no hold": close itself, the last
// operation, or the last Free or Release. Nothing touches a mapping outside
// an operation or a hold; a slice handed out never outlives the mapping it
// points into.
type lifetime struct {
	word    atomic.Uint64 // lifeClosing | operations<<32 | holds
	drained chan struct{} // closed when, after closing, no operation is left
	unmap   func()        // called once, when the last user leaves
}

const (
	lifeClosing   = 1 << 63
	lifeOpOne     = 1 << 32
	lifeOpMask    = (1<<31 - 1) << 32
	lifeHoldMask  = 1<<32 - 1
	lifeHoldLimit = 1<<31 - 1 // holds are bounded by slots and messages, far below

	minusOp = ^uint64(lifeOpOne - 1) // adding it subtracts one operation

	// holdBatch is how many holds a hold cache (the allocator's, the Recv
	// turn's, the release path's) takes from or returns to the word at a
	// time, so that a message costs no read-modify-write of the word.
	holdBatch = 64
)

func (l *lifetime) init(unmap func()) {
	l.word.Store(1) // the session's own hold
	l.drained = make(chan struct{})
	l.unmap = unmap
}

// beginOp starts an operation on the mappings; false once closing.
func (l *lifetime) beginOp() bool {
	for {
		w := l.word.Load()
		if w&lifeClosing != 0 {
			return false
		}
		if l.word.CompareAndSwap(w, w+lifeOpOne) {
			return true
		}
	}
}

// endOp ends an operation started by beginOp.
func (l *lifetime) endOp() { l.settleOp(l.word.Add(minusOp)) }

// acquireHolds takes n holds at once (one for an object handed to the
// caller, holdBatch for a cache that hands them out without touching the
// word); false once closing.
func (l *lifetime) acquireHolds(n uint64) bool {
	for {
		w := l.word.Load()
		if w&lifeClosing != 0 || w&lifeHoldMask+n > lifeHoldLimit {
			return false
		}
		if l.word.CompareAndSwap(w, w+n) {
			return true
		}
	}
}

// dropHolds drops n holds.
func (l *lifetime) dropHolds(n int) {
	if n > 0 && l.word.Add(-uint64(n)) == lifeClosing {
		l.unmap()
	}
}

// close sets the closing bit and drops the session's own hold. It reports
// false if the lifetime was already closing.
func (l *lifetime) close() bool {
	for {
		w := l.word.Load()
		if w&lifeClosing != 0 {
			return false
		}
		nw := w | lifeClosing
		if l.word.CompareAndSwap(w, nw) {
			if nw&lifeOpMask == 0 {
				close(l.drained) // no operation in flight, and none can start
			}
			l.dropHolds(1)
			return true
		}
	}
}

// settleOp acts on the word an operation's end produced. After closing, the
// decrement that empties the operation count closes drained (once: no
// operation starts after closing), and the one that leaves nothing unmaps.
func (l *lifetime) settleOp(w uint64) {
	if w&lifeClosing == 0 || w&lifeOpMask != 0 {
		return
	}
	close(l.drained)
	if w == lifeClosing {
		l.unmap()
	}
}

// closed reports whether closing has begun.
func (l *lifetime) closed() bool { return l.word.Load()&lifeClosing != 0 }

// Done is closed when the session closes.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns why the session closed, or nil while it is open.
func (s *Session) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

func (s *Session) closedErr() error {
	if err := s.Err(); err != nil && !errors.Is(err, ErrClosed) {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return ErrClosed
}

// Close closes the session: the peer learns at once, operations in flight
// fail with ErrClosed and are waited for, and the mappings are unmapped as
// soon as no received message or local buffer still points into them.
// Idempotent.
func (s *Session) Close() error {
	s.closeWith(ErrClosed, true)
	<-s.life.drained
	<-s.recvDrained
	<-s.readerEnd
	return nil
}

// fail closes the session because of err (recorded as Err). It does not
// wait: it is called from inside operations.
func (s *Session) fail(err error) {
	s.closeWith(err, !errors.Is(err, ErrPeerClosed))
}

// closeWith records the reason, fences new users, tells the peer (without
// ever blocking on the socket) and closes it, which unblocks any writer and
// the reader. It must not be called with allocMu, sendMu or relMu held.
func (s *Session) closeWith(reason error, tellPeer bool) {
	s.closeOnce.Do(func() {
		s.errMu.Lock()
		s.err = reason
		s.errMu.Unlock()
		if errors.Is(reason, ErrCorrupt) {
			corruptSessions.Add(1)
			klog.Warnf("kshm: closing session with pid %d: %v", s.peerPID, reason)
		}
		unregister(s) // settles the process-wide counters before Done
		if n := s.heldFromPeer(); n > 0 {
			klog.Warnf("kshm: session with pid %d closed while this process still holds %d of its buffers unreleased; "+
				"both regions stay mapped until every received message is released", s.peerPID, n)
		}
		// Tell the peer's observers before our hold goes (the mapping may be
		// unmapped as soon as the closing bit is set).
		if s.life.beginOp() {
			atomic.StoreUint32(&s.localHdr.Closing, 1)
			s.life.endOp()
		}
		s.life.close() // fence: from here no operation or hold starts
		s.settleHolds()
		close(s.done)
		s.ringDoorbell()
		if tellPeer && s.wmu.TryLock() {
			// Best effort and never blocking: the peer also sees the socket
			// close. A writer holding wmu is unblocked by conn.Close below.
			msg := reason.Error()
			if len(msg) > maxCloseReason {
				msg = msg[:maxCloseReason]
			}
			f := make([]byte, frameHeaderSize+len(msg))
			putFrameHeader(f, frameClose, uint32(len(msg)))
			copy(f[frameHeaderSize:], msg)
			s.writeNonblocking(f)
			s.wmu.Unlock()
		}
		s.conn.Close()
	})
}

// settleHolds returns the holds that the caches keep in the word after
// close has set the closing bit (so no cache refills): the allocator's
// spare holds and those of the buffers the peer still holds (a buffer
// still local keeps its own until Free), the release path's, and the Recv
// turn's if the turn is free (else its holder returns them as it leaves,
// recvLeave). It must not be called with allocMu, sendMu or relMu held.
func (s *Session) settleHolds() {
	s.allocMu.Lock()
	s.sendMu.Lock() // no Send moves a buffer from local to sent meanwhile
	n := s.allocHolds + (s.sendCounts.bufs - s.allocCounts.reclaimed)
	s.allocHolds = 0
	s.allocClosed = true
	s.sendMu.Unlock()
	s.allocMu.Unlock()
	s.relMu.Lock()
	n += s.relHolds
	s.relHolds = 0
	s.relMu.Unlock()
	if s.recvTurn.tryTake() {
		s.settleRecvHolds()
		s.recvTurn.give()
	}
	s.life.dropHolds(int(n))
}
