package kshm_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"
	ktransport "github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
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
	{kshm.WithRegionSize(1 << 20), "MaxMessageSize"}, // the default 4 MiB maximum does not fit
	{kshm.WithWakeMode(kshm.WakeMode(9)), "WakeMode"},
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

// A server that cannot derive its socket path (no WithSocketPath, no
// service name) fails at Run with an error naming the setting.
func TestWithServerShmIPC_NoPathNoNameFailsAtRun(t *testing.T) {
	svr := echoservice.NewServer(&nopEcho{},
		server.WithServiceAddr(&tcpAddr{"127.0.0.1:0"}),
		kshm.WithServerShmIPC(),
	)
	errc := make(chan error, 1)
	go func() { errc <- svr.Run() }()
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "WithSocketPath") || !errors.Is(err, transport.ErrBadConfig) {
			t.Fatalf("Run: %v, want an error naming WithSocketPath", err)
		}
	case <-time.After(20 * time.Second):
		svr.Stop()
		t.Fatal("Run did not fail")
	}
}

type tcpAddr struct{ s string }

func (a *tcpAddr) Network() string { return "tcp" }
func (a *tcpAddr) String() string  { return a.s }

// The server refuses a socket path held by a live listener, and replaces a
// stale socket file.
func TestWithServerShmIPC_SocketPathInUse(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	run := func() (server.Server, chan error) {
		svr := echoservice.NewServer(&nopEcho{},
			server.WithServiceAddr(&tcpAddr{"127.0.0.1:0"}),
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
	_, errc2 := run()
	if err := <-errc2; err == nil || !strings.Contains(err.Error(), "listening") {
		t.Fatalf("second server on the same socket: %v", err)
	}
	svr1.Stop()
	if err := <-errc1; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left after Stop: %v", err)
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

// WithClientShmIPC switches Kitex's default Framed to TTHeaderFramed, and
// leaves an explicit choice alone.
func TestWithClientShmIPC_TTHeaderByDefault(t *testing.T) {
	for _, tc := range []struct {
		opts []client.Option
		want ktransport.Protocol
	}{
		{nil, ktransport.TTHeaderFramed},
		{[]client.Option{client.WithTransportProtocol(ktransport.PurePayload)}, ktransport.PurePayload},
	} {
		var got ktransport.Protocol
		opts := append([]client.Option{
			kshm.WithClientShmIPC(kshm.WithSocketPath(filepath.Join(t.TempDir(), "none.sock"))),
			client.WithHostPorts("127.0.0.1:1"),
			client.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
				return func(ctx context.Context, req, resp any) error {
					got = rpcinfo.GetRPCInfo(ctx).Config().TransportProtocol()
					return next(ctx, req, resp)
				}
			}),
		}, tc.opts...)
		c, err := echoservice.NewClient("svc", opts...)
		if err != nil {
			t.Fatal(err)
		}
		c.Echo(context.Background(), &echo.EchoRequest{}) // fails: nobody listens
		if got != tc.want {
			t.Errorf("transport protocol %v, want %v", got, tc.want)
		}
	}
}

func TestDefaultSocketPath(t *testing.T) {
	t.Setenv("TMPDIR", "/tmp")
	p, err := transport.DefaultSocketPath("a.b/c d")
	if err != nil || p != "/tmp/kshm-a.b_c_d.sock" {
		t.Fatalf("DefaultSocketPath: %q %v", p, err)
	}
	if _, err := transport.DefaultSocketPath(""); !errors.Is(err, transport.ErrBadConfig) {
		t.Fatalf("empty service name: %v", err)
	}
	if _, err := transport.DefaultSocketPath(strings.Repeat("n", 200)); !errors.Is(err, transport.ErrBadConfig) {
		t.Fatalf("too long: %v", err)
	}
}
