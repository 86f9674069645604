package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// summaryBaselines are the baselines kshm is compared with in the summary.
var summaryBaselines = map[string][]string{"engine": {"uds", "shmipc-go"}, "kitex": {"netpoll-uds", "netpoll-tcp"}}

// summaryPairs: each kshm transport compared in the summary, with its
// baselines (the RPC-timeout variant against netpoll's).
func summaryPairs(layer, transport string) []string {
	switch transport {
	case "kshm":
		return summaryBaselines[layer]
	case "kshm-rpctimeout":
		return []string{"netpoll-uds-rpctimeout"}
	}
	return nil
}

// printSummary prints, for every case at concurrency 1 and 16, each
// transport's medians with the values of every round, and kshm's ratio to
// each baseline round by round (the two ran back to back in each round, so
// a round's ratio compares them on the same machine state) with the spread
// of those ratios.
func printSummary(w io.Writer, recs []record) {
	if len(recs) == 0 {
		return
	}
	m := recs[0].Machine
	fmt.Fprintf(w, "\n== summary: %s, %d cpus, %s, load %s at the start, %s at the end\n", m.CPU, m.Cores, m.Go, m.LoadAvg, m.LoadEnd)
	if m.Calibration != nil {
		fmt.Fprintf(w, "calibration: %s\n", *m.Calibration)
	}
	if m.CalibrationEnd != nil {
		fmt.Fprintf(w, "at the end:  %s\n", *m.CalibrationEnd)
	}
	type key struct {
		layer, transport string
		size, conc       int
	}
	by := map[key]record{}
	for _, r := range recs {
		if !r.Scale && r.Rounds > 0 {
			by[key{r.Layer, r.Transport, r.Size, r.Concurrency}] = r
		}
	}
	for _, layer := range []string{"kitex", "engine"} {
		for _, conc := range []int{1, 16} {
			var rows []record
			for _, r := range recs {
				if r.Layer == layer && r.Concurrency == conc && !r.Scale && r.Rounds > 0 {
					rows = append(rows, r)
				}
			}
			if len(rows) == 0 {
				continue
			}
			fmt.Fprintf(w, "\n%s, concurrency %d: medians over the rounds [each round]; per call: CPU µs and context switches of both processes, minor faults, migrations\n", layer, conc)
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
			fmt.Fprintf(tw, "size\ttransport\tp50 µs [rounds]\tp99 µs\tqps\tCPU µs [rounds]\tcsw [rounds]\tminflt [rounds]\tmigr\tgc\tsched p99 µs c/s\tfallbacks\t\n")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s %s\t%s\t%s\t%s %s\t%.2f %s\t%.2f %s\t%.2f\t%.0f\t%.0f/%.0f\t%d\t\n",
					sizeName(r.Size), r.Transport, fmtUs(r.P50US), fmtRounds(r.P50Rounds), fmtUs(r.P99US), fmtCount(r.QPS),
					fmtUs(r.CPUUSPerCall), fmtRounds(r.CPURounds), r.CSWPerCall, fmtRounds(r.CSWRounds),
					r.MinFltPerCall, fmtRounds(r.FltRounds), r.MigrationsPerCall, r.GCsPerRound,
					r.ClientSchedP99US, r.ServerSchedP99US, r.Fallbacks)
			}
			tw.Flush()
			// Ratios, round by round.
			tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
			header := false
			for _, r := range rows {
				for _, base := range summaryPairs(layer, r.Transport) {
					b, ok := by[key{layer, base, r.Size, conc}]
					if !ok {
						continue
					}
					if !header {
						fmt.Fprintf(tw, "kshm / baseline\tsize\tp50 [per round] spread\tCPU [per round] spread\tcsw kshm vs base\t\n")
						header = true
					}
					pr, ps := roundRatios(r.P50Rounds, b.P50Rounds)
					cr, cs := roundRatios(r.CPURounds, b.CPURounds)
					fmt.Fprintf(tw, "%s / %s\t%s\t%s %s ±%.0f%%\t%s %s ±%.0f%%\t%.2f vs %.2f\t\n", r.Transport, base, sizeName(r.Size),
						ratioStr(r.P50US, b.P50US), pr, ps*50, ratioStr(r.CPUUSPerCall, b.CPUUSPerCall), cr, cs*50,
						r.CSWPerCall, b.CSWPerCall)
				}
			}
			if header {
				fmt.Fprintln(w)
				tw.Flush()
			}
		}
	}
	fmt.Fprintln(w)
}

func fmtRounds(v []float64) string {
	parts := make([]string, len(v))
	for i, x := range v {
		switch {
		case x >= 100:
			parts[i] = fmt.Sprintf("%.0f", x)
		case x >= 10:
			parts[i] = fmt.Sprintf("%.1f", x)
		default:
			parts[i] = fmt.Sprintf("%.2f", x)
		}
	}
	return "[" + strings.Join(parts, " ") + "]"
}

func ratioStr(a, b float64) string {
	if a == 0 || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// roundRatios returns a/b round by round, and the spread (max-min)/median
// of those ratios.
func roundRatios(a, b []float64) (string, float64) {
	var rs []float64
	for i := range min(len(a), len(b)) {
		if a[i] > 0 && b[i] > 0 {
			rs = append(rs, a[i]/b[i])
		}
	}
	parts := make([]string, len(rs))
	for i, x := range rs {
		parts[i] = fmt.Sprintf("%.2f", x)
	}
	return "[" + strings.Join(parts, " ") + "]", spread(rs)
}
