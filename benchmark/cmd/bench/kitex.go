package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/connpool"
	"github.com/cloudwego/kitex/pkg/klog"
	"github.com/cloudwego/kitex/server"
	"github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
)

// The Kitex layer: the example's kitex-generated EchoService, the same
// client and handler code over each transport, TTHeaderFramed framing, a
// long-connection pool that keeps one connection per concurrent caller.
// The handler checks every byte of the request payload and overwrites every
// byte of it with the response pattern, which it returns as the response
// payload (Kitex decodes binaries into fresh copies, so this is safe).
//
// The client has Kitex's default configuration, no RPC timeout, so a call
// runs on the caller's goroutine. The "-rpctimeout" variants set one
// (client.WithRPCTimeout), as most production clients do: Kitex then runs
// every call on a worker goroutine of its timeout pool
// (kitex/client/rpctimeout.go), two goroutine hand-offs per call whatever
// the transport, and the pair kshm-rpctimeout / netpoll-uds-rpctimeout shows
// what that costs each.
func kitexTransports() []transportDef {
	ts := []transportDef{
		{layer: "kitex", name: "netpoll-uds", dial: dialKitex(nil), serve: serveKitex(nil)},
		{layer: "kitex", name: "netpoll-tcp", tcp: true, dial: dialKitex(nil), serve: serveKitex(nil)},
		{layer: "kitex", name: "netpoll-uds-rpctimeout", dial: dialKitex(&kitexExtra{rpcTimeout: rpcTimeoutVariant}), serve: serveKitex(nil)},
	}
	return append(kitexKshmTransports(), ts...)
}

// kitexExtra adds a transport's own options to the common ones.
type kitexExtra struct {
	// netpollAddr is the server's usual (netpoll) address when p.sock is
	// the transport's own.
	netpollAddr func(p params) string
	client      func(p params) []client.Option
	server      func(p params) []server.Option
	fallbacks   func() uint64
	// rpcTimeout is the client's RPC timeout (0: none, Kitex's default).
	rpcTimeout time.Duration
}

// rpcTimeoutVariant is the RPC timeout of the "-rpctimeout" variants: long
// enough never to fire.
const rpcTimeoutVariant = 30 * time.Second

func kitexAddr(p params, x *kitexExtra) net.Addr {
	addr := p.sock
	if x != nil && x.netpollAddr != nil {
		addr = x.netpollAddr(p)
	}
	if a, err := net.ResolveTCPAddr("tcp", addr); err == nil && a.Port != 0 {
		return a
	}
	return &net.UnixAddr{Net: "unix", Name: addr}
}

func dialKitex(x *kitexExtra) func(p params) (clientSide, error) {
	return func(p params) (clientSide, error) {
		klog.SetLevel(klog.LevelError)
		opts := []client.Option{
			client.WithHostPorts(kitexAddr(p, x).String()),
			client.WithTransportProtocol(transport.TTHeaderFramed),
			client.WithConnectTimeout(5 * time.Second),
			client.WithLongConnection(connpool.IdleConfig{
				MinIdlePerAddress: 0,
				MaxIdlePerAddress: p.conc + 1,
				MaxIdleGlobal:     p.conc + 1,
				MaxIdleTimeout:    time.Minute,
			}),
		}
		if x != nil && x.rpcTimeout > 0 {
			opts = append(opts, client.WithRPCTimeout(x.rpcTimeout))
		}
		if x != nil && x.client != nil {
			opts = append(opts, x.client(p)...)
		}
		cli, err := echoservice.NewClient("kshm.bench.echo", opts...)
		if err != nil {
			return nil, err
		}
		c := &kitexClient{cli: cli, size: p.size}
		if x != nil {
			c.fallbackCount = x.fallbacks
		}
		return c, nil
	}
}

type kitexClient struct {
	cli           echoservice.Client
	size          int
	fallbackCount func() uint64
}

func (c *kitexClient) fallbacks() uint64 {
	if c.fallbackCount == nil {
		return 0
	}
	return c.fallbackCount()
}

func (c *kitexClient) newCaller(int) (caller, error) {
	return &kitexCaller{cli: c.cli, req: &echo.EchoRequest{Payload: make([]byte, c.size), Message: "bench"}}, nil
}

func (c *kitexClient) close() error { return nil }

type kitexCaller struct {
	cli echoservice.Client
	req *echo.EchoRequest
}

func (k *kitexCaller) call(seq uint64) error {
	fillRequest(k.req.Payload, seq)
	k.req.Seq = int64(seq)
	resp, err := k.cli.Echo(context.Background(), k.req)
	if err != nil {
		return err
	}
	if resp.Seq != int64(seq) || len(resp.Payload) != len(k.req.Payload) || !checkResponse(resp.Payload, seq) {
		return fmt.Errorf("kitex: response %d (%d bytes) to call %d failed verification", resp.Seq, len(resp.Payload), seq)
	}
	return nil
}

type benchEcho struct{ fail func(error) }

func (h *benchEcho) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	seq, err := serveRequest(req.Payload, req.Payload)
	if err != nil || seq != uint64(req.Seq) {
		err = fmt.Errorf("kitex: request %d failed verification", req.Seq)
		h.fail(err)
		return nil, err
	}
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (h *benchEcho) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return h.Echo(ctx, req)
}

func (h *benchEcho) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	return h.Echo(ctx, req)
}

func (h *benchEcho) Notify(ctx context.Context, req *echo.EchoRequest) error { return nil }

type kitexServer struct {
	srv  server.Server
	done chan error
}

func serveKitex(x *kitexExtra) func(p params, fail func(error)) (serverSide, error) {
	return func(p params, fail func(error)) (serverSide, error) {
		klog.SetLevel(klog.LevelError)
		addr := kitexAddr(p, x)
		if addr.Network() == "unix" {
			_ = os.Remove(addr.String())
		}
		opts := []server.Option{
			server.WithServiceAddr(addr),
			server.WithExitWaitTime(100 * time.Millisecond),
			server.WithReadWriteTimeout(30 * time.Second),
		}
		if x != nil && x.server != nil {
			opts = append(opts, x.server(p)...)
		}
		srv := echoservice.NewServer(&benchEcho{fail: fail}, opts...)
		s := &kitexServer{srv: srv, done: make(chan error, 1)}
		go func() { s.done <- srv.Run() }()
		// Ready when the address (and the transport's own socket) accept
		// connections.
		ready := addr
		if x != nil && x.netpollAddr != nil {
			ready = &net.UnixAddr{Net: "unix", Name: p.sock}
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			conn, err := net.DialTimeout(ready.Network(), ready.String(), time.Second)
			if err == nil {
				conn.Close()
				return s, nil
			}
			select {
			case err := <-s.done:
				return nil, fmt.Errorf("kitex server: %v", err)
			default:
			}
			if time.Now().After(deadline) {
				srv.Stop()
				return nil, fmt.Errorf("kitex server not listening on %s after 10s: %v", addr, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// close stops the server. Calls still in flight when the client process
// went away make Stop complain after ExitWaitTime; that is expected here.
func (s *kitexServer) close() error {
	if err := s.srv.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "kitex server stop: %v\n", err)
	}
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
	}
	return nil
}
