package shm

import (
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// osYield gives up the CPU to another runnable thread (sched_yield). It is a
// raw system call, as the runtime's own osyield is: a yield that lets
// another thread run returns only when this one is scheduled again, often
// after more than one sysmon tick, and through syscall.Syscall the runtime
// would count that as a blocking system call. sysmon then hands our
// processor to another thread (a wake-up, then a stopped thread when the
// yield returns) and resets its own sleep to 20 µs. Measured at Kitex 16 KiB
// c=1, sysmon's wake-ups were then a third of all context switches.
func osYield() { syscall.RawSyscall(syscall.SYS_SCHED_YIELD, 0, 0, 0) }

// schedLoad tells pollers how busy the schedulers are, from samples taken
// at most every goSampleEvery (the Go scheduler, runtime/metrics) and
// cpuSampleEvery (the machine's, /proc/loadavg), by whichever poller asks
// first. Reading it costs two atomic loads; a Go sample (runtime/metrics,
// three scheduler metrics) costs about 120 ns and takes the runtime's
// scheduler lock, so it is taken at most every 10 µs; a Gosched clears the
// flag until the next sample, so a stale sample costs one Gosched at most.
type schedLoad struct {
	mu      sync.Mutex   // guards sample and the refreshes
	goNext  atomic.Int64 // unix nanoseconds of the next refresh of each
	cpuNext atomic.Int64
	goBusy  atomic.Bool // more goroutines runnable than GOMAXPROCS
	goWant  atomic.Bool // some goroutine runnable and no processor idle
	cpuBusy atomic.Bool // more threads runnable on the machine than CPUs
	sample  []metrics.Sample
	loadavg int       // descriptor of /proc/loadavg: 0 not yet open, -1 unavailable
	buf     [128]byte // its contents
}

const (
	goSampleEvery  = 10 * time.Microsecond
	cpuSampleEvery = time.Millisecond
	runnableMetric = "/sched/goroutines/runnable:goroutines"
	runningMetric  = "/sched/goroutines/running:goroutines"
	notInGoMetric  = "/sched/goroutines/not-in-go:goroutines"
)

var sched = schedLoad{sample: []metrics.Sample{{Name: runnableMetric}, {Name: runningMetric}, {Name: notInGoMetric}}}

// refresh takes new samples if they are due. now is unix nanoseconds.
func (l *schedLoad) refresh(now int64) {
	if now < l.goNext.Load() && now < l.cpuNext.Load() || !l.mu.TryLock() {
		return
	}
	defer l.mu.Unlock()
	if now >= l.goNext.Load() {
		l.goNext.Store(now + int64(goSampleEvery))
		metrics.Read(l.sample)
		procs := uint64(runtime.GOMAXPROCS(0))
		runnable, okRunnable := sampleUint(l.sample[0])
		running, okRunning := sampleUint(l.sample[1])
		notInGo, _ := sampleUint(l.sample[2])
		if okRunnable {
			l.goBusy.Store(runnable > procs)
			if !okRunning {
				running = procs // unknown: assume every processor busy
			}
			l.goWant.Store(processorWanted(runnable, running, notInGo, procs))
		}
	}
	if now >= l.cpuNext.Load() {
		l.cpuNext.Store(now + int64(cpuSampleEvery))
		if running, ok := l.machineRunnable(); ok {
			l.cpuBusy.Store(running > runtime.NumCPU())
		} else {
			l.cpuBusy.Store(true) // unknown: yield as before
		}
	}
}

// processorWanted reports whether a runnable goroutine waits with no idle
// processor to run it: only then does giving up ours help. A goroutine made
// runnable while a processor is idle gets one without our help (the runtime
// woke a thread for it when it readied it). Processors of goroutines in
// system calls count as busy.
func processorWanted(runnable, running, notInGo, procs uint64) bool {
	return runnable > 0 && running+notInGo >= procs
}

func sampleUint(s metrics.Sample) (uint64, bool) {
	if s.Value.Kind() != metrics.KindUint64 {
		return 0, false
	}
	return s.Value.Uint64(), true
}

// machineRunnable is the number of threads runnable on the machine now
// (including this one): the fourth field of /proc/loadavg, "running/total".
// It keeps the file open and allocates nothing. l.mu held.
func (l *schedLoad) machineRunnable() (int, bool) {
	if l.loadavg < 0 {
		return 0, false
	}
	if l.loadavg == 0 {
		fd, err := unix.Open("/proc/loadavg", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			l.loadavg = -1
			return 0, false
		}
		l.loadavg = fd
	}
	// A raw system call (rawio_linux.go): procfs never blocks, and
	// through syscall.Syscall this read, the first system call of a
	// poller that starts after its process was idle, woke sysmon into a
	// millisecond of 20 µs polling.
	n, _, e := syscall.RawSyscall6(unix.SYS_PREAD64, uintptr(l.loadavg), uintptr(unsafe.Pointer(&l.buf[0])), uintptr(len(l.buf)), 0, 0, 0)
	if e != 0 || int(n) <= 0 || int(n) > len(l.buf) {
		return 0, false
	}
	return parseRunnable(l.buf[:n])
}

// parseRunnable returns the r of "a b c r/t pid" (/proc/loadavg).
func parseRunnable(b []byte) (int, bool) {
	field := 0
	for i := 0; i < len(b); {
		for i < len(b) && b[i] == ' ' {
			i++
		}
		if field == 3 {
			n, digits := 0, 0
			for ; i < len(b) && b[i] >= '0' && b[i] <= '9' && digits < 9; i++ {
				n = n*10 + int(b[i]-'0')
				digits++
			}
			return n, digits > 0 && i < len(b) && b[i] == '/'
		}
		for i < len(b) && b[i] != ' ' {
			i++
		}
		field++
	}
	return 0, false
}
