package shm

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cloudwego/kitex/pkg/klog"
	"golang.org/x/sys/unix"
)

// The wake protocol. A receiver that finds nothing to read marks itself
// sleeping in its region's State word (the sleeper count and an epoch
// bumped by each sleep), rechecks the peer's ring, and blocks. A sender
// publishes its tail, then reads the peer's State (the Dekker pair: one of
// the two sees the other) and wakes the peer only if it sleeps in an epoch
// no sender has woken yet.
//
// The receiver sleeps one of two ways, and says which in State:
//   - on a futex (stateFutex set; futex_linux.go): its thread blocks on the
//     low half of the peer's ring tail and on our doorbell, and the sender
//     wakes it with FUTEX_WAKE on its own ring tail. One system call, and
//     the woken thread is the receiver's own: nothing is handed over. Used
//     while no other goroutine waits for a processor (the blocked thread
//     keeps its processor; futexUsable), for a few typical waits at most,
//     so that an idle session holds no thread;
//   - on the socket: it blocks on a channel that our reader signals when a
//     wake frame arrives, and the sender writes one. The write never
//     blocks: if the socket is full, frames are already queued and any
//     frame wakes the peer.
//
// A sender that does not know stateFutex (an older kshm) sees a sleeper
// and writes a wake frame; our reader then rings the doorbell, so a futex
// sleeper is woken either way.
const (
	stateSleeper  = 1
	stateFutex    = 1 << 31 // the sleeper waits on a futex, not the socket
	stateEpochOne = 1 << 32
	sleeperMask   = 1<<32 - 1      // a sleeper, either way
	sleeperCount  = stateFutex - 1 // the number of sleepers
)

// peerNeedsWake reports whether the peer's receiver sleeps in an epoch no
// sender has woken yet, and records that we wake it. sendMu held, after the
// tail store.
func (s *Session) peerNeedsWake() (wake, futex bool) {
	st := atomic.LoadUint64(&s.peerHdr.State)
	if st&sleeperMask == 0 {
		return false, false
	}
	ep := uint32(st>>32) + 1
	old := uint32(s.lastWake.Load())
	// Newer epochs only: a stale read never moves lastWake backwards
	// (epochs wrap, hence the signed difference).
	if old != 0 && int32(ep-old) <= 0 {
		return false, false
	}
	s.lastWake.Store(uint64(ep))
	return true, st&stateFutex != 0 && futexWaitvOK && futexWakeEnabled
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
// inline message, ctx or close: on the futex first when it may, then on
// the socket (the wake protocol above). A sleep counts once in Sleeps,
// whichever way it ends. Recv turn held, inside an operation.
func (s *Session) sleep(ctx context.Context) error {
	s.reclaim()
	counted := false
	if s.futexUsable() {
		done, err := s.sleepFutex(ctx)
		if done {
			return err
		}
		counted = true
	}
	select { // drop a stale wake-up
	case <-s.recvWake:
	default:
	}
	atomic.AddUint64(&s.localHdr.State, stateEpochOne|stateSleeper)
	defer atomic.AddUint64(&s.localHdr.State, ^uint64(stateSleeper-1))
	if atomic.LoadUint64(&s.peerHdr.RingTail) != s.peerHead || len(s.inlineQ) > 0 {
		return nil
	}
	if !counted {
		s.events.sleeps.Add(1)
	}
	select {
	case <-s.recvWake:
	case <-s.done:
	case <-ctx.Done():
		return ctxErr(ctx)
	}
	return nil
}

// pauseKind says what a pause did (for tests).
type pauseKind int

const (
	pausedNot     pauseKind = iota // polled on
	pausedGosched                  // gave our processor to another goroutine
	pausedOS                       // gave the CPU to another thread
)

// pause lets others run between polls: other goroutines of this process
// when more are runnable than there are processors, or when some wait for
// a processor and none is idle; and other threads of the machine (the
// peer, when it shares our core) every 256th time when the machine has
// more runnable threads than CPUs. With nothing else runnable it does
// neither: a Gosched or sched_yield would only add a trip through a
// scheduler. Gosched is not used while a processor is idle: the runtime
// already woke a thread for the waiting goroutine, and Gosched would wake
// another (goschedImpl calls wakep), a context switch per pause.
//
// While the process has more runnable goroutines than processors, a poller
// thus yields at every pause instead of spinning: it checks the ring once
// each time the run queue comes round to it, and takes no processor time
// from the others. It does not sleep for that reason: a sleeping receiver
// costs the peer a wake-up write and us the reader's read and a goroutine
// readied, and under load the ring is rarely empty for long. Sleeping
// whenever the process was busy took the engine at concurrency 16 and
// 64 B from 277 k to 102-121 k calls per second against polling, with the
// wake-up system calls a third of the server's CPU profile.
func (s *Session) pause(i int) pauseKind {
	if i&255 == 0 && sched.cpuBusy.Load() {
		osYield()
		return pausedOS
	}
	if sched.goBusy.Load() {
		runtime.Gosched()
		return pausedGosched
	}
	if sched.goWant.Load() {
		runtime.Gosched()
		sched.goWant.Store(false) // until a fresh sample says so again
		sched.goNext.Store(0)
		return pausedGosched
	}
	return pausedNot
}

// The spin policy (notify mode). A receiver that finds nothing polls for a
// budget, then sleeps. Polling costs CPU for as long as the wait; sleeping
// costs a wake-up (the peer's system call, and a thread, often a halted
// vCPU, woken here), about wakeCost, and adds its latency. So the budget
// follows two streaming quantiles of recent waits:
//   - while twice the median fits in SpinTime, the receiver polls for
//     twice the median plus minSpin, at least wakeCost (polling for as long
//     as a wake-up costs is never worse than sleeping at once: the
//     competitive spin-then-block rule), capped at SpinTime; a wait a few
//     µs longer than usual then does not pay a wake-up;
//   - otherwise, while twice the lower quartile plus minSpin is at most
//     wakeCost (and SpinTime), it polls for that long: a quarter of the
//     waits or more end within less than a wake-up's cost;
//   - otherwise it polls for minSpin only and sleeps. An idle session
//     therefore costs no CPU.
//
// The second rule is for bimodal waits. A Kitex server whose client sets
// an RPC timeout waits 5-10 µs for about half its requests and 50-130 µs
// for the rest (the client's Kitex runs each call on a worker goroutine
// and hands the result back). The median sits near the threshold, and on
// the median alone the server slept for about half its requests: its 64 B
// p50 went from 0.14x to 0.86x netpoll's in a full run. Deciding on the
// lower quartile alone, with the median's budget, polled through 64 KiB
// waits again and cost 1.1x netpoll's CPU there; polling only as long as
// the short mode lasts does not.
//
// SpinTime thus says how much CPU a receiver may spend to save a wake-up's
// latency. The engine's default (1 ms) polls through waits of up to
// 500 µs; the Kitex transport's (transport.DefaultSpinTime, 100 µs) only
// through waits shorter than about a wake-up, because there the peer's
// process collects garbage while we wait: polling through its work cost
// 1.4x netpoll's CPU per call at 64 KiB, and sleeping at once 0.9-1.1x.
//
// Quantiles, not the mean: a garbage collection or a preemption now and
// then makes a few waits of milliseconds, which would pull a mean far up
// while most waits are short. While the process has more runnable
// goroutines than GOMAXPROCS, the poller yields its processor at every
// pause (pause, above) rather than spin on it.

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
	if s.cfg.SpinTime <= minSpin {
		return s.cfg.SpinTime
	}
	if mid := 2*time.Duration(s.waitMid) + minSpin; mid <= s.cfg.SpinTime {
		return min(max(mid, wakeCost), s.cfg.SpinTime)
	}
	if low := 2*time.Duration(s.waitLow) + minSpin; low <= min(wakeCost, s.cfg.SpinTime) {
		return low
	}
	return minSpin
}

// keepSpinning reports whether a receiver that has polled since spinStart
// should go on, and refreshes the scheduler's sample for its pause. now is
// the current time. Recv turn held.
func (s *Session) keepSpinning(now, spinStart time.Time, budget time.Duration) bool {
	if now.Sub(spinStart) >= budget {
		return false
	}
	sched.refresh(now.UnixNano())
	return true
}

// waitSampleCap bounds a wait's weight in the mean, so that one preempted or
// idle wait moves it by a bounded step.
const waitSampleCap = time.Millisecond

// observeWait folds one wait into the mean (weight 1/8, each sample capped
// at waitSampleCap), the median and the lower quartile. Recv turn held.
func (s *Session) observeWait(d time.Duration) {
	s.waitAvg += (int64(min(d, waitSampleCap)) - s.waitAvg) / 8
	trackQuantile(&s.waitMid, int64(d), 1)
	trackQuantile(&s.waitLow, int64(d), 3)
}

// trackQuantile moves a streaming quantile estimate q towards sample x:
// down by a sixteenth of q (at least 100 ns) when x is at or below it, up
// by that step divided by upDiv when x is above. It settles where the steps
// balance, with a fraction 1/(1+upDiv) of the samples at or below it:
// upDiv 1 tracks the median, 3 the lower quartile.
func trackQuantile(q *int64, x int64, upDiv int64) {
	step := *q/16 + int64(100*time.Nanosecond)
	if x > *q {
		*q += step / upDiv
	} else {
		*q = max(*q-step, 0)
	}
}

// A futex sleep lasts about four typical waits, within [futexSleepMin,
// futexSleepMax]; the receiver then sleeps on the socket, which holds no
// thread. (Variables for tests.)
var (
	futexSleepMin = 200 * time.Microsecond
	futexSleepMax = 5 * time.Millisecond
)

// futexWakeEnabled lets tests play a sender that predates futex sleeps.
var futexWakeEnabled = true

// futexUsable reports whether the receiver should sleep on the futex now:
// the kernel has futex_waitv, the peer has not flooded us with futex
// wake-ups, and no goroutine of ours waits for a processor. A thread
// blocked in a system call keeps its processor until sysmon takes it away
// (a hand-off to another thread, after one or two of sysmon's ticks, 20 µs
// to 10 ms): goroutines waiting for one would wait that long. For the same
// reason sleepFutex leaves one processor free of futex sleepers. Recv turn
// held.
func (s *Session) futexUsable() bool {
	if !futexWaitvOK || s.futexOff {
		return false
	}
	if !futexLoadCheck {
		return true
	}
	sched.refresh(time.Now().UnixNano())
	return !sched.goWant.Load() && !sched.goBusy.Load()
}

// futexSleepers counts this process's receivers sleeping on a futex: at
// most GOMAXPROCS-1, so that one processor is always left to the rest of
// the process (timers, the network poller, other goroutines) without
// waiting for sysmon, and none with GOMAXPROCS 1.
var futexSleepers atomic.Int32

// reserveFutexSleep takes a futex sleeper's place; false if none is left.
func reserveFutexSleep() bool {
	if futexSleepers.Add(1) <= int32(runtime.GOMAXPROCS(0)-1) {
		return true
	}
	futexSleepers.Add(-1)
	return false
}

// futexLoadCheck is off in tests that need a futex sleep whatever the
// scheduler's load.
var futexLoadCheck = true

// sleepFutex sleeps on the peer's ring tail and our doorbell (see the wake
// protocol above), for about four typical waits. done is false if it slept
// that long, or if GOMAXPROCS-1 receivers already sleep on futexes: the
// caller then sleeps on the socket. Recv turn held, inside
// an operation.
func (s *Session) sleepFutex(ctx context.Context) (done bool, err error) {
	if !reserveFutexSleep() {
		return false, nil
	}
	defer futexSleepers.Add(-1)
	s.futexSleeping.Store(true)
	defer s.futexSleeping.Store(false)
	bell := s.doorbell.Load()
	const futexSleeper = stateSleeper | stateFutex
	atomic.AddUint64(&s.localHdr.State, stateEpochOne|futexSleeper)
	defer atomic.AddUint64(&s.localHdr.State, ^uint64(futexSleeper-1)) // subtracts futexSleeper
	head := s.peerHead
	if atomic.LoadUint64(&s.peerHdr.RingTail) != head || len(s.inlineQ) > 0 || s.life.closed() {
		return true, nil
	}
	timeout := min(max(4*time.Duration(s.waitAvg), futexSleepMin), futexSleepMax)
	if ctx.Done() != nil {
		if ctxDone(ctx) {
			return true, ctxErr(ctx)
		}
		// A ctx with a deadline ends the sleep at its deadline (a ctx
		// cancelled earlier is seen when the sleep ends, within
		// futexSleepMax); one without is watched by AfterFunc, which
		// for such a ctx (a context.WithCancel) costs no goroutine.
		// Callers such as the Kitex transport reuse one ctx type whose
		// Done only its own goroutine may call.
		if dl, ok := ctx.Deadline(); ok {
			if timeout = min(timeout, time.Until(dl)); timeout <= 0 {
				return false, nil // the socket sleep returns at once
			}
		} else {
			stop := context.AfterFunc(ctx, s.ringDoorbell)
			defer stop()
		}
	}
	s.events.sleeps.Add(1)
	tail := (*uint32)(unsafe.Pointer(&s.peerHdr.RingTail)) // the low half
	timedOut := futexWaitTwo(tail, uint32(head), &s.doorbell, bell, timeout)
	if ctxDone(ctx) {
		return true, ctxErr(ctx)
	}
	if timedOut {
		return false, nil
	}
	s.countFutexWake(atomic.LoadUint64(&s.peerHdr.RingTail) != head || s.doorbell.Load() != bell || len(s.inlineQ) > 0)
	return true, nil
}

// countFutexWake counts a futex wake-up that found nothing new (spurious)
// against those that did. A peer that keeps waking us for nothing would
// keep our receiver polling; past wakeSlack net spurious wake-ups the
// session sleeps on the socket only, where its wake frames are counted
// against our sleeps (reader.go). An honest peer wakes each sleep at most
// once. Recv turn held.
func (s *Session) countFutexWake(found bool) {
	if found {
		s.futexSpurious = max(s.futexSpurious-1, 0)
		return
	}
	if s.futexSpurious++; s.futexSpurious > wakeSlack {
		s.futexOff = true
		klog.Warnf("kshm: session with pid %d: %d futex wake-ups beyond those that found a message; sleeping on the socket from now on", s.peerPID, s.futexSpurious)
	}
}

// ringDoorbell wakes our receiver if it sleeps on the futex (a wake frame
// or an inline message arrived, the session closes, or its ctx ends).
func (s *Session) ringDoorbell() {
	s.doorbell.Add(1)
	if s.futexSleeping.Load() {
		futexWakePrivate(&s.doorbell)
	}
}
