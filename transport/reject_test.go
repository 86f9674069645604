package transport_test

// Every rejection reaches the client (issue 8 §4) and the server knows its
// caller (§10): a child Kitex server that rejects calls in the ways Kitex
// servers do, called over kshm and, for comparison, over netpoll.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/client/callopt"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/kerrors"
	"github.com/cloudwego/kitex/pkg/limit"
	"github.com/cloudwego/kitex/pkg/remote"
	kcodec "github.com/cloudwego/kitex/pkg/remote/codec"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"
	ktransport "github.com/cloudwego/kitex/transport"
	"github.com/cloudwego/netpoll"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/internal/shmtest"
)

const (
	roleRejectServer = "kitex-reject-server"
	envReject        = "KSHM_T_REJECT" // conn | qps | panic | "" (none)
)

func init() {
	if shmtest.Role() == roleRejectServer {
		os.Exit(runRejectServer())
	}
}

type peerKey struct{}

// peerEcho answers with the caller's address as the server's middleware saw
// it (rpcinfo.From().Address()). It records the sequence numbers of oneway
// calls in the order it served them; Echo with message "order?" returns
// them.
type peerEcho struct {
	echoImpl
	mu      sync.Mutex
	oneways []string
}

func (e *peerEcho) Notify(ctx context.Context, req *echo.EchoRequest) error {
	e.mu.Lock()
	e.oneways = append(e.oneways, fmt.Sprint(req.Seq))
	e.mu.Unlock()
	return nil
}

func (e *peerEcho) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	resp := &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq, Meta: map[string]string{}}
	if req.Message == "order?" {
		e.mu.Lock()
		resp.Message = strings.Join(e.oneways, ",")
		e.mu.Unlock()
	}
	if a, ok := ctx.Value(peerKey{}).(net.Addr); ok {
		resp.Meta["network"], resp.Meta["addr"] = a.Network(), a.String()
	}
	return resp, nil
}

// panicCodec is Kitex's default codec, except that encoding the reply to
// an Echo whose message is "panic" panics: Kitex's server handler turns
// that into a closed connection without a reply.
type panicCodec struct{ remote.Codec }

func (c panicCodec) Encode(ctx context.Context, msg remote.Message, out remote.ByteBuffer) error {
	if r, ok := msg.Data().(*echo.EchoServiceEchoResult); ok && r.Success != nil && r.Success.Message == "panic" {
		panic("kshm test: asked to panic while encoding the reply")
	}
	return c.Codec.Encode(ctx, msg, out)
}

// garbageCodec is a client codec that sends bytes no server can decode.
type garbageCodec struct{ remote.Codec }

func (garbageCodec) Encode(ctx context.Context, msg remote.Message, out remote.ByteBuffer) error {
	_, err := out.WriteBinary([]byte{0, 0, 0, 12, 0x7f, 'n', 'o', 't', ' ', 'k', 'i', 't', 'e', 'x', '!', '!'})
	return err
}

// runRejectServer runs an echo server on 127.0.0.1 (netpoll) and the unix
// socket (kshm) that rejects as KSHM_T_REJECT says. Lines: "ready <addr>",
// "stats <json>" on SIGUSR1, "final <json>" after SIGTERM.
func runRejectServer() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sock := os.Getenv(envSock)
	opts := []server.Option{
		server.WithListener(ln),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: serviceName}),
		server.WithExitWaitTime(500 * time.Millisecond),
		server.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
			return func(ctx context.Context, req, resp any) error {
				if ri := rpcinfo.GetRPCInfo(ctx); ri != nil && ri.From() != nil {
					ctx = context.WithValue(ctx, peerKey{}, ri.From().Address())
				}
				return next(ctx, req, resp)
			}
		}),
		kshm.WithServerShmIPC(kshm.WithSocketPath(sock), kshm.WithRegionSize(testRegion)),
	}
	switch os.Getenv(envReject) {
	case "conn":
		opts = append(opts, server.WithLimit(&limit.Option{MaxConnections: 1}))
	case "qps":
		opts = append(opts, server.WithLimit(&limit.Option{MaxQPS: 2}))
	case "panic":
		opts = append(opts, server.WithCodec(panicCodec{kcodec.NewDefaultCodec()}))
	}
	svr := echoservice.NewServer(&peerEcho{}, opts...)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		for range usr1 {
			printStats("stats")
		}
	}()
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()
	for i := 0; ; i++ {
		c, err := net.Dial("unix", sock)
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
	shmtest.Printf("ready %s", ln.Addr())
	if err := <-runErr; err != nil {
		fmt.Fprintln(os.Stderr, "server.Run:", err)
		return 1
	}
	printStats("final")
	return 0
}

func startRejectServer(t *testing.T, reject string) *testServer {
	t.Helper()
	sock := sockPath(t)
	p := shmtest.Start(t, roleRejectServer, envSock+"="+sock, envReject+"="+reject)
	line := p.Expect(t, "ready ", 60*time.Second)
	return &testServer{p: p, addr: strings.TrimPrefix(line, "ready "), sock: sock}
}

// transportModes are the two ways a test calls the server: kshm over
// shared memory, and plain Kitex over netpoll (TCP) for comparison.
var transportModes = []string{"kshm", "netpoll"}

func rejectClient(t *testing.T, srv *testServer, mode string, opts ...client.Option) *echoClient {
	t.Helper()
	// Kitex's 50 ms connect timeout fails and retries dials on a loaded
	// machine, which reorders the netpoll baseline's connections.
	opts = append(opts, client.WithConnectTimeout(5*time.Second))
	if mode == "kshm" {
		opts = append(opts, shmOpt(srv.sock), client.WithHostPorts(srv.addr))
	} else {
		opts = append(opts, client.WithHostPorts(srv.addr), client.WithTransportProtocol(ktransport.TTHeaderFramed))
	}
	return newEchoClient(t, opts...)
}

// call runs f, failing the test if it has not returned within a minute:
// a rejected call must never hang, even with no RPC timeout.
func call[T any](t *testing.T, what string, f func() (T, error)) (T, error) {
	t.Helper()
	type out struct {
		v   T
		err error
	}
	ch := make(chan out, 1)
	go func() {
		v, err := f()
		ch <- out{v, err}
	}()
	select {
	case o := <-ch:
		return o.v, o.err
	case <-time.After(time.Minute):
		t.Fatalf("%s: the call never returned", what)
		panic("unreachable")
	}
}

// checkRejected checks that err is how Kitex reports a connection the
// server closed: a remote-or-network error caused by netpoll's
// ErrConnClosed, never a timeout.
func checkRejected(t *testing.T, mode string, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: the call succeeded; want the server to reject it", mode)
	}
	if kerrors.IsTimeoutError(err) {
		t.Fatalf("%s: the call waited for its timeout: %v", mode, err)
	}
	if !errors.Is(err, kerrors.ErrRemoteOrNetwork) || !errors.Is(err, netpoll.ErrConnClosed) {
		t.Fatalf("%s: %v; want kerrors.ErrRemoteOrNetwork caused by netpoll.ErrConnClosed", mode, err)
	}
}

func echoOK(t *testing.T, c *echoClient, seq int64, co ...callopt.Option) {
	t.Helper()
	req := &echo.EchoRequest{Payload: payload(3000, seq), Message: fmt.Sprint(seq), Seq: seq}
	resp, err := call(t, "Echo", func() (*echo.EchoResponse, error) { return c.Echo(context.Background(), req, co...) })
	if err != nil {
		t.Fatalf("Echo %d: %v", seq, err)
	}
	if resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, req.Payload) {
		t.Fatalf("Echo %d: wrong response (seq %d)", seq, resp.Seq)
	}
}

// rpcTimeouts: each rejection is tested with no RPC timeout (Kitex's
// default) and with one far longer than the test.
var rpcTimeouts = []time.Duration{0, 30 * time.Second}

func timeoutOpts(d time.Duration) []callopt.Option {
	if d == 0 {
		return nil
	}
	return []callopt.Option{callopt.WithRPCTimeout(d)}
}

// waitServerConns waits until the server has no kshm virtual connection
// left, and the client none beyond want.
func waitConnsGone(t *testing.T, srv *testServer, clientWant int64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := srv.stats(t)
		cst := kshm.ReadStats()
		if st.ServerConns == 0 && cst.ClientConns == clientWant {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("server vconns %d, client vconns %d (want %d): a virtual connection outlived its end",
				st.ServerConns, cst.ClientConns, clientWant)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A connection limiter (MaxConnections 1): a second connection is refused
// at OnActive; its call fails at once, the first call is answered.
func TestReject_ConnectionLimiter(t *testing.T) {
	srv := startRejectServer(t, "conn")
	for _, mode := range transportModes {
		for _, to := range rpcTimeouts {
			t.Run(fmt.Sprintf("%s/timeout=%v", mode, to), func(t *testing.T) {
				before := kshm.ReadStats().ClientConns
				c := rejectClient(t, srv, mode)
				req := &echo.EchoRequest{Payload: payload(5000, 1), Seq: 1}
				first := make(chan error, 1)
				go func() {
					resp, err := c.Sleep(context.Background(), req, 2500, timeoutOpts(to)...)
					if err == nil && (resp.Seq != 1 || !bytes.Equal(resp.Payload, req.Payload)) {
						err = errors.New("wrong response")
					}
					first <- err
				}()
				time.Sleep(800 * time.Millisecond) // the first call holds the only connection
				_, err := call(t, "second call", func() (*echo.EchoResponse, error) {
					return c.Echo(context.Background(), &echo.EchoRequest{Seq: 2}, timeoutOpts(to)...)
				})
				reordered := false
				if mode == "netpoll" && err == nil {
					// The baseline only shows what Kitex returns; on a loaded
					// machine its dials retry and can reorder who holds the
					// connection, so the first call may be the one refused.
					// kshm has no dial per call.
					t.Logf("netpoll baseline: the second call was not rejected this time")
					reordered = true
				} else {
					checkRejected(t, mode, err)
				}
				if err := <-first; err != nil {
					if !reordered || !errors.Is(err, kerrors.ErrRemoteOrNetwork) {
						t.Fatalf("the call holding the connection: %v", err)
					}
					t.Logf("netpoll baseline: the first call was the one refused: %v", err)
				}
				echoOK(t, c, 3, timeoutOpts(to)...) // its connection is reused
				if mode == "kshm" {
					c.Close()
					waitConnsGone(t, srv, before)
				}
			})
		}
	}
	srv.stop(t)
}

// A QPS limiter (MaxQPS 2): of a burst of calls, those refused at OnRead
// fail at once; every call answered is answered right.
func TestReject_QPSLimiter(t *testing.T) {
	srv := startRejectServer(t, "qps")
	for _, mode := range transportModes {
		for _, to := range rpcTimeouts {
			t.Run(fmt.Sprintf("%s/timeout=%v", mode, to), func(t *testing.T) {
				before := kshm.ReadStats().ClientConns
				c := rejectClient(t, srv, mode)
				var wg sync.WaitGroup
				var mu sync.Mutex
				var answered, rejected int
				for i := 0; i < 12; i++ {
					wg.Add(1)
					go func(seq int64) {
						defer wg.Done()
						req := &echo.EchoRequest{Payload: payload(2000, seq), Seq: seq}
						resp, err := call(t, "burst call", func() (*echo.EchoResponse, error) {
							return c.Echo(context.Background(), req, timeoutOpts(to)...)
						})
						mu.Lock()
						defer mu.Unlock()
						if err == nil {
							if resp.Seq != seq || !bytes.Equal(resp.Payload, req.Payload) {
								t.Errorf("call %d: wrong response (seq %d)", seq, resp.Seq)
							}
							answered++
							return
						}
						checkRejected(t, mode, err)
						rejected++
					}(int64(100 + i))
				}
				wg.Wait()
				t.Logf("%s: %d answered, %d rejected", mode, answered, rejected)
				if rejected == 0 {
					t.Fatal("no call was rejected; the test does not test the limiter")
				}
				if mode == "kshm" {
					c.Close()
					waitConnsGone(t, srv, before)
				}
			})
		}
	}
	srv.stop(t)
}

// A request the server cannot decode: no reply, the connection closes, the
// call fails at once; the client's other calls keep working.
func TestReject_DecodeError(t *testing.T) {
	srv := startRejectServer(t, "")
	for _, mode := range transportModes {
		for _, to := range rpcTimeouts {
			t.Run(fmt.Sprintf("%s/timeout=%v", mode, to), func(t *testing.T) {
				before := kshm.ReadStats().ClientConns
				bad := rejectClient(t, srv, mode, client.WithCodec(garbageCodec{kcodec.NewDefaultCodec()}))
				_, err := call(t, "undecodable call", func() (*echo.EchoResponse, error) {
					return bad.Echo(context.Background(), &echo.EchoRequest{Seq: 1}, timeoutOpts(to)...)
				})
				checkRejected(t, mode, err)
				good := rejectClient(t, srv, mode)
				echoOK(t, good, 2, timeoutOpts(to)...)
				if mode == "kshm" {
					bad.Close()
					good.Close()
					waitConnsGone(t, srv, before)
				}
			})
		}
	}
	srv.stop(t)
}

// A panic while the server writes the reply: Kitex turns it into a closed
// connection; the call fails at once and the server keeps serving.
func TestReject_PanicClosesConnection(t *testing.T) {
	srv := startRejectServer(t, "panic")
	for _, mode := range transportModes {
		for _, to := range rpcTimeouts {
			t.Run(fmt.Sprintf("%s/timeout=%v", mode, to), func(t *testing.T) {
				before := kshm.ReadStats().ClientConns
				c := rejectClient(t, srv, mode)
				echoOK(t, c, 1, timeoutOpts(to)...)
				_, err := call(t, "panicking call", func() (*echo.EchoResponse, error) {
					return c.Echo(context.Background(), &echo.EchoRequest{Seq: 2, Message: "panic"}, timeoutOpts(to)...)
				})
				checkRejected(t, mode, err)
				echoOK(t, c, 3, timeoutOpts(to)...)
				if mode == "kshm" {
					c.Close()
					waitConnsGone(t, srv, before)
				}
			})
		}
	}
	srv.stop(t)
}

// Shutdown with a call in flight that outlasts ExitWaitTime: the call fails
// at once when the server closes its session, with no RPC timeout too.
func TestReject_ShutdownEndsCallInFlight(t *testing.T) {
	for _, to := range rpcTimeouts {
		t.Run(fmt.Sprintf("timeout=%v", to), func(t *testing.T) {
			srv := startServer(t, sockPath(t), envExitWait+"=300")
			c := newEchoClient(t, shmOpt(srv.sock), client.WithHostPorts(srv.addr))
			checkEcho(t, c, 100, 1)
			done := make(chan error, 1)
			go func() {
				_, err := c.Sleep(context.Background(), &echo.EchoRequest{Seq: 2}, 20000, timeoutOpts(to)...)
				done <- err
			}()
			time.Sleep(200 * time.Millisecond) // let the call reach the server
			if err := srv.p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				checkRejected(t, "kshm", err)
			case <-time.After(time.Minute):
				t.Fatal("the call in flight never returned after the server shut down")
			}
			// The handler still sleeps: Run reports connections busy after
			// ExitWaitTime, and the server exits.
			srv.p.Wait()
		})
	}
}

// The server's RemoteAddr of a shared-memory call names the calling
// process: a middleware sees kshm:pid=<client pid>,uid=<client uid>.
func TestPeer_RemoteAddrNamesCaller(t *testing.T) {
	srv := startRejectServer(t, "")
	c := newEchoClient(t, shmOpt(srv.sock), client.WithHostPorts(srv.addr))
	before := kshm.ReadStats().CallsSent
	resp, err := c.Echo(context.Background(), &echo.EchoRequest{Seq: 1})
	if err != nil {
		t.Fatal(err)
	}
	if kshm.ReadStats().CallsSent == before {
		t.Fatal("the call did not go over shared memory")
	}
	want := fmt.Sprintf("kshm:pid=%d,uid=%d", os.Getpid(), os.Getuid())
	if resp.Meta["network"] != "kshm" || resp.Meta["addr"] != want {
		t.Fatalf("server middleware saw the caller as %q %q; want kshm %q", resp.Meta["network"], resp.Meta["addr"], want)
	}
	// Over netpoll the address is the TCP peer, as plain Kitex has it.
	pc := newEchoClient(t, client.WithHostPorts(srv.addr))
	resp, err = pc.Echo(context.Background(), &echo.EchoRequest{Seq: 2})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Meta["network"] != "tcp" || !strings.HasPrefix(resp.Meta["addr"], "127.0.0.1:") {
		t.Fatalf("over netpoll the server saw %q %q", resp.Meta["network"], resp.Meta["addr"])
	}
	srv.stop(t)
}
