// Command compare checks that two benchmark runs agree: for every case it
// prints kshm's p50 ratio against each baseline in both runs, and whether
// the second lies within the spread the report shows for the first (half the
// round-to-round spread of kshm plus half that of the baseline).
//
//	go run ./cmd/compare results/full-run1.json results/full.json
package main

import (
	"fmt"
	"math"
	"os"
	"sort"

	"github.com/shmkit/kshm/benchmark/internal/report"
)

type key struct {
	layer, transport    string
	size, conc, clients int
}

func index(recs []report.Record) map[key]report.Record {
	m := make(map[key]report.Record, len(recs))
	for _, r := range recs {
		m[key{r.Layer, r.Transport, r.Size, r.Concurrency, max(r.Clients, 1)}] = r
	}
	return m
}

var baselines = map[string][]string{"engine": {"uds", "shmipc-go"}, "kitex": {"netpoll-uds", "netpoll-tcp"}}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: compare first.json second.json")
		os.Exit(2)
	}
	var runs [2]map[key]report.Record
	for i, p := range os.Args[1:] {
		recs, err := report.Load(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		runs[i] = index(recs)
	}
	var keys []key
	for k := range runs[0] {
		if k.transport == "kshm" && k.clients == 1 {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool {
		a, b := keys[i], keys[j]
		if a.layer != b.layer {
			return a.layer < b.layer
		}
		if a.conc != b.conc {
			return a.conc < b.conc
		}
		return a.size < b.size
	})
	within, total := 0, 0
	for _, k := range keys {
		for _, bt := range baselines[k.layer] {
			kb := k
			kb.transport = bt
			a1, ok1 := runs[0][kb]
			k2, ok2 := runs[1][k]
			b2, ok3 := runs[1][kb]
			if !ok1 || !ok2 || !ok3 || a1.P50 == 0 || b2.P50 == 0 {
				continue
			}
			k1 := runs[0][k]
			r1, r2 := k1.P50/a1.P50, k2.P50/b2.P50
			tol := math.Max((k1.P50Spread+a1.P50Spread)/2, 0.05)
			ok := math.Abs(r2-r1)/r1 <= tol
			total++
			mark := "ok"
			if ok {
				within++
			} else {
				mark = "OUTSIDE"
			}
			fmt.Printf("%-6s kshm/%-11s %8d B c%-2d  run 1 %.2fx  run 2 %.2fx  (±%.0f%%) %s\n",
				k.layer, bt, k.size, k.conc, r1, r2, tol*100, mark)
		}
	}
	fmt.Printf("%d of %d p50 ratios of the second run within the first run's spread\n", within, total)
}
