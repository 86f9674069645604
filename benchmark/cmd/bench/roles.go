package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Control protocol between the orchestrator and its children, one line each
// way: the child reads its stdin and writes to file descriptor 3 (so that
// whatever a library prints on stdout cannot be mistaken for control):
//
//	server: "ready"; orchestrator: "q" -> "u <procSample as JSON>"
//	client: orchestrator "start"; "warm" -> "go"; "end" -> "stop"; then "result <json>" (or "error <text>" at any time)

// With KSHM_BENCH_CPUPROFILE=dir, every server and client process writes a
// CPU profile of its measurement window to dir/<role>-<transport>-<size>-c<conc>-<pid>.prof;
// with KSHM_BENCH_TRACE=dir, a runtime execution trace of the same window to
// dir/<role>-<transport>-<size>-c<conc>-<pid>.trace (`go tool trace`);
// with KSHM_BENCH_MEMPROFILE=dir, the allocations of the window, every one
// sampled, to dir/<role>-<transport>-<size>-c<conc>-<pid>.mprof
// (`go tool pprof -sample_index=alloc_objects`).
var profileName string

func init() {
	// Every allocation sampled; set before the first, as the runtime
	// requires. The profile written covers the whole process (warm-up
	// included), so compare its per-call numbers over a long window.
	if os.Getenv("KSHM_BENCH_MEMPROFILE") != "" {
		runtime.MemProfileRate = 1
	}
}

var (
	traceFile      *os.File
	memProfilePath string
)

func setProfileName(o options) {
	profileName = fmt.Sprintf("%s-%d-c%d", strings.ReplaceAll(o.transport, "/", "-"), o.size, o.conc)
}

func startProfile(role string) {
	if dir := os.Getenv("KSHM_BENCH_MEMPROFILE"); dir != "" {
		memProfilePath = filepath.Join(dir, fmt.Sprintf("%s-%s-%d.mprof", role, profileName, os.Getpid()))
	}
	if dir := os.Getenv("KSHM_BENCH_TRACE"); dir != "" {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%s-%d.trace", role, profileName, os.Getpid())))
		if err == nil {
			err = trace.Start(f)
			if err != nil {
				f.Close()
			} else {
				traceFile = f
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "trace: %v\n", err)
		}
	}
	dir := os.Getenv("KSHM_BENCH_CPUPROFILE")
	if dir == "" {
		return
	}
	f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%s-%d.prof", role, profileName, os.Getpid())))
	if err != nil {
		fmt.Fprintf(os.Stderr, "cpu profile: %v\n", err)
		return
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "cpu profile: %v\n", err)
		f.Close()
	}
}

func stopProfile() {
	if memProfilePath != "" {
		runtime.GC() // the profile shows allocations as of the last GC
		if f, err := os.Create(memProfilePath); err == nil {
			pprof.Lookup("allocs").WriteTo(f, 0)
			f.Close()
		}
		memProfilePath = ""
	}
	if traceFile != nil {
		trace.Stop()
		traceFile.Close()
		traceFile = nil
	}
	if os.Getenv("KSHM_BENCH_CPUPROFILE") != "" {
		pprof.StopCPUProfile()
	}
}

// controlOut is the child's end of the control channel.
func controlOut() *os.File { return os.NewFile(3, "control") }

func runServer(o options) error {
	setProfileName(o)
	ctl := controlOut()
	def, err := findTransport(o.transport)
	if err != nil {
		return err
	}
	var fails firstError
	srv, err := def.serve(params{sock: o.sock, size: o.size, conc: o.conc, scale: o.scaleRole}, func(err error) {
		fails.set(err)
		fmt.Fprintf(os.Stderr, "bench server %s: %v\n", def.id(), err)
	})
	if err != nil {
		return fmt.Errorf("%s server: %w", def.id(), err)
	}
	var srvFallbacks func() uint64
	if f, ok := srv.(interface{ fallbacks() uint64 }); ok {
		srvFallbacks = f.fallbacks
	}
	fmt.Fprintln(ctl, "ready")
	in := bufio.NewScanner(os.Stdin)
	queries := 0
	for in.Scan() {
		switch in.Text() {
		case "q":
			// The first query opens the window, the second closes it.
			var split map[string]int64
			if queries++; queries == 1 {
				startProfile("server")
				startSplit()
			} else {
				split = stopSplit()
				stopProfile()
			}
			_, n := fails.get()
			v := takeSample(srvFallbacks)
			v.Errors = n
			v.Split = split
			b, err := json.Marshal(v)
			if err != nil {
				return err
			}
			fmt.Fprintf(ctl, "u %s\n", b)
		case "quit":
			return nil
		}
	}
	// The orchestrator has what it needs: exit at once, without a graceful
	// shutdown of the server (the next measurement starts a fresh one).
	_ = srv
	return nil
}

// clientResult is what a client child reports for its measurement window.
type clientResult struct {
	Calls    uint64  `json:"calls"`
	WindowNs int64   `json:"window_ns"`
	P50Ns    float64 `json:"p50_ns"`
	P99Ns    float64 `json:"p99_ns"`
	P999Ns   float64 `json:"p999_ns"`
	MaxNs    float64 `json:"max_ns"`
	// Proc is what the window cost the client process (CPU, allocations,
	// context switches, page faults, scheduler latencies, and the calls
	// that did not go through shared memory).
	Proc     procDelta `json:"proc"`
	RSSKiB   int64     `json:"rss_kib"`
	ShmemKiB int64     `json:"shmem_kib"`
	// Hist is the latency histogram as (bucket, count) pairs, so the
	// orchestrator can merge the clients of the scale case exactly.
	Hist [][2]uint64 `json:"hist"`
	// Split: the window's CPU by category, ns (only in the split pass).
	Split map[string]int64 `json:"split,omitempty"`
}

// memKiB reads this process's resident and resident-shared-memory sizes.
func memKiB() (rss, shmem int64) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		var v int64
		if _, err := fmt.Sscanf(line, "VmRSS: %d kB", &v); err == nil {
			rss = v
		} else if _, err := fmt.Sscanf(line, "RssShmem: %d kB", &v); err == nil {
			shmem = v
		}
	}
	return rss, shmem
}

func runClient(o options) error {
	setProfileName(o)
	def, err := findTransport(o.transport)
	if err != nil {
		return err
	}
	ctl := controlOut()
	in := bufio.NewScanner(os.Stdin)
	expect := func(want string) error {
		if !in.Scan() {
			return fmt.Errorf("control channel closed waiting for %q", want)
		}
		if got := in.Text(); got != want {
			return fmt.Errorf("control: got %q, want %q", got, want)
		}
		return nil
	}
	report := func(err error) error {
		fmt.Fprintf(ctl, "error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		return err
	}

	// Started beside the server, to overlap the two processes' start-up;
	// dial once the orchestrator says the server is ready.
	if err := expect("start"); err != nil {
		return err
	}
	p := params{sock: o.sock, size: o.size, conc: o.conc, scale: o.scaleRole}
	cs, err := def.dial(p)
	if err != nil {
		return report(fmt.Errorf("%s dial: %w", def.id(), err))
	}
	defer cs.close()
	callers := make([]caller, o.conc)
	for i := range callers {
		if callers[i], err = cs.newCaller(i); err != nil {
			return report(fmt.Errorf("%s caller %d: %w", def.id(), i, err))
		}
	}

	const (
		phaseWarm = iota
		phaseMeasure
		phaseCool
		phaseStop
	)
	var phase atomic.Int32
	var seq, measured atomic.Uint64
	var fails firstError
	failed := make(chan struct{})
	var failOnce sync.Once
	hists := make([]*hist, o.conc)
	var wg sync.WaitGroup
	for i := range callers {
		hists[i] = new(hist)
		wg.Add(1)
		go func(c caller, h *hist) {
			defer wg.Done()
			for phase.Load() != phaseStop {
				s := seq.Add(1)
				t0 := time.Now()
				err := c.call(s)
				d := time.Since(t0)
				if err != nil {
					fails.set(err)
					failOnce.Do(func() { close(failed) })
					return
				}
				// A call counts in the window it completes in.
				if phase.Load() == phaseMeasure {
					h.record(int64(d))
					measured.Add(1)
				}
			}
		}(callers[i], hists[i])
	}
	stop := func() {
		phase.Store(phaseStop)
		wg.Wait()
	}
	sleep := func(d time.Duration) error {
		select {
		case <-time.After(d):
			return nil
		case <-failed:
			stop()
			err, _ := fails.get()
			return err
		}
	}

	fb, _ := cs.(interface{ fallbacks() uint64 })
	fallbacks := func() uint64 {
		if fb == nil {
			return 0
		}
		return fb.fallbacks()
	}
	// Every transport makes at least four calls per caller, so that each
	// caller's buffers have been used before the window opens, and moves
	// 128 MiB each way (up to 256 calls): a process's first megabytes of
	// Go heap (Kitex's decode and encode buffers, its pools) are fresh pages,
	// each first touch a page fault of 10-40 µs on a small VM, and a Kitex
	// call at 1 MiB measured 8-13 ms with 300-450 faults and 100 allocations
	// per call in its first 100 ms, 1.2-2.5 ms with 35-110 faults and 30
	// allocations once warm. A transport that cycles through its buffers
	// (shmipc-go takes them from a FIFO free list) asks for enough calls to
	// have touched each buffer once (warmCalls): the first touch of each page
	// of shared memory costs a page fault in both processes, which a
	// long-running user pays once, not on every call.
	warmCalls := max(4*o.conc, min(256, (128<<20)/max(o.size, 1)))
	if w, ok := cs.(interface{ warmCalls() int }); ok {
		warmCalls = max(warmCalls, w.warmCalls())
	}
	// Warm up; a transport that can fall back (kshm's Kitex transport, while
	// its session is being set up) warms up until a whole warm-up period
	// passes without fallbacks, for up to five seconds (ten for the buffers'
	// first touch).
	for start := time.Now(); ; {
		f := fallbacks()
		if err := sleep(o.warmup); err != nil {
			return report(err)
		}
		cold := seq.Load() < uint64(warmCalls) && time.Since(start) < 10*time.Second
		if (fallbacks() == f || time.Since(start) > 5*time.Second) && !cold {
			break
		}
	}
	fmt.Fprintln(ctl, "warm")
	if err := expect("go"); err != nil {
		stop()
		return err
	}
	startProfile("client")
	startSplit()
	s0, t0 := takeSample(fallbacks), time.Now()
	phase.Store(phaseMeasure)
	if err := sleep(o.duration); err != nil {
		return report(err)
	}
	// Slow cases (megabytes at high concurrency) stay in the window until
	// enough calls completed, up to -maxwindow.
	// At least one call must complete, however slow (up to a minute).
	for (measured.Load() < uint64(o.minCalls) && time.Since(t0) < o.maxWindow) ||
		(measured.Load() == 0 && time.Since(t0) < time.Minute) {
		if err := sleep(o.duration / 10); err != nil {
			return report(err)
		}
	}
	phase.Store(phaseCool)
	t1, s1 := time.Now(), takeSample(fallbacks)
	split := stopSplit()
	stopProfile()
	fmt.Fprintln(ctl, "end")
	if err := expect("stop"); err != nil {
		stop()
		return err
	}
	stop()
	if err, _ := fails.get(); err != nil {
		return report(err)
	}
	var h hist
	for _, x := range hists {
		h.merge(x)
	}
	res := clientResult{
		Calls: h.n, WindowNs: t1.Sub(t0).Nanoseconds(),
		P50Ns: h.quantile(0.50), P99Ns: h.quantile(0.99), P999Ns: h.quantile(0.999), MaxNs: float64(h.max),
		Proc: s1.sub(s0), RSSKiB: s1.RSSKiB, ShmemKiB: s1.ShmemKiB, Split: split,
	}
	for i, n := range h.counts {
		if n != 0 {
			res.Hist = append(res.Hist, [2]uint64{uint64(i), n})
		}
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	fmt.Fprintf(ctl, "result %s\n", b)
	return nil
}
