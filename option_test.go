package kshm_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/remote/trans/netpoll"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"
	ktransport "github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/shm"
	"github.com/shmkit/kshm/transport"
)

type nopEcho struct{}

func (nopEcho) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{}, nil
}
func (nopEcho) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{}, nil
}
func (nopEcho) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{}, nil
}
func (nopEcho) Notify(ctx context.Context, req *echo.EchoRequest) error { return nil }

// panicMessage runs f and returns what it panicked with ("" if it did not).
func panicMessage(f func()) (msg string) {
	defer func() {
		if r := recover(); r != nil {
			msg = fmt.Sprint(r)
		}
	}()
	f()
	return ""
}

var badSettings = []struct {
	opt  kshm.Option
	name string // what the error must name
}{
	{kshm.WithRegionSize(1), "RegionSize"},
	{kshm.WithMaxMessageSize(10), "MaxMessageSize"},
	{kshm.WithWakeMode(kshm.WakeMode(9)), "WakeMode"},
	{kshm.WithSpinTime(-time.Microsecond), "SpinTime"},
	{kshm.WithSpinTime(2 * time.Second), "SpinTime"},
	{kshm.WithSocketMode(0o400), "SocketMode"},
	{kshm.WithHandshakeTimeout(0), "HandshakeTimeout"},
	{kshm.WithSocketPath("relative.sock"), "WithSocketPath"},
	{kshm.WithSocketPath("/" + strings.Repeat("x", 120)), "WithSocketPath"},
	{kshm.WithSessions(0), "WithSessions"},
	{kshm.WithSessions(1000), "WithSessions"},
	{kshm.WithDialTimeout(0), "WithDialTimeout"},
	{kshm.WithReconnectBackoff(time.Second, time.Millisecond), "WithReconnectBackoff"},
	{kshm.WithMaxIdleConns(0), "WithMaxIdleConns"},
	{kshm.Option{}, "zero kshm.Option"},
}

// Settings that contradict each other explicitly are refused, naming them.
func TestWithShmIPC_ContradictionRefused(t *testing.T) {
	opts := []kshm.Option{kshm.WithRegionSize(1 << 20), kshm.WithMaxMessageSize(8 << 20)}
	msg := panicMessage(func() { echoservice.NewClient("svc", kshm.WithClientShmIPC(opts...)) })
	if !strings.Contains(msg, "MaxMessageSize") || !strings.Contains(msg, "RegionSize") {
		t.Fatalf("panic %q does not name both settings", msg)
	}
}

// WithRegionSize alone works at every size from the minimum up: the default
// maximum message follows the region.
func TestWithRegionSize_AloneAtEverySize(t *testing.T) {
	for size := shm.MinRegionSize; size <= 64<<20; size *= 2 {
		for _, sz := range []int{size, size + size/3} {
			if msg := panicMessage(func() {
				echoservice.NewClient("svc", kshm.WithClientShmIPC(kshm.WithRegionSize(sz)))
				echoservice.NewServer(&nopEcho{}, kshm.WithServerShmIPC(kshm.WithRegionSize(sz)))
			}); msg != "" {
				t.Fatalf("WithRegionSize(%d) alone: %s", sz, msg)
			}
		}
	}
}

// An option of the other side is refused, naming the option and the side.
func TestWithShmIPC_OtherSideOptionRefused(t *testing.T) {
	for _, o := range []struct {
		opt  kshm.Option
		name string
	}{
		{kshm.WithSessions(2), "WithSessions"},
		{kshm.WithDialTimeout(time.Second), "WithDialTimeout"},
		{kshm.WithMaxIdleConns(3), "WithMaxIdleConns"},
		{kshm.WithReconnectBackoff(time.Millisecond, time.Second), "WithReconnectBackoff"},
	} {
		msg := panicMessage(func() { echoservice.NewServer(&nopEcho{}, kshm.WithServerShmIPC(o.opt)) })
		if !strings.Contains(msg, o.name) || !strings.Contains(msg, "client setting") {
			t.Errorf("server given %s: panic %q", o.name, msg)
		}
	}
	for _, o := range []struct {
		opt  kshm.Option
		name string
	}{
		{kshm.WithSocketMode(0o660), "WithSocketMode"},
		{kshm.WithServerLimits(4, 1<<30), "WithServerLimits"},
	} {
		msg := panicMessage(func() { echoservice.NewClient("svc", kshm.WithClientShmIPC(o.opt)) })
		if !strings.Contains(msg, o.name) || !strings.Contains(msg, "server setting") {
			t.Errorf("client given %s: panic %q", o.name, msg)
		}
	}
	msg := panicMessage(func() { echoservice.NewServer(&nopEcho{}, kshm.WithServerShmIPC(kshm.WithServerLimits(0, 1<<30))) })
	if !strings.Contains(msg, "WithServerLimits") {
		t.Errorf("WithServerLimits(0): panic %q", msg)
	}
}

// A gRPC client is refused at NewClient: Kitex would replace kshm's pool.
func TestWithClientShmIPC_GRPCRefused(t *testing.T) {
	msg := panicMessage(func() {
		echoservice.NewClient("svc", kshm.WithClientShmIPC(), client.WithTransportProtocol(ktransport.GRPC))
	})
	if !strings.Contains(msg, "GRPC") {
		t.Fatalf("panic %q does not name the conflict", msg)
	}
}

func TestWithClientShmIPC_BadSettingPanicsNamingIt(t *testing.T) {
	for _, bs := range badSettings {
		msg := panicMessage(func() {
			echoservice.NewClient("svc", kshm.WithClientShmIPC(bs.opt))
		})
		if !strings.Contains(msg, bs.name) {
			t.Errorf("bad %s: panic %q does not name it", bs.name, msg)
		}
	}
}

func TestWithServerShmIPC_BadSettingPanicsNamingIt(t *testing.T) {
	for _, bs := range badSettings {
		msg := panicMessage(func() {
			echoservice.NewServer(&nopEcho{}, kshm.WithServerShmIPC(bs.opt))
		})
		if !strings.Contains(msg, bs.name) {
			t.Errorf("bad %s: panic %q does not name it", bs.name, msg)
		}
	}
}

// A server without WithSocketPath and without a service name publishes its
// socket in the per-host directory (0700) under its address, mode 0600.
func TestWithServerShmIPC_ZeroConfigPublishes(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	svr := echoservice.NewServer(&nopEcho{},
		server.WithServiceAddr(&tcpAddr{"127.0.0.1:0"}),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{}),
		kshm.WithServerShmIPC(kshm.WithRegionSize(shm.MinRegionSize)),
		server.WithExitWaitTime(100*time.Millisecond),
	)
	errc := make(chan error, 1)
	go func() { errc <- svr.Run() }()
	dir := transport.LocalDir()
	var sock string
	deadline := time.Now().Add(10 * time.Second)
	for sock == "" {
		m, _ := filepath.Glob(filepath.Join(dir, "127.0.0.1-*.sock"))
		if len(m) == 1 {
			sock = m[0]
			break
		}
		select {
		case err := <-errc:
			t.Fatalf("Run: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no socket in the per-host directory")
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitSocket(t, sock)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("directory %s: %v %v", dir, fi.Mode(), err)
	}
	port := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(sock), "127.0.0.1-"), ".sock")
	waitServing(t, "127.0.0.1:"+port)
	svr.Stop()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left after Stop: %v", err)
	}
}

type tcpAddr struct{ s string }

func (a *tcpAddr) Network() string { return "tcp" }
func (a *tcpAddr) String() string  { return a.s }

// A second server on the same socket path takes it over atomically (the
// first keeps running); a regular file at the path is refused.
func TestWithServerShmIPC_SocketPathTakenOver(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	var addr string
	run := func() (server.Server, chan error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = ln.Addr().String()
		svr := echoservice.NewServer(&nopEcho{},
			server.WithListener(ln),
			kshm.WithServerShmIPC(kshm.WithSocketPath(sock)),
			server.WithExitWaitTime(100*time.Millisecond),
		)
		errc := make(chan error, 1)
		go func() { errc <- svr.Run() }()
		return svr, errc
	}
	if err := os.WriteFile(sock, nil, 0o600); err != nil { // not a socket
		t.Fatal(err)
	}
	_, errc := run()
	if err := <-errc; err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Run over a regular file: %v", err)
	}
	os.Remove(sock)

	svr1, errc1 := run()
	waitSocket(t, sock)
	waitServing(t, addr)
	fi1, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	svr2, errc2 := run()
	waitServing(t, addr)
	deadline := time.Now().Add(10 * time.Second)
	for {
		fi2, err := os.Stat(sock)
		if err == nil && !os.SameFile(fi1, fi2) {
			break
		}
		select {
		case err := <-errc2:
			t.Fatalf("second server: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the second server never took the socket over")
		}
		time.Sleep(10 * time.Millisecond)
	}
	svr1.Stop() // leaves the new server's socket alone
	if err := <-errc1; err != nil {
		t.Fatal(err)
	}
	waitSocket(t, sock)
	svr2.Stop()
	if err := <-errc2; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left after Stop: %v", err)
	}
}

// waitServing waits until a plain Kitex call to addr succeeds: the server
// is past its start (Kitex's netpoll server must not be stopped before).
func waitServing(t *testing.T, addr string) {
	t.Helper()
	c, err := echoservice.NewClient("svc", client.WithHostPorts(addr))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := c.Echo(context.Background(), &echo.EchoRequest{}); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("server at %s never answered", addr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waitSocket(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			if fi.Mode().Perm() != 0o600 {
				t.Fatalf("socket mode %v, want 0600", fi.Mode().Perm())
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("socket never appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// WithClientShmIPC leaves the client's transport protocol alone: calls it
// sends over the fallback keep it (calls over shared memory use
// TTHeaderFramed, checked end to end in the transport package).
func TestWithClientShmIPC_FallbackKeepsProtocol(t *testing.T) {
	for _, tc := range []struct {
		opts []client.Option
		want ktransport.Protocol
	}{
		{nil, ktransport.Framed},
		{[]client.Option{client.WithTransportProtocol(ktransport.PurePayload)}, ktransport.PurePayload},
		{[]client.Option{client.WithTransportProtocol(ktransport.TTHeaderFramed)}, ktransport.TTHeaderFramed},
	} {
		var got ktransport.Protocol
		var tag string
		opts := append([]client.Option{
			kshm.WithClientShmIPC(kshm.WithSocketPath(filepath.Join(t.TempDir(), "none.sock"))),
			client.WithHostPorts("127.0.0.1:1"),
			client.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
				return func(ctx context.Context, req, resp any) error {
					err := next(ctx, req, resp)
					ri := rpcinfo.GetRPCInfo(ctx)
					got = ri.Config().TransportProtocol()
					tag, _ = ri.To().Tag(transport.TagTransport)
					return err
				}
			}),
		}, tc.opts...)
		c, err := echoservice.NewClient("svc", opts...)
		if err != nil {
			t.Fatal(err)
		}
		c.Echo(context.Background(), &echo.EchoRequest{}) // fails: nobody listens
		if got != tc.want || tag != transport.TransportFallback {
			t.Errorf("transport protocol %v over %q, want %v over the fallback", got, tag, tc.want)
		}
	}
}

// WithSpinTime alone works on either side, from 0 (sleep at once) to its
// maximum: calls go over shared memory. The Kitex default is
// transport.DefaultSpinTime, shorter than the engine's.
func TestWithSpinTime_Alone(t *testing.T) {
	if got := transport.DefaultConfig().Shm.SpinTime; got != transport.DefaultSpinTime || got >= shm.DefaultConfig().SpinTime {
		t.Fatalf("the transport's default SpinTime is %v, want DefaultSpinTime (%v), below the engine's", got, transport.DefaultSpinTime)
	}
	for _, pair := range [][2]time.Duration{{0, time.Second}, {time.Second, 0}} {
		sock := filepath.Join(t.TempDir(), "k.sock")
		svr := echoservice.NewServer(&nopEcho{},
			server.WithServiceAddr(&tcpAddr{"127.0.0.1:0"}),
			kshm.WithServerShmIPC(kshm.WithSocketPath(sock), kshm.WithRegionSize(shm.MinRegionSize), kshm.WithSpinTime(pair[0])),
			server.WithExitWaitTime(100*time.Millisecond),
		)
		errc := make(chan error, 1)
		go func() { errc <- svr.Run() }()
		waitSocket(t, sock)
		var tag string
		c, err := echoservice.NewClient("svc",
			kshm.WithClientShmIPC(kshm.WithSocketPath(sock), kshm.WithRegionSize(shm.MinRegionSize), kshm.WithSpinTime(pair[1])),
			client.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
				return func(ctx context.Context, req, resp any) error {
					err := next(ctx, req, resp)
					tag, _ = rpcinfo.GetRPCInfo(ctx).To().Tag(transport.TagTransport)
					return err
				}
			}))
		if err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			if _, err := c.Echo(context.Background(), &echo.EchoRequest{}); err != nil || tag != transport.TransportShm {
				t.Fatalf("server SpinTime %v, client %v: call %d: %v over %q", pair[0], pair[1], i, err, tag)
			}
		}
		svr.Stop()
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}

func TestDefaultSocketPath(t *testing.T) {
	t.Setenv("TMPDIR", "/tmp")
	p, err := transport.DefaultSocketPath("a.b/c d")
	if err != nil || p != fmt.Sprintf("/tmp/kshm-%d/svc-a.b_c_d.sock", os.Getuid()) {
		t.Fatalf("DefaultSocketPath: %q %v", p, err)
	}
	if _, err := transport.DefaultSocketPath(""); !errors.Is(err, transport.ErrBadConfig) {
		t.Fatalf("empty service name: %v", err)
	}
	if _, err := transport.DefaultSocketPath(strings.Repeat("n", 200)); !errors.Is(err, transport.ErrBadConfig) {
		t.Fatalf("too long: %v", err)
	}
}

// A trans server factory given after WithServerShmIPC would take kshm out of
// the server: Run fails naming the conflict.
func TestWithServerShmIPC_TransServerFactoryAfterRefused(t *testing.T) {
	svr := echoservice.NewServer(&nopEcho{},
		server.WithServiceAddr(&tcpAddr{"127.0.0.1:0"}),
		kshm.WithServerShmIPC(kshm.WithSocketPath(filepath.Join(t.TempDir(), "s.sock"))),
		server.WithTransServerFactory(netpoll.NewTransServerFactory()),
	)
	errc := make(chan error, 1)
	go func() { errc <- svr.Run() }()
	select {
	case err := <-errc:
		if !errors.Is(err, transport.ErrConflict) || !strings.Contains(err.Error(), "WithTransServerFactory") {
			t.Fatalf("Run: %v, want a conflict naming WithTransServerFactory", err)
		}
	case <-time.After(20 * time.Second):
		svr.Stop()
		t.Fatal("Run did not fail")
	}
}
