package transport

import (
	"context"
	"errors"
	"net"

	"github.com/cloudwego/netpoll"

	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/remote/trans"
	"github.com/cloudwego/kitex/pkg/remote/trans/gonet"
	npext "github.com/cloudwego/kitex/pkg/remote/trans/netpoll"
	"github.com/cloudwego/kitex/pkg/rpcinfo"

	"github.com/shmkit/kshm/codec"
	"github.com/shmkit/kshm/shm"
)

// extension is the trans.Extension of kshm's trans handlers. It picks the
// buffer kind by connection type: shm buffers for virtual connections,
// netpoll's for netpoll connections (fallback calls, the server's usual
// address), bufiox over Go net for plain Kitex connections on the unix
// socket.
type extension struct {
	server bool
	np     trans.Extension
	gn     trans.Extension
}

func newExtension(server bool) *extension {
	return &extension{server: server, np: npext.NewNetpollConnExtension(), gn: gonet.NewGonetExtension()}
}

// SetReadTimeout implements trans.Extension.
func (e *extension) SetReadTimeout(ctx context.Context, conn net.Conn, cfg rpcinfo.RPCConfig, role remote.RPCRole) {
	switch c := conn.(type) {
	case *clientConn:
		c.setReadTimeout(trans.GetReadTimeout(cfg))
	case *serverConn:
		// The request is already in memory when OnRead starts.
	case netpoll.Connection:
		e.np.SetReadTimeout(ctx, conn, cfg, role)
	default:
		e.gn.SetReadTimeout(ctx, conn, cfg, role)
	}
}

// NewWriteByteBuffer implements trans.Extension.
func (e *extension) NewWriteByteBuffer(ctx context.Context, conn net.Conn, msg remote.Message) remote.ByteBuffer {
	switch c := conn.(type) {
	case *clientConn:
		return c.newWriteBuffer(ctx, msg)
	case *serverConn:
		return c.newWriteBuffer(ctx)
	case netpoll.Connection:
		return e.np.NewWriteByteBuffer(ctx, conn, msg)
	default:
		return e.gn.NewWriteByteBuffer(ctx, conn, msg)
	}
}

// NewReadByteBuffer implements trans.Extension.
func (e *extension) NewReadByteBuffer(ctx context.Context, conn net.Conn, msg remote.Message) remote.ByteBuffer {
	switch c := conn.(type) {
	case *clientConn:
		return codec.NewLazyReadBuffer(c)
	case *serverConn:
		return codec.NewReadBuffer(c.ss.s, &c.cur)
	case netpoll.Connection:
		return e.np.NewReadByteBuffer(ctx, conn, msg)
	default:
		return e.gn.NewReadByteBuffer(ctx, conn, msg)
	}
}

// ReleaseBuffer implements trans.Extension; it also counts what was sent.
func (e *extension) ReleaseBuffer(buf remote.ByteBuffer, err error) error {
	switch b := buf.(type) {
	case nil:
		return nil
	case *codec.WriteBuffer:
		sent, inline := b.Outcome()
		if sent {
			if e.server {
				if inline {
					counters.inlineResponses.Add(1)
				}
			} else {
				counters.callsSent.Add(1)
				if inline {
					counters.inlineRequests.Add(1)
				}
			}
		}
		return b.Release(err)
	default:
		return buf.Release(err)
	}
}

// IsTimeoutErr implements trans.Extension.
func (e *extension) IsTimeoutErr(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, shm.ErrTimeout) || e.np.IsTimeoutErr(err) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// IsRemoteClosedErr implements trans.Extension.
func (e *extension) IsRemoteClosedErr(err error) bool {
	if err == nil {
		return false
	}
	return errors.Is(err, shm.ErrClosed) || errors.Is(err, shm.ErrPeerClosed) ||
		e.np.IsRemoteClosedErr(err) || e.gn.IsRemoteClosedErr(err)
}

var _ trans.Extension = (*extension)(nil)
