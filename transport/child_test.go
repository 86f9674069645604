package transport_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bytedance/gopkg/cloud/metainfo"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/example/kitex_gen/echo/mathservice"
	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/transport"
)

// Child roles and their environment.
const (
	roleServer = "kitex-server"
	roleClient = "kitex-client" // calls the server at KSHM_T_SOCK in a loop until killed

	envSock     = "KSHM_T_SOCK"     // socket path ("" derives it from the service name)
	envNoShm    = "KSHM_T_NOSHM"    // "1": a plain Kitex server without kshm
	envRegion   = "KSHM_T_REGION"   // region size
	envMaxMsg   = "KSHM_T_MAXMSG"   // maximum message size
	envName     = "KSHM_T_NAME"     // service name
	envExitWait = "KSHM_T_EXITWAIT" // server.WithExitWaitTime, ms
	envAddr     = "KSHM_T_ADDR"     // TCP listen address (default 127.0.0.1:0)
	envReuse    = "KSHM_T_REUSE"    // "1": listen with SO_REUSEPORT (a replacement server)
	envMaxSess  = "KSHM_T_MAXSESS"  // kshm.WithServerLimits sessions
	envUnixAddr = "KSHM_T_UNIXADDR" // the service address is this unix socket (instead of TCP)
)

const serviceName = "kshm-test"

func TestMain(m *testing.M) {
	switch shmtest.Role() {
	case "":
		os.Exit(m.Run())
	case roleServer:
		os.Exit(runServer())
	case roleClient:
		os.Exit(runClient())
	default:
		fmt.Fprintln(os.Stderr, "unknown child role", shmtest.Role())
		os.Exit(2)
	}
}

type mwKey struct{}

// echoImpl is the test service. It reports what reached it so the parent can
// check features end to end.
type echoImpl struct {
	notified atomic.Int64
	seen     sync.Map // seq -> struct{}: for "slow-once"
}

func (e *echoImpl) reply(ctx context.Context, req *echo.EchoRequest) *echo.EchoResponse {
	meta := map[string]string{}
	if v, ok := metainfo.GetValue(ctx, "t-key"); ok {
		meta["transient"] = v
	}
	if v, ok := metainfo.GetPersistentValue(ctx, "p-key"); ok {
		meta["persistent"] = v
	}
	if v, ok := ctx.Value(mwKey{}).(string); ok {
		meta["server-mw"] = v
	}
	meta["pid"] = strconv.Itoa(os.Getpid()) // which server answered
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq, Meta: meta}
}

func (e *echoImpl) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	if req.Message == "notified?" {
		return &echo.EchoResponse{Seq: e.notified.Load()}, nil
	}
	return e.reply(ctx, req), nil
}

func (e *echoImpl) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	if req.Message == "fail" {
		return nil, &echo.EchoError{Code: 42, Message: "asked to fail"}
	}
	return e.reply(ctx, req), nil
}

func (e *echoImpl) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	if req.Message == "slow-once" {
		if _, again := e.seen.LoadOrStore(req.Seq, struct{}{}); again {
			millis = 0
		}
	}
	time.Sleep(time.Duration(millis) * time.Millisecond)
	return e.reply(ctx, req), nil
}

func (e *echoImpl) Notify(ctx context.Context, req *echo.EchoRequest) error {
	e.notified.Add(1)
	return nil
}

type mathImpl struct{}

func (*mathImpl) Add(ctx context.Context, a, b int64) (int64, error) { return a + b, nil }

func envInt(name string) int {
	v, _ := strconv.Atoi(os.Getenv(name))
	return v
}

// runServer runs the test server: plain Kitex on a TCP port of 127.0.0.1
// and, unless KSHM_T_NOSHM, kshm on the unix socket. It prints
// "ready <tcp address>", a "stats <json>" line on SIGUSR1, and "final <json>"
// after a graceful stop (SIGTERM).
func runServer() int {
	ln, err := listenTCP()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	name := os.Getenv(envName)
	if name == "" {
		name = serviceName
	}
	hooks := &connHooks{seen: make(map[net.Conn]*connLife)}
	opts := []server.Option{
		server.WithBoundHandler(hooks),
		server.WithListener(ln),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: name}),
		server.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
			return func(ctx context.Context, req, resp any) error {
				return next(context.WithValue(ctx, mwKey{}, "yes"), req, resp)
			}
		}),
	}
	if ms := envInt(envExitWait); ms > 0 {
		opts = append(opts, server.WithExitWaitTime(time.Duration(ms)*time.Millisecond))
	}
	sock := os.Getenv(envSock)
	noShm := os.Getenv(envNoShm) == "1"

	if !noShm {
		var kopts []kshm.Option
		if sock != "" {
			kopts = append(kopts, kshm.WithSocketPath(sock))
		}
		if n := envInt(envRegion); n > 0 {
			kopts = append(kopts, kshm.WithRegionSize(n))
		}
		if n := envInt(envMaxMsg); n > 0 {
			kopts = append(kopts, kshm.WithMaxMessageSize(n))
		}
		if n := envInt(envMaxSess); n > 0 {
			kopts = append(kopts, kshm.WithServerLimits(n, 1<<40))
		}
		opts = append(opts, kshm.WithServerShmIPC(kopts...))
	}
	svr := echoservice.NewServer(&echoImpl{}, opts...)
	if err := mathservice.RegisterService(svr, &mathImpl{}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}

	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		for sig := range usr1 {
			if sig == syscall.SIGUSR2 {
				b, _ := json.Marshal(hooks.report())
				shmtest.Printf("hooks %s", b)
				continue
			}
			printStats("stats")
		}
	}()
	if path := os.Getenv("KSHM_T_CPUPROFILE"); path != "" { // for looking into the server's costs
		f, err := os.Create(path)
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer func() { pprof.StopCPUProfile(); f.Close() }()
		}
	}
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()

	// Ready when the socket (or, without kshm, the TCP port) accepts.
	readyAddr := ln.Addr().String()
	probeNet, probeAddr := "tcp", readyAddr
	if !noShm {
		probeNet, probeAddr = "unix", sock
		if sock == "" {
			p, err := transport.LocalSocketPath(ln.Addr())
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			probeAddr = p
		}
	}
	for i := 0; ; i++ {
		c, err := net.Dial(probeNet, probeAddr)
		if err == nil {
			c.Close()
			break
		}
		if i > 500 {
			fmt.Fprintln(os.Stderr, "server not ready:", err)
			return 1
		}
		time.Sleep(10 * time.Millisecond)
	}
	shmtest.Printf("ready %s", readyAddr)
	if err := <-runErr; err != nil {
		fmt.Fprintln(os.Stderr, "server.Run:", err)
		return 1
	}
	printStats("final")
	return 0
}

// listenTCP listens on KSHM_T_ADDR (127.0.0.1:0 by default), with
// SO_REUSEPORT when KSHM_T_REUSE is 1.
func listenTCP() (net.Listener, error) {
	if path := os.Getenv(envUnixAddr); path != "" {
		return net.Listen("unix", path)
	}
	addr := os.Getenv(envAddr)
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var lc net.ListenConfig
	if os.Getenv(envReuse) == "1" {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	return lc.Listen(context.Background(), "tcp", addr)
}

func defaultPath(name string) string {
	p, err := transport.DefaultSocketPath(name)
	if err != nil {
		panic(err)
	}
	return p
}

func printStats(prefix string) {
	b, _ := json.Marshal(kshm.ReadStats())
	shmtest.Printf("%s %s", prefix, b)
}

// runClient calls Echo with 64 KiB payloads from 8 goroutines, forever;
// it prints "calling" after the first successful call.
func runClient() int {
	c, err := echoservice.NewClient(serviceName, kshm.WithClientShmIPC(kshm.WithSocketPath(os.Getenv(envSock)), kshm.WithRegionSize(16<<20)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var once sync.Once
	for g := 0; g < 8; g++ {
		go func() {
			p := make([]byte, 64<<10)
			for {
				if _, err := c.Echo(context.Background(), &echo.EchoRequest{Payload: p}); err == nil {
					once.Do(func() { shmtest.Printf("calling") })
				}
			}
		}()
	}
	select {}
}

// connHooks checks Kitex's connection contract on the server: for every
// connection OnActive exactly once before any OnRead, OnInactive exactly once
// at the end.
type connHooks struct {
	mu   sync.Mutex
	seen map[net.Conn]*connLife
}

type connLife struct{ active, reads, inactive int }

// hookReport is what the child prints on SIGUSR2.
type hookReport struct {
	Conns, Open, Reads, Violations int
}

func (h *connHooks) life(conn net.Conn) *connLife {
	l := h.seen[conn]
	if l == nil {
		l = &connLife{}
		h.seen[conn] = l
	}
	return l
}

func (h *connHooks) OnActive(ctx context.Context, conn net.Conn) (context.Context, error) {
	h.mu.Lock()
	h.life(conn).active++
	h.mu.Unlock()
	return ctx, nil
}

func (h *connHooks) OnInactive(ctx context.Context, conn net.Conn) context.Context {
	h.mu.Lock()
	h.life(conn).inactive++
	h.mu.Unlock()
	return ctx
}

func (h *connHooks) OnRead(ctx context.Context, conn net.Conn) (context.Context, error) {
	h.mu.Lock()
	l := h.life(conn)
	l.reads++
	if l.active != 1 || l.inactive != 0 {
		l.active = -1000 // a read outside the connection's life: counted as a violation
	}
	h.mu.Unlock()
	return ctx, nil
}

func (h *connHooks) OnMessage(ctx context.Context, args, result remote.Message) (context.Context, error) {
	return ctx, nil
}

func (h *connHooks) report() hookReport {
	h.mu.Lock()
	defer h.mu.Unlock()
	var r hookReport
	for _, l := range h.seen {
		r.Conns++
		r.Reads += l.reads
		switch {
		case l.active == 1 && l.inactive == 0:
			r.Open++
		case l.active == 1 && l.inactive == 1:
		default:
			r.Violations++
		}
	}
	return r
}
