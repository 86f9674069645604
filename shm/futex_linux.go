package shm

import (
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Futex sleeps (wake.go). A receiver that sleeps on a futex blocks its own
// thread in the kernel on two words at once, with futex_waitv(2): the low
// half of the peer's ring tail (in the peer's region, which we map shared,
// so the kernel keys it by the memfd page and the peer's FUTEX_WAKE on its
// own mapping reaches us) and our doorbell (private), which our reader,
// close and ctx cancellation ring. The sender's wake-up is then one system
// call that readies the sleeping thread itself: no socket write, no poller
// thread, no hand-off from our reader goroutine to the receiver.
const (
	sysFutexWaitv  = 449 // futex_waitv(2), Linux 5.16; one number on every architecture
	futexWakeOp    = 1   // FUTEX_WAKE
	futexPrivate   = 128 // FUTEX_PRIVATE_FLAG
	futex2SizeU32  = 0x02
	futex2Private  = 128
	clockMonotonic = 1
)

// futexWaiter is struct futex_waitv.
type futexWaiter struct {
	val      uint64
	uaddr    uint64
	flags    uint32
	reserved uint32
}

// futexWaitvOK reports whether the kernel has futex_waitv: a call with no
// waiters fails with EINVAL there, and with ENOSYS (or EPERM under a
// seccomp filter) where it cannot be used.
var futexWaitvOK = func() bool {
	_, _, e := syscall.RawSyscall6(sysFutexWaitv, 0, 0, 0, 0, 0, 0)
	return e == syscall.EINVAL
}()

// futexWaitTwo blocks until the 32-bit word at shared differs from
// sharedVal, bell differs from bellVal, either is woken, or timeout passes.
// shared may be woken by another process (it must lie in a shared mapping);
// bell is private to this process. It reports whether the timeout passed.
//
// It is a blocking system call through syscall.Syscall6, so the runtime
// counts it as one: the garbage collector does not wait for it, and a
// processor it holds longer than a sysmon tick while other goroutines are
// runnable is handed to another thread.
func futexWaitTwo(shared *uint32, sharedVal uint32, bell *atomic.Uint32, bellVal uint32, timeout time.Duration) (timedOut bool) {
	w := [2]futexWaiter{
		{val: uint64(sharedVal), uaddr: uint64(uintptr(unsafe.Pointer(shared))), flags: futex2SizeU32},
		{val: uint64(bellVal), uaddr: uint64(uintptr(unsafe.Pointer(bell))), flags: futex2SizeU32 | futex2Private},
	}
	var now syscall.Timespec
	// clock_gettime is a real system call here, not the vDSO; raw, so
	// that it does not look like a blocking call to sysmon.
	syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, clockMonotonic, uintptr(unsafe.Pointer(&now)), 0)
	deadline := syscall.NsecToTimespec(now.Nano() + int64(timeout))
	for {
		_, _, e := syscall.Syscall6(sysFutexWaitv, uintptr(unsafe.Pointer(&w[0])), uintptr(len(w)), 0,
			uintptr(unsafe.Pointer(&deadline)), clockMonotonic, 0)
		switch e {
		case syscall.EINTR: // a signal (profiling, preemption): wait on
		case syscall.ETIMEDOUT:
			return true
		default: // woken, or a word already differed (EAGAIN)
			return false
		}
	}
}

// futexWakeShared wakes a waiter, in any process, on the shared word at p.
// It never blocks.
func futexWakeShared(p *uint64) {
	syscall.RawSyscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(p)), futexWakeOp, 1, 0, 0, 0)
}

// futexWakePrivate wakes a waiter of this process on the word at p.
func futexWakePrivate(p *atomic.Uint32) {
	syscall.RawSyscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(p)), futexWakeOp|futexPrivate, 1, 0, 0, 0)
}
