package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/klog"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/shm"
)

// Child processes: the role and settings come in the environment.
const (
	envRole    = "KSHM_SOAK_ROLE" // "server" or "client"
	envSock    = "KSHM_SOAK_SOCK"
	envAddr    = "KSHM_SOAK_ADDR" // the server's TCP address, shared with SO_REUSEPORT
	envID      = "KSHM_SOAK_ID"
	envG       = "KSHM_SOAK_G"
	envRegion  = "KSHM_SOAK_REGION"      // the most a session side's regions hold
	envInitial = "KSHM_SOAK_INIT_REGION" // the region a session starts with
	envShrink  = "KSHM_SOAK_SHRINK_MS"   // ShrinkAfter, ms
	envMaxMsg  = "KSHM_SOAK_MAXMSG"
	envMaxPay  = "KSHM_SOAK_MAXPAY"
	envTimeout = "KSHM_SOAK_TIMEOUT"
	envDir     = "KSHM_SOAK_DIR" // where hang dumps go

	serviceName = "kshm-soak"
)

// Sample is what a child reports about itself: kshm's counters and the
// process's descriptors and resident memory.
type Sample struct {
	Kshm kshm.Stats
	FDs  int
	RSS  int64 // bytes
}

func sample() Sample {
	s := Sample{Kshm: kshm.ReadStats(), FDs: -1, RSS: -1}
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		s.FDs = len(ents)
	}
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
				if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
					s.RSS = kb << 10
				}
			}
		}
	}
	return s
}

// out serialises the child's stdout lines.
var outMu sync.Mutex

func say(format string, a ...any) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", a...)
}

func sayJSON(prefix string, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		say("error marshal %v", err)
		return
	}
	say("%s %s", prefix, b)
}

func envInt(name string) int {
	v, _ := strconv.Atoi(os.Getenv(name))
	return v
}

func runChild(role string) int {
	// kshm logs every session a killed peer leaves behind: expected here.
	klog.SetLevel(klog.LevelError)
	switch role {
	case "server":
		return runServer()
	case "client":
		return runClient()
	}
	fmt.Fprintln(os.Stderr, "soak: unknown role", role)
	return 2
}

type echoHandler struct{}

func (*echoHandler) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (*echoHandler) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (*echoHandler) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	time.Sleep(time.Duration(millis) * time.Millisecond)
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (*echoHandler) Notify(ctx context.Context, req *echo.EchoRequest) error { return nil }

// shmOptions: sessions start with a small region and grow up to envRegion
// when messages need room, releasing grown regions idle for envShrink (the
// engine's ShrinkAfter, which only the whole engine configuration sets).
func shmOptions() []kshm.Option {
	cfg := shm.DefaultConfig()
	cfg.RegionSize = envInt(envRegion)
	cfg.InitialRegionSize = envInt(envInitial)
	cfg.MaxMessageSize = envInt(envMaxMsg)
	cfg.ShrinkAfter = time.Duration(envInt(envShrink)) * time.Millisecond
	return []kshm.Option{
		kshm.WithSocketPath(os.Getenv(envSock)),
		kshm.WithShmConfig(cfg),
	}
}

// Growth is what a process's regions did (kshm.ReadStats().Engine, closed
// sessions included): regions added and released, and allocations that
// fell back to the session socket because the regions could not grow, by
// reason (our maximum, the peer's cap, no memory).
type Growth struct {
	Grows, Shrinks                                   uint64
	FallbackLimit, FallbackPeerLimit, FallbackMemory uint64
}

func readGrowth() Growth {
	e := kshm.ReadStats().Engine
	return Growth{Grows: e.Grows, Shrinks: e.Shrinks, FallbackLimit: e.GrowFallbacks.Limit,
		FallbackPeerLimit: e.GrowFallbacks.PeerLimit, FallbackMemory: e.GrowFallbacks.Memory}
}

func (g *Growth) add(o Growth) {
	g.Grows += o.Grows
	g.Shrinks += o.Shrinks
	g.FallbackLimit += o.FallbackLimit
	g.FallbackPeerLimit += o.FallbackPeerLimit
	g.FallbackMemory += o.FallbackMemory
}

// runServer serves Echo over kshm on the socket, and plain Kitex on the TCP
// address (nobody calls it) through server.WithReusePort(true): every
// server of the run has the same options, so that a replacement shares the
// port and takes the socket over. It prints "ready" once the socket at the
// path is its own, a "progress" line with its regions' growth every
// progressEvery, a "stats" line on SIGUSR1, and stops on SIGTERM.
func runServer() int {
	addr, err := net.ResolveTCPAddr("tcp", os.Getenv(envAddr))
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak server:", err)
		return 1
	}
	stop := make(chan error, 1)
	svr := echoservice.NewServer(&echoHandler{},
		server.WithServiceAddr(addr),
		server.WithReusePort(true),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: serviceName}),
		server.WithExitWaitTime(2*time.Second),
		server.WithExitSignal(func() <-chan error { return stop }),
		kshm.WithServerShmIPC(shmOptions()...),
	)
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		for s := range sigs {
			switch s {
			case syscall.SIGTERM:
				stop <- nil
				return
			case syscall.SIGHUP:
				dumpGoroutines("server")
			default:
				sayJSON("stats", sample())
			}
		}
	}()
	sock := os.Getenv(envSock)
	before, _ := os.Stat(sock) // a server's socket already there (nil if none)
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()
	for i := 0; ; i++ {
		fi, err := os.Stat(sock)
		if err == nil && fi.Mode()&os.ModeSocket != 0 && isNew(before, fi) {
			var c net.Conn
			if c, err = net.Dial("unix", sock); err == nil {
				c.Close()
				break
			}
		}
		select {
		case err := <-runErr:
			fmt.Fprintln(os.Stderr, "soak server:", err)
			return 1
		default:
		}
		if i > 1000 {
			fmt.Fprintln(os.Stderr, "soak server: socket never ours and accepting:", err)
			return 1
		}
		time.Sleep(10 * time.Millisecond)
	}
	say("ready")
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			sayJSON("progress", Progress{Growth: readGrowth()})
		case err := <-runErr:
			sayJSON("progress", Progress{Growth: readGrowth()})
			if err != nil {
				fmt.Fprintln(os.Stderr, "soak server:", err)
				return 1
			}
			sayJSON("final", sample())
			return 0
		}
	}
}

// isNew reports whether fi is not the file old (nil: there was none).
// Inode numbers are reused at once on some file systems, so a file that
// replaced old may have old's inode; its modification time tells them apart.
func isNew(old, fi os.FileInfo) bool {
	return old == nil || !os.SameFile(old, fi) || !old.ModTime().Equal(fi.ModTime())
}

// Progress is a client's running count, printed every progressEvery.
type Progress struct {
	Calls, OK, Errors, Mismatches, Hung int64
	Bytes                               int64 // payload bytes echoed and verified
	InFlight                            int64
	// From kshm.ReadStats: requests sent over kshm sessions, calls over
	// plain Kitex (no session), requests and responses carried on a
	// session's socket (no shared memory).
	ShmCalls, FallbackCalls, InlineRequests, InlineRecv uint64
	Growth                                              Growth
}

const progressEvery = 500 * time.Millisecond

// errLinesPerProgress bounds the "error" lines a client prints between two
// progress lines.
const errLinesPerProgress = 5

// A client's calls come in bursts and calms, so that its sessions' regions
// grow and shrink again and again: a burst of burstFor at start and then
// every cycle, with the full payload mix (payloadSize: the initial region
// cannot hold the calls in flight, so the regions grow), then a calm with
// small payloads only and an idle gap of calmGap between a goroutine's
// calls: those fit the initial region, so the grown ones drain and are
// released ShrinkAfter later. The calm lasts long enough for that.
const (
	burstFor = 1500 * time.Millisecond
	calmGap  = 20 * time.Millisecond
)

func calmFor(shrinkAfter time.Duration) time.Duration {
	return max(2500*time.Millisecond, shrinkAfter+1500*time.Millisecond)
}

// smallPayloads are the calm's payload sizes.
var smallPayloads = []int{0, 1, 17, 100, 300, 1000}

// payloadSize draws a payload size of a burst: mostly small, some large
// enough to need grown regions (and, with the calls in flight, to exhaust
// the largest: fallback, no memory), some larger than the maximum message
// (fallback: too large), as the default settings go.
func payloadSize(r *rand.Rand) int {
	medium := []int{4096, 10000, 32 << 10, 64 << 10}
	large := []int{100 << 10, 200 << 10}
	switch k := r.IntN(100); {
	case k < 60:
		return smallPayloads[r.IntN(len(smallPayloads))]
	case k < 92:
		return medium[r.IntN(len(medium))]
	}
	return large[r.IntN(len(large))]
}

// runClient calls Echo from envG goroutines, in bursts and calms, until
// SIGUSR2 (quiesce: stop calling, wait until every shm buffer is back, print
// "quiet") and SIGTERM.
func runClient() int {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM)
	id := envInt(envID)
	timeout := time.Duration(envInt(envTimeout)) * time.Millisecond
	maxPay := envInt(envMaxPay)
	c, err := echoservice.NewClient(serviceName, kshm.WithClientShmIPC(shmOptions()...), client.WithRPCTimeout(timeout))
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak client:", err)
		return 1
	}
	var p struct{ calls, ok, errs, mismatches, hung, bytes, inflight atomic.Int64 }
	snapshot := func() Progress {
		st := kshm.ReadStats()
		return Progress{Calls: p.calls.Load(), OK: p.ok.Load(), Errors: p.errs.Load(), Mismatches: p.mismatches.Load(),
			Hung: p.hung.Load(), Bytes: p.bytes.Load(), InFlight: p.inflight.Load(),
			ShmCalls: st.CallsSent, FallbackCalls: st.FallbackCalls, InlineRequests: st.InlineRequests, InlineRecv: st.Engine.InlineRecv,
			Growth: readGrowth()}
	}
	started := time.Now()
	cycle := burstFor + calmFor(time.Duration(envInt(envShrink))*time.Millisecond)
	calm := func() bool { return time.Since(started)%cycle >= burstFor }
	stopCalls := make(chan struct{})
	var wg sync.WaitGroup
	var errLines atomic.Int64                    // error lines since the last progress line
	starts := make([]atomic.Int64, envInt(envG)) // unix ns a call started, 0 when idle
	go watchdog(starts, timeout, fmt.Sprintf("client-%d", id))
	for g := range envInt(envG) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(id), uint64(g)))
			for seq := int64(1); ; seq++ {
				select {
				case <-stopCalls:
					return
				default:
				}
				var n int
				if calm() {
					select {
					case <-stopCalls:
						return
					case <-time.After(calmGap):
					}
					n = smallPayloads[r.IntN(len(smallPayloads))]
				} else {
					n = payloadSize(r)
					if r.IntN(50) == 0 {
						n = maxPay // now and then the largest: always a fallback
					}
				}
				req := &echo.EchoRequest{Payload: make([]byte, n), Message: fmt.Sprintf("c%d-g%d-s%d", id, g, seq), Seq: seq}
				fill(req.Payload, r.Uint64())
				p.inflight.Add(1)
				start := time.Now()
				starts[g].Store(start.UnixNano())
				ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Second)
				resp, err := c.Echo(ctx, req)
				cancel()
				took := time.Since(start)
				starts[g].Store(0)
				p.inflight.Add(-1)
				p.calls.Add(1)
				if took > timeout+2*time.Second {
					p.hung.Add(1)
					say("hung call %s took %v (timeout %v), err %v", req.Message, took.Round(time.Millisecond), timeout, err)
				}
				switch {
				case err != nil:
					p.errs.Add(1)
					if errLines.Add(1) <= errLinesPerProgress {
						say("error %s: %v", req.Message, err)
					}
					time.Sleep(10 * time.Millisecond) // the server may be down: do not spin
				case resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, req.Payload):
					p.mismatches.Add(1)
					say("mismatch %s: got seq %d message %q, %d payload bytes (sent %d), equal %v",
						req.Message, resp.Seq, resp.Message, len(resp.Payload), n, bytes.Equal(resp.Payload, req.Payload))
				default:
					p.ok.Add(1)
					p.bytes.Add(int64(n))
				}
			}
		}()
	}
	say("ready")
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			sayJSON("progress", snapshot())
			errLines.Store(0)
		case s := <-sigs:
			switch s {
			case syscall.SIGUSR1:
				sayJSON("stats", sample())
			case syscall.SIGUSR2:
				quiesce(stopCalls, &wg, timeout)
				sayJSON("progress", snapshot())
				sayJSON("quiet", sample())
			case syscall.SIGTERM:
				quiesce(stopCalls, &wg, timeout)
				sayJSON("progress", snapshot())
				sayJSON("final", sample())
				return 0
			}
		}
	}
}

// quiesce stops the calling goroutines (once), waits for their last calls,
// then waits (bounded) for every shm buffer of this process to come back.
func quiesce(stop chan struct{}, wg *sync.WaitGroup, timeout time.Duration) {
	select {
	case <-stop:
	default:
		close(stop)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout + 10*time.Second):
		say("hung calls still in flight %v after quiesce", timeout+10*time.Second)
	}
	deadline := time.Now().Add(10 * time.Second)
	for kshm.ReadStats().InUseBuffers != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

// watchdog dumps every goroutine's stack once a call has been in flight
// longer than its timeout plus 2 s, and says so ("hangdump <file>"): the
// soak then asks the server for its stacks too.
func watchdog(starts []atomic.Int64, timeout time.Duration, name string) {
	for dumps := 0; dumps < 3; {
		time.Sleep(500 * time.Millisecond)
		now := time.Now().UnixNano()
		for i := range starts {
			if st := starts[i].Load(); st != 0 && time.Duration(now-st) > timeout+2*time.Second {
				dumpGoroutines(name)
				dumps++
				time.Sleep(10 * time.Second)
				break
			}
		}
	}
}

var dumpSeq atomic.Int64

// dumpGoroutines writes every goroutine's stack to a file in $KSHM_SOAK_DIR
// and prints "hangdump <file>".
func dumpGoroutines(name string) {
	path := filepath.Join(os.Getenv(envDir), fmt.Sprintf("hang-%s-%d-%d.txt", name, os.Getpid(), dumpSeq.Add(1)))
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak: hang dump:", err)
		return
	}
	pprof.Lookup("goroutine").WriteTo(f, 2)
	f.Close()
	say("hangdump %s", path)
}

// fill writes pseudo-random bytes derived from seed into p.
func fill(p []byte, seed uint64) {
	x := seed | 1
	i := 0
	for ; i+8 <= len(p); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		p[i], p[i+1], p[i+2], p[i+3] = byte(x), byte(x>>8), byte(x>>16), byte(x>>24)
		p[i+4], p[i+5], p[i+6], p[i+7] = byte(x>>32), byte(x>>40), byte(x>>48), byte(x>>56)
	}
	for ; i < len(p); i++ {
		p[i] = byte(x >> (8 * (i & 7)))
	}
}

// readLines feeds the lines of a child's stdout to f until EOF.
func readLines(r *bufio.Scanner, f func(string)) {
	for r.Scan() {
		f(r.Text())
	}
}
