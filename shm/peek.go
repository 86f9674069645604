package shm

import "sync/atomic"

// Waiting reports whether a message is waiting to be received: the peer
// has published one that Recv has not taken yet, in its ring or as an
// inline frame. It is a hint for a caller deciding whether another
// goroutine should receive while it works: a message may arrive just after
// it answers false. Any goroutine may call it; false once the session is
// closed.
func (s *Session) Waiting() bool {
	if !s.life.beginOp() {
		return false
	}
	defer s.life.endOp()
	return len(s.inlineQ) > 0 || atomic.LoadUint64(&s.peerHdr.RingTail) != atomic.LoadUint64(&s.localHdr.PeerRingHead)
}
