package shm

import (
	"bytes"
	"os"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// osYield gives up the CPU to another runnable thread (sched_yield).
func osYield() { syscall.Syscall(syscall.SYS_SCHED_YIELD, 0, 0, 0) }

// schedLoad tells pollers how busy the schedulers are, from samples taken
// at most every goSampleEvery (the Go scheduler, runtime/metrics) and
// cpuSampleEvery (the machine's, /proc/loadavg), by whichever poller asks
// first. Reading it costs two atomic loads.
type schedLoad struct {
	mu      sync.Mutex   // guards sample and the refreshes
	goNext  atomic.Int64 // unix nanoseconds of the next refresh of each
	cpuNext atomic.Int64
	goBusy  atomic.Bool // more goroutines runnable than GOMAXPROCS
	goRun   atomic.Bool // some goroutine runnable (waiting for a P)
	cpuBusy atomic.Bool // more threads runnable on the machine than CPUs
	sample  []metrics.Sample
}

const (
	goSampleEvery  = 50 * time.Microsecond
	cpuSampleEvery = time.Millisecond
	runnableMetric = "/sched/goroutines/runnable:goroutines"
)

var sched = schedLoad{sample: []metrics.Sample{{Name: runnableMetric}}}

// refresh takes new samples if they are due. now is unix nanoseconds.
func (l *schedLoad) refresh(now int64) {
	if now < l.goNext.Load() && now < l.cpuNext.Load() || !l.mu.TryLock() {
		return
	}
	defer l.mu.Unlock()
	if now >= l.goNext.Load() {
		l.goNext.Store(now + int64(goSampleEvery))
		metrics.Read(l.sample)
		if v := l.sample[0].Value; v.Kind() == metrics.KindUint64 {
			n := v.Uint64()
			l.goBusy.Store(n > uint64(runtime.GOMAXPROCS(0)))
			l.goRun.Store(n > 0)
		}
	}
	if now >= l.cpuNext.Load() {
		l.cpuNext.Store(now + int64(cpuSampleEvery))
		if running, ok := machineRunnable(); ok {
			l.cpuBusy.Store(running > runtime.NumCPU())
		} else {
			l.cpuBusy.Store(true) // unknown: yield as before
		}
	}
}

// machineRunnable is the number of threads runnable on the machine now
// (including this one): the fourth field of /proc/loadavg, "running/total".
func machineRunnable() (int, bool) {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0, false
	}
	f := bytes.Fields(b)
	if len(f) < 4 {
		return 0, false
	}
	r, _, ok := bytes.Cut(f[3], []byte("/"))
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(string(r))
	return n, err == nil
}
