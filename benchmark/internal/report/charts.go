package report

import (
	"fmt"
	"math"
	"path/filepath"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// chart is one SVG file and what it shows.
type chart struct {
	file, title string
}

type series struct {
	name string
	xys  plotter.XYs
}

func sizeTicks(sizes []int) plot.ConstantTicks {
	var ts plot.ConstantTicks
	for _, s := range sizes {
		ts = append(ts, plot.Tick{Value: float64(s), Label: SizeName(s)})
	}
	return ts
}

func countTicks(ns []int) plot.ConstantTicks {
	var ts plot.ConstantTicks
	for _, n := range ns {
		ts = append(ts, plot.Tick{Value: float64(n), Label: strconv.Itoa(n)})
	}
	return ts
}

// logTicks labels a log axis with readable numbers: powers of ten over
// three decades or more, 1-2-5 steps (or every step) over fewer.
type logTicks struct{}

func (logTicks) Ticks(lo, hi float64) []plot.Tick {
	ts := plot.LogTicks{Prec: -1}.Ticks(lo, hi)
	labeled := 0
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = human(ts[i].Value)
			if ts[i].Value >= lo && ts[i].Value <= hi {
				labeled++
			}
		}
	}
	if labeled >= 2 && hi/lo >= 1000 {
		return ts
	}
	var out []plot.Tick
	for _, steps := range [][]float64{{1, 2, 5}, {1, 2, 3, 4, 5, 6, 7, 8, 9}} {
		out = out[:0]
		for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
			for _, m := range steps {
				if v := m * math.Pow(10, e); v >= lo && v <= hi {
					out = append(out, plot.Tick{Value: v, Label: human(v)})
				}
			}
		}
		if len(out) >= 2 {
			break
		}
	}
	return out
}

// human formats a tick value: 0.5, 20, 300, 4k, 1.5M.
func human(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'g', 3, 64) + "M"
	case v >= 1e3:
		return strconv.FormatFloat(v/1e3, 'g', 3, 64) + "k"
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

// drawLines draws one line per series on log-log axes.
func drawLines(path, title, xLabel, yLabel string, xTicks plot.Ticker, ss []series, legendTop, legendLeft, png bool) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xLabel
	p.Y.Label.Text = yLabel
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = xTicks
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = logTicks{}
	p.Legend.Top = legendTop
	p.Legend.Left = legendLeft
	p.Add(plotter.NewGrid())
	var vs []any
	for _, s := range ss {
		if len(s.xys) == 0 {
			continue
		}
		vs = append(vs, s.name, s.xys)
	}
	if len(vs) == 0 {
		return nil
	}
	if err := plotutil.AddLinePoints(p, vs...); err != nil {
		return err
	}
	if err := p.Save(7*vg.Inch, 4.5*vg.Inch, path); err != nil {
		return err
	}
	if png {
		return p.Save(7*vg.Inch, 4.5*vg.Inch, strings.TrimSuffix(path, ".svg")+".png")
	}
	return nil
}

// metricSeries collects metric(size) of every transport of a layer at conc.
func (d *data) metricSeries(layer string, conc int, metric func(Record) float64) []series {
	var ss []series
	for _, t := range d.transports(layer) {
		s := series{name: t}
		for _, size := range d.sizes(layer) {
			if r, ok := d.get(layer, t, size, conc); ok && metric(r) > 0 {
				s.xys = append(s.xys, plotter.XY{X: float64(size), Y: metric(r)})
			}
		}
		ss = append(ss, s)
	}
	return ss
}

func hasConc(concs []int, c int) bool {
	for _, x := range concs {
		if x == c {
			return true
		}
	}
	return false
}

// charts draws every chart the data allows and returns them per layer.
func (d *data) charts(dir string, png bool) (map[string][]chart, error) {
	out := map[string][]chart{}
	for _, layer := range []string{"engine", "kitex"} {
		concs := d.concs(layer)
		if len(concs) == 0 {
			continue
		}
		ticks := sizeTicks(d.sizes(layer))
		hi := concs[len(concs)-1]
		if hasConc(concs, 16) {
			hi = 16
		}
		type spec struct {
			file, title, y string
			conc           int
			metric         func(Record) float64
			top, left      bool
		}
		specs := []spec{
			{fmt.Sprintf("%s-latency-c1.svg", layer), fmt.Sprintf("%s: median round trip, concurrency 1", layer),
				"p50 latency (µs)", 1, func(r Record) float64 { return r.P50 }, true, true},
			{fmt.Sprintf("%s-throughput-c%d.svg", layer, hi), fmt.Sprintf("%s: throughput, concurrency %d", layer, hi),
				"calls per second", hi, func(r Record) float64 { return r.QPS }, true, false},
			{fmt.Sprintf("%s-cpu-c1.svg", layer), fmt.Sprintf("%s: CPU time per call (both processes), concurrency 1", layer),
				"CPU µs per call", 1, func(r Record) float64 { return r.CPU }, true, true},
			{fmt.Sprintf("%s-cpu-c%d.svg", layer, hi), fmt.Sprintf("%s: CPU time per call (both processes), concurrency %d", layer, hi),
				"CPU µs per call", hi, func(r Record) float64 { return r.CPU }, true, true},
		}
		for i, s := range specs {
			if !hasConc(concs, s.conc) || (i == 3 && hi == 1) {
				continue
			}
			if err := drawLines(filepath.Join(dir, s.file), s.title, "payload size (each way)", s.y, ticks,
				d.metricSeries(layer, s.conc, s.metric), s.top, s.left, png); err != nil {
				return nil, fmt.Errorf("%s: %w", s.file, err)
			}
			out[layer] = append(out[layer], chart{s.file, s.title})
		}
	}
	if len(d.scale) > 0 {
		byT := map[string]plotter.XYs{}
		set := map[int]bool{}
		for _, r := range d.scale {
			if r.Rounds > 0 && r.QPS > 0 {
				byT[r.Transport] = append(byT[r.Transport], plotter.XY{X: float64(r.Clients), Y: r.QPS})
				set[r.Clients] = true
			}
		}
		var ss []series
		for _, t := range engineOrder {
			if xys, ok := byT[t]; ok {
				ss = append(ss, series{t, xys})
			}
		}
		r0 := d.scale[0]
		title := fmt.Sprintf("throughput against client processes (%s, %d calls in flight per process)",
			SizeName(r0.Size), r0.Concurrency/max(r0.Clients, 1))
		if err := drawLines(filepath.Join(dir, "scale-throughput.svg"), title, "client processes", "calls per second",
			countTicks(sortedKeys(set)), ss, false, false, png); err != nil {
			return nil, err
		}
		out["scale"] = append(out["scale"], chart{"scale-throughput.svg", title})

		// Memory against client processes: the shared memory the server's
		// memfds commit per session, and the server's RSS.
		mem := map[string]plotter.XYs{}
		for _, r := range d.scale {
			if r.Rounds == 0 {
				continue
			}
			if r.ServerShmCommitted > 0 {
				mem[r.Transport+" shm per session"] = append(mem[r.Transport+" shm per session"],
					plotter.XY{X: float64(r.Clients), Y: r.ServerShmCommitted / 1024 / float64(r.Sessions())})
			}
			if r.ServerOwnShmCommitted > 0 {
				mem[r.Transport+" server-side shm per session"] = append(mem[r.Transport+" server-side shm per session"],
					plotter.XY{X: float64(r.Clients), Y: r.ServerOwnShmCommitted / 1024 / float64(r.Sessions())})
			}
			if r.ServerRSS > 0 {
				mem[r.Transport+" server RSS"] = append(mem[r.Transport+" server RSS"], plotter.XY{X: float64(r.Clients), Y: r.ServerRSS / 1024})
			}
		}
		var ms []series
		for _, t := range engineOrder {
			for _, what := range []string{" shm per session", " server-side shm per session", " server RSS"} {
				if xys, ok := mem[t+what]; ok {
					ms = append(ms, series{t + what, xys})
				}
			}
		}
		if len(ms) > 0 {
			mt := "server memory against client processes: shared memory committed per session (both sides; server side), server RSS"
			if err := drawLines(filepath.Join(dir, "scale-memory.svg"), mt, "client processes", "MiB",
				countTicks(sortedKeys(set)), ms, false, false, png); err != nil {
				return nil, err
			}
			out["scale"] = append(out["scale"], chart{"scale-memory.svg", mt})
		}
	}
	return out, nil
}
