// Command bench measures cross-process round trips over kshm and its
// baselines, alternating the transports in rounds, and writes the medians of
// the rounds as JSON (results/quick.json or results/full.json).
//
//	go run ./cmd/bench -mode quick   # under two minutes
//	go run ./cmd/bench -mode full    # the full matrix, several minutes
//
// The same binary runs as orchestrator (the default), and, started by the
// orchestrator, as the server process (-role server) and the client process
// (-role client) of each measurement; the two talk only through the
// transport under test, and to the orchestrator through stdin/stdout.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

var errCorruptRequest = errors.New("bench: request payload failed verification")

type options struct {
	mode       string
	role       string
	transport  string
	sock       string
	size       int
	conc       int
	warmup     time.Duration
	duration   time.Duration
	rounds     int
	minCalls   int
	maxWindow  time.Duration
	sizes      []int
	concs      []int
	layers     []string
	transports []string
	out        string
	reportDir  string
	scale      []int
	summary    bool
	split      string // "auto", "on" or "off"
	scaleRole  bool   // internal: this process is part of the scale case
	heavy      int    // size of the scale case's heavy client (0: none)
	grown      []int
}

func main() {
	var o options
	var sizes, concs, layers, transports, scale, grown string
	flag.StringVar(&o.mode, "mode", "quick", "quick (under two minutes), full, or custom (set every matrix flag)")
	flag.StringVar(&o.role, "role", "", "internal: server or client (started by the orchestrator)")
	flag.StringVar(&o.transport, "transport", "", "internal: transport of this process (layer/name)")
	flag.StringVar(&o.sock, "sock", "", "internal: socket path or address of the server")
	flag.IntVar(&o.size, "size", 0, "internal: payload size in bytes")
	flag.IntVar(&o.conc, "conc", 1, "internal: concurrent calls of the client")
	flag.BoolVar(&o.scaleRole, "scale-case", false, "internal: the process is part of the scale case (default transport configuration)")
	var heavy string
	flag.DurationVar(&o.warmup, "warmup", 0, "warm-up per measurement (default by mode)")
	flag.DurationVar(&o.duration, "duration", 0, "measured time per measurement (default by mode)")
	flag.IntVar(&o.minCalls, "mincalls", 0, "calls a measurement window must hold at least (it grows up to -maxwindow; default by mode)")
	flag.DurationVar(&o.maxWindow, "maxwindow", 0, "longest measurement window when -mincalls are not reached (default by mode)")
	flag.IntVar(&o.rounds, "rounds", 0, "rounds; each runs every case once per transport (default by mode)")
	flag.StringVar(&sizes, "sizes", "", "comma-separated payload sizes, e.g. 64,1K,4M (default by mode)")
	flag.StringVar(&concs, "concs", "", "comma-separated concurrencies (default by mode)")
	flag.StringVar(&layers, "layers", "engine,kitex", "layers to run: engine, kitex")
	flag.StringVar(&transports, "transports", "", "comma-separated transport names to run (default all available)")
	flag.StringVar(&heavy, "heavy", "", "payload size of one extra heavy client in the scale case, e.g. 4M (default by mode; 0 disables)")
	flag.StringVar(&scale, "scale", "", "comma-separated client-process counts for the scale case (default by mode; 0 disables)")
	flag.StringVar(&o.split, "split", "auto", "CPU split: one extra profiled measurement per Kitex goal row (64 B, 16 KiB, 1 MiB at c=1 and c=16, kshm and netpoll-uds) sorting CPU by category: on, off, or auto (on in quick and full)")
	flag.StringVar(&grown, "grown", "", "comma-separated payload sizes of the grown case: Kitex kshm-fixed against kshm-grown at c=16, e.g. 1M,4M (default by mode; 0 disables)")
	flag.BoolVar(&o.summary, "summary", false, "print the per-round summary and ratios at the end (always in -mode quick)")
	flag.StringVar(&o.out, "out", "", "output file (default results/<mode>.json)")
	flag.StringVar(&o.reportDir, "report", "-", "directory for REPORT.md and its charts (default results for -mode full, results/quick for -mode quick, none otherwise; empty for none)")
	flag.Parse()

	var err error
	if o.sizes, err = parseList(sizes); err != nil {
		fatalf("-sizes: %v", err)
	}
	if o.concs, err = parseList(concs); err != nil {
		fatalf("-concs: %v", err)
	}
	if o.grown, err = parseList(grown); err != nil {
		fatalf("-grown: %v", err)
	}
	if o.scale, err = parseList(scale); err != nil {
		fatalf("-scale: %v", err)
	}
	o.heavy = -1
	if h, err := parseList(heavy); err != nil || len(h) > 1 {
		fatalf("-heavy: want one size")
	} else if len(h) == 1 {
		o.heavy = h[0]
	}
	o.layers = splitList(layers)
	o.transports = splitList(transports)

	switch o.role {
	case "server":
		err = runServer(o)
	case "client":
		err = runClient(o)
	case "echo":
		err = runEcho()
	case "":
		err = orchestrate(o)
	default:
		err = fmt.Errorf("unknown -role %q", o.role)
	}
	if err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...)
	os.Exit(1)
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// parseList parses "64,1K,16K,4M" (K and M are powers of 1024).
func parseList(s string) ([]int, error) {
	var out []int
	for _, f := range splitList(s) {
		mul := 1
		switch {
		case strings.HasSuffix(f, "K"), strings.HasSuffix(f, "k"):
			mul, f = 1<<10, f[:len(f)-1]
		case strings.HasSuffix(f, "M"), strings.HasSuffix(f, "m"):
			mul, f = 1<<20, f[:len(f)-1]
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, n*mul)
	}
	return out, nil
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}
