// Package report turns the records of a benchmark run (results/*.json)
// into a Markdown report with tables, ratios against each baseline and SVG
// charts drawn with gonum.org/v1/plot.
package report

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Record is the subset of a results record the report reads.
type Record struct {
	Layer       string  `json:"layer"`
	Transport   string  `json:"transport"`
	Size        int     `json:"size"`
	Concurrency int     `json:"concurrency"`
	Clients     int     `json:"clients"`
	Scale       bool    `json:"scale"`
	Grown       bool    `json:"grown"`
	P50         float64 `json:"p50_us"`
	P99         float64 `json:"p99_us"`
	P999        float64 `json:"p999_us"`
	QPS         float64 `json:"qps"`
	CPU         float64 `json:"cpu_us_per_call"`
	// CPUSplit: CPU µs per call of both processes by category, from one
	// extra profiled measurement (Kitex goal rows only).
	CPUSplit     map[string]float64 `json:"cpu_split_us_per_call"`
	Allocs       float64            `json:"allocs_per_call"`
	ClientCPU    float64            `json:"client_cpu_us_per_call"`
	ServerCPU    float64            `json:"server_cpu_us_per_call"`
	ServerAllocs float64            `json:"server_allocs_per_call"`
	ServerRSS    float64            `json:"server_rss_kib"`
	ServerShmem  float64            `json:"server_shmem_kib"`
	ClientRSS    float64            `json:"client_rss_kib"`
	P50Spread    float64            `json:"p50_spread"`
	P99Spread    float64            `json:"p99_spread"`
	QPSSpread    float64            `json:"qps_spread"`
	CPUSpread    float64            `json:"cpu_spread"`
	P50Rounds    []float64          `json:"p50_us_rounds"`
	QPSRounds    []float64          `json:"qps_rounds"`
	CPURounds    []float64          `json:"cpu_us_per_call_rounds"`
	Rounds       int                `json:"rounds"`
	Calls        uint64             `json:"calls"`
	Fallbacks    uint64             `json:"fallbacks"`
	Errors       []string           `json:"errors"`

	ServerShmCommitted    float64 `json:"server_shm_committed_kib"`
	ServerShmMapped       float64 `json:"server_shm_mapped_kib"`
	ServerMemfds          float64 `json:"server_memfds"`
	ServerOwnShmCommitted float64 `json:"server_own_shm_committed_kib"`
	HeavySize             int     `json:"heavy_size"`
	HeavyP50              float64 `json:"heavy_p50_us"`
	HeavyQPS              float64 `json:"heavy_qps"`
	HeavyFallbacks        uint64  `json:"heavy_fallbacks"`

	CSW            float64   `json:"csw_per_call"`
	ClientCSW      float64   `json:"client_csw_per_call"`
	ServerCSW      float64   `json:"server_csw_per_call"`
	InvolCSW       float64   `json:"involuntary_csw_per_call"`
	MinFlt         float64   `json:"minflt_per_call"`
	Migrations     float64   `json:"migrations_per_call"`
	RunqWait       float64   `json:"runq_wait_us_per_call"`
	GCs            float64   `json:"gcs_per_round"`
	Wakeups        *float64  `json:"wakeups_per_call"` // nil in runs from before it was recorded
	ClientWakeups  float64   `json:"client_wakeups_per_call"`
	ServerWakeups  float64   `json:"server_wakeups_per_call"`
	FutexWakeups   float64   `json:"futex_wakeups_per_call"`
	ClientSchedP50 float64   `json:"client_sched_p50_us"`
	ClientSchedP99 float64   `json:"client_sched_p99_us"`
	ServerSchedP50 float64   `json:"server_sched_p50_us"`
	ServerSchedP99 float64   `json:"server_sched_p99_us"`
	CSWRounds      []float64 `json:"csw_per_call_rounds"`
	FltRounds      []float64 `json:"minflt_per_call_rounds"`
	MigRounds      []float64 `json:"migrations_per_call_rounds"`
	GCRounds       []float64 `json:"gcs_rounds"`
	RunqRounds     []float64 `json:"runq_wait_us_per_call_rounds"`

	Machine struct {
		CPU            string       `json:"cpu"`
		Cores          int          `json:"cores"`
		MemKiB         int64        `json:"mem_kib"`
		Kernel         string       `json:"kernel"`
		Go             string       `json:"go"`
		LoadAvg        string       `json:"loadavg"`
		LoadEnd        string       `json:"loadavg_end"`
		Calibration    *Calibration `json:"calibration"`
		CalibrationEnd *Calibration `json:"calibration_end"`
	} `json:"machine"`
	Date   string `json:"date"`
	Commit string `json:"commit"`
}

// Calibration is what the machine's basic operations cost (see cmd/bench).
type Calibration struct {
	UDSRoundTripUS       float64 `json:"uds_rtt_us"`
	ChanWakeRoundTripUS  float64 `json:"chan_wake_rtt_us"`
	FutexRoundTripUS     float64 `json:"futex_rtt_us"`
	ChanWakeUnpinnedUS   float64 `json:"chan_wake_unpinned_rtt_us"`
	FutexUnpinnedUS      float64 `json:"futex_unpinned_rtt_us"`
	CacheLineRoundTripNs float64 `json:"cacheline_rtt_ns"`
	PageTouchUS          float64 `json:"page_touch_us"`
	ShmPageTouchUS       float64 `json:"shm_page_touch_us"`
	MemcpyColdGBs        float64 `json:"memcpy_cold_gbs"`
	MemcpyWarmGBs        float64 `json:"memcpy_warm_gbs"`
	Pinned               bool    `json:"pinned"`
	CPUs                 [2]int  `json:"cpus"`
}

// Sessions is the number of client processes of a scale record: the light
// ones and the heavy one.
func (r Record) Sessions() int {
	n := max(r.Clients, 1)
	if r.HeavySize > 0 {
		n++
	}
	return n
}

// Load reads a results file.
func Load(path string) ([]Record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var recs []Record
	if err := json.Unmarshal(b, &recs); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return recs, nil
}

// Transport orders: kshm first, then the baselines.
var (
	engineOrder = []string{"kshm", "kshm-poll", "kshm-timed", "uds", "shmipc-go", "floor"}
	kitexOrder  = []string{"kshm", "kshm-poll", "kshm-timed", "netpoll-uds", "netpoll-tcp", "kshm-rpctimeout", "netpoll-uds-rpctimeout"}
	baselines   = map[string][]string{"engine": {"uds", "shmipc-go"}, "kitex": {"netpoll-uds", "netpoll-tcp"}}
)

// baselinesFor are the baselines a kshm transport is compared with: the
// Kitex RPC-timeout variant with netpoll's, every other with the layer's.
func baselinesFor(layer, transport string) []string {
	if transport == "kshm-rpctimeout" {
		return []string{"netpoll-uds-rpctimeout"}
	}
	return baselines[layer]
}

type key struct {
	layer, transport string
	size, conc       int
}

type data struct {
	recs  []Record
	by    map[key]Record // the non-scale records
	scale []Record
	grown []Record // the grown case: kshm-fixed against kshm-grown
}

func index(recs []Record) *data {
	d := &data{recs: recs, by: map[key]Record{}}
	for _, r := range recs {
		if r.Scale {
			d.scale = append(d.scale, r)
			continue
		}
		if r.Grown {
			d.grown = append(d.grown, r)
			continue
		}
		if r.Rounds == 0 {
			continue
		}
		d.by[key{r.Layer, r.Transport, r.Size, r.Concurrency}] = r
	}
	return d
}

func (d *data) get(layer, transport string, size, conc int) (Record, bool) {
	r, ok := d.by[key{layer, transport, size, conc}]
	return r, ok
}

// transports present in a layer, in report order.
func (d *data) transports(layer string) []string {
	order := engineOrder
	if layer == "kitex" {
		order = kitexOrder
	}
	seen := map[string]bool{}
	for k := range d.by {
		if k.layer == layer {
			seen[k.transport] = true
		}
	}
	var out []string
	for _, t := range order {
		if seen[t] {
			out = append(out, t)
			delete(seen, t)
		}
	}
	var rest []string
	for t := range seen {
		rest = append(rest, t)
	}
	sort.Strings(rest)
	return append(out, rest...)
}

func (d *data) sizes(layer string) []int {
	set := map[int]bool{}
	for k := range d.by {
		if k.layer == layer {
			set[k.size] = true
		}
	}
	return sortedKeys(set)
}

func (d *data) concs(layer string) []int {
	set := map[int]bool{}
	for k := range d.by {
		if k.layer == layer {
			set[k.conc] = true
		}
	}
	return sortedKeys(set)
}

func sortedKeys(set map[int]bool) []int {
	var out []int
	for v := range set {
		out = append(out, v)
	}
	sort.Ints(out)
	return out
}

// SizeName formats a payload size: 64 B, 16 KiB, 4 MiB.
func SizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// Options say where a report comes from and what to draw.
type Options struct {
	Source  string // the results file, as the report names it
	Command string // the command that reproduces the results
	PNG     bool   // also write each chart as PNG
}

// Write writes REPORT.md and its SVG charts into dir.
func Write(dir string, recs []Record, o Options) error {
	if len(recs) == 0 {
		return fmt.Errorf("no records")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	d := index(recs)
	var b strings.Builder
	charts, err := d.charts(dir, o.PNG)
	if err != nil {
		return err
	}
	d.markdown(&b, o.Source, o.Command, charts)
	return os.WriteFile(filepath.Join(dir, "REPORT.md"), []byte(b.String()), 0o644)
}
