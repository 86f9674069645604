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
		socketPath  = flag.String("socket", "", "the server's kshm unix socket `path`")
		regionSize  = flag.Int("region-size", 0, "kshm region size in `bytes` (0: kshm's default)")
		maxMessage  = flag.Int("max-message", 0, "largest message kshm carries in shared memory, in `bytes` (0: kshm's default); larger ones fall back")
		wakeMode    = flag.String("wake", "", "kshm wake `mode`: notify, poll or timed (empty: kshm's default)")
		sizesFlag   = flag.String("sizes", "64,1024,16384,262144,1048576", "comma-separated payload `sizes` in bytes")
		duration    = flag.Duration("duration", time.Second, "how long to call Echo at each size")
		concurrency = flag.Int("concurrency", 1, "concurrent callers")
		timeout     = flag.Duration("timeout", 3*time.Second, "RPC timeout")
	)
	flag.Parse()
	if *addr == "" || *socketPath == "" {
		flag.Usage()
		return fmt.Errorf("-addr and -socket are required")
	}
	if *concurrency < 1 {
		return fmt.Errorf("-concurrency %d: want at least 1", *concurrency)
	}
	sizes, err := parseSizes(*sizesFlag)
	if err != nil {
		return err
	}

	common := func() ([]client.Option, error) {
		shmOpt, err := shmClientOption(*socketPath, *regionSize, *maxMessage, *wakeMode)
		if err != nil {
			return nil, err
		}
		return []client.Option{
			client.WithHostPorts(*addr),
			client.WithTransportProtocol(transport.TTHeaderFramed),
			client.WithMetaHandler(transmeta.ClientTTHeaderHandler),
			client.WithRPCTimeout(*timeout),
			shmOpt,
		}, nil
	}
	opts, err := common()
	if err != nil {
		return err
	}
	echoCli, err := echoservice.NewClient(serviceName, opts...)
	if err != nil {
		return err
	}
	if opts, err = common(); err != nil {
		return err
	}
	mathCli, err := mathservice.NewClient(serviceName, opts...)
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

	failed := false
	results := make([]result, 0, len(sizes))
	for _, size := range sizes {
		r := measure(echoCli, size, *concurrency, *duration)
		results = append(results, r)
		if r.failures > 0 {
			failed = true
		}
	}
	printTable(os.Stdout, results, *concurrency)
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
