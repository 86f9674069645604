package main

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/shmkit/kshm/benchmark/internal/report"
)

// record is one line of results/*.json: the medians over the rounds of one
// case over one transport, with their spread.
type record struct {
	Layer       string `json:"layer"`
	Transport   string `json:"transport"`
	Size        int    `json:"size"`
	Concurrency int    `json:"concurrency"` // concurrent calls, all client processes together
	Clients     int    `json:"clients"`     // client processes (1, except in the scale case)
	Scale       bool   `json:"scale,omitempty"`
	Grown       bool   `json:"grown,omitempty"` // the grown case (grown.go)

	P50US        float64 `json:"p50_us"`
	P99US        float64 `json:"p99_us"`
	P999US       float64 `json:"p999_us"`
	QPS          float64 `json:"qps"`
	CPUUSPerCall float64 `json:"cpu_us_per_call"` // both processes, user+system (rusage)
	// AllocsPerCall counts the client process's heap allocations
	// (runtime.MemStats.Mallocs) per call.
	AllocsPerCall       float64 `json:"allocs_per_call"`
	ClientCPUUSPerCall  float64 `json:"client_cpu_us_per_call"`
	ServerCPUUSPerCall  float64 `json:"server_cpu_us_per_call"`
	ServerAllocsPerCall float64 `json:"server_allocs_per_call"`
	ServerRSSKiB        float64 `json:"server_rss_kib"`
	ServerShmemKiB      float64 `json:"server_shmem_kib"` // RssShmem: shared memory resident in the server
	ClientRSSKiB        float64 `json:"client_rss_kib"`   // per client process
	ClientShmemKiB      float64 `json:"client_shmem_kib"` // per client process
	// The memfds the server maps, each counted once: the memory their pages
	// take (committed) and their sizes (mapped), KiB, and how many.
	ServerShmCommittedKiB float64 `json:"server_shm_committed_kib"`
	ServerShmMappedKiB    float64 `json:"server_shm_mapped_kib"`
	ServerMemfds          float64 `json:"server_memfds"`
	// Of the committed KiB, the server's own regions (memfds it created).
	ServerOwnShmCommittedKiB float64 `json:"server_own_shm_committed_kib"`
	// The scale case's heavy client (one more process, one call at a time):
	// its payload size, p50, calls per second and fallbacks (all rounds).
	HeavySize      int     `json:"heavy_size,omitempty"`
	HeavyP50US     float64 `json:"heavy_p50_us,omitempty"`
	HeavyQPS       float64 `json:"heavy_qps,omitempty"`
	HeavyFallbacks uint64  `json:"heavy_fallbacks,omitempty"`

	// What explains the numbers, per call and both processes together unless
	// named: context switches of all threads (voluntary+involuntary,
	// getrusage) and the involuntary ones alone (preemptions), minor page
	// faults, CPU migrations of threads, and the time threads waited
	// runnable for a CPU (µs; /proc/self/task/*/schedstat).
	CSWPerCall          float64 `json:"csw_per_call"`
	ClientCSWPerCall    float64 `json:"client_csw_per_call"`
	ServerCSWPerCall    float64 `json:"server_csw_per_call"`
	InvolCSWPerCall     float64 `json:"involuntary_csw_per_call"`
	MinFltPerCall       float64 `json:"minflt_per_call"`
	ClientMinFltPerCall float64 `json:"client_minflt_per_call"`
	ServerMinFltPerCall float64 `json:"server_minflt_per_call"`
	MigrationsPerCall   float64 `json:"migrations_per_call"`
	RunqWaitUSPerCall   float64 `json:"runq_wait_us_per_call"`
	GCsPerRound         float64 `json:"gcs_per_round"` // GC cycles in a window, both processes
	// kshm's wake-ups per call: sends that found the peer's receiver asleep
	// and woke it with a system call, sent by the client processes (waking
	// the server) and by the server (waking a client), and of all those the
	// ones through the receiver's futex rather than its socket. Each costs
	// the sender a system call and the receiver a context switch. 0 for the
	// other transports and for kshm's poll and timed modes.
	WakeupsPerCall       float64 `json:"wakeups_per_call"`
	ClientWakeupsPerCall float64 `json:"client_wakeups_per_call"`
	ServerWakeupsPerCall float64 `json:"server_wakeups_per_call"`
	FutexWakeupsPerCall  float64 `json:"futex_wakeups_per_call"`
	// The Go scheduler's latency (/sched/latencies:seconds: how long
	// goroutines waited runnable) in the window, µs, per process.
	ClientSchedP50US float64 `json:"client_sched_p50_us"`
	ClientSchedP99US float64 `json:"client_sched_p99_us"`
	ServerSchedP50US float64 `json:"server_sched_p50_us"`
	ServerSchedP99US float64 `json:"server_sched_p99_us"`

	// Spreads are (max-min)/median over the rounds, as fractions.
	P50Spread      float64   `json:"p50_spread"`
	P99Spread      float64   `json:"p99_spread"`
	QPSSpread      float64   `json:"qps_spread"`
	CPUSpread      float64   `json:"cpu_spread"`
	P50Rounds      []float64 `json:"p50_us_rounds"`
	QPSRounds      []float64 `json:"qps_rounds"`
	CPURounds      []float64 `json:"cpu_us_per_call_rounds"`
	P99Rounds      []float64 `json:"p99_us_rounds"`
	CSWRounds      []float64 `json:"csw_per_call_rounds"`
	FltRounds      []float64 `json:"minflt_per_call_rounds"`
	MigRounds      []float64 `json:"migrations_per_call_rounds"`
	GCRounds       []float64 `json:"gcs_rounds"`
	RunqWaitRounds []float64 `json:"runq_wait_us_per_call_rounds"`
	Rounds         int       `json:"rounds"`
	Calls          uint64    `json:"calls"` // measured calls, all rounds together
	// Fallbacks counts measured calls (all rounds) that went over Kitex's
	// netpoll fallback or the session socket instead of shared memory.
	Fallbacks uint64   `json:"fallbacks"`
	Errors    []string `json:"errors,omitempty"`

	Machine machine `json:"machine"`
	Date    string  `json:"date"`
	Commit  string  `json:"commit"`
	// CPUSplitUS: CPU µs per call of both processes by category (wait,
	// syscall, copy, gc, alloc, scheduler, kitex, transport, bench, other),
	// from one extra profiled measurement outside the rounds.
	CPUSplitUS map[string]float64 `json:"cpu_split_us_per_call,omitempty"`
}

type machine struct {
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	MemKiB int64  `json:"mem_kib"`
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
	OS     string `json:"os"`
	Arch   string `json:"arch"`
	// LoadAvg is /proc/loadavg when the run started and when it ended:
	// anything else running on the machine skews the numbers.
	LoadAvg string `json:"loadavg"`
	LoadEnd string `json:"loadavg_end,omitempty"`
	// Calibration is what the machine's basic operations cost at the start
	// of the run, and CalibrationEnd at its end.
	Calibration    *calibration `json:"calibration,omitempty"`
	CalibrationEnd *calibration `json:"calibration_end,omitempty"`
	Date           string       `json:"-"`
	Commit         string       `json:"-"`
}

func machineInfo() machine {
	m := machine{Cores: runtime.NumCPU(), Go: runtime.Version(), OS: runtime.GOOS, Arch: runtime.GOARCH,
		Date: time.Now().UTC().Format(time.RFC3339)}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	m.LoadAvg = loadAvg()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				v = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB"))
				for _, ch := range v {
					m.MemKiB = m.MemKiB*10 + int64(ch-'0')
				}
			}
		}
	}
	m.Commit = "unknown"
	if out, err := exec.Command("git", "rev-parse", "HEAD").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(st) > 0 {
			m.Commit += "-dirty"
		}
	}
	return m
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func aggregate(d transportDef, c benchCase, rs []roundResult, errs []string, m machine) record {
	rec := record{
		Layer: d.layer, Transport: d.name, Size: c.size, Concurrency: c.conc * c.clients, Clients: c.clients,
		Scale: c.scale, Grown: c.grown, Rounds: len(rs), Errors: errs, Machine: m, Date: m.Date, Commit: m.Commit,
	}
	col := func(f func(r roundResult) float64) []float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		return v
	}
	med := func(f func(r roundResult) float64) float64 { return round3(report.Median(col(f))) }
	if len(rs) == 0 {
		return rec
	}
	rec.P50US = med(func(r roundResult) float64 { return r.p50 })
	rec.P99US = med(func(r roundResult) float64 { return r.p99 })
	rec.P999US = med(func(r roundResult) float64 { return r.p999 })
	rec.QPS = med(func(r roundResult) float64 { return r.qps })
	rec.CPUUSPerCall = med(func(r roundResult) float64 { return r.cpu })
	rec.AllocsPerCall = med(func(r roundResult) float64 { return r.allocs })
	rec.ClientCPUUSPerCall = med(func(r roundResult) float64 { return r.clientCPU })
	rec.ServerCPUUSPerCall = med(func(r roundResult) float64 { return r.serverCPU })
	rec.ServerAllocsPerCall = med(func(r roundResult) float64 { return r.serverAllocs })
	rec.ServerRSSKiB = med(func(r roundResult) float64 { return r.serverRSS })
	rec.ServerShmemKiB = med(func(r roundResult) float64 { return r.serverShmem })
	rec.ClientRSSKiB = med(func(r roundResult) float64 { return r.clientRSS })
	rec.ClientShmemKiB = med(func(r roundResult) float64 { return r.clientShmem })
	rec.ServerShmCommittedKiB = med(func(r roundResult) float64 { return r.serverShmCommitted })
	rec.ServerShmMappedKiB = med(func(r roundResult) float64 { return r.serverShmMapped })
	rec.ServerMemfds = med(func(r roundResult) float64 { return float64(r.serverMemfds) })
	rec.ServerOwnShmCommittedKiB = med(func(r roundResult) float64 { return r.serverOwnShmCommitted })
	if c.heavy > 0 {
		rec.HeavySize = c.heavy
		rec.HeavyP50US = med(func(r roundResult) float64 { return r.heavyP50 })
		rec.HeavyQPS = med(func(r roundResult) float64 { return r.heavyQPS })
	}
	rec.CSWPerCall = med(func(r roundResult) float64 { return r.csw })
	rec.ClientCSWPerCall = med(func(r roundResult) float64 { return r.clientCSW })
	rec.ServerCSWPerCall = med(func(r roundResult) float64 { return r.serverCSW })
	rec.InvolCSWPerCall = med(func(r roundResult) float64 { return r.ivcsw })
	rec.MinFltPerCall = med(func(r roundResult) float64 { return r.minflt })
	rec.ClientMinFltPerCall = med(func(r roundResult) float64 { return r.clientMinflt })
	rec.ServerMinFltPerCall = med(func(r roundResult) float64 { return r.serverMinflt })
	rec.MigrationsPerCall = med(func(r roundResult) float64 { return r.migrations })
	rec.RunqWaitUSPerCall = med(func(r roundResult) float64 { return r.runqWait })
	rec.GCsPerRound = med(func(r roundResult) float64 { return r.gcs })
	rec.WakeupsPerCall = med(func(r roundResult) float64 { return r.clientWakeups + r.serverWakeups })
	rec.ClientWakeupsPerCall = med(func(r roundResult) float64 { return r.clientWakeups })
	rec.ServerWakeupsPerCall = med(func(r roundResult) float64 { return r.serverWakeups })
	rec.FutexWakeupsPerCall = med(func(r roundResult) float64 { return r.futexWakeups })
	rec.ClientSchedP50US = med(func(r roundResult) float64 { return r.clientSchedP50 })
	rec.ClientSchedP99US = med(func(r roundResult) float64 { return r.clientSchedP99 })
	rec.ServerSchedP50US = med(func(r roundResult) float64 { return r.serverSchedP50 })
	rec.ServerSchedP99US = med(func(r roundResult) float64 { return r.serverSchedP99 })
	p50 := col(func(r roundResult) float64 { return r.p50 })
	qps := col(func(r roundResult) float64 { return r.qps })
	cpu := col(func(r roundResult) float64 { return r.cpu })
	rec.P50Spread, rec.QPSSpread, rec.CPUSpread = spread(p50), spread(qps), spread(cpu)
	rec.P99Spread = spread(col(func(r roundResult) float64 { return r.p99 }))
	rounds := func(f func(r roundResult) float64) []float64 {
		v := col(f)
		for i := range v {
			v[i] = round3(v[i])
		}
		return v
	}
	rec.P50Rounds, rec.QPSRounds, rec.CPURounds = rounds(func(r roundResult) float64 { return r.p50 }),
		rounds(func(r roundResult) float64 { return r.qps }), rounds(func(r roundResult) float64 { return r.cpu })
	rec.P99Rounds = rounds(func(r roundResult) float64 { return r.p99 })
	rec.CSWRounds = rounds(func(r roundResult) float64 { return r.csw })
	rec.FltRounds = rounds(func(r roundResult) float64 { return r.minflt })
	rec.MigRounds = rounds(func(r roundResult) float64 { return r.migrations })
	rec.GCRounds = rounds(func(r roundResult) float64 { return r.gcs })
	rec.RunqWaitRounds = rounds(func(r roundResult) float64 { return r.runqWait })
	for i := range rs {
		rec.Calls += rs[i].calls
		rec.Fallbacks += rs[i].fallbacks
		rec.HeavyFallbacks += rs[i].heavyFallbacks
	}
	return rec
}

// writeJSON replaces path atomically with the records.
func writeJSON(path string, recs []record) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(recs, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
