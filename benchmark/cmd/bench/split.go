package main

import (
	"bytes"
	"fmt"
	"os"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/google/pprof/profile"
)

// The CPU split: in one extra, separately run measurement per Kitex goal
// row (never one of the rounds the figures come from), each process profiles
// its window and sorts every sample by what it was doing, so that REPORT.md
// can say where a call's CPU goes on each transport. The orchestrator turns
// it into µs per call, both processes together.

// splitWindow is the measurement window of the split pass.
const splitWindow = 2 * time.Second

// splitEnv makes a child profile its window for the split.
const splitEnv = "KSHM_BENCH_SPLIT"

// splitCategories, in the order the report shows them.
var splitCategories = []string{"wait", "syscall", "copy", "gc", "alloc", "scheduler", "kitex", "transport", "bench", "other"}

var splitBuf *bytes.Buffer

func splitOn() bool { return os.Getenv(splitEnv) != "" }

// startSplit starts the window's profile (unless a profile to a file was
// asked for: the runtime takes one at a time).
func startSplit() {
	if !splitOn() || os.Getenv("KSHM_BENCH_CPUPROFILE") != "" {
		return
	}
	splitBuf = new(bytes.Buffer)
	if err := pprof.StartCPUProfile(splitBuf); err != nil {
		splitBuf = nil
	}
}

// stopSplit ends the window's profile and returns nanoseconds by category.
func stopSplit() map[string]int64 {
	if splitBuf == nil {
		return nil
	}
	pprof.StopCPUProfile()
	p, err := profile.Parse(splitBuf)
	splitBuf = nil
	if err != nil {
		return nil
	}
	return splitSamples(p)
}

func splitSamples(p *profile.Profile) map[string]int64 {
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == "cpu" {
			idx = i
		}
	}
	if idx < 0 {
		return nil
	}
	out := map[string]int64{}
	var stack []string
	for _, s := range p.Sample {
		stack = stack[:0]
		for _, loc := range s.Location { // leaf first; inlined callees first within a location
			for _, ln := range loc.Line {
				if ln.Function != nil {
					stack = append(stack, ln.Function.Name)
				}
			}
		}
		out[classify(stack)] += s.Value[idx]
	}
	return out
}

// classify names what a sample's stack (leaf first) was doing:
//   - wait: a receiver polling or waiting for the peer (kshm's Recv loop:
//     spinning, yields, Gosched, its sleep; netpoll's epoll_wait);
//   - syscall: any other system call (socket reads and writes, wake-ups);
//   - copy: memmove, memclr, memequal (encoding, decoding, the payload);
//   - gc: the garbage collector's marking, sweeping and scavenging;
//   - alloc: the allocator;
//   - scheduler: the Go scheduler (parking, readying, futexes, idle Ms);
//   - kitex, transport (kshm or netpoll), bench (the benchmark's own
//     code), other: by the leaf function's package.
func classify(stack []string) string {
	if len(stack) == 0 {
		return "other"
	}
	for _, f := range stack {
		if strings.Contains(f, "kshm/shm.(*Session).recvLoop") || strings.Contains(f, "kshm/shm.(*Session).sleep") ||
			strings.Contains(f, "EpollWait") || strings.Contains(f, "netpoll.(*defaultPoll).Wait") {
			return "wait"
		}
	}
	leaf := stack[0]
	switch {
	case strings.Contains(leaf, "syscall.Syscall") || strings.Contains(leaf, "syscall.RawSyscall") ||
		strings.HasPrefix(leaf, "internal/runtime/syscall") || strings.HasPrefix(leaf, "golang.org/x/sys/unix.Syscall"):
		return "syscall"
	case strings.HasPrefix(leaf, "runtime.memmove") || strings.HasPrefix(leaf, "runtime.memclr") ||
		leaf == "memeqbody" || strings.HasPrefix(leaf, "runtime.memequal"):
		return "copy"
	}
	for _, f := range stack {
		switch {
		case strings.HasPrefix(f, "runtime.gcBgMarkWorker"), strings.HasPrefix(f, "runtime.gcAssistAlloc"),
			strings.HasPrefix(f, "runtime.bgsweep"), strings.HasPrefix(f, "runtime.bgscavenge"),
			strings.HasPrefix(f, "runtime.gcStart"), strings.HasPrefix(f, "runtime.markroot"),
			strings.HasPrefix(f, "runtime.sweepone"), strings.HasPrefix(f, "runtime.gcDrain"):
			return "gc"
		case strings.HasPrefix(f, "runtime.mallocgc"), strings.HasPrefix(f, "runtime.newobject"),
			strings.HasPrefix(f, "runtime.makeslice"), strings.HasPrefix(f, "runtime.growslice"):
			return "alloc"
		case strings.HasPrefix(f, "runtime.schedule"), strings.HasPrefix(f, "runtime.findRunnable"),
			strings.HasPrefix(f, "runtime.mcall"), strings.HasPrefix(f, "runtime.park_m"),
			strings.HasPrefix(f, "runtime.goready"), strings.HasPrefix(f, "runtime.ready"),
			strings.HasPrefix(f, "runtime.wakep"), strings.HasPrefix(f, "runtime.startm"),
			strings.HasPrefix(f, "runtime.stopm"), strings.HasPrefix(f, "runtime.futex"),
			strings.HasPrefix(f, "runtime.usleep"), strings.HasPrefix(f, "runtime.osyield"),
			strings.HasPrefix(f, "runtime.exitsyscall"), strings.HasPrefix(f, "runtime.entersyscall"),
			strings.HasPrefix(f, "runtime.Gosched"), strings.HasPrefix(f, "runtime.gopark"),
			strings.HasPrefix(f, "runtime.selectgo"), strings.HasPrefix(f, "runtime.chansend"),
			strings.HasPrefix(f, "runtime.chanrecv"), strings.HasPrefix(f, "runtime.notewakeup"),
			strings.HasPrefix(f, "runtime.sysmon"):
			return "scheduler"
		}
	}
	switch {
	case strings.Contains(leaf, "github.com/shmkit/kshm/") && !strings.HasPrefix(leaf, "github.com/shmkit/kshm/example"),
		strings.Contains(leaf, "cloudwego/netpoll"):
		return "transport"
	case strings.Contains(leaf, "cloudwego/kitex"), strings.Contains(leaf, "cloudwego/gopkg"),
		strings.Contains(leaf, "bytedance/gopkg"), strings.Contains(leaf, "kshm/example/kitex_gen"),
		strings.Contains(leaf, "cloudwego/frugal"), strings.Contains(leaf, "cloudwego/dynamicgo"):
		return "kitex"
	case strings.HasPrefix(leaf, "main."):
		return "bench"
	case strings.HasPrefix(leaf, "runtime.") || strings.HasPrefix(leaf, "internal/runtime"):
		// runtime leaves not under a category above: the scheduler's
		// bookkeeping, write barriers, map and interface helpers
		if strings.Contains(leaf, "scan") || strings.Contains(leaf, "mark") || strings.Contains(leaf, "sweep") ||
			strings.Contains(leaf, "wbBuf") || strings.Contains(leaf, "Barrier") {
			return "gc"
		}
		if strings.Contains(leaf, "mspan") || strings.Contains(leaf, "mcache") || strings.Contains(leaf, "mheap") ||
			strings.Contains(leaf, "heapBits") || strings.Contains(leaf, "fixalloc") || strings.Contains(leaf, "HeapBits") {
			return "alloc"
		}
		if strings.Contains(leaf, "lock") || strings.Contains(leaf, "runq") || strings.Contains(leaf, "nanotime") ||
			strings.Contains(leaf, "procyield") || strings.Contains(leaf, "casgstatus") {
			return "scheduler"
		}
	}
	return "other"
}

// splitCase: the Kitex goal rows get a CPU split.
func splitCase(d transportDef, c benchCase) bool {
	if d.layer != "kitex" || c.scale || (d.name != "kshm" && d.name != "netpoll-uds") {
		return false
	}
	return (c.conc == 1 || c.conc == 16) && (c.size == 64 || c.size == 16<<10 || c.size == 1<<20)
}

func fmtSplit(m map[string]float64) string {
	var b strings.Builder
	var total float64
	for _, k := range splitCategories {
		if v := m[k]; v > 0 {
			fmt.Fprintf(&b, "%s %.1f ", k, v)
			total += v
		}
	}
	fmt.Fprintf(&b, "= %.1f µs/call", total)
	return b.String()
}
