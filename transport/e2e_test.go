package transport_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bytedance/gopkg/cloud/metainfo"
	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/client/callopt"
	"github.com/cloudwego/kitex/pkg/discovery"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/kerrors"
	"github.com/cloudwego/kitex/pkg/retry"
	"github.com/cloudwego/kitex/server"
	ktransport "github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/example/kitex_gen/echo/mathservice"
	"github.com/shmkit/kshm/internal/shmtest"
)

// ---- test server (child process) ----

type testServer struct {
	p    *shmtest.Proc
	addr string // plain Kitex over TCP on 127.0.0.1
	sock string
}

// testRegion keeps the tests' regions small: creating a 64 MiB region takes
// ~100 ms on a loaded machine, and several at once can pass the handshake
// timeout.
const testRegion = 16 << 20

// shmOpt is WithClientShmIPC for the tests: the socket, a small region, more.
func shmOpt(sock string, more ...kshm.Option) client.Option {
	return kshm.WithClientShmIPC(append([]kshm.Option{kshm.WithSocketPath(sock), kshm.WithRegionSize(testRegion)}, more...)...)
}

func startServer(t *testing.T, sock string, env ...string) *testServer {
	t.Helper()
	env = append([]string{fmt.Sprintf("%s=%d", envRegion, testRegion)}, env...) // later entries win
	p := shmtest.Start(t, roleServer, append(env, envSock+"="+sock)...)
	line := p.Expect(t, "ready ", 60*time.Second)
	return &testServer{p: p, addr: strings.TrimPrefix(line, "ready "), sock: sock}
}

func parseStats(t *testing.T, line, prefix string) kshm.Stats {
	t.Helper()
	var st kshm.Stats
	if err := json.Unmarshal([]byte(strings.TrimPrefix(line, prefix)), &st); err != nil {
		t.Fatalf("bad stats line %q: %v", line, err)
	}
	return st
}

func (s *testServer) stats(t *testing.T) kshm.Stats {
	t.Helper()
	if err := s.p.Cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	return parseStats(t, s.p.Expect(t, "stats ", 20*time.Second), "stats ")
}

// waitNoBuffers waits until the server has every shm buffer back (buffers
// the client released are reclaimed on the next allocation or housekeeping).
func (s *testServer) waitNoBuffers(t *testing.T) kshm.Stats {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := s.stats(t)
		if st.InUseBuffers == 0 {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("server still has %d shm buffers (%d bytes) in use", st.InUseBuffers, st.InUseBytes)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// hooks returns the server's record of Kitex's connection contract.
func (s *testServer) hooks(t *testing.T) hookReport {
	t.Helper()
	if err := s.p.Cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	var r hookReport
	line := s.p.Expect(t, "hooks ", 20*time.Second)
	if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "hooks ")), &r); err != nil {
		t.Fatalf("bad hooks line %q: %v", line, err)
	}
	return r
}

// stop stops the server gracefully (SIGTERM) and returns its final stats.
func (s *testServer) stop(t *testing.T) kshm.Stats {
	t.Helper()
	if err := s.p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	st := parseStats(t, s.p.Expect(t, "final ", 30*time.Second), "final ")
	if err := s.p.Wait(); err != nil {
		t.Fatalf("server exit: %v", err)
	}
	return st
}

func waitClientNoBuffers(t *testing.T) kshm.Stats {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := kshm.ReadStats()
		if st.InUseBuffers == 0 {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("client still has %d shm buffers (%d bytes) in use", st.InUseBuffers, st.InUseBytes)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sockPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "k.sock")
}

// ---- client ----

// echoClient calls EchoService exactly as the generated client does, over a
// Kitex client we can Close (the generated one cannot be closed).
type echoClient struct{ kc client.Client }

func newEchoClient(t *testing.T, opts ...client.Option) *echoClient {
	t.Helper()
	kc, err := client.NewClient(echoservice.NewServiceInfoForClient(), append([]client.Option{client.WithDestService(serviceName)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kc.(interface{ Close() error }).Close() })
	return &echoClient{kc}
}

func (c *echoClient) Close() error { return c.kc.(interface{ Close() error }).Close() }

func (c *echoClient) Echo(ctx context.Context, req *echo.EchoRequest, co ...callopt.Option) (*echo.EchoResponse, error) {
	if len(co) > 0 {
		ctx = client.NewCtxWithCallOptions(ctx, co)
	}
	var res echo.EchoServiceEchoResult
	if err := c.kc.Call(ctx, "Echo", &echo.EchoServiceEchoArgs{Req: req}, &res); err != nil {
		return nil, err
	}
	return res.GetSuccess(), nil
}

func (c *echoClient) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	var res echo.EchoServiceEchoOrFailResult
	if err := c.kc.Call(ctx, "EchoOrFail", &echo.EchoServiceEchoOrFailArgs{Req: req}, &res); err != nil {
		return nil, err
	}
	if res.Err != nil {
		return nil, res.Err
	}
	return res.GetSuccess(), nil
}

func (c *echoClient) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64, co ...callopt.Option) (*echo.EchoResponse, error) {
	if len(co) > 0 {
		ctx = client.NewCtxWithCallOptions(ctx, co)
	}
	var res echo.EchoServiceSleepResult
	if err := c.kc.Call(ctx, "Sleep", &echo.EchoServiceSleepArgs{Req: req, Millis: millis}, &res); err != nil {
		return nil, err
	}
	return res.GetSuccess(), nil
}

func (c *echoClient) Notify(ctx context.Context, req *echo.EchoRequest) error {
	return c.kc.Call(ctx, "Notify", &echo.EchoServiceNotifyArgs{Req: req}, nil)
}

func payload(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// checkEcho calls Echo and verifies the response byte for byte.
func checkEcho(t *testing.T, c *echoClient, n int, seq int64) {
	t.Helper()
	req := &echo.EchoRequest{Payload: payload(n, seq), Message: fmt.Sprintf("m%d", seq), Seq: seq}
	resp, err := c.Echo(context.Background(), req)
	if err != nil {
		t.Fatalf("Echo(%d bytes, seq %d): %v", n, seq, err)
	}
	if resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, req.Payload) {
		t.Fatalf("Echo(%d bytes, seq %d): got seq %d message %q, payload equal %v",
			n, seq, resp.Seq, resp.Message, bytes.Equal(resp.Payload, req.Payload))
	}
}

// ---- tests ----

// Every Kitex feature the transport must carry, over shared memory.
func TestKitex_FeaturesOverShm(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock)
	before := kshm.ReadStats()

	var mwCalls atomic.Int64
	c := newEchoClient(t,
		shmOpt(sock),
		client.WithHostPorts(srv.addr),
		client.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
			return func(ctx context.Context, req, resp any) error {
				mwCalls.Add(1)
				return next(ctx, req, resp)
			}
		}),
	)
	ctx := context.Background()

	t.Run("payload sizes", func(t *testing.T) {
		for i, n := range []int{0, 1, 64, 1000, 4 << 10, 16 << 10, 100 << 10, 1 << 20, 4<<20 - 4<<10} {
			checkEcho(t, c, n, int64(i+1))
		}
	})
	t.Run("middleware both sides", func(t *testing.T) {
		n := mwCalls.Load()
		resp, err := c.Echo(ctx, &echo.EchoRequest{Message: "mw"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Meta["server-mw"] != "yes" || mwCalls.Load() != n+1 {
			t.Fatalf("server middleware %q, client middleware calls %d", resp.Meta["server-mw"], mwCalls.Load()-n)
		}
	})
	t.Run("metainfo transient and persistent", func(t *testing.T) {
		mctx := metainfo.WithValue(ctx, "t-key", "t-val")
		mctx = metainfo.WithPersistentValue(mctx, "p-key", "p-val")
		resp, err := c.Echo(mctx, &echo.EchoRequest{Message: "meta"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Meta["transient"] != "t-val" || resp.Meta["persistent"] != "p-val" {
			t.Fatalf("metainfo at the server: %v", resp.Meta)
		}
	})
	t.Run("business exception", func(t *testing.T) {
		_, err := c.EchoOrFail(ctx, &echo.EchoRequest{Message: "fail"})
		var ee *echo.EchoError
		if !errors.As(err, &ee) || ee.Code != 42 || ee.Message != "asked to fail" {
			t.Fatalf("EchoOrFail: %v, want EchoError{42}", err)
		}
		if resp, err := c.EchoOrFail(ctx, &echo.EchoRequest{Message: "ok", Seq: 9}); err != nil || resp.Seq != 9 {
			t.Fatalf("EchoOrFail ok: %v %v", resp, err)
		}
	})
	t.Run("oneway", func(t *testing.T) {
		for i := 0; i < 5; i++ {
			if err := c.Notify(ctx, &echo.EchoRequest{Seq: int64(i)}); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := c.Echo(ctx, &echo.EchoRequest{Message: "notified?"})
			if err != nil {
				t.Fatal(err)
			}
			if resp.Seq == 5 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("server saw %d oneway calls, want 5", resp.Seq)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	t.Run("rpc timeout then many calls", func(t *testing.T) {
		start := time.Now()
		// The server sleeps far past the timeout: on a loaded machine timers
		// fire late, and a response already there when one does is
		// legitimately returned (netpoll does the same).
		resp, err := c.Sleep(ctx, &echo.EchoRequest{Seq: 1, Message: "sleeper"}, 2000, callopt.WithRPCTimeout(50*time.Millisecond))
		if !errors.Is(err, kerrors.ErrRPCTimeout) || !kerrors.IsTimeoutError(err) {
			t.Fatalf("Sleep past its timeout: %v (response %+v after %v), want Kitex's RPC timeout error", err, resp, time.Since(start))
		}
		// The late response must never reach a later call.
		for i := 0; i < 200; i++ {
			checkEcho(t, c, 100+i*37, int64(1000+i))
		}
		deadline := time.Now().Add(10 * time.Second)
		for kshm.ReadStats().LateResponses == before.LateResponses {
			if time.Now().After(deadline) {
				t.Fatal("the late response was never seen and dropped")
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	t.Run("concurrent calls", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for g := 0; g < 16; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := 0; i < 40; i++ {
					seq := int64(g*1000 + i)
					req := &echo.EchoRequest{Payload: payload(50+(g*i)%20000, seq), Seq: seq}
					resp, err := c.Echo(ctx, req)
					if err != nil {
						errs <- err
						return
					}
					if resp.Seq != seq || !bytes.Equal(resp.Payload, req.Payload) {
						errs <- fmt.Errorf("crosstalk: seq %d got seq %d", seq, resp.Seq)
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
	t.Run("timeouts under concurrency never cross", func(t *testing.T) {
		var wg sync.WaitGroup
		var timeouts, ok atomic.Int64
		errs := make(chan error, 8)
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				r := rand.New(rand.NewSource(int64(g)))
				for i := 0; i < 25; i++ {
					seq := int64(50000 + g*100 + i)
					req := &echo.EchoRequest{Payload: payload(r.Intn(8000), seq), Seq: seq}
					resp, err := c.Sleep(ctx, req, int64(r.Intn(30)), callopt.WithRPCTimeout(15*time.Millisecond))
					switch {
					case kerrors.IsTimeoutError(err):
						timeouts.Add(1)
					case err != nil:
						errs <- err
						return
					case resp.Seq != seq || !bytes.Equal(resp.Payload, req.Payload):
						errs <- fmt.Errorf("crosstalk: call %d got the response of %d", seq, resp.Seq)
						return
					default:
						ok.Add(1)
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		t.Logf("%d calls answered, %d timed out", ok.Load(), timeouts.Load())
		for i := 0; i < 50; i++ { // and the client still works
			checkEcho(t, c, 2000+i, int64(60000+i))
		}
	})
	t.Run("retry after timeout", func(t *testing.T) {
		fp := retry.NewFailurePolicy()
		fp.WithMaxRetryTimes(2)
		rc := newEchoClient(t,
			shmOpt(sock),
			client.WithHostPorts(srv.addr),
			client.WithFailureRetry(fp),
			client.WithRPCTimeout(time.Second),
		)
		// The server sleeps on the first attempt only: the retry succeeds.
		resp, err := rc.Sleep(ctx, &echo.EchoRequest{Message: "slow-once", Seq: 777}, 3000)
		if err != nil || resp.Seq != 777 {
			t.Fatalf("retried call: %v %v", resp, err)
		}
	})
	t.Run("several sessions", func(t *testing.T) {
		dialedBefore := kshm.ReadStats().SessionsDialed
		sc := newEchoClient(t, shmOpt(sock, kshm.WithSessions(3)), client.WithHostPorts(srv.addr))
		var wg sync.WaitGroup
		errs := make(chan error, 6)
		for g := 0; g < 6; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := 0; i < 30; i++ {
					seq := int64(g*100 + i)
					req := &echo.EchoRequest{Payload: payload(3000, seq), Seq: seq}
					resp, err := sc.Echo(ctx, req)
					if err == nil && (resp.Seq != seq || !bytes.Equal(resp.Payload, req.Payload)) {
						err = fmt.Errorf("crosstalk: seq %d got %d", seq, resp.Seq)
					}
					if err != nil {
						errs <- err
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if got := kshm.ReadStats().SessionsDialed - dialedBefore; got != 3 {
			t.Fatalf("the client opened %d sessions, want 3", got)
		}
	})
	t.Run("several services", func(t *testing.T) {
		mc, err := mathservice.NewClient(serviceName, shmOpt(sock), client.WithHostPorts(srv.addr))
		if err != nil {
			t.Fatal(err)
		}
		if sum, err := mc.Add(ctx, 40, 2); err != nil || sum != 42 {
			t.Fatalf("Add: %d %v", sum, err)
		}
		gc, err := echoservice.NewClient(serviceName, shmOpt(sock), client.WithHostPorts(srv.addr))
		if err != nil {
			t.Fatal(err)
		}
		if resp, err := gc.Echo(ctx, &echo.EchoRequest{Seq: 5}); err != nil || resp.Seq != 5 {
			t.Fatalf("generated client: %v %v", resp, err)
		}
	})

	st := waitClientNoBuffers(t)
	if st.CallsSent <= before.CallsSent || st.FallbackCalls != before.FallbackCalls {
		t.Fatalf("client: %d calls over shm, %d fallback calls; want all over shm", st.CallsSent-before.CallsSent, st.FallbackCalls-before.FallbackCalls)
	}
	sst := srv.waitNoBuffers(t)
	if sst.CallsServed == 0 || sst.Sessions == 0 {
		t.Fatalf("server served %d calls on %d sessions", sst.CallsServed, sst.Sessions)
	}
	srv.stop(t)
}

// A deliberately tiny region: messages that find no shared memory go over
// the session socket, in both directions, and no call ever receives
// another's response.
func TestKitex_FallbackBothDirectionsTinyRegion(t *testing.T) {
	sock := sockPath(t)
	const region, maxMsg = 1 << 20, 128 << 10
	srv := startServer(t, sock, fmt.Sprintf("%s=%d", envRegion, region), fmt.Sprintf("%s=%d", envMaxMsg, maxMsg))
	before := kshm.ReadStats()
	c := newEchoClient(t,
		shmOpt(sock, kshm.WithRegionSize(region), kshm.WithMaxMessageSize(maxMsg)),
		client.WithHostPorts(srv.addr),
	)
	const goroutines, calls = 16, 20
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(g)))
			for i := 0; i < calls; i++ {
				seq := int64(g*10000 + i)
				// Two calls in three just under the maximum message size, so
				// that 16 of them at once exhaust the 1 MiB regions; one in
				// three larger than the maximum.
				n := maxMsg/2 + r.Intn(maxMsg/2-1024)
				if i%3 == 0 {
					n = maxMsg + r.Intn(2*maxMsg)
				}
				req := &echo.EchoRequest{Payload: payload(n, seq), Message: fmt.Sprint(seq), Seq: seq}
				resp, err := c.Echo(context.Background(), req)
				if err != nil {
					errs <- fmt.Errorf("seq %d (%d bytes): %w", seq, n, err)
					return
				}
				if resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, req.Payload) {
					errs <- fmt.Errorf("seq %d (%d bytes): got seq %d, payload equal %v", seq, n, resp.Seq, bytes.Equal(resp.Payload, req.Payload))
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := waitClientNoBuffers(t)
	sst := srv.waitNoBuffers(t)
	if st.InlineRequests == before.InlineRequests {
		t.Fatal("no request took the fallback path; the test does not test it")
	}
	if sst.InlineResponses == 0 {
		t.Fatal("no response took the fallback path; the test does not test it")
	}
	if st.InlineNoMemory+st.InlineQuota == before.InlineNoMemory+before.InlineQuota &&
		sst.InlineNoMemory+sst.InlineQuota == 0 {
		t.Fatal("no message found the arena full; the test does not test exhaustion")
	}
	if st.CallsSent-before.CallsSent != goroutines*calls {
		t.Fatalf("%d calls over kshm sessions, want %d", st.CallsSent-before.CallsSent, goroutines*calls)
	}
	t.Logf("client: inline requests %d (no memory %d, quota %d, too large %d); server: inline responses %d (no memory %d, quota %d, too large %d)",
		st.InlineRequests-before.InlineRequests, st.InlineNoMemory-before.InlineNoMemory, st.InlineQuota-before.InlineQuota,
		st.InlineTooLarge-before.InlineTooLarge, sst.InlineResponses, sst.InlineNoMemory, sst.InlineQuota, sst.InlineTooLarge)
	srv.stop(t)
}

// A client without kshm reaches a kshm server on both of its addresses.
func TestKitex_PlainClientBothAddresses(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock)
	for _, addr := range []string{srv.addr, sock} {
		c := newEchoClient(t, client.WithHostPorts(addr), client.WithTransportProtocol(ktransport.TTHeaderFramed))
		for i, n := range []int{0, 100, 64 << 10, 1 << 20} {
			checkEcho(t, c, n, int64(i))
		}
		if err := c.Notify(context.Background(), &echo.EchoRequest{}); err != nil {
			t.Fatal(err)
		}
		// Framed, Kitex's default, too.
		c2 := newEchoClient(t, client.WithHostPorts(addr))
		checkEcho(t, c2, 1000, 1)
	}
	if st := srv.waitNoBuffers(t); st.PlainConns == 0 {
		t.Fatal("no plain connection was served on the unix socket")
	}
	srv.stop(t)
}

// No session can be had (the socket is missing; the server has no kshm):
// calls go over Kitex's netpoll transport to the resolved address.
func TestKitex_NoSessionFallsBack(t *testing.T) {
	srv := startServer(t, "", envNoShm+"=1")
	before := kshm.ReadStats()
	c := newEchoClient(t,
		kshm.WithClientShmIPC(kshm.WithSocketPath(sockPath(t))), // nobody listens there
		client.WithHostPorts(srv.addr),
	)
	for i, n := range []int{0, 10, 100 << 10} {
		checkEcho(t, c, n, int64(i))
	}
	st := kshm.ReadStats()
	// At least 3: Kitex retries a failed connect (its default connect timeout
	// is 50 ms), and each attempt is a fallback.
	if st.FallbackCalls-before.FallbackCalls < 3 || st.CallsSent != before.CallsSent {
		t.Fatalf("fallback calls %d, shm calls %d; want 3 and 0", st.FallbackCalls-before.FallbackCalls, st.CallsSent-before.CallsSent)
	}

	// The same through a resolver instead of WithHostPorts.
	res := &discovery.SynthesizedResolver{
		ResolveFunc: func(ctx context.Context, key string) (discovery.Result, error) {
			return discovery.Result{Cacheable: true, CacheKey: "test", Instances: []discovery.Instance{
				discovery.NewInstance("tcp", srv.addr, discovery.DefaultWeight, nil)}}, nil
		},
		NameFunc: func() string { return "test-resolver" },
	}
	rc := newEchoClient(t, kshm.WithClientShmIPC(kshm.WithSocketPath(sockPath(t))), client.WithResolver(res))
	checkEcho(t, rc, 5000, 7)
	srv.stop(t)
}

// Without WithSocketPath both sides derive the same path from the service
// name; without an address, fallback calls go to that socket as plain Kitex.
func TestKitex_DefaultSocketPathAndNoAddress(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	srv := startServer(t, "", "TMPDIR="+tmp)
	_ = srv
	c := newEchoClient(t, kshm.WithClientShmIPC(kshm.WithRegionSize(testRegion)))
	before := kshm.ReadStats()
	checkEcho(t, c, 5000, 1)
	if st := kshm.ReadStats(); st.CallsSent != before.CallsSent+1 {
		t.Fatal("the call did not go over shared memory")
	}
	waitClientNoBuffers(t)
	srv.waitNoBuffers(t)
	srv.stop(t)
}

// kill -9 of the server: calls fail fast or fall back meanwhile; after a
// restart on the same socket the client uses shared memory again.
func TestKitex_KillAndRestart(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock)
	// No address: fallback calls go to the unix socket, which the restarted
	// server serves too.
	c := newEchoClient(t,
		shmOpt(sock, kshm.WithReconnectBackoff(20*time.Millisecond, 200*time.Millisecond)),
		client.WithRPCTimeout(5*time.Second),
	)
	checkEcho(t, c, 1000, 1)
	lostBefore := kshm.ReadStats().SessionsLost

	srv.p.Kill()
	srv.p.Wait()
	// The session dies; calls now fail without waiting for their timeout.
	deadline := time.Now().Add(10 * time.Second)
	for kshm.ReadStats().SessionsLost == lostBefore {
		if time.Now().After(deadline) {
			t.Fatal("the client never noticed the dead server")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i := 0; i < 5; i++ {
		_, err := c.Echo(context.Background(), &echo.EchoRequest{Seq: int64(i)})
		if err == nil {
			t.Fatal("a call succeeded with the server dead")
		}
		if kerrors.IsTimeoutError(err) {
			t.Fatalf("call waited for its timeout instead of failing fast: %v", err)
		}
	}
	if st := kshm.ReadStats(); st.InUseBuffers != 0 {
		t.Fatalf("%d buffers still in use after the peer died", st.InUseBuffers)
	}

	srv2 := startServer(t, sock)
	sentBefore := kshm.ReadStats().CallsSent
	deadline = time.Now().Add(20 * time.Second)
	for i := 0; kshm.ReadStats().CallsSent == sentBefore; i++ {
		if time.Now().After(deadline) {
			t.Fatal("the client never used shared memory again after the restart")
		}
		checkEcho(t, c, 2000, int64(100+i)) // over the socket until the session is back
		time.Sleep(20 * time.Millisecond)
	}
	for i := 0; i < 20; i++ {
		checkEcho(t, c, 3000, int64(200+i))
	}
	waitClientNoBuffers(t)
	srv2.waitNoBuffers(t)
	srv2.stop(t)
}

// Graceful shutdown lets a call in flight finish.
func TestKitex_GracefulShutdownFinishesCallsInFlight(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock, envExitWait+"=3000")
	c := newEchoClient(t, shmOpt(sock), client.WithHostPorts(srv.addr))
	checkEcho(t, c, 10, 1)
	done := make(chan error, 1)
	go func() {
		resp, err := c.Sleep(context.Background(), &echo.EchoRequest{Seq: 9, Payload: payload(5000, 9)}, 500)
		if err == nil && (resp.Seq != 9 || !bytes.Equal(resp.Payload, payload(5000, 9))) {
			err = errors.New("wrong response")
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // let the call reach the server
	st := srv.stop(t)
	if err := <-done; err != nil {
		t.Fatalf("call in flight during shutdown: %v", err)
	}
	if st.InUseBuffers != 0 {
		t.Logf("server exited with %d buffers not yet reclaimed", st.InUseBuffers)
	}
	waitClientNoBuffers(t)
}

// kill -9 of a client in the middle of calls: the server ends the session,
// its virtual connections and their goroutines, gets every buffer back, and
// keeps serving.
func TestKitex_ClientKilledMidCall(t *testing.T) {
	sock := sockPath(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svr := echoservice.NewServer(&echoImpl{},
		server.WithListener(ln),
		server.WithExitWaitTime(time.Second),
		kshm.WithServerShmIPC(kshm.WithSocketPath(sock), kshm.WithRegionSize(testRegion)),
	)
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()
	t.Cleanup(func() { svr.Stop(); <-runErr })
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 1000 {
			t.Fatal("server never listened")
		}
		time.Sleep(10 * time.Millisecond)
	}
	servedBefore := kshm.ReadStats().CallsServed

	cli := shmtest.Start(t, roleClient, envSock+"="+sock)
	cli.Expect(t, "calling", 60*time.Second)
	for kshm.ReadStats().CallsServed < servedBefore+200 {
		time.Sleep(5 * time.Millisecond)
	}
	cli.Kill()
	cli.Wait()

	deadline := time.Now().Add(20 * time.Second)
	for {
		st := kshm.ReadStats()
		if st.ServerConns == 0 && st.InUseBuffers == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the client died: %d server vconns, %d buffers in use", st.ServerConns, st.InUseBuffers)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := newEchoClient(t, shmOpt(sock))
	checkEcho(t, c, 10000, 1)
}

// BenchmarkKitex_Echo1KiB measures a kshm Echo call from this process to a
// child server, with this side's allocations. KSHM_BENCH_SIZE changes the
// payload size; KSHM_BENCH_WAKE=poll|timed|plain the wake mode or, plain,
// Kitex over the same unix socket without kshm.
func BenchmarkKitex_Echo1KiB(b *testing.B) {
	sock := filepath.Join(b.TempDir(), "k.sock")
	p := shmtest.Start(b, roleServer, envSock+"="+sock)
	p.Expect(b, "ready ", 60*time.Second)
	kopts := []kshm.Option{kshm.WithSocketPath(sock)}
	switch os.Getenv("KSHM_BENCH_WAKE") {
	case "poll":
		kopts = append(kopts, kshm.WithWakeMode(kshm.WakePoll))
	case "timed":
		kopts = append(kopts, kshm.WithWakeMode(kshm.WakeTimed), kshm.WithPollInterval(20*time.Microsecond))
	}
	copts := []client.Option{client.WithDestService(serviceName), kshm.WithClientShmIPC(kopts...)}
	if os.Getenv("KSHM_BENCH_WAKE") == "plain" { // baseline: Kitex over the same unix socket
		copts = []client.Option{client.WithDestService(serviceName), client.WithHostPorts(sock),
			client.WithTransportProtocol(ktransport.TTHeaderFramed)}
	}
	kc, err := client.NewClient(echoservice.NewServiceInfoForClient(), copts...)
	if err != nil {
		b.Fatal(err)
	}
	defer kc.(interface{ Close() error }).Close()
	c := &echoClient{kc}
	size := 1024
	if v, err := strconv.Atoi(os.Getenv("KSHM_BENCH_SIZE")); err == nil {
		size = v
	}
	req := &echo.EchoRequest{Payload: payload(size, 1)}
	ctx := context.Background()
	if _, err := c.Echo(ctx, req); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Echo(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// Closing a client ends its sessions and their goroutines, and its virtual
// connections on the server.
func TestKitex_ClientCloseEndsSessions(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock)
	before := kshm.ReadStats()
	c := newEchoClient(t, shmOpt(sock, kshm.WithSessions(2)))
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				checkEcho(t, c, 1000, int64(g*100+i))
			}
		}(g)
	}
	wg.Wait()
	if st := kshm.ReadStats(); st.Sessions <= before.Sessions || st.ClientConns <= before.ClientConns {
		t.Fatalf("sessions %d -> %d, client vconns %d -> %d: the client used none", before.Sessions, st.Sessions, before.ClientConns, st.ClientConns)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if st := kshm.ReadStats(); st.Sessions != before.Sessions || st.ClientConns != before.ClientConns || st.InUseBuffers != 0 {
		t.Fatalf("after Close: sessions %d (was %d), client vconns %d (was %d), buffers in use %d",
			st.Sessions, before.Sessions, st.ClientConns, before.ClientConns, st.InUseBuffers)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := srv.stats(t)
		if st.Sessions == 0 && st.ServerConns == 0 && st.InUseBuffers == 0 {
			// Every virtual connection had OnActive once before its reads
			// and OnInactive once at its end.
			if h := srv.hooks(t); h.Violations != 0 || h.Open != 0 || h.Conns == 0 || h.Reads < 40 {
				t.Fatalf("server connection hooks: %+v", h)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server after the client closed: %d sessions, %d vconns, %d buffers", st.Sessions, st.ServerConns, st.InUseBuffers)
		}
		time.Sleep(20 * time.Millisecond)
	}
	srv.stop(t)
}

// A connect timeout on the fallback path is Kitex's own connect error, the
// same as without kshm. (Over shared memory there is no connect per call;
// the session's dial is bounded by WithDialTimeout and a failed dial means
// fallback.) The peer is a TCP listener on 127.0.0.1 whose accept queue is
// full, so a connect hangs.
func TestKitex_ConnectTimeoutIsKitexError(t *testing.T) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*syscall.SockaddrInet4).Port}).String()
	for i := 0; i < 4; i++ { // fill the accept queue; nobody accepts
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		defer c.Close()
	}
	for _, opts := range [][]client.Option{
		{shmOpt(sockPath(t))}, // kshm, no session: fallback
		nil,                   // plain Kitex
	} {
		c := newEchoClient(t, append(opts, client.WithHostPorts(addr), client.WithConnectTimeout(50*time.Millisecond))...)
		_, err := c.Echo(context.Background(), &echo.EchoRequest{})
		if !errors.Is(err, kerrors.ErrGetConnection) || !strings.Contains(err.Error(), "timeout") {
			t.Fatalf("connect to a full accept queue: %v, want Kitex's connect timeout error", err)
		}
	}
}
