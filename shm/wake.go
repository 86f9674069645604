package shm

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The wake protocol. A receiver that finds nothing to read marks itself
// sleeping in its region's State word (the sleeper count and an epoch
// bumped by each sleep), rechecks the peer's ring, and blocks until its
// reader sees a wake frame. A sender publishes its tail, then reads the
// peer's State (the Dekker pair: one of the two sees the other) and writes a
// wake frame only if the peer sleeps in an epoch it has not woken yet. The
// write never blocks: if the socket is full, frames are already queued and
// any frame wakes the peer.
const (
	stateSleeper  = 1
	stateEpochOne = 1 << 32
	sleeperMask   = 1<<32 - 1
)

// peerNeedsWake reports whether the peer's receiver sleeps in an epoch no
// sender has woken yet, and records that we wake it. sendMu held, after the
// tail store.
func (s *Session) peerNeedsWake() bool {
	st := atomic.LoadUint64(&s.peerHdr.State)
	if st&sleeperMask == 0 {
		return false
	}
	ep := uint32(st>>32) + 1
	old := uint32(s.lastWake.Load())
	// Newer epochs only: a stale read never moves lastWake backwards
	// (epochs wrap, hence the signed difference).
	if old != 0 && int32(ep-old) <= 0 {
		return false
	}
	s.lastWake.Store(uint64(ep))
	return true
}

// wakePeer writes one wake frame, by us or by whoever holds wmu now (it
// writes pending wake-ups before it lets go). It never blocks.
func (s *Session) wakePeer() {
	s.wakePending.Store(true)
	for s.writesPending() && s.wmu.TryLock() {
		s.flushWakeLocked()
		s.wmu.Unlock()
	}
}

// unlockWriter releases wmu after writing any wake-up that came meanwhile.
func (s *Session) unlockWriter() {
	s.flushWakeLocked()
	s.wmu.Unlock()
	for s.writesPending() && s.wmu.TryLock() {
		s.flushWakeLocked()
		s.wmu.Unlock()
	}
}

// writesPending reports whether a wake-up or a control frame waits for the
// writer lock's next holder. A full socket does not count: its frames are
// retried by later writers and housekeeping, not spun on.
func (s *Session) writesPending() bool {
	return s.wakePending.Load() || (s.ctrlPending.Load() && !s.ctrlStuck.Load())
}

// flushWakeLocked writes a pending wake-up and queued control frames. wmu
// held.
func (s *Session) flushWakeLocked() {
	s.flushCtrlLocked()
	if !s.wakePending.Swap(false) {
		return
	}
	var f [frameHeaderSize]byte
	putFrameHeader(f[:], frameWake, 0)
	n, err := s.writeNonblocking(f[:])
	switch {
	case err == nil && n == len(f):
		s.events.wakeupsSent.Add(1)
	case n <= 0 && errors.Is(err, unix.EAGAIN):
		// The peer has not read what we wrote before: those frames wake it.
	default:
		s.fail(fmt.Errorf("%w: wake-up write: %d bytes, %v", ErrPeerClosed, n, err))
	}
}

// writeNonblocking makes one non-blocking write to the socket. wmu held.
func (s *Session) writeNonblocking(b []byte) (int, error) { return s.sendNonblocking(b, nil) }

// sendNonblocking makes one non-blocking write of b with the control
// message oob (descriptors). wmu held.
func (s *Session) sendNonblocking(b, oob []byte) (int, error) {
	var n int
	var werr error
	if err := s.rc.Write(func(fd uintptr) bool {
		n, werr = rawSendmsg(int(fd), b, oob)
		return true
	}); err != nil {
		return 0, err
	}
	return n, werr
}

// sleep marks our receiver sleeping, rechecks the ring (so a message
// published before the mark is not missed), and blocks until a wake-up, an
// inline message, ctx or close. Recv turn held, inside an operation.
func (s *Session) sleep(ctx context.Context) error {
	s.reclaim()
	select { // drop a stale wake-up
	case <-s.recvWake:
	default:
	}
	atomic.AddUint64(&s.localHdr.State, stateEpochOne|stateSleeper)
	defer atomic.AddUint64(&s.localHdr.State, ^uint64(stateSleeper-1))
	if atomic.LoadUint64(&s.peerHdr.RingTail) != s.peerHead || len(s.inlineQ) > 0 {
		return nil
	}
	s.events.sleeps.Add(1)
	select {
	case <-s.recvWake:
	case <-s.done:
	case <-ctx.Done():
		return ctxErr(ctx)
	}
	return nil
}

// pause lets others run between polls: other goroutines of this process
// when some wait for a processor and none is idle, and other threads of the
// machine (the peer, when it shares our core) every 256th time when the
// machine has more runnable threads than CPUs. With nothing else runnable it
// does neither: a Gosched or sched_yield would only add a trip through a
// scheduler. Gosched is never used while a processor is idle: the runtime
// already woke a thread for the waiting goroutine, and Gosched would wake
// another (goschedImpl calls wakep), a context switch per pause.
func (s *Session) pause(i int) {
	if i&255 == 0 && sched.cpuBusy.Load() {
		osYield()
		return
	}
	if sched.goWant.Load() {
		runtime.Gosched()
		sched.goWant.Store(false) // until a fresh sample says so again
		sched.goNext.Store(0)
	}
}

// The spin policy (notify mode). A receiver that finds nothing polls for a
// budget, then sleeps. The budget follows the typical wait: an average of
// recent waits (weight 1/8, each sample capped at twice SpinTime so that
// one preempted or idle wait moves it by a bounded step). While the typical
// wait is within SpinTime, the receiver polls for twice it plus minSpin,
// and at least wakeCost, capped at SpinTime: sleeping costs a wake-up (the
// peer's system call, and a thread, often a halted vCPU, woken here), so
// polling for as long as a wake-up costs is never worse than sleeping at
// once (the competitive spin-then-block rule), and a wait a few µs longer
// than usual does not pay one. When waits are typically longer, it polls
// for minSpin only and sleeps, so an idle session costs no CPU. It also
// stops polling while the process has more runnable goroutines than
// GOMAXPROCS: its processor is wanted.

// minSpin is how long a receiver polls before sleeping when its waits are
// long anyway.
const minSpin = 2 * time.Microsecond

// wakeCost is about what a sleep and its wake-up cost: on the 2-vCPU VMs
// this was built on, a futex wake-up round trip between two threads is
// 20-30 µs and a channel one 80 µs (the benchmark's calibration); polling
// at least this long before sleeping took the engine's 64 B round trips
// from 0.9 to 0.1-0.2 context switches per call and 27 to 5-11 µs of CPU.
const wakeCost = 50 * time.Microsecond

// spinBudget is how long Recv polls before it sleeps. Recv turn held.
func (s *Session) spinBudget() time.Duration {
	typical := time.Duration(s.waitAvg)
	if s.cfg.SpinTime <= minSpin || typical > s.cfg.SpinTime {
		return min(minSpin, s.cfg.SpinTime)
	}
	return min(max(2*typical+minSpin, wakeCost), s.cfg.SpinTime)
}

// keepSpinning reports whether a receiver that has polled since spinStart
// should go on. now is the current time. Recv turn held.
func (s *Session) keepSpinning(now, spinStart time.Time, budget time.Duration) bool {
	if now.Sub(spinStart) >= budget {
		return false
	}
	sched.refresh(now.UnixNano())
	return !sched.goBusy.Load()
}

// observeWait folds one wait into the average. Recv turn held.
func (s *Session) observeWait(d time.Duration) {
	d = min(d, 2*s.cfg.SpinTime)
	s.waitAvg += (int64(d) - s.waitAvg) / 8
}
