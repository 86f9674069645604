package shm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudwego/kitex/pkg/klog"
	"golang.org/x/sys/unix"
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
	rx := &fdReader{rc: s.rc, oob: make([]byte, unix.CmsgSpace(4*MaxRegions)), buf: make([]byte, readAhead)}
	defer rx.closeAll()
	for {
		if now := time.Now(); !now.Before(next) {
			passes++
			s.housekeep(now, passes%leakScanEvery == 0)
			fl.decay()
			next = now.Add(housekeepEvery)
		}
		s.conn.SetReadDeadline(next)
		got, err := rx.readFull(hdr[:])
		if err != nil && got > 0 && got < frameHeaderSize && isTimeout(err) {
			// Never lose a frame's alignment to the housekeeping deadline.
			s.conn.SetReadDeadline(deadlineAfter(frameBodyTimeout))
			var k int
			k, err = rx.readFull(hdr[got:])
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
		if err := rx.err; err != nil {
			s.fail(err)
			return
		}
		if !s.handleFrame(fh, &fl, rx) {
			return
		}
	}
}

// handleFrame handles one frame; false ends the reader.
func (s *Session) handleFrame(fh frameHeader, fl *floodCheck, rx *fdReader) bool {
	if !s.life.beginOp() {
		return false
	}
	defer s.life.endOp()
	switch fh.Type {
	case frameGrow, frameGrowAck, frameShrink:
		body := make([]byte, fh.Len)
		s.conn.SetReadDeadline(deadlineAfter(frameBodyTimeout))
		if _, err := rx.readFull(body); err != nil {
			s.closeWith(fmt.Errorf("%w: frame body: %v", ErrPeerClosed, err), false)
			return false
		}
		var err error
		switch fh.Type {
		case frameGrow:
			err = s.peerGrow(body, rx.take())
		case frameGrowAck:
			err = s.growAcked(binary.LittleEndian.Uint32(body))
		case frameShrink:
			err = s.peerShrink(binary.LittleEndian.Uint32(body))
		}
		if err == nil && fh.Type != frameGrow && binary.LittleEndian.Uint32(body[4:]) != 0 {
			err = fmt.Errorf("%w: frame type %d reserved bytes", ErrCorrupt, fh.Type)
		}
		if err != nil {
			s.fail(err)
			return false
		}
	case frameWake:
		if err := fl.wake(uint32(atomic.LoadUint64(&s.localHdr.State) >> 32)); err != nil {
			s.fail(err)
			return false
		}
		s.signalRecv()
	case frameClose:
		reason := make([]byte, fh.Len)
		s.conn.SetReadDeadline(deadlineAfter(frameBodyTimeout))
		rx.readFull(reason)
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
		if _, err := rx.readFull(buf); err != nil {
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
	s.ringDoorbell()
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

// fdReader reads the socket ahead, in a buffer (many frames per system
// call), keeping the descriptors that come with the bytes (a frameGrow's
// memfd) in order, for the frame that claims them: a descriptor arrives no
// later than its frame's first byte. It belongs to the reader goroutine.
type fdReader struct {
	rc   syscall.RawConn // the session's socket
	oob  []byte
	buf  []byte // read ahead: buf[r:w] not yet consumed
	r, w int
	fds  []int // received, not yet claimed, in order
	err  error // descriptors arrived that no frame can claim
}

const readAhead = 64 << 10

// readFull reads exactly len(b) bytes, keeping descriptors. On error it
// returns how many bytes it read.
func (r *fdReader) readFull(b []byte) (int, error) {
	n := r.take0(b)
	for n < len(b) {
		// A large remainder goes straight into b; a small one through the
		// buffer.
		direct := len(b)-n >= len(r.buf)
		dst := r.buf
		if direct {
			dst = b[n:]
		}
		k, oobn, flags, err := recvmsg(r.rc, dst, r.oob)
		k = max(k, 0) // -1 with some errors
		if oobn > 0 {
			r.keep(r.oob[:oobn])
		}
		if flags&unix.MSG_CTRUNC != 0 && r.err == nil {
			r.err = fmt.Errorf("%w: %w: descriptors truncated", ErrCorrupt, ErrRegionLimit)
		}
		if direct {
			n += k
		} else {
			r.r, r.w = 0, k
			n += r.take0(b[n:])
		}
		if err != nil && n < len(b) {
			return n, err
		}
	}
	return n, nil
}

// take0 copies buffered bytes into b.
func (r *fdReader) take0(b []byte) int {
	k := copy(b, r.buf[r.r:r.w])
	r.r += k
	return k
}

func (r *fdReader) keep(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		if r.err == nil {
			r.err = fmt.Errorf("%w: control message: %v", ErrCorrupt, err)
		}
		return
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if len(r.fds) >= MaxRegions {
				unix.Close(fd)
				if r.err == nil {
					r.err = fmt.Errorf("%w: %w: more than %d descriptors unclaimed", ErrCorrupt, ErrRegionLimit, MaxRegions)
				}
				continue
			}
			r.fds = append(r.fds, fd)
		}
	}
}

// take returns the oldest unclaimed descriptor, or -1.
func (r *fdReader) take() int {
	if len(r.fds) == 0 {
		return -1
	}
	fd := r.fds[0]
	r.fds = r.fds[1:]
	return fd
}

func (r *fdReader) closeAll() {
	for _, fd := range r.fds {
		unix.Close(fd)
	}
	r.fds = nil
}

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
	s.shrinkIdle(now.UnixNano())
	s.flushCtrl() // frames a full socket held back
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
