package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// calibration is what the machine's basic operations cost when a run
// starts, so that results from two machines can be compared: a transport
// that saves a socket round trip but adds a thread wake-up gains on one
// machine and loses on another.
type calibration struct {
	// UDSRoundTripUS: 1 byte each way over a unix socketpair between two
	// processes, blocking reads (p50 of the round trips).
	UDSRoundTripUS float64 `json:"uds_rtt_us"`
	// ChanWakeRoundTripUS: two goroutines locked to OS threads (on distinct
	// CPUs when Pinned) passing a token over unbuffered channels: each pass
	// wakes a sleeping thread through the Go scheduler.
	ChanWakeRoundTripUS float64 `json:"chan_wake_rtt_us"`
	// FutexRoundTripUS: the same between two threads with FUTEX_WAIT and
	// FUTEX_WAKE directly.
	FutexRoundTripUS float64 `json:"futex_rtt_us"`
	// The same two, with the threads left wherever the kernel puts them:
	// on a loaded machine a thread pinned to one CPU waits for that CPU.
	ChanWakeUnpinnedUS float64 `json:"chan_wake_unpinned_rtt_us"`
	FutexUnpinnedUS    float64 `json:"futex_unpinned_rtt_us"`
	// CacheLineRoundTripNs: two threads spinning on one atomic word (one
	// cache line), pinned to distinct CPUs: the floor of any spinning
	// hand-off between cores (mean of the round trips).
	CacheLineRoundTripNs float64 `json:"cacheline_rtt_ns"`
	// PageTouchUS: the first write to a page of fresh anonymous memory
	// (minor fault, zeroing), and to a page of a fresh memfd mapped shared
	// (what a shared-memory transport's first use of its region costs).
	PageTouchUS    float64 `json:"page_touch_us"`
	ShmPageTouchUS float64 `json:"shm_page_touch_us"`
	// Memcpy bandwidth, GB/s: 64 MiB copies between buffers much larger
	// than the caches (cold) and 256 KiB copies that stay in cache (warm).
	MemcpyColdGBs float64 `json:"memcpy_cold_gbs"`
	MemcpyWarmGBs float64 `json:"memcpy_warm_gbs"`
	// Pinned tells whether the thread pairs ran on distinct CPUs (CPUs).
	Pinned bool     `json:"pinned"`
	CPUs   [2]int   `json:"cpus"`
	Errors []string `json:"errors,omitempty"`
	TookMS float64  `json:"took_ms"`
}

// calibrate measures the machine; self is this binary (the echo process of
// the socket round trip).
func calibrate(self string) calibration {
	start := time.Now()
	var c calibration
	fail := func(what string, err error) { c.Errors = append(c.Errors, what+": "+err.Error()) }
	var err error
	if c.UDSRoundTripUS, err = udsRoundTrip(self, 5000); err != nil {
		fail("uds", err)
	}
	cpus, pinned := twoCPUs()
	c.CPUs, c.Pinned = cpus, pinned
	c.ChanWakeRoundTripUS = threadPair(cpus, pinned, 3000, chanPingPong) / 1e3
	c.FutexRoundTripUS = threadPair(cpus, pinned, 3000, futexPingPong) / 1e3
	c.ChanWakeUnpinnedUS = threadPair(cpus, false, 3000, chanPingPong) / 1e3
	c.FutexUnpinnedUS = threadPair(cpus, false, 3000, futexPingPong) / 1e3
	if pinned {
		c.CacheLineRoundTripNs = threadPair(cpus, pinned, 100000, spinPingPong)
	}
	if c.PageTouchUS, err = pageTouch(false); err != nil {
		fail("page touch", err)
	}
	if c.ShmPageTouchUS, err = pageTouch(true); err != nil {
		fail("shm page touch", err)
	}
	c.MemcpyColdGBs, c.MemcpyWarmGBs = memcpyBandwidth()
	c.TookMS = float64(time.Since(start).Microseconds()) / 1e3
	return c
}

func (c calibration) String() string {
	pin := "not pinned"
	if c.Pinned {
		pin = fmt.Sprintf("cpus %d,%d", c.CPUs[0], c.CPUs[1])
	}
	return fmt.Sprintf("uds rtt %.1fµs, chan wake rtt %.1fµs (unpinned %.1fµs), futex rtt %.1fµs (unpinned %.1fµs), "+
		"cache-line rtt %.0fns (%s), page touch %.2fµs (shm %.2fµs), memcpy %.1f GB/s cold, %.1f GB/s warm",
		c.UDSRoundTripUS, c.ChanWakeRoundTripUS, c.ChanWakeUnpinnedUS, c.FutexRoundTripUS, c.FutexUnpinnedUS,
		c.CacheLineRoundTripNs, pin,
		c.PageTouchUS, c.ShmPageTouchUS, c.MemcpyColdGBs, c.MemcpyWarmGBs)
}

// runEcho is the echo process of udsRoundTrip: it writes back every byte
// it reads on file descriptor 3 until the other end closes.
func runEcho() error {
	var b [1]byte
	for {
		n, err := syscall.Read(3, b[:])
		if n <= 0 || err != nil {
			return nil
		}
		if _, err := syscall.Write(3, b[:1]); err != nil {
			return nil
		}
	}
}

// udsRoundTrip returns the median round trip, in µs, of n one-byte
// messages over a unix socketpair to an echo process, with blocking reads
// and writes (the thread sleeps in the kernel until the byte arrives).
func udsRoundTrip(self string, n int) (float64, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	mine, theirs := fds[0], os.NewFile(uintptr(fds[1]), "echo")
	defer syscall.Close(mine)
	cmd := exec.Command(self, "-role", "echo")
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		theirs.Close()
		return 0, err
	}
	theirs.Close()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	lats := make([]int64, 0, n)
	var b [1]byte
	var ioErr error
	for i := 0; i < n+n/10; i++ {
		t0 := time.Now()
		if _, err := syscall.Write(mine, []byte{byte(i)}); err != nil {
			ioErr = err
			break
		}
		if k, err := syscall.Read(mine, b[:]); err != nil || k != 1 {
			ioErr = fmt.Errorf("read %d: %v", k, err)
			break
		}
		if i >= n/10 { // the first tenth warms up
			lats = append(lats, time.Since(t0).Nanoseconds())
		}
	}
	syscall.Shutdown(mine, syscall.SHUT_RDWR)
	if err := cmd.Wait(); err != nil && ioErr == nil {
		ioErr = err
	}
	if ioErr != nil {
		return 0, ioErr
	}
	return medianNs(lats) / 1e3, nil
}

func medianNs(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	return float64(v[len(v)/2])
}

// twoCPUs picks two CPUs this process may run on.
func twoCPUs() ([2]int, bool) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return [2]int{}, false
	}
	var cpus []int
	for i := 0; i < 1024 && len(cpus) < 2; i++ {
		if set.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	if len(cpus) < 2 {
		return [2]int{}, false
	}
	return [2]int{cpus[0], cpus[1]}, true
}

// pinTo locks the calling goroutine to its thread and that thread to cpu;
// the returned function undoes both.
func pinTo(cpu int, pin bool) func() {
	runtime.LockOSThread()
	if !pin {
		return runtime.UnlockOSThread
	}
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return runtime.UnlockOSThread
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return runtime.UnlockOSThread
	}
	return func() {
		_ = unix.SchedSetaffinity(0, &old)
		runtime.UnlockOSThread()
	}
}

// A pingPong runs n round trips between side 0 (the timer) and side 1,
// each calling it on its own thread.
type pingPong interface {
	run(side, n int)
}

// threadPair runs p between two threads pinned to cpus and returns the
// mean round trip in ns.
func threadPair(cpus [2]int, pin bool, n int, newP func() pingPong) float64 {
	p := newP()
	warm := n / 10
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer pinTo(cpus[1], pin)()
		p.run(1, warm+n)
	}()
	defer pinTo(cpus[0], pin)()
	p.run(0, warm)
	t0 := time.Now()
	p.run(0, n)
	d := time.Since(t0)
	wg.Wait()
	return float64(d.Nanoseconds()) / float64(n)
}

type chanPP struct{ ping, pong chan struct{} }

func chanPingPong() pingPong {
	return &chanPP{ping: make(chan struct{}), pong: make(chan struct{})}
}

func (c *chanPP) run(side, n int) {
	for i := 0; i < n; i++ {
		if side == 0 {
			c.ping <- struct{}{}
			<-c.pong
		} else {
			<-c.ping
			c.pong <- struct{}{}
		}
	}
}

// futexPP passes a counter: side 0 makes it odd, side 1 even; each waits
// in FUTEX_WAIT for its turn and wakes the other with FUTEX_WAKE.
type futexPP struct {
	_    [64]byte
	word atomic.Uint32
	_    [60]byte
}

func futexPingPong() pingPong { return new(futexPP) }

const (
	futexWaitPrivate = 0 | 128 // FUTEX_WAIT | FUTEX_PRIVATE_FLAG
	futexWakePrivate = 1 | 128
)

func (f *futexPP) run(side, n int) {
	addr := uintptr(unsafe.Pointer(&f.word))
	for i := 0; i < n; i++ {
		for {
			v := f.word.Load()
			if int(v%2) == side {
				break
			}
			unix.Syscall6(unix.SYS_FUTEX, addr, futexWaitPrivate, uintptr(v), 0, 0, 0)
		}
		f.word.Add(1)
		unix.Syscall6(unix.SYS_FUTEX, addr, futexWakePrivate, 1, 0, 0, 0)
	}
}

// spinPP is futexPP without the futex: both threads spin on the word.
type spinPP struct{ futexPP }

func spinPingPong() pingPong { return new(spinPP) }

func (s *spinPP) run(side, n int) {
	for i := 0; i < n; i++ {
		for spins := 0; int(s.word.Load()%2) != side; spins++ {
			if spins > 1<<20 { // the other thread is not running: let it
				runtime.Gosched()
				spins = 0
			}
		}
		s.word.Add(1)
	}
}

// pageTouch maps 16 MiB of fresh memory (anonymous, or a memfd mapped
// shared) and returns the mean time, in µs, of the first write to each page.
func pageTouch(shared bool) (float64, error) {
	const size = 16 << 20
	page := os.Getpagesize()
	var mem []byte
	var err error
	if shared {
		fd, err := unix.MemfdCreate("kshm-bench-calibration", unix.MFD_CLOEXEC)
		if err != nil {
			return 0, err
		}
		defer unix.Close(fd)
		if err := unix.Ftruncate(fd, size); err != nil {
			return 0, err
		}
		mem, err = unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return 0, err
		}
	} else if mem, err = unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		return 0, err
	}
	defer unix.Munmap(mem)
	t0 := time.Now()
	for i := 0; i < size; i += page {
		mem[i] = 1
	}
	return float64(time.Since(t0).Nanoseconds()) / float64(size/page) / 1e3, nil
}

// memcpyBandwidth copies 64 MiB between two pre-faulted 64 MiB buffers
// (so the data comes from memory, not cache: cold) and 256 KiB within
// cache many times (warm); each is the best of a few tries, in GB/s.
func memcpyBandwidth() (cold, warm float64) {
	const big, small = 64 << 20, 256 << 10
	src, dst := make([]byte, big), make([]byte, big)
	for i := range src {
		src[i] = byte(i)
	}
	copy(dst, src)
	for try := 0; try < 3; try++ {
		t0 := time.Now()
		copy(dst, src)
		cold = max(cold, big/time.Since(t0).Seconds()/1e9)
	}
	s, d := src[:small], dst[:small]
	for try := 0; try < 3; try++ {
		const reps = 256
		t0 := time.Now()
		for i := 0; i < reps; i++ {
			copy(d, s)
		}
		warm = max(warm, small*reps/time.Since(t0).Seconds()/1e9)
	}
	return cold, warm
}
