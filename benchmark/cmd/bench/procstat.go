package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strconv"
	"strings"
	"syscall"

	"github.com/shmkit/kshm/shm"
)

// procSample is what a server or client process reports about itself at
// each end of the measurement window; the difference of two samples is
// what the window cost the process.
type procSample struct {
	CPUNs   int64  `json:"cpu_ns"`  // user+system time (getrusage)
	Mallocs uint64 `json:"mallocs"` // Go heap allocations
	GCs     uint32 `json:"gcs"`     // completed GC cycles
	// Context switches of all the process's threads (getrusage): voluntary
	// (the thread blocked: futex, read, epoll_wait, nanosleep) and
	// involuntary (preempted by the kernel scheduler).
	VCSW  int64 `json:"vcsw"`
	IVCSW int64 `json:"ivcsw"`
	// Page faults (getrusage): minor (a page mapped without I/O, such as the
	// first touch of a fresh page of the heap or of shared memory) and major.
	MinFlt int64 `json:"minflt"`
	MajFlt int64 `json:"majflt"`
	// Migrations of the process's threads between CPUs, and the time they
	// were runnable but waited for a CPU (/proc/self/task/*/sched and
	// schedstat; 0 where the kernel does not provide them).
	Migrations int64 `json:"migrations"`
	RunqWaitNs int64 `json:"runq_wait_ns"`
	// Sched is the Go runtime's /sched/latencies:seconds histogram (time
	// goroutines spent runnable before they ran), cumulative bucket counts.
	Sched []uint64 `json:"sched,omitempty"`
	// Split: the server's window CPU by category, ns (split pass only).
	Split     map[string]int64 `json:"split,omitempty"`
	Fallbacks uint64           `json:"fallbacks"` // messages that did not use shared memory
	// Wake-ups this process's kshm sessions sent: sends that found the
	// peer's receiver asleep and woke it with a system call (shm.Stats's
	// WakeupsSent), and of those the ones through its futex. 0 for the
	// other transports.
	Wakeups      uint64 `json:"wakeups"`
	FutexWakeups uint64 `json:"futex_wakeups"`
	Errors       int    `json:"errors"`
	RSSKiB       int64  `json:"rss_kib"`
	ShmemKiB     int64  `json:"shmem_kib"`
	// Shared memory the process maps, counted once per memfd however
	// often it is mapped: the pages the memfds have committed (allocated)
	// and their sizes, in KiB, and the number of memfds.
	ShmCommittedKiB int64 `json:"shm_committed_kib"`
	ShmMappedKiB    int64 `json:"shm_mapped_kib"`
	Memfds          int   `json:"memfds"`
	// Of those, the memfds this process created itself (kshm names its
	// regions kshm-<pid>): its own side's regions.
	OwnShmCommittedKiB int64 `json:"own_shm_committed_kib"`
	OwnMemfds          int   `json:"own_memfds"`
}

const schedMetric = "/sched/latencies:seconds"

// schedBuckets are the bucket boundaries of /sched/latencies:seconds, the
// same in every process of one binary.
var schedBuckets = func() []float64 {
	s := []metrics.Sample{{Name: schedMetric}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return nil
	}
	return s[0].Value.Float64Histogram().Buckets
}()

func takeSample(fallbacks func() uint64) procSample {
	var v procSample
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		v.CPUNs = ru.Utime.Nano() + ru.Stime.Nano()
		v.VCSW, v.IVCSW = ru.Nvcsw, ru.Nivcsw
		v.MinFlt, v.MajFlt = ru.Minflt, ru.Majflt
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	v.Mallocs, v.GCs = ms.Mallocs, ms.NumGC
	v.Migrations, v.RunqWaitNs = threadSched()
	s := []metrics.Sample{{Name: schedMetric}}
	metrics.Read(s)
	if s[0].Value.Kind() == metrics.KindFloat64Histogram {
		v.Sched = append([]uint64(nil), s[0].Value.Float64Histogram().Counts...)
	}
	if fallbacks != nil {
		v.Fallbacks = fallbacks()
	}
	st := shm.ReadStats()
	v.Wakeups, v.FutexWakeups = st.WakeupsSent, st.FutexWakeups
	v.RSSKiB, v.ShmemKiB = memKiB()
	m := memfdKiB()
	v.ShmCommittedKiB, v.ShmMappedKiB, v.Memfds = m.committed, m.mapped, m.n
	v.OwnShmCommittedKiB, v.OwnMemfds = m.ownCommitted, m.own
	return v
}

// memfds is what memfdKiB found.
type memfds struct {
	committed, mapped int64 // KiB
	n                 int
	ownCommitted      int64 // KiB of the memfds named kshm-<our pid>
	own               int
}

// memfdKiB adds up the memfds this process maps (/proc/self/map_files),
// each once: the bytes their pages take (st_blocks) and their sizes, and
// apart the ones kshm created in this process (named kshm-<pid>).
func memfdKiB() (m memfds) {
	dir := "/proc/self/map_files"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return m
	}
	ownName := fmt.Sprintf("/memfd:kshm-%d", os.Getpid())
	type id struct{ dev, ino uint64 }
	seen := map[id]bool{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || !strings.HasPrefix(target, "/memfd:") {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, e.Name()), &st); err != nil {
			continue
		}
		k := id{uint64(st.Dev), st.Ino}
		if seen[k] {
			continue
		}
		seen[k] = true
		m.committed += st.Blocks * 512 >> 10
		m.mapped += st.Size >> 10
		m.n++
		if name, _, _ := strings.Cut(target, " "); name == ownName {
			m.ownCommitted += st.Blocks * 512 >> 10
			m.own++
		}
	}
	return m
}

// threadSched sums the CPU migrations and the run-queue waits of every
// thread of this process.
func threadSched() (migrations, waitNs int64) {
	dirs, err := filepath.Glob("/proc/self/task/*")
	if err != nil {
		return 0, 0
	}
	for _, d := range dirs {
		if b, err := os.ReadFile(filepath.Join(d, "sched")); err == nil {
			for _, line := range bytes.Split(b, []byte("\n")) {
				if k, val, ok := strings.Cut(string(line), ":"); ok && strings.TrimSpace(k) == "se.nr_migrations" {
					n, _ := strconv.ParseInt(strings.TrimSpace(val), 10, 64)
					migrations += n
				}
			}
		}
		if b, err := os.ReadFile(filepath.Join(d, "schedstat")); err == nil {
			if f := strings.Fields(string(b)); len(f) >= 2 {
				n, _ := strconv.ParseInt(f[1], 10, 64)
				waitNs += n
			}
		}
	}
	return migrations, waitNs
}

// procDelta is the cost of a window to one process.
type procDelta struct {
	CPUNs, VCSW, IVCSW, MinFlt, MajFlt, Migrations, RunqWaitNs int64
	Mallocs                                                    uint64
	GCs                                                        uint32
	Fallbacks                                                  uint64
	Wakeups, FutexWakeups                                      uint64
	// SchedP50Ns and SchedP99Ns are the quantiles of the Go scheduler
	// latencies observed in the window (0 when none were).
	SchedP50Ns, SchedP99Ns float64
}

func (a procSample) sub(b procSample) procDelta {
	d := procDelta{
		CPUNs: a.CPUNs - b.CPUNs, VCSW: a.VCSW - b.VCSW, IVCSW: a.IVCSW - b.IVCSW,
		MinFlt: a.MinFlt - b.MinFlt, MajFlt: a.MajFlt - b.MajFlt,
		Migrations: a.Migrations - b.Migrations, RunqWaitNs: a.RunqWaitNs - b.RunqWaitNs,
		Mallocs: a.Mallocs - b.Mallocs, GCs: a.GCs - b.GCs, Fallbacks: a.Fallbacks - b.Fallbacks,
		Wakeups: a.Wakeups - b.Wakeups, FutexWakeups: a.FutexWakeups - b.FutexWakeups,
	}
	if len(a.Sched) == len(b.Sched) && len(a.Sched) > 0 {
		counts := make([]uint64, len(a.Sched))
		for i := range counts {
			counts[i] = a.Sched[i] - b.Sched[i]
		}
		d.SchedP50Ns = histQuantile(schedBuckets, counts, 0.5) * 1e9
		d.SchedP99Ns = histQuantile(schedBuckets, counts, 0.99) * 1e9
	}
	return d
}

// histQuantile returns the q-quantile of a runtime/metrics histogram
// (len(buckets) == len(counts)+1): the upper bound of the bucket that holds
// it, or its lower bound for the last, unbounded bucket; 0 if it is empty.
func histQuantile(buckets []float64, counts []uint64, q float64) float64 {
	if len(buckets) != len(counts)+1 {
		return 0
	}
	var n uint64
	for _, c := range counts {
		n += c
	}
	if n == 0 {
		return 0
	}
	rank := uint64(q*float64(n) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var cum uint64
	for i, c := range counts {
		cum += c
		if cum >= rank {
			hi := buckets[i+1]
			if hi > 1e300 { // +Inf
				return buckets[i]
			}
			return hi
		}
	}
	return buckets[len(buckets)-1]
}
