package shm

import (
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/cloudwego/kitex/pkg/klog"
)

// wakeSlack is how many wake-ups beyond our sleeps a peer may send before
// the session is closed as a flood. The excess decays by half at every
// housekeeping pass, so an honest peer never accumulates it.
const wakeSlack = 1024

// reader owns the socket after the handshake: wake-ups, inline messages,
// close, and a housekeeping pass every housekeepEvery, busy socket or quiet.
// It handles each frame inside an operation; it blocks on the socket
// outside any.
func (s *Session) reader() {
	defer close(s.readerEnd)
	var hdr [frameHeaderSize]byte
	passes := 0
	next := time.Now().Add(housekeepEvery)
	var fl floodCheck
	for {
		if now := time.Now(); !now.Before(next) {
			passes++
			s.housekeep(now, passes%leakScanEvery == 0)
			fl.decay()
			next = now.Add(housekeepEvery)
		}
		s.conn.SetReadDeadline(next)
		got, err := readFull(s.conn, hdr[:])
		if err != nil && got > 0 && got < frameHeaderSize && isTimeout(err) {
			// Never lose a frame's alignment to the housekeeping deadline.
			s.conn.SetReadDeadline(deadlineAfter(frameBodyTimeout))
			var k int
			k, err = readFull(s.conn, hdr[got:])
			got += k
		}
		if err != nil {
			if isTimeout(err) && got == 0 && !s.life.closed() {
				continue
			}
			s.closeWith(fmt.Errorf("%w: %v", ErrPeerClosed, err), false)
			return
		}
		fh, err := parseFrameHeader(hdr[:])
		if err != nil {
			s.fail(err)
			return
		}
		if !s.handleFrame(fh, &fl) {
			return
		}
	}
}

// handleFrame handles one frame; false ends the reader.
func (s *Session) handleFrame(fh frameHeader, fl *floodCheck) bool {
	if !s.life.beginOp() {
		return false
	}
	defer s.life.endOp()
	switch fh.Type {
	case frameWake:
		if err := fl.wake(uint32(atomic.LoadUint64(&s.localHdr.State) >> 32)); err != nil {
			s.fail(err)
			return false
		}
		s.signalRecv()
	case frameClose:
		reason := make([]byte, fh.Len)
		s.conn.SetReadDeadline(deadlineAfter(frameBodyTimeout))
		readFull(s.conn, reason)
		s.closeWith(fmt.Errorf("%w: %s", ErrPeerClosed, sanitize(reason)), false)
		return false
	case frameInline:
		if uint64(fh.Len)-inlineMetaSize > s.inlineMax {
			s.fail(fmt.Errorf("%w: inline frame of %d bytes, above our MaxInlineSize %d", ErrCorrupt, fh.Len-inlineMetaSize, s.inlineMax))
			return false
		}
		// The bytes queued are bounded: wait (reading nothing more, so the
		// peer's writes block) until the receiver takes enough.
		if !s.waitInlineRoom(int64(fh.Len)) {
			return false
		}
		buf := make([]byte, fh.Len)
		s.conn.SetReadDeadline(deadlineAfter(frameBodyTimeout))
		if _, err := readFull(s.conn, buf); err != nil {
			s.inlineBytes.Add(-int64(fh.Len))
			s.closeWith(fmt.Errorf("%w: inline frame body: %v", ErrPeerClosed, err), false)
			return false
		}
		id, aux, kind, err := parseInlineMeta(buf)
		if err != nil {
			s.fail(err)
			return false
		}
		m := Message{ID: id, Aux: aux, Kind: kind, inline: true, n: 1}
		m.segs[0] = buf[inlineMetaSize:]
		s.inlineBytes.Add(-inlineMetaSize) // queued bytes count the payload only
		select {
		case s.inlineQ <- m:
		case <-s.done:
			return false
		}
		s.events.inlineRecv.Add(1)
		s.signalRecv()
	default:
		s.fail(fmt.Errorf("%w: unexpected frame type %d", ErrCorrupt, fh.Type))
		return false
	}
	return true
}

// inlineBudget is the most inline payload bytes queued for the receiver:
// room for two inline messages of the largest size we accept.
func (s *Session) inlineBudget() int64 { return 2 * int64(s.inlineMax) }

// waitInlineRoom reserves n bytes of the inline budget, waiting for the
// receiver to take queued messages; false if the session closed.
func (s *Session) waitInlineRoom(n int64) bool {
	for {
		if s.inlineBytes.Load() == 0 || s.inlineBytes.Load()+n <= s.inlineBudget() {
			s.inlineBytes.Add(n)
			return true
		}
		select {
		case <-s.inlineRoom:
		case <-s.done:
			return false
		}
	}
}

func (s *Session) signalRecv() {
	select {
	case s.recvWake <- struct{}{}:
	default:
	}
}

// floodCheck limits wake-ups beyond our receiver's sleeps. An honest peer
// wakes each sleep at most once; the excess it may build decays, so a long
// session never drifts towards the limit.
type floodCheck struct {
	excess     int64
	lastSleeps uint32
}

func (f *floodCheck) wake(sleeps uint32) error {
	f.excess += 1 - int64(sleeps-f.lastSleeps)
	f.lastSleeps = sleeps
	if f.excess < 0 {
		f.excess = 0
	}
	if f.excess > wakeSlack {
		return fmt.Errorf("%w: wake-up flood: %d wake-ups beyond our sleeps", ErrCorrupt, f.excess)
	}
	return nil
}

func (f *floodCheck) decay() { f.excess /= 2 }

// deadlineAfter is time.Now().Add(d), for the frame-body deadlines.
func deadlineAfter(d time.Duration) time.Time { return time.Now().Add(d) }

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// housekeep reclaims released buffers, beats the heartbeat, publishes the
// counters and, when asked, logs buffers the peer has held longer than
// LeakThreshold.
func (s *Session) housekeep(now time.Time, scan bool) {
	s.coarseNow.Store(now.UnixNano())
	s.reclaim()
	if !s.life.beginOp() {
		return
	}
	defer s.life.endOp()
	atomic.StoreInt64(&s.localHdr.Heartbeat, now.UnixNano())
	s.publishCounters()
	if !scan || s.cfg.LeakThreshold <= 0 {
		return
	}
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	for i := range s.slotWords {
		w := s.slotWords[i].Load()
		gen := uint32(w >> 32)
		if uint32(w) != slotSent || s.leakLogged[i] == gen {
			continue
		}
		m := &s.local.slots[i]
		if age := time.Duration(now.UnixNano() - m.Time); age > s.cfg.LeakThreshold {
			s.leakLogged[i] = gen
			klog.Warnf("kshm: probable leak: peer pid %d has held buffer slot %d (message id %d, %d bytes) for %v",
				s.peerPID, i, m.ID, m.Len, age.Round(time.Millisecond))
		}
	}
}
