package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The test binary doubles as the server and client processes of the smoke
// test: the orchestrator re-executes it with -role.
func TestMain(m *testing.M) {
	if os.Getenv("KSHM_BENCH_CHILD") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestBench_SmokeEveryTransport(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	t.Setenv("KSHM_BENCH_CHILD", "1")
	out := filepath.Join(t.TempDir(), "smoke.json")
	o := options{
		mode: "custom", rounds: 1, sizes: []int{64, 100 << 10}, concs: []int{1, 3},
		layers:   []string{"engine", "kitex"},
		warmup:   10 * time.Millisecond,
		duration: 30 * time.Millisecond, minCalls: 1, maxWindow: 2 * time.Second,
		scale: []int{2}, heavy: 256 << 10, grown: []int{100 << 10}, out: out, reportDir: filepath.Join(t.TempDir(), "report"),
	}
	skip := map[string]bool{}
	if raceEnabled {
		o.sizes = []int{100 << 10} // keep the race run short
		skip["engine/shmipc-go"] = true
		for _, d := range allTransports() {
			if !skip[d.id()] {
				o.transports = append(o.transports, d.id())
			}
		}
	}
	if err := orchestrate(o); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var recs []record
	if err := json.Unmarshal(b, &recs); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range recs {
		seen[r.Layer+"/"+r.Transport] = true
		if len(r.Errors) > 0 || r.Rounds != 1 || r.Calls == 0 || r.P50US <= 0 || r.QPS <= 0 || r.CPUUSPerCall <= 0 {
			t.Errorf("%s/%s %d B c%d x%d: rounds %d calls %d p50 %v qps %v cpu %v errors %v", r.Layer, r.Transport, r.Size,
				r.Concurrency, r.Clients, r.Rounds, r.Calls, r.P50US, r.QPS, r.CPUUSPerCall, r.Errors)
		}
		if r.Fallbacks > 0 {
			t.Errorf("%s/%s %d B c%d: %d calls fell back", r.Layer, r.Transport, r.Size, r.Concurrency, r.Fallbacks)
		}
		if len(r.P50Rounds) != r.Rounds || len(r.CSWRounds) != r.Rounds || len(r.FltRounds) != r.Rounds {
			t.Errorf("%s/%s %d B c%d: per-round values %v %v %v for %d rounds", r.Layer, r.Transport, r.Size, r.Concurrency,
				r.P50Rounds, r.CSWRounds, r.FltRounds, r.Rounds)
		}
		// Only a receiver that sleeps is woken: never one of kshm's poll or
		// timed modes, and no transport that is not kshm.
		if w := r.WakeupsPerCall; w < 0 || math.Abs(w-r.ClientWakeupsPerCall-r.ServerWakeupsPerCall) > 0.002 && r.Rounds == 1 ||
			r.FutexWakeupsPerCall > w+1e-9 ||
			(w != 0 && (!strings.HasPrefix(r.Transport, "kshm") || strings.Contains(r.Transport, "-poll") || strings.Contains(r.Transport, "-timed"))) {
			t.Errorf("%s/%s %d B c%d: wake-ups per call %v (client %v, server %v, futex %v)", r.Layer, r.Transport, r.Size,
				r.Concurrency, w, r.ClientWakeupsPerCall, r.ServerWakeupsPerCall, r.FutexWakeupsPerCall)
		}
		if c := r.Machine.Calibration; c == nil || c.UDSRoundTripUS <= 0 || c.FutexRoundTripUS <= 0 || c.PageTouchUS <= 0 ||
			c.MemcpyColdGBs <= 0 || (c.Pinned && c.CacheLineRoundTripNs <= 0) || len(c.Errors) > 0 {
			t.Errorf("%s/%s: calibration %+v", r.Layer, r.Transport, c)
		}
		// A fixed region is committed whole at the handshake (128 MiB per
		// side here, grownOptions); a growing one starts at 4 MiB.
		if r.Grown && r.Transport == grownFixed && r.ServerOwnShmCommittedKiB < 128<<10 {
			t.Errorf("kshm-fixed: the server's regions commit %v KiB, want the whole 128 MiB region", r.ServerOwnShmCommittedKiB)
		}
		if r.Grown && r.Transport == grownGrown && (r.ServerOwnShmCommittedKiB <= 0 || r.ServerOwnShmCommittedKiB >= 64<<10) {
			t.Errorf("kshm-grown: the server's regions commit %v KiB, want a few MiB (it starts at 4)", r.ServerOwnShmCommittedKiB)
		}
		if r.Scale {
			if r.HeavySize != 256<<10 || r.HeavyQPS <= 0 || r.HeavyFallbacks > 0 {
				t.Errorf("%s scale: heavy client %d B, %v calls/s, %d fallbacks", r.Transport, r.HeavySize, r.HeavyQPS, r.HeavyFallbacks)
			}
			if r.Transport == "kshm" && (r.ServerShmCommittedKiB <= 0 || r.ServerMemfds < 2) {
				t.Errorf("kshm scale: server commits %v KiB in %v memfds", r.ServerShmCommittedKiB, r.ServerMemfds)
			}
		}
	}
	for _, d := range allTransports() {
		if !seen[d.id()] && !skip[d.id()] {
			t.Errorf("no record for %s", d.id())
		}
	}
	if _, err := os.Stat(filepath.Join(o.reportDir, "REPORT.md")); err != nil {
		t.Errorf("report: %v", err)
	}
}

// The CPU split pass profiles the Kitex goal rows and the report shows it.
func TestBench_CPUSplit(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	t.Setenv("KSHM_BENCH_CHILD", "1")
	out := filepath.Join(t.TempDir(), "split.json")
	o := options{
		mode: "custom", split: "on", rounds: 1, sizes: []int{64}, concs: []int{1},
		layers: []string{"kitex"}, transports: []string{"kshm", "netpoll-uds"},
		warmup: 10 * time.Millisecond, duration: 300 * time.Millisecond, minCalls: 1, maxWindow: 2 * time.Second,
		heavy: -1, out: out, reportDir: filepath.Join(t.TempDir(), "report"),
	}
	if err := orchestrate(o); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var recs []record
	if err := json.Unmarshal(b, &recs); err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		var total float64
		for k, v := range r.CPUSplitUS {
			if !slices.Contains(splitCategories, k) {
				t.Errorf("%s: unknown split category %q", r.Transport, k)
			}
			total += v
		}
		if total <= 0 {
			t.Errorf("%s %d B c%d: no CPU split (%v)", r.Transport, r.Size, r.Concurrency, r.CPUSplitUS)
		}
	}
	rep, err := os.ReadFile(filepath.Join(o.reportDir, "REPORT.md"))
	if err != nil || !strings.Contains(string(rep), "Where a Kitex call's CPU goes") {
		t.Errorf("report has no CPU split section (%v)", err)
	}
}
