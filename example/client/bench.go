package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"runtime/metrics"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
)

// result is what measure found at one payload size.
type result struct {
	size     int
	calls    int
	failures int // errors and wrong responses
	p50, p99 time.Duration
	shm      shmCounters // kshm counters' change over the run
	gcs      uint64      // this process's garbage collections during the run
}

// measure calls Echo with payloads of size bytes from concurrency goroutines
// for about d, and checks every response against its request.
func measure(ec echoservice.Client, size, concurrency int, d time.Duration) result {
	// Warm up (sessions, connections, pools, and the first megabytes of
	// heap, whose first touch costs a page fault per page) for a fifth of
	// the run, at least 3 calls and at most 32 MiB each way per caller.
	warmup := max(3, min(200, (32<<20)/max(size, 1)))
	warmEnd := time.Now().Add(d / 5)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards lats and fails
		lats  []time.Duration
		fails int
	)
	// Warm up (sessions, pools, allocator) outside the counted calls.
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newCaller(ec, size, w)
			for i := 0; i < warmup && (i < 3 || time.Now().Before(warmEnd)); i++ {
				c.call()
			}
			mu.Lock()
			fails += c.fails
			mu.Unlock()
		}()
	}
	wg.Wait()

	before := readCounters()
	gcBefore := gcCycles()
	end := time.Now().Add(d)
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newCaller(ec, size, w)
			// At least one call each, even if this goroutine first runs
			// after end (a loaded machine).
			for first := true; first || time.Now().Before(end); first = false {
				c.call()
			}
			mu.Lock()
			lats = append(lats, c.lats...)
			fails += c.fails
			mu.Unlock()
		}()
	}
	wg.Wait()

	r := result{size: size, calls: len(lats), failures: fails, shm: readCounters().sub(before), gcs: gcCycles() - gcBefore}
	if len(lats) > 0 {
		slices.Sort(lats)
		r.p50 = lats[len(lats)/2]
		r.p99 = lats[min(len(lats)-1, len(lats)*99/100)]
	}
	return r
}

// gcCycles is the number of garbage collections this process has completed.
func gcCycles() uint64 {
	s := []metrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

// gcPer100 formats collections per 100 calls.
func gcPer100(r result) string {
	if r.calls == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", 100*float64(r.gcs)/float64(r.calls))
}

// lastSeq numbers the measured calls, never twice in a run.
var lastSeq atomic.Int64

func init() { lastSeq.Store(1 << 32) }

// caller is one goroutine's state: its request, reused from call to call
// with a new sequence number stamped into the payload.
type caller struct {
	ec    echoservice.Client
	req   echo.EchoRequest
	lats  []time.Duration
	fails int
}

func newCaller(ec echoservice.Client, size, worker int) *caller {
	c := &caller{ec: ec}
	c.req.Payload = make([]byte, size)
	fill(c.req.Payload, int64(size)+int64(worker))
	return c
}

func (c *caller) call() {
	seq := lastSeq.Add(1)
	c.req.Seq = seq
	c.req.Message = "echo-" + strconv.FormatInt(seq, 10)
	stamp(c.req.Payload, seq)
	start := time.Now()
	resp, err := c.ec.Echo(context.Background(), &c.req)
	lat := time.Since(start)
	switch {
	case err != nil:
		c.failf("size %d seq %d: %v", len(c.req.Payload), seq, err)
	case resp.Seq != c.req.Seq || resp.Message != c.req.Message:
		c.failf("size %d seq %d: response is for another call (seq %d, message %q)", len(c.req.Payload), seq, resp.Seq, resp.Message)
	case !bytes.Equal(resp.Payload, c.req.Payload):
		c.failf("size %d seq %d: payload differs (%d bytes back, first difference at %d)",
			len(c.req.Payload), seq, len(resp.Payload), firstDiff(resp.Payload, c.req.Payload))
	default:
		c.lats = append(c.lats, lat)
	}
}

func (c *caller) failf(format string, a ...any) {
	c.fails++
	if c.fails <= 3 {
		fmt.Printf("FAIL "+format+"\n", a...)
	}
}

// fill writes a pattern that depends on seed, so that payloads of different
// calls differ everywhere, not only in their stamps.
func fill(p []byte, seed int64) {
	x := uint32(seed)*2654435761 + 1
	for i := range p {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		p[i] = byte(x)
	}
}

// stamp writes seq into the first and last 8 bytes of p (as much as fits).
func stamp(p []byte, seq int64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(seq))
	copy(p, b[:])
	if len(p) > 8 {
		copy(p[max(8, len(p)-8):], b[:])
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// printTable prints one line per result; withShm adds kshm's counters.
func printTable(w io.Writer, rs []result, withShm bool) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if withShm {
		fmt.Fprintf(tw, "size\tcalls\tp50\tp99\tkshm calls\tfallbacks\tfailures\t\n")
	} else {
		fmt.Fprintf(tw, "size\tcalls\tp50\tp99\tfailures\t\n")
	}
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t", sizeString(r.size), r.calls, durString(r.p50), durString(r.p99))
		if withShm {
			fmt.Fprintf(tw, "%d\t%d\t", r.shm.calls, r.shm.fallbacks)
		}
		fmt.Fprintf(tw, "%d\t\n", r.failures)
	}
	tw.Flush()
}

func sizeString(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

func durString(d time.Duration) string {
	switch {
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.1fµs", float64(d)/float64(time.Microsecond))
	}
}

// printCompare prints kshm's and plain Kitex's latencies side by side, one
// line per size, with their ratios and kshm's counters.
func printCompare(w io.Writer, shm, plain []result) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "size\tkshm p50\tplain p50\tratio\tkshm p99\tplain p99\tratio\tcalls kshm/plain\tover shm\tfallbacks\tfailures\tGCs/100 calls\t\n")
	for i, r := range shm {
		t := plain[i]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\t%d\t%d\t%d\t%s/%s\t\n", sizeString(r.size),
			durString(r.p50), durString(t.p50), ratioString(r.p50, t.p50),
			durString(r.p99), durString(t.p99), ratioString(r.p99, t.p99),
			r.calls, t.calls, r.shm.calls, r.shm.fallbacks, r.failures+t.failures, gcPer100(r), gcPer100(t))
	}
	tw.Flush()
}

// ratioString formats a/b as "0.42x" ("-" when either is missing).
func ratioString(a, b time.Duration) string {
	if a <= 0 || b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", float64(a)/float64(b))
}
