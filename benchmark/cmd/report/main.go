// Command report regenerates a benchmark report from a results file:
//
//	go run ./cmd/report -in results/full.json -out results
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/shmkit/kshm/benchmark/internal/report"
)

func main() {
	in := flag.String("in", "results/full.json", "results file written by cmd/bench")
	out := flag.String("out", "results", "directory for REPORT.md and the SVG charts")
	command := flag.String("command", "make bench", "the command that reproduces the results, named in the report")
	png := flag.Bool("png", false, "also write the charts as PNG")
	flag.Parse()
	recs, err := report.Load(*in)
	if err == nil {
		err = report.Write(*out, recs, report.Options{Source: *in, Command: *command, PNG: *png})
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "report: %v\n", err)
		os.Exit(1)
	}
}
