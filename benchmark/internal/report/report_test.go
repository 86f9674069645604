package report

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func synthetic() []Record {
	var recs []Record
	for _, layer := range []string{"engine", "kitex"} {
		ts := []string{"kshm", "uds", "shmipc-go"}
		if layer == "kitex" {
			ts = []string{"kshm", "netpoll-uds", "netpoll-tcp"}
		}
		for i, t := range ts {
			for _, size := range []int{64, 64 << 10, 4 << 20} {
				for _, c := range []int{1, 16} {
					f := float64(i+1) * float64(size+1000) / 1000
					recs = append(recs, Record{Layer: layer, Transport: t, Size: size, Concurrency: c, Clients: 1,
						P50: f, P99: 3 * f, QPS: 1e6 / f, CPU: f, Rounds: 3, Calls: 100, P50Spread: 0.1})
				}
			}
		}
	}
	for i, t := range []string{"kshm", "uds"} {
		for _, n := range []int{1, 4, 32} {
			recs = append(recs, Record{Layer: "engine", Transport: t, Size: 1024, Concurrency: 4 * n, Clients: n, Scale: true,
				P50: 10, P99: 30, QPS: float64(n*(i+1)) * 1e4, CPU: 5, Rounds: 3, ServerShmem: 1024,
				ServerShmCommitted: float64(n) * 131072, ServerRSS: 40000, HeavySize: 4 << 20, HeavyP50: 900, HeavyQPS: 500,
				ServerOwnShmCommitted: float64(n+1) * 4096})
		}
	}
	for _, size := range []int{1 << 20, 4 << 20} {
		recs = append(recs,
			Record{Layer: "kitex", Transport: "kshm-fixed", Size: size, Concurrency: 16, Clients: 1, Grown: true,
				P50: 900, QPS: 1000, Rounds: 3, QPSRounds: []float64{1000, 1100, 900}, ServerOwnShmCommitted: 262144, ServerMemfds: 2},
			Record{Layer: "kitex", Transport: "kshm-grown", Size: size, Concurrency: 16, Clients: 1, Grown: true,
				P50: 950, QPS: 950, Rounds: 3, QPSRounds: []float64{950, 1100, 720}, ServerOwnShmCommitted: 73728, ServerMemfds: 12})
	}
	recs[0].Machine.CPU = "test cpu"
	recs[0].Machine.Calibration = &Calibration{UDSRoundTripUS: 23.5, CacheLineRoundTripNs: 1700, Pinned: true, CPUs: [2]int{0, 1}}
	for i := range recs {
		recs[i].P50Rounds = []float64{recs[i].P50, recs[i].P50 * 1.1, recs[i].P50 * 0.9}
		recs[i].CSWRounds = []float64{1, 2, 3}
		recs[i].RunqRounds = []float64{10, 200, 5}
	}
	recs[0].P50Rounds = []float64{1, 3, 1}
	return recs
}

// writeSynthetic writes the report of synthetic() into a temporary
// directory and returns the directory and REPORT.md.
func writeSynthetic(t *testing.T) (dir, md string) {
	t.Helper()
	dir = t.TempDir()
	if err := Write(dir, synthetic(), Options{Source: "x.json", Command: "make bench"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "REPORT.md"))
	if err != nil {
		t.Fatal(err)
	}
	return dir, string(b)
}

func TestWrite_ReportAndCharts(t *testing.T) {
	dir, md := writeSynthetic(t)
	for _, want := range []string{"## Goals", "## Engine layer", "## Kitex layer", "## Scale", "kshm / uds",
		"engine-latency-c1.svg", "kitex-throughput-c16.svg", "scale-throughput.svg", "test cpu",
		"unix socket 1-byte round trip", "23.5", "1700", "## Every round of the key rows", "context switches / minor page faults",
		"scale-memory.svg", "committed MiB per session", "4 MiB one at a time",
		"## Goals (Kitex layer", "context switches per call at c=1",
		"round 2 3.00 µs against round 1 1.00 µs: waiting for a CPU 10.0 → 200 µs",
		"## Grown regions against fixed-size regions (Kitex, concurrency 16)", "| 4 MiB | 1.0 k ±0% | 950 ±0% | 0.95× (met) | 0.95, 1.00, 0.80 |",
		"| 256 / 72 | 2 / 12 |",
		"Measured: 4.0 MiB per session of the server's own regions (33 sessions, the heavy client's included; 124.1 MiB with its clients' regions): met, within the aim of 4 MiB."} {
		if !strings.Contains(md, want) {
			t.Errorf("REPORT.md lacks %q", want)
		}
	}
	for _, f := range []string{"engine-latency-c1.svg", "engine-throughput-c16.svg", "engine-cpu-c1.svg",
		"kitex-latency-c1.svg", "scale-throughput.svg", "scale-memory.svg"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Size() == 0 {
			t.Errorf("chart %s: %v", f, err)
		}
	}
}

func TestSizeName(t *testing.T) {
	for n, want := range map[int]string{64: "64 B", 1024: "1 KiB", 65536: "64 KiB", 4 << 20: "4 MiB", 1000: "1000 B"} {
		if got := SizeName(n); got != want {
			t.Errorf("SizeName(%d) = %q, want %q", n, got, want)
		}
	}
}

// The floor section divides each engine transport's p50 at concurrency 1 by
// the floor's, and is absent without a floor row.
func TestWrite_FloorSection(t *testing.T) {
	recs := synthetic()
	dir := t.TempDir()
	if err := Write(dir, recs, Options{Source: "x.json"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "REPORT.md"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "### The floor") {
		t.Error("floor section without a floor row")
	}
	// synthetic kshm at 64 KiB: P50 = 66.536; floor at a quarter of it.
	recs = append(recs, Record{Layer: "engine", Transport: "floor", Size: 64 << 10, Concurrency: 1, Clients: 1,
		P50: 66.536 / 4, CPU: 40, Rounds: 3, Calls: 100, P50Rounds: []float64{16.6, 16.7, 16.5}})
	if err := Write(dir, recs, Options{Source: "x.json"}); err != nil {
		t.Fatal(err)
	}
	if b, err = os.ReadFile(filepath.Join(dir, "REPORT.md")); err != nil {
		t.Fatal(err)
	}
	md := string(b)
	// kshm 4.00×, uds (twice kshm's p50) 8.00×, shmipc-go 12.00×; no kshm-poll row: "–".
	for _, want := range []string{"### The floor", "| 64 KiB | 16.6 µs | 40.0 | 4.00× | – | 12.00× | 8.00× |"} {
		if !strings.Contains(md, want) {
			t.Errorf("REPORT.md lacks %q", want)
		}
	}
}

// The per-round table divides kshm by its baseline within each round, not
// medians from different rounds, and leaves out pairs with no baseline.
func TestWrite_RatiosRoundByRound(t *testing.T) {
	_, report := writeSynthetic(t)
	// engine kshm 64 B: rounds 1, 3, 1 µs; uds: 2.128, 2.341, 1.915 µs.
	want := "| engine | kshm / uds | 64 B | 0.47, 1.28, 0.52 | 0.52× |"
	if !strings.Contains(report, want) {
		t.Errorf("no per-round row %q in:\n%s", want, report)
	}
	if strings.Contains(report, "kshm / floor") {
		t.Error("a row for kshm / floor, which the records do not have")
	}
}

func TestMedianOf(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5}} {
		in := append([]float64(nil), c.in...)
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Errorf("Median modified its input: %v", c.in)
			}
		}
	}
}

// Each missed Kitex goal is explained once per row, from the run's own
// measurements; a met goal is not listed.
func TestWrite_MissedGoalsExplained(t *testing.T) {
	split := func(copyUS, waitUS, syscallUS float64) map[string]float64 {
		return map[string]float64{"copy": copyUS, "wait": waitUS, "syscall": syscallUS, "kitex": 10}
	}
	rec := func(t string, size, conc int, p50, qps, cpu, csw float64, sp map[string]float64) Record {
		return Record{Layer: "kitex", Transport: t, Size: size, Concurrency: conc, Clients: 1, P50: p50, QPS: qps,
			CPU: cpu, CSW: csw, ClientCSW: csw / 2, ServerCSW: csw / 2, GCs: 7, Rounds: 3, CPUSplit: sp}
	}
	recs := []Record{
		rec("kshm", 64, 1, 10, 1000, 20, 0.2, nil), rec("netpoll-uds", 64, 1, 100, 100, 100, 5, nil),
		// 16 KiB c=16: throughput 1.1x (goal 1.5x) and CPU 0.9x (goal 0.7x) missed.
		rec("kshm", 16<<10, 16, 50, 1100, 90, 0.5, split(30, 5, 2)),
		rec("netpoll-uds", 16<<10, 16, 60, 1000, 100, 0.5, split(15, 20, 20)),
	}
	wakeups := 0.3
	recs[2].Wakeups, recs[2].ClientWakeups, recs[2].ServerWakeups, recs[2].FutexWakeups = &wakeups, 0.2, 0.1, 0.05
	dir := t.TempDir()
	if err := Write(dir, recs, Options{Source: "x.json", Command: "make bench"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "REPORT.md"))
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	i := strings.Index(md, "### Why each missed goal is missed")
	if i < 0 {
		t.Fatalf("no missed-goals section:\n%s", md)
	}
	sec := md[i:]
	if j := strings.Index(sec[4:], "\n## "); j >= 0 {
		sec = sec[:j+4]
	}
	for _, want := range []string{
		"**16 KiB, c=16**",
		"throughput at c=16, kshm / netpoll-uds: 1.10×",
		"CPU per call at c=16, kshm / netpoll-uds: 0.90×",
		"CPU 90.0 against 100 µs per call",
		"kshm spends more on copy 15.0",
		// netpoll: wait 20 + syscall 20 of 65 profiled: 62% and 1/(1-0.615) = 2.60x.
		"netpoll spends 62% of its profiled CPU",
		"about 2.60× its calls per second",
		"0.20 + 0.10 per call, 0.05 of them through the futex",
	} {
		if !strings.Contains(sec, want) {
			t.Errorf("missed-goals section lacks %q:\n%s", want, sec)
		}
	}
	if n := strings.Count(sec, "**16 KiB, c=16**"); n != 1 {
		t.Errorf("row listed %d times, want once", n)
	}
	if strings.Contains(sec, "**64 B") {
		t.Errorf("a row whose goals are met is listed:\n%s", sec)
	}

	// A run from before wake-ups were recorded says nothing about them.
	recs[2].Wakeups = nil
	if err := Write(dir, recs, Options{Source: "x.json", Command: "make bench"}); err != nil {
		t.Fatal(err)
	}
	if b, err = os.ReadFile(filepath.Join(dir, "REPORT.md")); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "wake-ups (") {
		t.Errorf("wake-ups reported for a run that did not record them")
	}
}

// The engine and Kitex sections list kshm's wake-ups per call for the kshm
// transports of a run that recorded them, and leave the table out of one
// that did not.
func TestWrite_WakeupsTable(t *testing.T) {
	w := 0.9
	recs := []Record{
		{Layer: "kitex", Transport: "kshm", Size: 16 << 10, Concurrency: 1, Clients: 1, P50: 50, QPS: 100, CPU: 100, Rounds: 3,
			Wakeups: &w, ClientWakeups: 0.5, ServerWakeups: 0.4, FutexWakeups: 0.85},
		{Layer: "kitex", Transport: "netpoll-uds", Size: 16 << 10, Concurrency: 1, Clients: 1, P50: 100, QPS: 50, CPU: 150, Rounds: 3},
	}
	dir := t.TempDir()
	read := func() string {
		t.Helper()
		if err := Write(dir, recs, Options{Source: "x.json", Command: "make bench"}); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, "REPORT.md"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	md := read()
	for _, want := range []string{"kshm's wake-ups per call", "| size | kshm |", "| 16 KiB | 0.50 + 0.40 (0.85) |"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	recs[0].Wakeups = nil
	if md := read(); strings.Contains(md, "kshm's wake-ups per call") {
		t.Errorf("a wake-ups table for a run that did not record them")
	}
}
