// Command kshm shows the shared-memory sessions of a live process, read-only,
// without the process's help: the counters and buffer tables live in each
// region's header, and the regions are reached through /proc/PID/fd.
//
//	kshm stats PID...        counters of every session of each process
//	kshm dump [-all] PID     each region's layout and every buffer in use
//
// Reading another user's process needs the same permission as ptrace (the
// same user, or root / CAP_SYS_PTRACE); kshm says so when the OS refuses.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
)

const usage = `usage:
  kshm stats PID...       counters of every kshm session of each process
  kshm dump [-all] PID    each region's layout and every buffer in use
                          (-all: whole buffers in hex, not the first 32 bytes)

Exit status: 0 on success (also when a process has no kshm sessions),
1 when a process cannot be read, 2 on bad usage.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is the whole command; it returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "stats":
		pids, ok := parsePIDs(args[1:], stderr)
		if !ok {
			return 2
		}
		status := 0
		for i, pid := range pids {
			if i > 0 {
				fmt.Fprintln(stdout)
			}
			if err := stats(stdout, pid); err != nil {
				fmt.Fprintf(stderr, "kshm: %v\n", err)
				status = 1
			}
		}
		return status
	case "dump":
		fs := flag.NewFlagSet("dump", flag.ContinueOnError)
		fs.SetOutput(stderr)
		all := fs.Bool("all", false, "print whole buffers in hex")
		fs.Usage = func() { fmt.Fprint(stderr, usage) }
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		pids, ok := parsePIDs(fs.Args(), stderr)
		if !ok {
			return 2
		}
		status := 0
		for i, pid := range pids {
			if i > 0 {
				fmt.Fprintln(stdout)
			}
			if err := dump(stdout, pid, *all); err != nil {
				fmt.Fprintf(stderr, "kshm: %v\n", err)
				status = 1
			}
		}
		return status
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "kshm: unknown command %q\n%s", args[0], usage)
	return 2
}

func parsePIDs(args []string, stderr io.Writer) ([]int, bool) {
	if len(args) == 0 {
		fmt.Fprintf(stderr, "kshm: no PID given\n%s", usage)
		return nil, false
	}
	var pids []int
	for _, a := range args {
		pid, err := strconv.Atoi(a)
		if err != nil || pid <= 0 {
			fmt.Fprintf(stderr, "kshm: %q is not a process id\n", a)
			return nil, false
		}
		pids = append(pids, pid)
	}
	return pids, true
}
