package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudwego/gopkg/bufiox"
	"github.com/cloudwego/kitex/pkg/klog"
	"github.com/cloudwego/kitex/pkg/remote"

	"github.com/shmkit/kshm/codec"
	"github.com/shmkit/kshm/shm"
)

// serverSession serves one kshm session: a dispatcher routes requests to
// virtual connections, each served by its own goroutine.
type serverSession struct {
	ts *TransServer
	s  *shm.Session

	mu    sync.Mutex // guards conns
	conns map[uint64]*serverConn
	wg    sync.WaitGroup // connection goroutines

	acked   chan struct{} // closed when the client acknowledged a go-away
	ackOnce sync.Once
}

// drained reports whether the session can be closed during shutdown: the
// client acknowledged the go-away (it has no call left) or the session ended.
func (ss *serverSession) drained() bool {
	select {
	case <-ss.acked:
		return true
	case <-ss.s.Done():
		return true
	default:
		return false
	}
}

func (ss *serverSession) serve() {
	warned := false
	for {
		m, err := ss.s.Recv(context.Background())
		if err != nil {
			if !errors.Is(err, shm.ErrClosed) {
				klog.Warnf("kshm: server session ended: %v", err)
			}
			break
		}
		switch m.Kind {
		case codec.KindRequest:
			c := ss.conn(m.Aux)
			if c == nil {
				ss.s.Release(&m)
				klog.Warnf("kshm: client pid %d opened more than %d virtual connections; closing its session",
					ss.s.PeerPID(), maxServerConns)
				ss.s.Close()
				continue
			}
			c.push(m)
		case codec.KindGoAwayAck:
			ss.s.Release(&m)
			ss.ackOnce.Do(func() { close(ss.acked) })
		case codec.KindCloseConn:
			ss.s.Release(&m)
			ss.mu.Lock()
			c := ss.conns[m.Aux]
			ss.mu.Unlock()
			if c != nil {
				c.closeInput()
			}
		default:
			ss.s.Release(&m)
			if !warned { // once per session: a broken peer must not flood the log
				warned = true
				klog.Warnf("kshm: server dropped a message of unknown kind %d from pid %d (logged once per session)",
					m.Kind, ss.s.PeerPID())
			}
		}
	}
	ss.mu.Lock()
	conns := make([]*serverConn, 0, len(ss.conns))
	for _, c := range ss.conns {
		conns = append(conns, c)
	}
	ss.mu.Unlock()
	for _, c := range conns {
		c.closeInput()
	}
	ss.wg.Wait()
	ss.s.Close()
}

// maxServerConns bounds the virtual connections (each a goroutine) one
// session may have open: a client that exceeds it is broken or hostile.
const maxServerConns = 1 << 16

// conn returns the virtual connection id, starting it if new; nil if the
// session has too many.
func (ss *serverSession) conn(id uint64) *serverConn {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if c := ss.conns[id]; c != nil {
		return c
	}
	if len(ss.conns) >= maxServerConns {
		return nil
	}
	c := &serverConn{ss: ss, id: id, signal: make(chan struct{}, 1)}
	ss.conns[id] = c
	ss.wg.Add(1)
	counters.serverConns.Add(1)
	go c.run()
	return c
}

// goAway asks the client to open no new calls on this session.
func (ss *serverSession) goAway() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := ss.s.Send(ctx, 0, 0, codec.KindGoAway); err != nil && !errors.Is(err, shm.ErrClosed) {
		klog.Warnf("kshm: sending go-away: %v", err)
	}
}

// serverConn is the server side of a virtual connection.
type serverConn struct {
	ss *serverSession
	id uint64

	mu      sync.Mutex // guards queue, closing
	queue   []shm.Message
	closing bool
	signal  chan struct{} // capacity 1: queue or closing changed

	// The request being served, touched only by run's goroutine (and the
	// trans handler it calls).
	cur    shm.Message
	callID uint64
}

func (c *serverConn) push(m shm.Message) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		c.ss.s.Release(&m)
		return
	}
	c.queue = append(c.queue, m)
	c.ss.ts.queued.Add(1)
	c.mu.Unlock()
	c.wake()
}

func (c *serverConn) closeInput() {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.wake()
}

func (c *serverConn) wake() {
	select {
	case c.signal <- struct{}{}:
	default:
	}
}

// next waits for the next request; false once the connection is closing
// and its queue is empty.
func (c *serverConn) next() (shm.Message, bool) {
	for {
		c.mu.Lock()
		if len(c.queue) > 0 {
			m := c.queue[0]
			c.queue[0] = shm.Message{}
			c.queue = c.queue[1:]
			c.ss.ts.queued.Add(-1)
			c.mu.Unlock()
			return m, true
		}
		if c.closing {
			c.mu.Unlock()
			return shm.Message{}, false
		}
		c.mu.Unlock()
		<-c.signal
	}
}

// run serves the connection's requests in order: OnActive once, OnRead per
// request, OnInactive once.
func (c *serverConn) run() {
	ts := c.ss.ts
	defer func() {
		c.mu.Lock()
		c.closing = true
		rest := c.queue
		c.queue = nil
		c.ss.ts.queued.Add(-int64(len(rest)))
		c.mu.Unlock()
		for i := range rest {
			c.ss.s.Release(&rest[i])
		}
		c.ss.mu.Lock()
		delete(c.ss.conns, c.id)
		c.ss.mu.Unlock()
		counters.serverConns.Add(-1)
		c.ss.wg.Done()
	}()
	ctx, err := ts.hdl.OnActive(context.Background(), c)
	if err != nil {
		ts.hdl.OnError(ctx, err, c)
		return
	}
	defer ts.hdl.OnInactive(ctx, c)
	for {
		m, ok := c.next()
		if !ok {
			return
		}
		c.cur, c.callID = m, m.ID
		ts.inflight.Add(1)
		err := ts.onRead(ctx, c)
		c.ss.s.Release(&c.cur) // idempotent: covers paths that never decoded it
		c.cur = shm.Message{}
		ts.inflight.Add(-1)
		counters.callsServed.Add(1)
		if err != nil {
			if !errors.Is(err, shm.ErrClosed) {
				ts.hdl.OnError(ctx, err, c)
			}
			return
		}
	}
}

func (c *serverConn) newWriteBuffer(ctx context.Context) remote.ByteBuffer {
	return codec.NewWriteBuffer(ctx, c.ss.s, c.callID, c.id, codec.KindResponse)
}

// IsActive implements remote.IsActive.
func (c *serverConn) IsActive() bool {
	select {
	case <-c.ss.s.Done():
		return false
	default:
		return true
	}
}

func (c *serverConn) Read([]byte) (int, error)  { return 0, errNotStream }
func (c *serverConn) Write([]byte) (int, error) { return 0, errNotStream }
func (c *serverConn) Close() error {
	c.closeInput()
	return nil
}
func (c *serverConn) LocalAddr() net.Addr              { return c.ss.ts.unixAddr }
func (c *serverConn) RemoteAddr() net.Addr             { return c.ss.ts.unixAddr }
func (c *serverConn) SetDeadline(time.Time) error      { return nil }
func (c *serverConn) SetReadDeadline(time.Time) error  { return nil }
func (c *serverConn) SetWriteDeadline(time.Time) error { return nil }
func (c *serverConn) String() string {
	return fmt.Sprintf("kshm server vconn %d (peer pid %d)", c.id, c.ss.s.PeerPID())
}

// plainConn is a non-kshm Kitex connection accepted on the unix socket. The
// bytes read to look for the kshm preface are replayed before the rest.
type plainConn struct {
	net.Conn
	r      *bufiox.DefaultReader
	w      *bufiox.DefaultWriter
	closed atomic.Bool
}

func newPlainConn(conn net.Conn, prefix []byte) *plainConn {
	var src io.Reader = conn
	if len(prefix) > 0 {
		src = io.MultiReader(bytes.NewReader(prefix), conn)
	}
	return &plainConn{Conn: conn, r: bufiox.NewDefaultReader(src), w: bufiox.NewDefaultWriter(conn)}
}

// Reader and Writer let Kitex's gonet extension make the buffers.
func (c *plainConn) Reader() *bufiox.DefaultReader { return c.r }
func (c *plainConn) Writer() *bufiox.DefaultWriter { return c.w }

func (c *plainConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func (c *plainConn) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	return c.Conn.Close()
}

// IsActive implements remote.IsActive.
func (c *plainConn) IsActive() bool { return !c.closed.Load() }

var (
	_ remote.IsActive = (*serverConn)(nil)
	_ remote.IsActive = (*plainConn)(nil)
)
