// Command soak runs kshm under load and chaos and fails on anything lost,
// mixed up or leaked:
//
//	go run ./soak -duration 10m
//
// It starts a Kitex echo server over kshm and several client processes, each
// calling from many goroutines with mixed payload sizes, and checks every
// response byte for byte. Sessions start with a small region and grow up to
// a larger maximum: the clients call in bursts of large payloads, which make
// the regions grow (and, at the maximum, fall back to the session socket),
// and calms of small payloads with idle gaps, after which the grown regions
// are released, again and again. Meanwhile it kills clients with SIGKILL and
// restarts them at random,
// kills and restarts the server, and replaces the server the way the
// README's "Upgrading a server" says (a new server with the same options,
// then SIGTERM to the old one; no call may fail), now and then killing the
// new server mid-handover instead. The last part of the run kills no
// server, and ends with a quiet period: then every live process must have
// all its shared-memory buffers back, and the server's descriptors and
// resident memory must not have grown with the client churn, and every
// grown region must have been released. It prints what it did, how often
// the regions grew and shrank, and exits 1 on any mismatch, hung call or
// leak, or if no region grew or shrank.
//
// The same binary runs the server and the clients (KSHM_SOAK_ROLE).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if role := os.Getenv(envRole); role != "" {
		os.Exit(runChild(role))
	}
	cfg := DefaultConfig()
	flag.DurationVar(&cfg.Duration, "duration", 10*time.Minute, "how long to run")
	flag.IntVar(&cfg.Clients, "clients", cfg.Clients, "client processes")
	flag.IntVar(&cfg.Goroutines, "goroutines", cfg.Goroutines, "calling goroutines per client")
	flag.IntVar(&cfg.RegionSize, "region", cfg.RegionSize, "the most shared memory a session side's regions grow to, in bytes")
	flag.IntVar(&cfg.InitialRegionSize, "initial-region", cfg.InitialRegionSize, "the region a session side starts with, in bytes (= -region: no growth)")
	flag.DurationVar(&cfg.ShrinkAfter, "shrink-after", cfg.ShrinkAfter, "how long a grown region stays idle before it is released")
	flag.IntVar(&cfg.MaxMessage, "max-message", cfg.MaxMessage, "largest message carried in shared memory, in bytes")
	flag.IntVar(&cfg.MaxPayload, "max-payload", cfg.MaxPayload, "largest payload, in bytes (above max-message: fallback)")
	flag.DurationVar(&cfg.CallTimeout, "timeout", cfg.CallTimeout, "RPC timeout of each call")
	flag.DurationVar(&cfg.ClientKillEvery, "client-kill-every", cfg.ClientKillEvery, "mean interval between client kills (0: none)")
	flag.DurationVar(&cfg.ServerKillEvery, "server-kill-every", cfg.ServerKillEvery, "mean interval between server kills (0: none)")
	flag.DurationVar(&cfg.ServerReplaceEvery, "server-replace-every", cfg.ServerReplaceEvery, "mean interval between server replacements (0: none)")
	flag.Int64Var(&cfg.Seed, "seed", time.Now().UnixNano(), "random seed of the chaos schedule")
	flag.StringVar(&cfg.Dir, "dir", "", "directory for the socket (default: a new temporary directory)")
	flag.Parse()

	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "kshm-soak-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "soak:", err)
			os.Exit(1)
		}
		defer os.RemoveAll(d)
		cfg.Dir = d
	}
	// On Ctrl-C or SIGTERM: remove the directory and exit; the children
	// die with us (Pdeathsig).
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "soak: %v: stopping\n", s)
		os.RemoveAll(cfg.Dir)
		os.Exit(1)
	}()
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
	cfg.Command = func() *exec.Cmd { return exec.Command(self) }
	rep, err := Run(cfg, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
	if !rep.Passed() {
		fmt.Println("soak: FAILED")
		if len(rep.HangDumps) > 0 {
			fmt.Printf("soak: goroutine dumps kept in %s\n", cfg.Dir)
		} else {
			os.RemoveAll(cfg.Dir) // os.Exit skips the deferred removal
		}
		os.Exit(1)
	}
	fmt.Println("soak: PASSED")
}
