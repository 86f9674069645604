package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/shmkit/kshm/benchmark/internal/report"
	"github.com/shmkit/kshm/shm"
)

// A case is one cell of the matrix; each round measures every case once per
// transport, the transports back to back, so that slow drifts of the
// machine hit all of them alike.
type benchCase struct {
	layer   string
	size    int
	conc    int // concurrent calls per client process
	clients int // client processes
	scale   bool
	heavy   int  // the scale case's heavy client: its payload size (0: none)
	grown   bool // the grown case (grown.go): kshm-fixed against kshm-grown
}

type settings struct {
	rounds           int
	minCalls         int
	maxWindow        time.Duration
	kitexTransports  []string // default transports of the kitex layer (all when empty)
	warmup, duration time.Duration
	sizes            []int
	kitexSizes       []int // nil: sizes
	engineConcs      []int
	kitexConcs       []int
	scaleClients     []int
	scaleSize        int
	scaleConc        int
	scaleHeavy       int   // payload of one extra heavy client in the scale case (0: none)
	grownSizes       []int // payload sizes of the grown case (grown.go)
	split            bool
}

func modeSettings(o options) (settings, error) {
	all := []int{64, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20}
	var s settings
	switch o.mode {
	case "quick":
		// Five rounds: with three, one slow round (a vCPU the host took
		// away) moved medians enough that a second run disagreed.
		s = settings{rounds: 5, minCalls: 10, maxWindow: 300 * time.Millisecond,
			warmup: 20 * time.Millisecond, duration: 80 * time.Millisecond,
			kitexTransports: []string{"kshm", "netpoll-uds", "netpoll-tcp", "kshm-rpctimeout", "netpoll-uds-rpctimeout"},
			kitexSizes:      []int{64, 16 << 10, 1 << 20},
			// 1 KiB and 4 MiB are left to the full run: with the warm-ups a
			// loaded 2-vCPU machine took 5.5 minutes for every size.
			sizes: []int{64, 16 << 10, 64 << 10, 256 << 10, 1 << 20}, engineConcs: []int{1, 16}, kitexConcs: []int{1, 16},
			scaleClients: nil, scaleSize: 1 << 10, scaleConc: 1, scaleHeavy: 4 << 20}
	case "full":
		s = settings{rounds: 5, minCalls: 100, maxWindow: 3 * time.Second, warmup: 150 * time.Millisecond, duration: 500 * time.Millisecond,
			sizes: all, engineConcs: []int{1, 16, 64}, kitexConcs: []int{1, 16, 64},
			scaleClients: []int{1, 16, 32, 64, 100}, scaleSize: 1 << 10, scaleConc: 1, scaleHeavy: 4 << 20,
			grownSizes: []int{1 << 20, 4 << 20}}
	case "custom":
		s = settings{rounds: 3, minCalls: 50, maxWindow: 2 * time.Second, warmup: 100 * time.Millisecond, duration: 500 * time.Millisecond,
			sizes: all, engineConcs: []int{1, 16}, kitexConcs: []int{1, 16}, scaleSize: 1 << 10, scaleConc: 1, scaleHeavy: 4 << 20}
	default:
		return s, fmt.Errorf("unknown -mode %q (quick, full or custom)", o.mode)
	}
	switch o.split {
	case "on":
		s.split = true
	case "auto", "":
		s.split = o.mode == "quick" || o.mode == "full"
	case "off":
	default:
		return s, fmt.Errorf("-split %q: want on, off or auto", o.split)
	}
	if o.rounds > 0 {
		s.rounds = o.rounds
	}
	if o.minCalls > 0 {
		s.minCalls = o.minCalls
	}
	if o.maxWindow > 0 {
		s.maxWindow = o.maxWindow
	}
	if o.warmup > 0 {
		s.warmup = o.warmup
	}
	if o.duration > 0 {
		s.duration = o.duration
	}
	if s.maxWindow < s.duration {
		s.maxWindow = s.duration
	}
	if len(o.sizes) > 0 {
		s.sizes, s.kitexSizes = o.sizes, nil
	}
	if s.kitexSizes == nil {
		s.kitexSizes = s.sizes
	}
	if len(o.concs) > 0 {
		s.engineConcs, s.kitexConcs = o.concs, o.concs
	}
	if o.heavy >= 0 {
		s.scaleHeavy = o.heavy
	}
	if len(o.grown) > 0 {
		s.grownSizes = o.grown // 0 disables: grownCases skips it
	}
	if len(o.scale) > 0 {
		s.scaleClients = nil
		for _, n := range o.scale {
			if n > 0 {
				s.scaleClients = append(s.scaleClients, n)
			}
		}
	}
	for _, n := range s.sizes {
		if n < minSize {
			return s, fmt.Errorf("size %d below the minimum %d", n, minSize)
		}
	}
	return s, nil
}

// roundResult is one measurement of one case over one transport.
type roundResult struct {
	calls                     uint64
	p50, p99, p999, max       float64 // µs
	qps                       float64
	cpu, clientCPU, serverCPU float64 // µs per call
	allocs, serverAllocs      float64 // per call
	serverRSS, serverShmem    float64 // KiB
	clientRSS, clientShmem    float64 // KiB per client process
	fallbacks                 uint64  // calls that did not go through shared memory
	// Per call, both processes together unless named: context switches
	// (voluntary+involuntary), involuntary ones alone, minor page faults,
	// CPU migrations of threads, µs threads waited runnable for a CPU.
	csw, clientCSW, serverCSW, ivcsw   float64
	minflt, clientMinflt, serverMinflt float64
	migrations, runqWait               float64
	gcs                                float64 // GC cycles in the window, both processes
	// kshm wake-ups per call: sent by the client processes (each woke the
	// server's receiver) and by the server, and of both the futex ones.
	clientWakeups, serverWakeups, futexWakeups float64
	// split: CPU µs per call by category, both processes (split pass).
	split map[string]float64
	// Go scheduler latency (/sched/latencies:seconds) in the window, µs:
	// the client's (the worst client process) and the server's.
	clientSchedP50, clientSchedP99, serverSchedP50, serverSchedP99 float64
	// Shared memory the server holds: committed (allocated pages) and
	// mapped bytes of the distinct memfds it maps, KiB, and their number.
	serverShmCommitted, serverShmMapped float64
	serverMemfds                        int
	// Of that, the server's own regions (its memfds): committed KiB.
	serverOwnShmCommitted float64
	// The scale case's heavy client: p50 µs, calls per second, fallbacks.
	heavyP50, heavyQPS float64
	heavyFallbacks     uint64
}

type orchestrator struct {
	self    string
	dir     string
	set     settings
	seq     int
	started time.Time
	total   int
	done    int
}

func orchestrate(o options) error {
	set, err := modeSettings(o)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	out := o.out
	if out == "" {
		out = filepath.Join("results", o.mode+".json")
	}
	dir, err := os.MkdirTemp("", "kshm-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	want := map[string]bool{}
	for _, t := range o.transports {
		want[t] = true
	}
	layerOn := map[string]bool{}
	for _, l := range o.layers {
		layerOn[l] = true
	}
	var defs []transportDef
	kitexDefault := map[string]bool{}
	for _, t := range set.kitexTransports {
		kitexDefault[t] = true
	}
	for _, d := range allTransports() {
		if !layerOn[d.layer] {
			continue
		}
		if len(want) > 0 && !want[d.name] && !want[d.id()] {
			continue
		}
		if len(want) == 0 && d.layer == "kitex" && len(kitexDefault) > 0 && !kitexDefault[d.name] {
			continue
		}
		defs = append(defs, d)
	}
	if len(defs) == 0 {
		return fmt.Errorf("no transport selected")
	}
	byLayer := map[string][]transportDef{}
	for _, d := range defs {
		byLayer[d.layer] = append(byLayer[d.layer], d)
	}

	var cases []benchCase
	for _, layer := range []string{"engine", "kitex"} {
		concs, sizes := set.engineConcs, set.sizes
		if layer == "kitex" {
			concs, sizes = set.kitexConcs, set.kitexSizes
		}
		if len(byLayer[layer]) == 0 {
			continue
		}
		for _, size := range sizes {
			for _, c := range concs {
				cases = append(cases, benchCase{layer: layer, size: size, conc: c, clients: 1})
			}
		}
	}
	// The scale case runs the default mode of each engine transport: poll
	// mode with many client processes would only measure spinning.
	scaleDefs := map[string]bool{}
	for _, d := range byLayer["engine"] {
		if d.name == "kshm" || d.name == "uds" || d.name == "shmipc-go" {
			scaleDefs[d.id()] = true
		}
	}
	if len(scaleDefs) > 0 {
		for _, n := range set.scaleClients {
			cases = append(cases, benchCase{layer: "engine", size: set.scaleSize, conc: set.scaleConc, clients: n, scale: true,
				heavy: set.scaleHeavy})
		}
	}

	cases = append(cases, grownCases(set, byLayer)...)

	or := &orchestrator{self: self, dir: dir, set: set, started: time.Now()}
	transportsOf := func(c benchCase) []transportDef {
		if !c.scale {
			var ts []transportDef
			for _, d := range grownTransportsFor(c, byLayer[c.layer]) {
				if d.name != "floor" || c.conc == 1 { // floor.go: concurrency 1 only
					ts = append(ts, d)
				}
			}
			return ts
		}
		var ts []transportDef
		for _, d := range byLayer[c.layer] {
			if scaleDefs[d.id()] {
				ts = append(ts, d)
			}
		}
		return ts
	}
	for _, c := range cases {
		or.total += len(transportsOf(c)) * set.rounds
	}
	meta := machineInfo()
	fmt.Fprintf(os.Stderr, "bench: mode %s, %d rounds x %d measurements, %v warm-up + %v each; %s, %d cpus, go %s, load %s\n",
		o.mode, set.rounds, or.total/set.rounds, set.warmup, set.duration, meta.CPU, meta.Cores, meta.Go, meta.LoadAvg)
	cal := calibrate(self)
	meta.Calibration = &cal
	fmt.Fprintf(os.Stderr, "bench: calibration: %s\n", cal)

	type key struct {
		id string
		c  benchCase
	}
	results := map[key][]roundResult{}
	failures := map[key][]string{}
	var order []key
	for round := 0; round < set.rounds; round++ {
		for _, c := range cases {
			ts := transportsOf(c)
			for i := range ts {
				d := ts[(i+round)%len(ts)] // rotate the order from round to round
				k := key{d.id(), c}
				if round == 0 && i == 0 {
					// keep the report order: case by case, transports in list order
					for _, t := range ts {
						order = append(order, key{t.id(), c})
					}
				}
				t0 := time.Now()
				r, err := or.measure(d, c)
				took := fmt.Sprintf(" [%.1fs]", time.Since(t0).Seconds())
				or.done++
				if err != nil {
					failures[k] = append(failures[k], err.Error())
					fmt.Fprintf(os.Stderr, "%s FAILED%s: %v\n", or.prefix(round, d, c), took, err)
					continue
				}
				results[k] = append(results[k], r)
				fb := ""
				if r.fallbacks > 0 {
					fb = fmt.Sprintf(" FALLBACKS %d/%d", r.fallbacks, r.calls)
				}
				fmt.Fprintf(os.Stderr, "%s p50 %s p99 %s %s/s cpu %.1fµs csw %.2f flt %.2f mig %.2f gc %.0f /call allocs %.1f%s%s%s\n",
					or.prefix(round, d, c), fmtUs(r.p50), fmtUs(r.p99), fmtCount(r.qps), r.cpu, r.csw, r.minflt, r.migrations,
					r.gcs, r.allocs, fb, took, or.eta())
			}
		}
		meta.LoadEnd = loadAvg()
		var recs []record
		for _, k := range order {
			d, _ := findTransport(k.id)
			recs = append(recs, aggregate(d, k.c, results[k], failures[k], meta))
		}
		if err := writeJSON(out, recs); err != nil {
			return err
		}
	}
	splits := map[key]map[string]float64{}
	if set.split {
		// Long windows: the profiler takes 100 samples a second per busy
		// thread, so an 80 ms window would hold a handful.
		saved := or.set
		or.set.duration, or.set.maxWindow = splitWindow, max(or.set.maxWindow, splitWindow)
		defer func() { or.set = saved }()
		for _, k := range order {
			d, _ := findTransport(k.id)
			if !splitCase(d, k.c) {
				continue
			}
			os.Setenv(splitEnv, "1")
			r, err := or.measure(d, k.c)
			os.Unsetenv(splitEnv)
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: CPU split %s %s c%d FAILED: %v\n", d.id(), sizeName(k.c.size), k.c.conc, err)
				continue
			}
			splits[k] = r.split
			fmt.Fprintf(os.Stderr, "bench: CPU split %-22s %5s c%-2d %s\n", d.id(), sizeName(k.c.size), k.c.conc, fmtSplit(r.split))
		}
	}
	// The machine again at the end: a calibration that moved says the
	// machine changed under the run.
	calEnd := calibrate(self)
	meta.CalibrationEnd = &calEnd
	meta.LoadEnd = loadAvg()
	fmt.Fprintf(os.Stderr, "bench: calibration at the end: %s; load %s\n", calEnd, meta.LoadEnd)
	recs := make([]record, 0, len(order))
	for _, k := range order {
		d, _ := findTransport(k.id)
		rec := aggregate(d, k.c, results[k], failures[k], meta)
		rec.CPUSplitUS = splits[k]
		recs = append(recs, rec)
	}
	if err := writeJSON(out, recs); err != nil {
		return err
	}
	if o.mode == "quick" || o.summary {
		printSummary(os.Stderr, recs)
	}
	fmt.Fprintf(os.Stderr, "bench: wrote %s (%d records) in %v\n", out, len(order), time.Since(or.started).Round(time.Second))
	repDir := o.reportDir
	if repDir == "-" {
		repDir = ""
		switch o.mode {
		case "full":
			repDir = filepath.Dir(out)
		case "quick":
			repDir = filepath.Join(filepath.Dir(out), "quick")
		}
	}
	if repDir == "" {
		return nil
	}
	lrecs, err := report.Load(out)
	if err == nil {
		err = report.Write(repDir, lrecs, report.Options{Source: "benchmark/" + filepath.ToSlash(out), Command: reproduce(o)})
	}
	if err != nil {
		return fmt.Errorf("report: %w", err)
	}
	fmt.Fprintf(os.Stderr, "bench: wrote %s\n", filepath.Join(repDir, "REPORT.md"))
	return nil
}

// reproduce names the command that reruns this benchmark.
func reproduce(o options) string {
	switch {
	case o.mode == "full" && len(os.Args) == 3:
		return "make bench"
	case o.mode == "quick" && len(os.Args) == 3:
		return "make bench-quick"
	}
	return "cd benchmark && go run ./cmd/bench " + strings.Join(os.Args[1:], " ")
}

func (or *orchestrator) prefix(round int, d transportDef, c benchCase) string {
	cl := ""
	if c.scale {
		cl = fmt.Sprintf(" x%dproc", c.clients)
		if c.heavy > 0 {
			cl += "+" + sizeName(c.heavy)
		}
	}
	if c.grown {
		cl = " grown"
	}
	return fmt.Sprintf("[%3d/%d r%d/%d] %-6s %-11s %7s c%-2d%s:", or.done, or.total, round+1, or.set.rounds,
		d.layer, d.name, sizeName(c.size), c.conc, cl)
}

func (or *orchestrator) eta() string {
	el := time.Since(or.started)
	if or.done == 0 {
		return ""
	}
	left := time.Duration(float64(el) / float64(or.done) * float64(or.total-or.done))
	return fmt.Sprintf("  | %v elapsed, ~%v left", el.Round(time.Second), left.Round(time.Second))
}

func fmtUs(us float64) string {
	switch {
	case us >= 10000:
		return fmt.Sprintf("%.1fms", us/1000)
	case us >= 100:
		return fmt.Sprintf("%.0fµs", us)
	}
	return fmt.Sprintf("%.1fµs", us)
}

func fmtCount(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

// address returns where the server of the next measurement listens.
func (or *orchestrator) address(d transportDef) (string, error) {
	or.seq++
	if !d.tcp {
		return filepath.Join(or.dir, fmt.Sprintf("s%d.sock", or.seq)), nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

type serverSample struct {
	at time.Time
	procSample
}

func queryServer(s *child) (serverSample, error) {
	t0 := time.Now()
	if err := s.send("q"); err != nil {
		return serverSample{}, s.failure("control write failed: " + err.Error())
	}
	line, err := s.recv(10 * time.Second)
	if err != nil {
		return serverSample{}, err
	}
	t1 := time.Now()
	var v serverSample
	js, ok := strings.CutPrefix(line, "u ")
	if !ok {
		return v, fmt.Errorf("server said %q, want a sample", line)
	}
	if err := json.Unmarshal([]byte(js), &v.procSample); err != nil {
		return v, fmt.Errorf("server said %q: %v", line, err)
	}
	v.at = t0.Add(t1.Sub(t0) / 2)
	return v, nil
}

// measure runs one case over one transport: a fresh server process, fresh
// client processes, warm-up, then a window in which both sides' CPU time
// and the client's latencies are taken while calls keep flowing.
func (or *orchestrator) measure(d transportDef, c benchCase) (res roundResult, err error) {
	addr, err := or.address(d)
	if err != nil {
		return res, err
	}
	debug := os.Getenv("KSHM_BENCH_DEBUG") != ""
	tStart := time.Now()
	phase := func(name string) {
		if debug {
			fmt.Fprintf(os.Stderr, "  %-14s %6.1f ms\n", name, float64(time.Since(tStart).Microseconds())/1000)
		}
	}
	if c.scale {
		if err := scaleMemoryCheck(d, c); err != nil {
			return res, err
		}
	}
	common := []string{"-transport", d.id(), "-sock", addr}
	if c.scale {
		common = append(common, "-scale-case")
	}
	srvArgs := append([]string{"-role", "server", "-conc", strconv.Itoa(c.conc*c.clients + min(c.heavy, 1)),
		"-size", strconv.Itoa(max(c.size, c.heavy))}, common...)
	srv, err := startChild("server", or.self, srvArgs...)
	if err != nil {
		return res, err
	}
	var clients []*child
	defer func() {
		if err != nil {
			for _, cl := range clients {
				cl.kill()
			}
			srv.kill()
		}
	}()
	// The clients, and in the scale case the heavy client last.
	nClients := c.clients
	if c.heavy > 0 {
		nClients++
	}
	for i := 0; i < nClients; i++ {
		size := c.size
		if i == c.clients {
			size = c.heavy
		}
		args := append([]string{"-role", "client", "-conc", strconv.Itoa(c.conc), "-size", strconv.Itoa(size),
			"-warmup", or.set.warmup.String(), "-duration", or.set.duration.String(),
			"-mincalls", strconv.Itoa(or.set.minCalls), "-maxwindow", or.set.maxWindow.String()}, common...)
		cl, err := startChild(fmt.Sprintf("client %d", i), or.self, args...)
		if err != nil {
			return res, err
		}
		clients = append(clients, cl)
	}
	if err = srv.expect("ready", 20*time.Second); err != nil {
		return res, err
	}
	phase("server ready")
	for _, cl := range clients {
		if err = cl.send("start"); err != nil {
			return res, cl.failure(err.Error())
		}
	}
	for _, cl := range clients {
		if err = cl.expect("warm", 30*time.Second+or.set.warmup); err != nil {
			return res, err
		}
	}
	phase("clients warm")
	s0, err := queryServer(srv)
	if err != nil {
		return res, err
	}
	for _, cl := range clients {
		if err = cl.send("go"); err != nil {
			return res, cl.failure(err.Error())
		}
	}
	for _, cl := range clients {
		if err = cl.expect("end", 90*time.Second+or.set.maxWindow); err != nil {
			return res, err
		}
	}
	phase("window end")
	s1, err := queryServer(srv)
	if err != nil {
		return res, err
	}
	for _, cl := range clients {
		if err = cl.send("stop"); err != nil {
			return res, cl.failure(err.Error())
		}
	}
	var h, heavyHist hist
	var window int64
	var cd procDelta // the client processes together
	var clientRSS, clientShmem float64
	var heavyFallbacks uint64
	var clientSplit map[string]int64
	for i, cl := range clients {
		line, err := cl.recv(30 * time.Second)
		if err != nil {
			return res, err
		}
		js, ok := strings.CutPrefix(line, "result ")
		if !ok {
			return res, fmt.Errorf("%s said %q, want a result", cl.name, line)
		}
		var r clientResult
		if err := json.Unmarshal([]byte(js), &r); err != nil {
			return res, err
		}
		// The heavy client's calls are kept apart from the light ones'.
		hh := &h
		if i == c.clients {
			hh = &heavyHist
			heavyFallbacks = r.Proc.Fallbacks
		}
		for _, b := range r.Hist {
			if b[0] < uint64(len(hh.counts)) {
				hh.counts[b[0]] += b[1]
				hh.n += b[1]
			}
		}
		if uint64(r.MaxNs) > hh.max {
			hh.max = uint64(r.MaxNs)
		}
		window = max(window, r.WindowNs)
		p := r.Proc
		cd.CPUNs += p.CPUNs
		cd.Mallocs += p.Mallocs
		cd.Fallbacks += p.Fallbacks
		cd.Wakeups += p.Wakeups
		cd.FutexWakeups += p.FutexWakeups
		cd.VCSW += p.VCSW
		cd.IVCSW += p.IVCSW
		cd.MinFlt += p.MinFlt
		cd.MajFlt += p.MajFlt
		cd.Migrations += p.Migrations
		cd.RunqWaitNs += p.RunqWaitNs
		cd.GCs += p.GCs
		cd.SchedP50Ns = max(cd.SchedP50Ns, p.SchedP50Ns)
		cd.SchedP99Ns = max(cd.SchedP99Ns, p.SchedP99Ns)
		for k, v := range r.Split {
			if clientSplit == nil {
				clientSplit = map[string]int64{}
			}
			clientSplit[k] += v
		}
		clientRSS += float64(r.RSSKiB) / float64(nClients)
		clientShmem += float64(r.ShmemKiB) / float64(nClients)
	}
	phase("results")
	// Stop everyone at once; the server needs no graceful shutdown.
	stopErrs := make(chan error, len(clients)+1)
	for _, ch := range append([]*child{srv}, clients...) {
		go func() { stopErrs <- ch.stop(10 * time.Second) }()
	}
	for range len(clients) + 1 {
		if e := <-stopErrs; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		return res, err
	}
	phase("server exited")
	if s1.Errors > 0 {
		return res, fmt.Errorf("server reported %d errors; its output ends:\n%s", s1.Errors, indent(srv.logs.String()))
	}
	if h.n == 0 || window <= 0 {
		return res, fmt.Errorf("no call completed in the window")
	}
	// The server's window (between its two samples) is a little longer than
	// the clients'; calls flow during both, so scale its CPU time to the
	// clients' window.
	scale := float64(window) / float64(s1.at.Sub(s0.at).Nanoseconds())
	if scale > 1 {
		scale = 1
	}
	calls := float64(h.n)
	sd := s1.sub(s0.procSample)
	perCall := func(v int64) float64 { return float64(v) / calls }
	// The server's counts, scaled to the clients' window.
	srvPerCall := func(v int64) float64 { return float64(v) * scale / calls }
	res = roundResult{
		calls: h.n,
		p50:   h.quantile(0.5) / 1e3, p99: h.quantile(0.99) / 1e3, p999: h.quantile(0.999) / 1e3, max: float64(h.max) / 1e3,
		qps:          calls / (float64(window) / 1e9),
		clientCPU:    perCall(cd.CPUNs) / 1e3,
		serverCPU:    srvPerCall(sd.CPUNs) / 1e3,
		allocs:       float64(cd.Mallocs) / calls,
		serverAllocs: float64(sd.Mallocs) * scale / calls,
		serverRSS:    float64(s1.RSSKiB),
		serverShmem:  float64(s1.ShmemKiB),
		clientRSS:    clientRSS,
		clientShmem:  clientShmem,
		fallbacks:    cd.Fallbacks + sd.Fallbacks,
		clientCSW:    perCall(cd.VCSW + cd.IVCSW),
		serverCSW:    srvPerCall(sd.VCSW + sd.IVCSW),
		ivcsw:        perCall(cd.IVCSW) + srvPerCall(sd.IVCSW),
		clientMinflt: perCall(cd.MinFlt),
		serverMinflt: srvPerCall(sd.MinFlt),
		migrations:   perCall(cd.Migrations) + srvPerCall(sd.Migrations),
		runqWait:     (perCall(cd.RunqWaitNs) + srvPerCall(sd.RunqWaitNs)) / 1e3,
		gcs:          float64(cd.GCs + sd.GCs),

		clientWakeups: perCall(int64(cd.Wakeups)), serverWakeups: srvPerCall(int64(sd.Wakeups)),
		futexWakeups: perCall(int64(cd.FutexWakeups)) + srvPerCall(int64(sd.FutexWakeups)),

		clientSchedP50: cd.SchedP50Ns / 1e3, clientSchedP99: cd.SchedP99Ns / 1e3,
		serverSchedP50: sd.SchedP50Ns / 1e3, serverSchedP99: sd.SchedP99Ns / 1e3,
	}
	res.serverShmCommitted, res.serverShmMapped, res.serverMemfds = float64(s1.ShmCommittedKiB), float64(s1.ShmMappedKiB), s1.Memfds
	res.serverOwnShmCommitted = float64(s1.OwnShmCommittedKiB)
	if heavyHist.n > 0 {
		res.heavyP50 = heavyHist.quantile(0.5) / 1e3
		res.heavyQPS = float64(heavyHist.n) / (float64(window) / 1e9)
		res.heavyFallbacks = heavyFallbacks
	}
	if clientSplit != nil || s1.Split != nil {
		res.split = map[string]float64{}
		for k, v := range clientSplit {
			res.split[k] += perCall(v) / 1e3
		}
		for k, v := range s1.Split {
			res.split[k] += srvPerCall(v) / 1e3
		}
	}
	res.csw = res.clientCSW + res.serverCSW
	res.minflt = res.clientMinflt + res.serverMinflt
	res.cpu = res.clientCPU + res.serverCPU
	return res, nil
}

// spread is (max-min)/median of the rounds, as a fraction.
func spread(v []float64) float64 {
	m := report.Median(v)
	if len(v) < 2 || m == 0 {
		return 0
	}
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = min(lo, x), max(hi, x)
	}
	return round3((hi - lo) / m)
}

func round3(v float64) float64 {
	s := strconv.FormatFloat(v, 'g', 4, 64)
	f, _ := strconv.ParseFloat(s, 64)
	return f
}

// scaleMemoryCheck refuses a scale case whose shared memory could take more
// than half the memory the machine has available: a machine shared with
// others must not be pushed into the OOM killer by a benchmark. The
// estimate is each transport's committed memory per client process with
// its default configuration (kshm commits its initial region on each side
// when the session starts, and a light client's calls fit it; the heavy
// client's regions grow up to the maximum, RegionSize per side;
// shmipc-go's client maps its buffer capacity).
func scaleMemoryCheck(d transportDef, c benchCase) error {
	var perClient, heavy int64
	switch {
	case d.layer == "engine" && strings.HasPrefix(d.name, "kshm"):
		cfg := shm.DefaultConfig()
		perClient = 2 * int64(cfg.InitialRegion())
		heavy = 2 * int64(cfg.RegionSize)
	case d.name == "shmipc-go":
		capacity, _ := shmipcSliceSizes(c.size, c.conc)
		perClient = int64(capacity)
		hc, _ := shmipcSliceSizes(c.heavy, 1)
		heavy = int64(hc)
	}
	need := perClient * int64(c.clients)
	if c.heavy > 0 {
		need += heavy
	}
	avail := memAvailable()
	if avail > 0 && need > avail/2 {
		return fmt.Errorf("skipped: %d client processes would commit about %d MiB of shared memory, more than half the %d MiB available",
			c.clients, need>>20, avail>>20)
	}
	return nil
}

// memAvailable is MemAvailable from /proc/meminfo, in bytes (0 if unknown).
func memAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err == nil {
				return n << 10
			}
		}
	}
	return 0
}
