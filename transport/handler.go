package transport

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/remote/trans"
)

// NewCliTransHandlerFactory returns the client trans handler factory: calls
// over kshm virtual connections go to Kitex's default client handler with
// kshm's extension; every other connection (the fallback pool's) to the
// handler of inner, the factory the client had (Kitex's netpoll one, a mux
// or a custom one). inner nil: kshm's handler serves both.
func NewCliTransHandlerFactory(inner remote.ClientTransHandlerFactory) remote.ClientTransHandlerFactory {
	return cliFactory{inner: inner}
}

type cliFactory struct {
	inner remote.ClientTransHandlerFactory
}

func (f cliFactory) NewTransHandler(opt *remote.ClientOption) (remote.ClientTransHandler, error) {
	own, err := trans.NewDefaultCliTransHandler(opt, newExtension(false))
	if err != nil {
		return nil, err
	}
	h := &cliHandler{own: own, inner: own}
	if f.inner != nil {
		// The inner handler sees the pool it serves: the fallback pool
		// (a mux handler insists on its own pool).
		io := *opt
		if rp, ok := opt.ConnPool.(*RoutePool); ok {
			io.ConnPool = rp.fallback
		}
		if h.inner, err = f.inner.NewTransHandler(&io); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// cliHandler routes each connection to the handler of its kind.
type cliHandler struct {
	own, inner remote.ClientTransHandler
}

func (h *cliHandler) pick(conn net.Conn) remote.ClientTransHandler {
	if _, ok := conn.(*clientConn); ok {
		return h.own
	}
	return h.inner
}

func (h *cliHandler) Write(ctx context.Context, conn net.Conn, send remote.Message) (context.Context, error) {
	c, ok := conn.(*clientConn)
	if !ok {
		return h.inner.Write(ctx, conn, send)
	}
	ctx, err := h.own.Write(ctx, conn, send)
	if c.lastInline {
		setTag(send.RPCInfo(), TransportInline)
	}
	return ctx, err
}

func (h *cliHandler) Read(ctx context.Context, conn net.Conn, msg remote.Message) (context.Context, error) {
	return h.pick(conn).Read(ctx, conn, msg)
}

func (h *cliHandler) OnInactive(ctx context.Context, conn net.Conn) {
	h.pick(conn).OnInactive(ctx, conn)
}

func (h *cliHandler) OnError(ctx context.Context, err error, conn net.Conn) {
	h.pick(conn).OnError(ctx, err, conn)
}

func (h *cliHandler) OnMessage(ctx context.Context, args, result remote.Message) (context.Context, error) {
	return h.own.OnMessage(ctx, args, result)
}

func (h *cliHandler) SetPipeline(p *remote.TransPipeline) {
	h.own.SetPipeline(p)
	if h.inner != h.own {
		h.inner.SetPipeline(p)
	}
}

// NewSvrTransHandlerFactory wraps the server's trans handler factory (Kitex's
// default: protocol detection over netpoll). Connections of the server's
// usual address keep going to the wrapped handler; kshm virtual connections
// and plain Kitex connections on the unix socket go to Kitex's default
// server handler with kshm's extension.
func NewSvrTransHandlerFactory(inner remote.ServerTransHandlerFactory) remote.ServerTransHandlerFactory {
	return &svrFactory{inner: inner}
}

type svrFactory struct {
	inner remote.ServerTransHandlerFactory
	made  atomic.Bool // NewTransHandler ran: the server uses this factory
}

func (f *svrFactory) NewTransHandler(opt *remote.ServerOption) (remote.ServerTransHandler, error) {
	if tf, ok := opt.TransServerFactory.(*transServerFactory); !ok || tf.handlers != f {
		return nil, fmt.Errorf("%w: WithServerShmIPC: the server's trans server factory was replaced after "+
			"WithServerShmIPC (kshm would be off); put WithServerShmIPC after server.WithTransServerFactory", ErrConflict)
	}
	own, err := trans.NewDefaultSvrTransHandler(opt, newExtension(true))
	if err != nil {
		return nil, err
	}
	h := &svrHandler{own: own}
	if f.inner != nil {
		if h.inner, err = f.inner.NewTransHandler(opt); err != nil {
			return nil, err
		}
	}
	f.made.Store(true)
	return h, nil
}

// svrHandler routes each connection to the handler of its kind.
type svrHandler struct {
	inner remote.ServerTransHandler // may be nil: then everything is ours
	own   remote.ServerTransHandler
}

type ownConnKey struct{}

func (h *svrHandler) pick(conn net.Conn) remote.ServerTransHandler {
	switch conn.(type) {
	case *serverConn, *plainConn:
		return h.own
	}
	if h.inner == nil {
		return h.own
	}
	return h.inner
}

func (h *svrHandler) pickCtx(ctx context.Context) remote.ServerTransHandler {
	if h.inner == nil || ctx.Value(ownConnKey{}) != nil {
		return h.own
	}
	return h.inner
}

func (h *svrHandler) Write(ctx context.Context, conn net.Conn, send remote.Message) (context.Context, error) {
	return h.pick(conn).Write(ctx, conn, send)
}

func (h *svrHandler) Read(ctx context.Context, conn net.Conn, msg remote.Message) (context.Context, error) {
	return h.pick(conn).Read(ctx, conn, msg)
}

func (h *svrHandler) OnRead(ctx context.Context, conn net.Conn) error {
	return h.pick(conn).OnRead(ctx, conn)
}

func (h *svrHandler) OnInactive(ctx context.Context, conn net.Conn) {
	h.pick(conn).OnInactive(ctx, conn)
}

func (h *svrHandler) OnError(ctx context.Context, err error, conn net.Conn) {
	h.pick(conn).OnError(ctx, err, conn)
}

func (h *svrHandler) OnMessage(ctx context.Context, args, result remote.Message) (context.Context, error) {
	return h.pickCtx(ctx).OnMessage(ctx, args, result)
}

func (h *svrHandler) OnActive(ctx context.Context, conn net.Conn) (context.Context, error) {
	hd := h.pick(conn)
	if hd == h.own {
		ctx = context.WithValue(ctx, ownConnKey{}, true)
	}
	return hd.OnActive(ctx, conn)
}

func (h *svrHandler) SetPipeline(p *remote.TransPipeline) {
	h.own.SetPipeline(p)
	if h.inner != nil {
		h.inner.SetPipeline(p)
	}
}

func (h *svrHandler) SetInvokeHandleFunc(ep endpoint.Endpoint) {
	if s, ok := h.own.(remote.InvokeHandleFuncSetter); ok {
		s.SetInvokeHandleFunc(ep)
	}
	if s, ok := h.inner.(remote.InvokeHandleFuncSetter); ok {
		s.SetInvokeHandleFunc(ep)
	}
}

func (h *svrHandler) GracefulShutdown(ctx context.Context) error {
	if g, ok := h.own.(remote.GracefulShutdown); ok {
		_ = g.GracefulShutdown(ctx)
	}
	if g, ok := h.inner.(remote.GracefulShutdown); ok {
		return g.GracefulShutdown(ctx)
	}
	return nil
}

var (
	_ remote.ServerTransHandler     = (*svrHandler)(nil)
	_ remote.InvokeHandleFuncSetter = (*svrHandler)(nil)
	_ remote.GracefulShutdown       = (*svrHandler)(nil)
)
