package report

import (
	"fmt"
	"math"
	"sort"
	"strings"
)

func us(v float64) string {
	switch {
	case v == 0:
		return "–"
	case v >= 10000:
		return fmt.Sprintf("%.1f ms", v/1000)
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// num formats a plain number with about three significant digits.
func num(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// usUnit is us with its unit: "850 µs", "13.5 ms".
func usUnit(v float64) string {
	if v >= 10000 {
		return us(v)
	}
	return us(v) + " µs"
}

func count(v float64) string {
	switch {
	case v == 0:
		return "–"
	case v >= 1e6:
		return fmt.Sprintf("%.2f M", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.0f k", v/1e3)
	case v >= 1e3:
		return fmt.Sprintf("%.1f k", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

func pct(f float64) string { return fmt.Sprintf("±%.0f%%", f*50) } // half the (max-min)/median spread

func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func table(b *strings.Builder, head []string, rows [][]string) {
	b.WriteString("| " + strings.Join(head, " | ") + " |\n|")
	for i := range head {
		if i == 0 {
			b.WriteString("---|")
		} else {
			b.WriteString("--:|")
		}
	}
	b.WriteString("\n")
	for _, r := range rows {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
	b.WriteString("\n")
}

func (d *data) markdown(b *strings.Builder, source, command string, charts map[string][]chart) {
	r0 := d.recs[0]
	m := r0.Machine
	rounds := 0
	for _, r := range d.recs {
		rounds = max(rounds, r.Rounds)
	}
	fmt.Fprintf(b, "# kshm benchmark report\n\n")
	fmt.Fprintf(b, "Generated from `%s`, reproduced by `%s`.\n\n", source, command)
	fmt.Fprintf(b, "- Machine: %s, %d cores, %.0f GiB, Linux %s, %s\n", m.CPU, m.Cores, float64(m.MemKiB)/(1<<20), m.Kernel, m.Go)
	fmt.Fprintf(b, "- Date: %s; commit `%s`\n", r0.Date, r0.Commit)
	if m.LoadAvg != "" {
		fmt.Fprintf(b, "- Load average (1, 5, 15 min) at the start: %s; at the end: %s. With 2 cores, anything above ~1 "+
			"besides the benchmark means other work competed with it for the CPU.\n", m.LoadAvg, m.LoadEnd)
	}
	d.calibrationSection(b)
	fmt.Fprintf(b, "- Method: client and server in separate processes; every request and response payload is written in full "+
		"by its sender and read (verified) in full by its receiver. Transports run back to back within each round, their order "+
		"rotating from round to round; each figure is the median of %d rounds, and ±x%% is half the spread "+
		"(max-min)/median of the rounds. CPU is user+system time (getrusage) of both processes over the measurement "+
		"window, divided by the calls completed in it; allocations are the client process's Go heap allocations per call. "+
		"Context switches (voluntary+involuntary, all threads, getrusage), minor page faults, CPU migrations and the time "+
		"threads waited runnable for a CPU (schedstat) are those of both processes over the window, per call; the Go scheduler "+
		"latency is the p99 of /sched/latencies:seconds in the window, client / server.\n\n", rounds)

	d.headline(b, charts)
	d.goals(b)
	d.floorSection(b)
	missed := d.kitexGoals(b)
	d.cpuSplit(b)
	d.missedGoals(b, missed)
	for _, layer := range []string{"engine", "kitex"} {
		if len(d.concs(layer)) == 0 {
			continue
		}
		d.layerSection(b, layer, charts[layer])
	}
	d.roundsSection(b)
	d.scaleSection(b, charts["scale"])
	d.grownSection(b)
	d.notAhead(b)
	var failed []string
	for _, r := range d.recs {
		for _, e := range r.Errors {
			failed = append(failed, fmt.Sprintf("- %s %s %s c%d: %s", r.Layer, r.Transport, SizeName(r.Size), r.Concurrency,
				strings.SplitN(e, "\n", 2)[0]))
		}
	}
	if len(failed) > 0 {
		fmt.Fprintf(b, "## Failed measurements\n\n%s\n", strings.Join(failed, "\n"))
	}
}

// headline is the short table for the project README: p50 at concurrency 1
// and throughput at the highest concurrency of kshm against each baseline.
func (d *data) headline(b *strings.Builder, charts map[string][]chart) {
	fmt.Fprintf(b, "## Headline\n\n")
	for _, c := range charts["engine"] {
		if strings.Contains(c.file, "latency-c1") {
			fmt.Fprintf(b, "![%s](%s)\n\n", c.title, c.file)
		}
	}
	var rows [][]string
	for _, layer := range []string{"engine", "kitex"} {
		ts := d.transports(layer)
		if !hasTransport(ts, "kshm") {
			continue
		}
		for _, base := range baselines[layer] {
			if !hasTransport(ts, base) {
				continue
			}
			for _, size := range d.sizes(layer) {
				if size != 64 && size != 64<<10 && size != 1<<20 && size != 4<<20 {
					continue // the full tables below have every size
				}
				k, ok1 := d.get(layer, "kshm", size, 1)
				c, ok2 := d.get(layer, base, size, 1)
				if !ok1 || !ok2 {
					continue
				}
				rows = append(rows, []string{layer, base, SizeName(size),
					fmt.Sprintf("%s vs %s (%s)", us(k.P50), us(c.P50), ratio(k.P50, c.P50)),
					fmt.Sprintf("%s vs %s (%s)", us(k.CPU), us(c.CPU), ratio(k.CPU, c.CPU))})
			}
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(b, "kshm (notify mode) against each baseline at concurrency 1: median round trip and CPU time per call "+
		"of both processes, in µs.\n\n")
	table(b, []string{"layer", "baseline", "size", "p50 kshm vs baseline", "CPU/call kshm vs baseline"}, rows)
}

// goals checks the targets of the engine issue against this run.
func (d *data) goals(b *strings.Builder) {
	sizes := d.sizes("engine")
	if len(sizes) == 0 {
		return
	}
	fmt.Fprintf(b, "## Goals (engine layer, concurrency 1)\n\n")
	status := func(ok bool, n int) string {
		if n == 0 {
			return "not measured"
		}
		if ok {
			return "**met**"
		}
		return "**not met**"
	}
	type goal struct {
		text  string
		check func(size int) (string, bool, bool) // cell, ok, applicable
	}
	p50 := func(t string, size int) float64 {
		r, _ := d.get("engine", t, size, 1)
		return r.P50
	}
	cpu := func(t string, size int) float64 {
		r, _ := d.get("engine", t, size, 1)
		return r.CPU
	}
	goals := []goal{
		{"kshm p50 ≤ 0.8 × shmipc-go's, every size", func(s int) (string, bool, bool) {
			a, c := p50("kshm", s), p50("shmipc-go", s)
			return ratio(a, c), a > 0 && c > 0 && a <= 0.8*c, a > 0 && c > 0
		}},
		{"kshm p50 ≤ 0.5 × uds's, from 64 KiB", func(s int) (string, bool, bool) {
			if s < 64<<10 {
				return "", true, false
			}
			a, c := p50("kshm", s), p50("uds", s)
			return ratio(a, c), a > 0 && c > 0 && a <= 0.5*c, a > 0 && c > 0
		}},
		{"kshm-poll p50 < 2 µs at 64 B", func(s int) (string, bool, bool) {
			if s != 64 {
				return "", true, false
			}
			a := p50("kshm-poll", s)
			return us(a) + " µs", a > 0 && a < 2, a > 0
		}},
		{"kshm CPU per call ≤ uds's, every size", func(s int) (string, bool, bool) {
			a, c := cpu("kshm", s), cpu("uds", s)
			return ratio(a, c), a > 0 && c > 0 && a <= c, a > 0 && c > 0
		}},
	}
	head := []string{"goal", "status"}
	for _, s := range sizes {
		head = append(head, SizeName(s))
	}
	var rows [][]string
	for _, g := range goals {
		row := []string{g.text, ""}
		all, n := true, 0
		for _, s := range sizes {
			cell, ok, applicable := g.check(s)
			if !applicable {
				row = append(row, "")
				continue
			}
			n++
			if !ok {
				all = false
				cell += " ✗"
			} else {
				cell += " ✓"
			}
			row = append(row, cell)
		}
		row[1] = status(all, n)
		rows = append(rows, row)
	}
	table(b, head, rows)
}

// floorSection sets the engine rows at concurrency 1 against the floor:
// the same work with no transport (benchmark/cmd/bench/floor.go).
func (d *data) floorSection(b *strings.Builder) {
	var rows [][]string
	for _, s := range d.sizes("engine") {
		f, ok := d.get("engine", "floor", s, 1)
		if !ok || f.P50 == 0 {
			continue
		}
		row := []string{SizeName(s), usUnit(f.P50), us(f.CPU)}
		for _, t := range []string{"kshm", "kshm-poll", "shmipc-go", "uds"} {
			r, _ := d.get("engine", t, s, 1)
			row = append(row, ratio(r.P50, f.P50))
		}
		rows = append(rows, row)
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(b, "### The floor: the payload's work with no transport\n\n"+
		"The floor row is this benchmark's work and nothing else: the client writes the whole request into a memfd it "+
		"shares with the server and stores the call's number in a flag word; the server, polling that word, checks the "+
		"request and writes the whole response into a second area, then stores the number in a second flag word, which "+
		"the client polls; the client checks the response. No allocation, descriptor, ring or wake-up: both processes "+
		"poll without pause. It is the least any shared-memory transport can take here, and on a 2-vCPU machine it "+
		"measures what moving the payload between the two cores costs. Each transport's p50 is shown as a multiple of "+
		"the floor's.\n\n")
	table(b, []string{"size", "floor p50", "floor CPU/call (µs)", "kshm ÷ floor", "kshm-poll ÷ floor", "shmipc-go ÷ floor", "uds ÷ floor"}, rows)
}

func (d *data) layerSection(b *strings.Builder, layer string, charts []chart) {
	title := map[string]string{"engine": "Engine layer: raw round trips", "kitex": "Kitex layer: the echo service"}[layer]
	fmt.Fprintf(b, "## %s\n\n", title)
	if layer == "engine" {
		b.WriteString("`kshm` is package shm in its default notify mode, `kshm-poll` and `kshm-timed` its other wake-up modes; " +
			"`uds` is a plain unix socket with length-prefixed frames, one connection per concurrent caller; `shmipc-go` is " +
			"github.com/cloudwego/shmipc-go v0.2.0 with memfd memory, one stream per concurrent caller, its buffer slices sized " +
			"for the payload as in its own benchmark, warmed up until it has used every slice of its FIFO free list once " +
			"(each first touch of a page is a page fault in both processes), with no call falling back to its unix socket.\n\n")
	} else {
		b.WriteString("The same kitex-generated EchoService client and handler over each transport (TTHeaderFramed, a " +
			"long-connection pool holding one connection per concurrent caller); the handler verifies the request payload and " +
			"returns a response payload of the same size. The clients have Kitex's default configuration, no RPC timeout, so " +
			"a call runs on the caller's goroutine. The `-rpctimeout` pair sets one (client.WithRPCTimeout), as most " +
			"production clients do: Kitex then runs every call on a worker goroutine of its timeout pool, two goroutine " +
			"hand-offs per call whatever the transport, and `kshm-rpctimeout` is compared with `netpoll-uds-rpctimeout`.\n\n")
	}
	for _, c := range charts {
		fmt.Fprintf(b, "![%s](%s)\n\n", c.title, c.file)
	}
	ts := d.transports(layer)
	for _, conc := range d.concs(layer) {
		fmt.Fprintf(b, "### Concurrency %d\n\n", conc)
		head := append([]string{"size"}, ts...)
		var lat, thr, cpu [][]string
		for _, size := range d.sizes(layer) {
			l, q, c := []string{SizeName(size)}, []string{SizeName(size)}, []string{SizeName(size)}
			for _, t := range ts {
				r, ok := d.get(layer, t, size, conc)
				if !ok {
					l, q, c = append(l, "–"), append(q, "–"), append(c, "–")
					continue
				}
				l = append(l, fmt.Sprintf("%s %s / %s", us(r.P50), pct(r.P50Spread), us(r.P99)))
				q = append(q, fmt.Sprintf("%s %s", count(r.QPS), pct(r.QPSSpread)))
				c = append(c, fmt.Sprintf("%s %s (%.1f)", us(r.CPU), pct(r.CPUSpread), r.Allocs))
			}
			lat, thr, cpu = append(lat, l), append(thr, q), append(cpu, c)
		}
		fmt.Fprintf(b, "Latency, µs: p50 ±spread / p99\n\n")
		table(b, head, lat)
		fmt.Fprintf(b, "Throughput, calls per second\n\n")
		table(b, head, thr)
		fmt.Fprintf(b, "CPU µs per call, both processes (client heap allocations per call)\n\n")
		table(b, head, cpu)
		var expl [][]string
		for _, size := range d.sizes(layer) {
			e := []string{SizeName(size)}
			for _, t := range ts {
				r, ok := d.get(layer, t, size, conc)
				if !ok {
					e = append(e, "–")
					continue
				}
				e = append(e, fmt.Sprintf("%.2f / %.2f / %.2f / %s", r.CSW, r.MinFlt, r.Migrations, us(r.RunqWait)))
			}
			expl = append(expl, e)
		}
		fmt.Fprintf(b, "Per call, both processes: context switches / minor page faults / CPU migrations / µs waiting for a CPU\n\n")
		table(b, head, expl)
		d.wakeupsTable(b, layer, conc, ts)
		if layer == "kitex" {
			var sched [][]string
			for _, size := range d.sizes(layer) {
				e := []string{SizeName(size)}
				for _, t := range ts {
					r, ok := d.get(layer, t, size, conc)
					if !ok {
						e = append(e, "–")
						continue
					}
					e = append(e, fmt.Sprintf("%s / %s (%s / %s)", us(r.ClientSchedP50), us(r.ServerSchedP50),
						us(r.ClientSchedP99), us(r.ServerSchedP99)))
				}
				sched = append(sched, e)
			}
			fmt.Fprintf(b, "Go scheduler latency in the window (/sched/latencies), µs: p50 client / server (p99 client / server)\n\n")
			table(b, head, sched)
		}

		var rhead []string
		rhead = append(rhead, "size")
		var pairs [][2]string
		for _, k := range ts {
			if !strings.HasPrefix(k, "kshm") {
				continue
			}
			for _, base := range baselinesFor(layer, k) {
				if hasTransport(ts, base) {
					pairs = append(pairs, [2]string{k, base})
				}
			}
		}
		if len(pairs) == 0 {
			continue
		}
		for _, p := range pairs {
			rhead = append(rhead, fmt.Sprintf("%s / %s: p50, qps, cpu", p[0], p[1]))
		}
		var rows [][]string
		for _, size := range d.sizes(layer) {
			row := []string{SizeName(size)}
			for _, p := range pairs {
				a, okA := d.get(layer, p[0], size, conc)
				c, okC := d.get(layer, p[1], size, conc)
				if !okA || !okC {
					row = append(row, "–")
					continue
				}
				row = append(row, fmt.Sprintf("%s, %s, %s", ratio(a.P50, c.P50), ratio(a.QPS, c.QPS), ratio(a.CPU, c.CPU)))
			}
			rows = append(rows, row)
		}
		fmt.Fprintf(b, "Ratios (below 1 is better for p50 and CPU, above 1 for qps)\n\n")
		table(b, rhead, rows)
	}
}

func hasTransport(ts []string, t string) bool {
	for _, x := range ts {
		if x == t {
			return true
		}
	}
	return false
}

func (d *data) scaleSection(b *strings.Builder, charts []chart) {
	if len(d.scale) == 0 {
		return
	}
	r0 := d.scale[0]
	fmt.Fprintf(b, "## Scale: client processes calling one server\n\n")
	heavy := ""
	if r0.HeavySize > 0 {
		heavy = fmt.Sprintf(", plus one heavy client process making calls of %s one at a time", SizeName(r0.HeavySize))
	}
	fmt.Fprintf(b, "Light client processes each make %d call(s) of %s at a time%s; one server process serves them all "+
		"(the sidecar case), each transport in its default configuration. Shared memory is what the server maps, each "+
		"memfd counted once: committed is the memory its pages take; both sides counts the server's and its clients' "+
		"regions alike, server side only the server's own regions (kshm's memfds named after the server's pid). Per "+
		"session is that divided by the client processes, the heavy one included. Calls per second and latency are the "+
		"light clients'; the heavy client's are in their own columns. CPU per call includes the heavy client's.\n\n",
		r0.Concurrency/max(r0.Clients, 1), SizeName(r0.Size), heavy)
	for _, c := range charts {
		fmt.Fprintf(b, "![%s](%s)\n\n", c.title, c.file)
	}
	var rows [][]string
	for _, t := range engineOrder {
		for _, r := range d.scale {
			if r.Transport != t {
				continue
			}
			if r.Rounds == 0 {
				why := "no round completed"
				if len(r.Errors) > 0 {
					why = strings.SplitN(r.Errors[0], "\n", 2)[0]
				}
				rows = append(rows, []string{t, fmt.Sprint(r.Clients), why, "", "", "", "", "", "", "", "", "", ""})
				continue
			}
			n := float64(r.Sessions())
			hv := "–"
			if r.HeavySize > 0 {
				hv = fmt.Sprintf("p50 %s, %s/s, %d fallbacks", usUnit(r.HeavyP50), count(r.HeavyQPS), r.HeavyFallbacks)
			}
			rows = append(rows, []string{t, fmt.Sprint(r.Clients), count(r.QPS) + " " + pct(r.QPSSpread), us(r.P50), us(r.P99),
				us(r.CPU), fmt.Sprintf("%.1f", r.ServerRSS/1024), fmt.Sprintf("%.1f", r.ServerShmCommitted/1024),
				fmt.Sprintf("%.1f", r.ServerOwnShmCommitted/1024/n), fmt.Sprintf("%.1f", r.ServerShmCommitted/1024/n),
				fmt.Sprintf("%.1f", r.ServerShmMapped/1024/n), fmt.Sprintf("%.1f", r.ClientRSS/1024), hv})
		}
	}
	table(b, []string{"transport", "light clients", "calls/s", "p50 µs", "p99 µs", "CPU µs/call", "server RSS MiB",
		"server shm committed MiB (both sides)", "committed MiB per session, server side", "committed MiB per session, both sides",
		"mapped MiB per session", "client RSS MiB", "heavy client"}, rows)
	for _, r := range d.scale {
		if r.Transport != "kshm" || r.Clients != 32 || r.Rounds == 0 || r.ServerOwnShmCommitted == 0 {
			continue
		}
		per := r.ServerOwnShmCommitted / 1024 / float64(r.Sessions())
		status := "met, within the aim of 4 MiB"
		switch {
		case per > 8:
			status = "not met"
		case per > 4:
			status = "met (≤ 8 MiB), above the aim of 4 MiB"
		}
		fmt.Fprintf(b, "Goal (issue 11): with 32 light client processes the server commits at most 8 MiB of shared memory "+
			"per session, aim 4 MiB. Measured: %.1f MiB per session of the server's own regions (%d sessions, the heavy "+
			"client's included; %.1f MiB with its clients' regions): %s.\n\n",
			per, r.Sessions(), r.ServerShmCommitted/1024/float64(r.Sessions()), status)
	}
}

// notAhead lists, honestly, every case where the default kshm mode is
// behind a baseline by more than the spread of the rounds.
func (d *data) notAhead(b *strings.Builder) {
	var lines []string
	for _, layer := range []string{"engine", "kitex"} {
		for _, conc := range d.concs(layer) {
			for _, size := range d.sizes(layer) {
				k, ok := d.get(layer, "kshm", size, conc)
				if !ok {
					continue
				}
				for _, base := range baselines[layer] {
					c, ok := d.get(layer, base, size, conc)
					if !ok {
						continue
					}
					var what []string
					noise := func(a, b float64) float64 { return math.Max(a, b) / 2 }
					if k.P50 > c.P50*(1+noise(k.P50Spread, c.P50Spread)) {
						what = append(what, fmt.Sprintf("p50 %s vs %s µs (%s)", us(k.P50), us(c.P50), ratio(k.P50, c.P50)))
					}
					if k.QPS < c.QPS*(1-noise(k.QPSSpread, c.QPSSpread)) {
						what = append(what, fmt.Sprintf("throughput %s vs %s/s (%s)", count(k.QPS), count(c.QPS), ratio(k.QPS, c.QPS)))
					}
					if k.CPU > c.CPU*(1+noise(k.CPUSpread, c.CPUSpread)) {
						what = append(what, fmt.Sprintf("CPU %s vs %s µs/call (%s)", us(k.CPU), us(c.CPU), ratio(k.CPU, c.CPU)))
					}
					if len(what) > 0 {
						lines = append(lines, fmt.Sprintf("- %s, %s, concurrency %d, against %s: %s", layer, SizeName(size), conc, base,
							strings.Join(what, "; ")))
					}
				}
			}
		}
	}
	fmt.Fprintf(b, "## Where kshm (notify mode) is not ahead\n\n")
	if len(lines) == 0 {
		b.WriteString("Nowhere beyond the spread of the rounds.\n\n")
		return
	}
	b.WriteString("Cases where the default mode is behind a baseline by more than half the spread of the rounds:\n\n")
	b.WriteString(strings.Join(lines, "\n") + "\n\n")
}

// calibrationSection shows what the machine's basic operations cost at the
// start and the end of the run.
func (d *data) calibrationSection(b *strings.Builder) {
	m := d.recs[0].Machine
	if m.Calibration == nil {
		return
	}
	cols := []*Calibration{m.Calibration}
	head := []string{"machine calibration", "at the start"}
	if m.CalibrationEnd != nil {
		cols = append(cols, m.CalibrationEnd)
		head = append(head, "at the end")
	}
	pin := "threads not pinned (fewer than 2 CPUs)"
	if m.Calibration.Pinned {
		pin = fmt.Sprintf("threads pinned to CPUs %d and %d", m.Calibration.CPUs[0], m.Calibration.CPUs[1])
	}
	rows := []struct {
		name string
		f    func(c *Calibration) string
	}{
		{"unix socket 1-byte round trip, two processes (p50, µs)", func(c *Calibration) string { return us(c.UDSRoundTripUS) }},
		{"channel wake-up round trip, two locked threads, pinned / unpinned (µs)", func(c *Calibration) string {
			return us(c.ChanWakeRoundTripUS) + " / " + us(c.ChanWakeUnpinnedUS)
		}},
		{"futex wake-up round trip, two threads, pinned / unpinned (µs)", func(c *Calibration) string {
			return us(c.FutexRoundTripUS) + " / " + us(c.FutexUnpinnedUS)
		}},
		{"cache-line ping-pong round trip, two pinned threads spinning (ns)", func(c *Calibration) string {
			return fmt.Sprintf("%.0f", c.CacheLineRoundTripNs)
		}},
		{"first touch of a page, anonymous / memfd shared (µs)", func(c *Calibration) string {
			return us(c.PageTouchUS) + " / " + us(c.ShmPageTouchUS)
		}},
		{"memcpy, 64 MiB cold / 256 KiB warm (GB/s)", func(c *Calibration) string {
			return fmt.Sprintf("%.1f / %.1f", c.MemcpyColdGBs, c.MemcpyWarmGBs)
		}},
	}
	var tr [][]string
	for _, r := range rows {
		row := []string{r.name}
		for _, c := range cols {
			row = append(row, r.f(c))
		}
		tr = append(tr, row)
	}
	fmt.Fprintf(b, "- Calibration (%s); compare these before comparing results from two machines:\n\n", pin)
	table(b, head, tr)
}

// roundsSection shows every round of the key rows (concurrency 1 at 64 B,
// 16 KiB and 1 MiB): a median hides a slow round, and the rounds' context
// switches, faults, migrations and waits for a CPU say why it was slow.
func (d *data) roundsSection(b *strings.Builder) {
	var rows [][]string
	for _, layer := range []string{"kitex", "engine"} {
		for _, t := range d.transports(layer) {
			for _, size := range []int{64, 16 << 10, 1 << 20} {
				r, ok := d.get(layer, t, size, 1)
				if !ok {
					continue
				}
				rows = append(rows, []string{layer, t, SizeName(size), rounds(r.P50Rounds), rounds(r.CPURounds),
					rounds(r.CSWRounds), rounds(r.FltRounds), rounds(r.MigRounds), rounds(r.RunqRounds), rounds(r.GCRounds)})
			}
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(b, "## Every round of the key rows (concurrency 1)\n\n")
	b.WriteString("One value per round, in the order the rounds ran; per call, both processes.\n\n")
	table(b, []string{"layer", "transport", "size", "p50 µs", "CPU µs", "context switches", "minor faults", "migrations",
		"µs waiting for a CPU", "GC cycles in the window"}, rows)
	var slow []string
	for _, layer := range []string{"kitex", "engine"} {
		for _, t := range d.transports(layer) {
			for _, size := range []int{64, 16 << 10, 1 << 20} {
				if r, ok := d.get(layer, t, size, 1); ok {
					if line := slowRound(r); line != "" {
						slow = append(slow, line)
					}
				}
			}
		}
	}
	if len(slow) > 0 {
		b.WriteString("Rounds whose p50 is at least 1.5× the fastest round's, against the fastest round (per call, both " +
			"processes):\n\n" + strings.Join(slow, "\n") + "\n\n")
	}
	d.roundRatios(b)
}

// roundPairs are the comparisons roundRatios makes, per layer: kshm's
// transport against each baseline.
var roundPairs = map[string][][2]string{
	"engine": {{"kshm", "floor"}, {"kshm", "uds"}, {"kshm", "shmipc-go"}},
	"kitex":  {{"kshm", "netpoll-uds"}, {"kshm-rpctimeout", "netpoll-uds-rpctimeout"}},
}

// roundRatios shows kshm over each baseline round by round. Within a round
// the transports run back to back, so both ran on the same placement of the
// machine's vCPUs; a ratio of medians can pair a fast round of one with a
// slow round of the other (on a VM whose host moves its vCPUs, the floor at
// 1 MiB took 90 µs in some rounds and 380 µs in others).
func (d *data) roundRatios(b *strings.Builder) {
	var rows [][]string
	for _, layer := range []string{"engine", "kitex"} {
		for _, pair := range roundPairs[layer] {
			for _, size := range []int{64, 16 << 10, 1 << 20} {
				k, ok1 := d.get(layer, pair[0], size, 1)
				base, ok2 := d.get(layer, pair[1], size, 1)
				if !ok1 || !ok2 {
					continue
				}
				p50 := perRound(k.P50Rounds, base.P50Rounds)
				cpu := perRound(k.CPURounds, base.CPURounds)
				if len(p50) == 0 {
					continue
				}
				rows = append(rows, []string{layer, pair[0] + " / " + pair[1], SizeName(size),
					ratios(p50), fmt.Sprintf("%.2f×", Median(p50)), ratios(cpu), fmt.Sprintf("%.2f×", Median(cpu))})
			}
		}
	}
	if len(rows) == 0 {
		return
	}
	b.WriteString("kshm against each baseline within each round (concurrency 1). The transports of a round run back to " +
		"back, so they share the machine's state, which a ratio of medians taken from different rounds does not:\n\n")
	table(b, []string{"layer", "kshm / baseline", "size", "p50, round by round", "median", "CPU per call, round by round",
		"median"}, rows)
}

// perRound divides a by b round by round, over the rounds both have.
func perRound(a, b []float64) []float64 {
	var out []float64
	for i := 0; i < len(a) && i < len(b); i++ {
		if b[i] > 0 {
			out = append(out, a[i]/b[i])
		}
	}
	return out
}

func ratios(v []float64) string {
	if len(v) == 0 {
		return "–"
	}
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(parts, ", ")
}

// Median is the median of v (the mean of the middle two for an even
// count); v is not modified.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// slowRound describes the slowest round of r, if its p50 is at least 1.5
// times the fastest round's, by what changed between the two rounds.
func slowRound(r Record) string {
	n := len(r.P50Rounds)
	if n < 2 {
		return ""
	}
	lo, hi := 0, 0
	for i, v := range r.P50Rounds {
		if v < r.P50Rounds[lo] {
			lo = i
		}
		if v > r.P50Rounds[hi] {
			hi = i
		}
	}
	if r.P50Rounds[lo] <= 0 || r.P50Rounds[hi] < 1.5*r.P50Rounds[lo] {
		return ""
	}
	at := func(v []float64, i int) float64 {
		if i < len(v) {
			return v[i]
		}
		return 0
	}
	diff := func(name string, v []float64, unit string) string {
		return fmt.Sprintf("%s %s → %s%s", name, num(at(v, lo)), num(at(v, hi)), unit)
	}
	return fmt.Sprintf("- %s %s %s: round %d %s µs against round %d %s µs: %s; %s; %s; %s; GC cycles %.0f → %.0f",
		r.Layer, r.Transport, SizeName(r.Size), hi+1, us(r.P50Rounds[hi]), lo+1, us(r.P50Rounds[lo]),
		diff("waiting for a CPU", r.RunqRounds, " µs"), diff("context switches", r.CSWRounds, ""),
		diff("minor faults", r.FltRounds, ""), diff("migrations", r.MigRounds, ""), at(r.GCRounds, lo), at(r.GCRounds, hi))
}

func rounds(v []float64) string {
	if len(v) == 0 {
		return "–"
	}
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = strings.TrimSpace(us(x))
		if x == 0 {
			parts[i] = "0"
		}
	}
	return strings.Join(parts, ", ")
}

// kitexGoals checks the Kitex layer's targets (issue 10): kshm in its
// default mode against netpoll over a unix socket, in one run.
func (d *data) kitexGoals(b *strings.Builder) []missedGoal {
	const base = "netpoll-uds"
	get := func(t string, size, conc int) (Record, bool) { return d.get("kitex", t, size, conc) }
	type goal struct {
		text  string
		conc  int
		sizes map[int]float64 // size -> limit
		cell  func(k, n Record, limit float64) (string, bool)
	}
	ratioLE := func(f func(Record) float64) func(k, n Record, limit float64) (string, bool) {
		return func(k, n Record, limit float64) (string, bool) {
			a, c := f(k), f(n)
			return fmt.Sprintf("%s (≤%.1f×)", ratio(a, c), limit), a > 0 && c > 0 && a <= limit*c
		}
	}
	goals := []goal{
		{"p50 at c=1, kshm / netpoll-uds", 1, map[int]float64{64: 0.5, 16 << 10: 0.5, 1 << 20: 0.6},
			ratioLE(func(r Record) float64 { return r.P50 })},
		{"CPU per call at c=1, kshm / netpoll-uds", 1, map[int]float64{64: 0.8, 16 << 10: 0.7, 1 << 20: 0.7},
			ratioLE(func(r Record) float64 { return r.CPU })},
		{"context switches per call at c=1, both processes", 1, map[int]float64{64: 1, 16 << 10: 1},
			func(k, n Record, limit float64) (string, bool) {
				return fmt.Sprintf("%.2f (≤%.0f; netpoll %.2f)", k.CSW, limit, n.CSW), k.Rounds > 0 && k.CSW <= limit
			}},
		{"throughput at c=16, kshm / netpoll-uds", 16, map[int]float64{16 << 10: 1.5, 1 << 20: 1.5},
			func(k, n Record, limit float64) (string, bool) {
				return fmt.Sprintf("%s (≥%.1f×)", ratio(k.QPS, n.QPS), limit), k.QPS > 0 && n.QPS > 0 && k.QPS >= limit*n.QPS
			}},
		{"CPU per call at c=16, kshm / netpoll-uds", 16, map[int]float64{16 << 10: 0.7, 1 << 20: 0.7},
			ratioLE(func(r Record) float64 { return r.CPU })},
	}
	sizes := []int{64, 16 << 10, 1 << 20}
	var rows [][]string
	var missed []missedGoal
	for gi, g := range goals {
		row := []string{g.text}
		for _, size := range sizes {
			limit, ok := g.sizes[size]
			if !ok {
				row = append(row, "")
				continue
			}
			k, ok1 := get("kshm", size, g.conc)
			n, ok2 := get(base, size, g.conc)
			if !ok1 || !ok2 {
				row = append(row, "not measured")
				continue
			}
			cell, met := g.cell(k, n, limit)
			if met {
				cell += " ✓"
			} else {
				cell += " ✗"
				missed = append(missed, missedGoal{goal: g.text, cell: cell, size: size, conc: g.conc,
					switches: gi == 2, kshm: k, netpoll: n})
			}
			row = append(row, cell)
		}
		rows = append(rows, row)
	}
	if _, ok := get("kshm", 64, 1); !ok {
		return nil
	}
	fmt.Fprintf(b, "## Goals (Kitex layer, kshm against netpoll over a unix socket)\n\n")
	head := []string{"goal"}
	for _, s := range sizes {
		head = append(head, SizeName(s))
	}
	table(b, head, rows)
	return missed
}

// missedGoal is one ✗ of the Kitex goals table, with the two rows it
// compares.
type missedGoal struct {
	goal, cell    string
	size, conc    int
	switches      bool // the context-switch goal
	kshm, netpoll Record
}

// whySwitches is what a context switch per call is, for the switch goal.
const whySwitches = "a kshm receiver whose wait outlasts its spin budget sleeps, and its wake-up is a switch on each side; " +
	"the budget follows the receiver's recent waits (docs/ARCHITECTURE.md, the spin rule), and polling through longer " +
	"waits, which would remove the switches, cost CPU above netpoll's at 16-64 KiB in every variant measured"

// missedGoals explains the missed Kitex goals, row by row, from what the
// run measured: the CPU split's differences, GC cycles, page faults,
// context switches and the Go scheduler's latency of both transports, and
// which of the split's categories (explained above) would have to shrink.
func (d *data) missedGoals(b *strings.Builder, missed []missedGoal) {
	if len(missed) == 0 {
		return
	}
	sort.SliceStable(missed, func(i, j int) bool {
		if missed[i].conc != missed[j].conc {
			return missed[i].conc < missed[j].conc
		}
		return missed[i].size < missed[j].size
	})
	b.WriteString("### Why each missed goal is missed\n\n")
	b.WriteString("Row by row, from the same run: CPU per call, GC cycles per round, minor page faults, context " +
		"switches (client + server) and run-queue wait per call of both processes, the p99 of the Go scheduler's " +
		"latency (client / server), and the CPU split's categories where kshm spends more than netpoll, largest " +
		"first; what each of those is and what would remove it is listed under the split above.\n\n")
	for i := 0; i < len(missed); {
		m := missed[i]
		var goals []string
		switches := false
		for ; i < len(missed) && missed[i].size == m.size && missed[i].conc == m.conc; i++ {
			goals = append(goals, fmt.Sprintf("%s: %s", missed[i].goal, strings.TrimSuffix(missed[i].cell, " ✗")))
			switches = switches || missed[i].switches
		}
		k, n := m.kshm, m.netpoll
		fmt.Fprintf(b, "- **%s, c=%d** (%s). kshm against netpoll: CPU %s against %s µs per call; GC cycles %s "+
			"against %s per round; minor faults %.2f against %.2f, context switches %.2f + %.2f against %.2f + %.2f, "+
			"run-queue wait %s against %s µs per call; scheduler latency p99 %s / %s against %s / %s µs.",
			SizeName(m.size), m.conc, strings.Join(goals, "; "), us(k.CPU), us(n.CPU), num(k.GCs), num(n.GCs),
			k.MinFlt, n.MinFlt, k.ClientCSW, k.ServerCSW, n.ClientCSW, n.ServerCSW, us(k.RunqWait), us(n.RunqWait),
			us(k.ClientSchedP99), us(k.ServerSchedP99), us(n.ClientSchedP99), us(n.ServerSchedP99))
		if k.Wakeups != nil {
			fmt.Fprintf(b, " kshm's wake-ups (a send finding the peer's receiver asleep: a system call for the sender, "+
				"a context switch for the receiver) %.2f + %.2f per call, %.2f of them through the futex.",
				k.ClientWakeups, k.ServerWakeups, k.FutexWakeups)
		}
		more, _ := splitDiff(k, n)
		if len(more) > 0 {
			fmt.Fprintf(b, " kshm spends more on %s.", diffList(more))
		}
		if m.conc > 1 {
			// With both cores busy, throughput is the cores over the CPU
			// per call: what netpoll spends in its transport bounds what
			// any transport could gain.
			var tot float64
			for _, c := range splitCategories {
				tot += n.CPUSplit[c.name]
			}
			io := n.CPUSplit["wait"] + n.CPUSplit["syscall"] + n.CPUSplit["transport"]
			if tot > io && io > 0 {
				fmt.Fprintf(b, " netpoll spends %.0f%% of its profiled CPU waiting, in system calls and in its "+
					"own code, so a transport that cost nothing would make about %.2f× its calls per second "+
					"at %.2f× its CPU per call.", 100*io/tot, tot/(tot-io), (tot-io)/tot)
			}
		}
		if switches {
			fmt.Fprintf(b, " Context switches: %s.", whySwitches)
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
}

type splitDelta struct {
	name string
	v    float64
}

// splitDiff returns the CPU split's categories where kshm spends more and
// less than netpoll (by more than 0.5 µs per call), largest first.
func splitDiff(k, n Record) (more, less []splitDelta) {
	if len(k.CPUSplit) == 0 || len(n.CPUSplit) == 0 {
		return nil, nil
	}
	for _, c := range splitCategories {
		v := k.CPUSplit[c.name] - n.CPUSplit[c.name]
		switch {
		case v > 0.5:
			more = append(more, splitDelta{c.name, v})
		case v < -0.5:
			less = append(less, splitDelta{c.name, -v})
		}
	}
	sort.Slice(more, func(i, j int) bool { return more[i].v > more[j].v })
	sort.Slice(less, func(i, j int) bool { return less[i].v > less[j].v })
	return more, less
}

func diffList(ds []splitDelta) string {
	var parts []string
	for _, x := range ds {
		parts = append(parts, fmt.Sprintf("%s %s", x.name, us(x.v)))
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, ", ")
}

// splitCategories: the CPU split's categories, in order, with what each is.
var splitCategories = []struct{ name, what string }{
	{"wait", "waiting for the peer: kshm's receive loop (polling, yields, its sleep) or netpoll's epoll_wait"},
	{"syscall", "other system calls: socket reads and writes, wake-ups"},
	{"copy", "memmove, memclr, memequal: encoding, decoding, the payload"},
	{"gc", "the garbage collector"},
	{"alloc", "the allocator"},
	{"scheduler", "the Go scheduler: parking, readying, futexes, idle threads"},
	{"kitex", "Kitex, its codec and the generated code"},
	{"transport", "kshm's own code, or netpoll's"},
	{"bench", "the benchmark's client loop and handler"},
	{"other", "the rest"},
}

// cpuSplit shows, for the Kitex goal rows, where a call's CPU goes.
func (d *data) cpuSplit(b *strings.Builder) {
	var rows [][]string
	for _, conc := range []int{1, 16} {
		for _, size := range []int{64, 16 << 10, 1 << 20} {
			for _, t := range []string{"kshm", "netpoll-uds"} {
				r, ok := d.get("kitex", t, size, conc)
				if !ok || len(r.CPUSplit) == 0 {
					continue
				}
				row := []string{SizeName(size), fmt.Sprint(conc), t}
				var total float64
				for _, c := range splitCategories {
					v := r.CPUSplit[c.name]
					total += v
					row = append(row, us(v))
				}
				row = append(row, us(total), us(r.CPU))
				rows = append(rows, row)
			}
		}
	}
	if len(rows) == 0 {
		return
	}
	b.WriteString("## Where a Kitex call's CPU goes\n\n")
	b.WriteString("One extra measurement per row, outside the rounds above, with both processes profiling their window " +
		"(pprof, 100 samples a second: coarse in a short window); each sample is sorted by its stack. µs per call, both " +
		"processes together; \"profiled\" is the split's total, \"rounds\" the CPU per call of the rounds, for comparison.\n\n")
	for _, c := range splitCategories {
		fmt.Fprintf(b, "- **%s**: %s\n", c.name, c.what)
	}
	b.WriteString("\n")
	head := []string{"size", "c", "transport"}
	for _, c := range splitCategories {
		head = append(head, c.name)
	}
	head = append(head, "profiled", "rounds")
	table(b, head, rows)
	d.splitDifferences(b)
}

// whatRemoves says, for a category where kshm spends more than netpoll,
// what the time is and what would remove it.
var whatRemoves = map[string]string{
	"copy": "kshm copies the payload into and out of shared memory in user space (the first read of a payload the other core " +
		"wrote is a cache miss here, in the kernel's socket copy for netpoll), and Kitex's Thrift decoding copies each binary " +
		"field twice into the Go heap (`[]byte(string(b))` in gopkg's ReadBinary), with the page faults of fresh heap pages: " +
		"a one-copy decode in Kitex would remove the second copy",
	"gc": "kshm keeps its buffers out of the Go heap, so its processes' live heaps are smaller and the same garbage (Kitex's " +
		"decoded copies) triggers more GC cycles: the Go pacer starts one each time the heap doubles. GOGC or GOMEMLIMIT set " +
		"for the application, or a real application's larger heap, removes the difference (README: GOGC=400 runs)",
	"alloc": "the same decoded copies, allocated",
	"wait": "kshm's receiver polls while the peer works, when its median wait is shorter than a wake-up costs (about " +
		"50 µs), or through the short mode of bimodal waits: CPU bought for latency; a shorter SpinTime trades it back",
	"scheduler": "goroutine hand-offs: with an RPC timeout Kitex's timeout pool hands every call to a worker and back; at " +
		"c=16 the receiving role passes between callers and responses are handed to their callers",
	"syscall":   "wake-ups of a receiver that slept",
	"transport": "kshm's own code (allocator, rings, receive roles)",
	"kitex":     "Kitex itself",
	"other":     "the rest (runtime helpers, hashing)",
	"bench":     "the benchmark's loop",
}

// splitDifferences lists, per row pair, the categories where kshm spends
// more CPU per call than netpoll, largest first, with what would remove it.
func (d *data) splitDifferences(b *strings.Builder) {
	var lines []string
	used := map[string]bool{}
	for _, conc := range []int{1, 16} {
		for _, size := range []int{64, 16 << 10, 1 << 20} {
			k, ok1 := d.get("kitex", "kshm", size, conc)
			n, ok2 := d.get("kitex", "netpoll-uds", size, conc)
			if !ok1 || !ok2 || len(k.CPUSplit) == 0 || len(n.CPUSplit) == 0 {
				continue
			}
			more, less := splitDiff(k, n)
			for _, x := range more {
				used[x.name] = true
			}
			lines = append(lines, fmt.Sprintf("- %s, c=%d: kshm spends more on %s; less on %s (µs per call).",
				SizeName(size), conc, diffList(more), diffList(less)))
		}
	}
	if len(lines) == 0 {
		return
	}
	b.WriteString("Where kshm spends more CPU than netpoll-uds, and where less, in the split above:\n\n")
	b.WriteString(strings.Join(lines, "\n") + "\n\n")
	b.WriteString("What that time is, and what would remove it:\n\n")
	for _, c := range splitCategories {
		if used[c.name] {
			fmt.Fprintf(b, "- **%s**: %s.\n", c.name, whatRemoves[c.name])
		}
	}
	b.WriteString("\n")
}

// wakeupsTable lists kshm's wake-ups per call (client + server, and of
// them those through the futex) for the kshm transports of one layer and
// concurrency, when the run recorded them: each is a receiver that slept,
// a context switch of its own, which tells those apart from the others in
// the table above.
func (d *data) wakeupsTable(b *strings.Builder, layer string, conc int, ts []string) {
	var kt []string
	for _, t := range ts {
		if !strings.HasPrefix(t, "kshm") {
			continue
		}
		for _, size := range d.sizes(layer) {
			if r, ok := d.get(layer, t, size, conc); ok && r.Wakeups != nil {
				kt = append(kt, t)
				break
			}
		}
	}
	if len(kt) == 0 {
		return
	}
	var rows [][]string
	for _, size := range d.sizes(layer) {
		e := []string{SizeName(size)}
		for _, t := range kt {
			r, ok := d.get(layer, t, size, conc)
			if !ok || r.Wakeups == nil {
				e = append(e, "–")
				continue
			}
			e = append(e, fmt.Sprintf("%.2f + %.2f (%.2f)", r.ClientWakeups, r.ServerWakeups, r.FutexWakeups))
		}
		rows = append(rows, e)
	}
	fmt.Fprintf(b, "kshm's wake-ups per call, sent by the client + by the server (of both, through the futex): "+
		"each is a receiver that slept and a context switch of its own\n\n")
	table(b, append([]string{"size"}, kt...), rows)
}
