// Command client calls the example EchoService over kshm: first a few
// functional checks (errors, timeouts, oneway calls, metainfo, a second
// service), then Echo for a while at each of several payload sizes, verifying
// every response byte for byte. It prints a table of latencies and of how
// many calls went over shared memory, and exits non-zero if any call failed
// or any response differed from its request.
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/transmeta"
	"github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/example/kitex_gen/echo/mathservice"
)

const serviceName = "kshm-example"

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		addr        = flag.String("addr", "", "the server's TCP `address` (host:port)")
		socketPath  = flag.String("socket", "", "the server's kshm unix socket `path` (empty: the zero-config path kshm finds for -addr)")
		regionSize  = flag.Int("region-size", 0, "kshm region size in `bytes` (0: kshm's default)")
		maxMessage  = flag.Int("max-message", 0, "largest message kshm carries in shared memory, in `bytes` (0: kshm's default); larger ones fall back")
		wakeMode    = flag.String("wake", "", "kshm wake `mode`: notify, poll or timed (empty: kshm's default)")
		sizesFlag   = flag.String("sizes", "64,1024,16384,262144,1048576", "comma-separated payload `sizes` in bytes")
		duration    = flag.Duration("duration", time.Second, "how long to call Echo at each size")
		concurrency = flag.Int("concurrency", 1, "concurrent callers")
		timeout     = flag.Duration("timeout", 3*time.Second, "RPC timeout")
		compareTCP  = flag.Bool("compare-tcp", true, "also measure each size over plain Kitex on the server's TCP address (no kshm), side by side")
		load        = flag.Bool("load", false, "instead: call Echo at the first of -sizes from -concurrency goroutines until stdin says stop, printing which server answered (see runLoad)")
	)
	flag.Parse()
	if *addr == "" {
		flag.Usage()
		return fmt.Errorf("-addr is required")
	}
	if *concurrency < 1 {
		return fmt.Errorf("-concurrency %d: want at least 1", *concurrency)
	}
	sizes, err := parseSizes(*sizesFlag)
	if err != nil {
		return err
	}

	common := func(withShm bool) ([]client.Option, error) {
		opts := []client.Option{
			client.WithHostPorts(*addr),
			client.WithTransportProtocol(transport.TTHeaderFramed),
			client.WithMetaHandler(transmeta.ClientTTHeaderHandler),
			client.WithRPCTimeout(*timeout),
		}
		if !withShm {
			return opts, nil
		}
		shmOpt, err := shmClientOption(*socketPath, *regionSize, *maxMessage, *wakeMode)
		if err != nil {
			return nil, err
		}
		return append(opts, shmOpt), nil
	}
	opts, err := common(true)
	if err != nil {
		return err
	}
	if *load {
		return runLoad(opts, sizes[0], *concurrency, os.Stdin, os.Stdout)
	}
	echoCli, err := newClient(echoservice.NewClient, opts)
	if err != nil {
		return err
	}
	if opts, err = common(true); err != nil {
		return err
	}
	mathCli, err := newClient(mathservice.NewClient, opts)
	if err != nil {
		return err
	}

	before := readCounters()
	if err := checks(echoCli, mathCli); err != nil {
		return fmt.Errorf("functional checks: %w", err)
	}
	c := readCounters().sub(before)
	fmt.Printf("functional checks: ok (%d calls over shared memory, %d fallbacks, %d late responses dropped)\n",
		c.calls, c.fallbacks, c.late)

	var tcpCli echoservice.Client
	if *compareTCP {
		if opts, err = common(false); err != nil {
			return err
		}
		if tcpCli, err = newClient(echoservice.NewClient, opts); err != nil {
			return err
		}
	}

	// With -compare-tcp, the two transports take turns at each size (in
	// alternating order), so that both see the same machine.
	failed := false
	var results, tcpResults []result
	for i, size := range sizes {
		var r, t result
		if tcpCli != nil && i%2 == 1 {
			t = measure(tcpCli, size, *concurrency, *duration)
		}
		r = measure(echoCli, size, *concurrency, *duration)
		if tcpCli != nil && i%2 == 0 {
			t = measure(tcpCli, size, *concurrency, *duration)
		}
		results = append(results, r)
		failed = failed || r.failures > 0
		if tcpCli != nil {
			tcpResults = append(tcpResults, t)
			failed = failed || t.failures > 0
		}
	}
	if tcpCli != nil {
		fmt.Printf("Echo, concurrency %d, %v per size and transport, the same server: kshm (shared memory) against\n"+
			"plain Kitex over the server's usual TCP address %s; every response verified byte for byte:\n",
			*concurrency, *duration, *addr)
		printCompare(os.Stdout, results, tcpResults)
		fmt.Println("(ratio: kshm / plain Kitex, below 1 is faster with kshm; over shm: calls that went over a kshm\n" +
			" session, fallbacks did not use shared memory: no session, or a message too large or finding no memory;\n" +
			" GCs/100 calls: this client's garbage collections, kshm/plain: Kitex decodes each payload into the Go heap,\n" +
			" and kshm keeps its buffers out of it, so a small heap is collected more often)")
	} else {
		fmt.Printf("Echo over kshm (concurrency %d):\n", *concurrency)
		printTable(os.Stdout, results, true)
		fmt.Println("(from the client's kshm counters over each run: kshm calls went over a kshm session; fallbacks did not\n" +
			" use shared memory: no session, or a message too large or finding no memory, sent on the session socket)")
	}
	if failed {
		return fmt.Errorf("some calls failed or returned wrong data")
	}

	// Every buffer the client sent must come back once the calls are done.
	if n, b := waitBuffersBack(2 * time.Second); n != 0 {
		return fmt.Errorf("%d shared-memory buffers (%d bytes) still held by the server after all calls returned", n, b)
	}
	fmt.Println("shared-memory buffers: all returned")
	return nil
}

// newClient calls a generated NewClient, with the panic Kitex options use to
// reject a bad setting turned into an error.
func newClient[C any](newC func(string, ...client.Option) (C, error), opts []client.Option) (c C, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("bad client option: %v", r)
		}
	}()
	return newC(serviceName, opts...)
}

func parseSizes(s string) ([]int, error) {
	var sizes []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad -sizes entry %q", f)
		}
		sizes = append(sizes, n)
	}
	return sizes, nil
}
