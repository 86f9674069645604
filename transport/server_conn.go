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

// serverSession serves one kshm session with leader/followers. One worker
// goroutine at a time holds the receiving role and calls Recv. When it
// receives a request for a virtual connection that nobody is serving, it
// serves the request itself (Kitex's OnRead on its own goroutine: no
// hand-off). Before that it hands the receiving role on, to a parked
// follower (or a new worker), only when more messages are already waiting
// (shm.Session.Waiting), so that concurrent calls are served in parallel.
// Otherwise the role stays free while it serves, and it takes the role back
// when done (or another worker does, when it finishes first); if serving
// outlasts standbyAfter (standbyOneConn when the session has one
// connection), a follower takes the free role, so a slow call never holds
// up the others for long.
//
// A request for a connection that is being served is queued on it, and the
// worker serving it serves it next: a connection's requests are served in
// order, one at a time, by one worker at a time (Kitex's contract: OnActive
// once before the first OnRead, OnRead never concurrent, OnInactive once).
type serverSession struct {
	ts   *TransServer
	s    *shm.Session
	peer net.Addr // the client, as RemoteAddr names it

	// mu guards conns, receiving, parked, busy, ended and the
	// queue and busy fields of every serverConn.
	mu        sync.Mutex
	conns     map[uint64]*serverConn
	receiving bool      // a worker holds the receiving role
	parked    []*worker // followers waiting for the role, most recent last
	busy      int       // connections being served
	ended     bool      // the session ended: workers exit
	wg        sync.WaitGroup
	standby   *time.Timer // gives the free role to a follower (standbyFired)

	warned  bool          // unknown message kind logged; touched by the role's holder
	acked   chan struct{} // closed when the client acknowledged a go-away
	ackOnce sync.Once
}

const (
	// maxParkedWorkers bounds the idle worker goroutines a session keeps.
	maxParkedWorkers = 4
	// standbyAfter is how long the receiving role may stay free while its
	// last holder serves a call; standbyOneConn when the session has a
	// single virtual connection, which cannot send another request before
	// this one is answered (only a new connection can), so that a call
	// longer than standbyAfter at c=1 (a large message) wakes nobody.
	standbyAfter   = 500 * time.Microsecond
	standbyOneConn = 5 * time.Millisecond
)

// worker is a goroutine of a session's pool.
type worker struct {
	wake chan struct{} // capacity 1: handed the receiving role while parked
}

func newWorker() *worker { return &worker{wake: make(chan struct{}, 1)} }

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

// serve runs the session until it ends: this goroutine is its first
// worker; then it waits for every worker, ends the connections left and
// closes the session.
func (ss *serverSession) serve() {
	ss.peer = newPeerAddr(ss.s.PeerPID(), ss.s.PeerUID())
	ss.standby = time.AfterFunc(time.Hour, ss.standbyFired)
	ss.standby.Stop()
	ss.mu.Lock()
	ss.receiving = true
	ss.mu.Unlock()
	ss.wg.Add(1)
	ss.work(newWorker(), true)
	ss.wg.Wait()
	ss.mu.Lock()
	ss.ended = true
	conns := make([]*serverConn, 0, len(ss.conns))
	for _, c := range ss.conns {
		conns = append(conns, c)
	}
	clear(ss.conns)
	ss.mu.Unlock()
	ss.standby.Stop()
	for _, c := range conns {
		c.finish()
	}
	ss.s.Close()
}

// work is a worker's loop: receive while holding the role, serve what it
// received, take the role back or park.
func (ss *serverSession) work(w *worker, lead bool) {
	defer ss.wg.Done()
	for {
		if !lead && !ss.park(w) {
			return
		}
		lead = false
		c := ss.receive()
		if c == nil {
			return
		}
		ss.serveConn(c)
		lead = ss.retake()
	}
}

// park waits until the worker is handed the receiving role (true), or the
// session ends or enough workers are parked already (false: exit). It takes
// a free role at once.
func (ss *serverSession) park(w *worker) bool {
	ss.mu.Lock()
	if ss.ended || ss.receiving && len(ss.parked) >= maxParkedWorkers {
		ss.mu.Unlock()
		return false
	}
	if !ss.receiving {
		ss.receiving = true
		ss.standby.Stop()
		ss.mu.Unlock()
		return true
	}
	ss.parked = append(ss.parked, w)
	ss.mu.Unlock()
	select {
	case <-w.wake:
		return true
	case <-ss.s.Done():
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for i, p := range ss.parked {
		if p == w {
			ss.parked = append(ss.parked[:i], ss.parked[i+1:]...)
			return false
		}
	}
	// Handed the role as the session ended: take it, Recv reports the end.
	select {
	case <-w.wake:
	default:
	}
	return true
}

// retake takes the receiving role back after serving if it is free.
func (ss *serverSession) retake() bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.receiving || ss.ended {
		return false
	}
	ss.receiving = true
	ss.standby.Stop()
	return true
}

// passRoleLocked hands the receiving role to the most recently parked
// worker, or to a new one. The caller holds the role; ss.mu held.
func (ss *serverSession) passRoleLocked() {
	if n := len(ss.parked); n > 0 {
		w := ss.parked[n-1]
		ss.parked[n-1] = nil
		ss.parked = ss.parked[:n-1]
		select {
		case w.wake <- struct{}{}:
		default:
		}
		return
	}
	ss.wg.Add(1)
	go ss.work(newWorker(), true)
}

// standbyFired runs when the role has been free for standbyAfter: a
// follower takes it.
func (ss *serverSession) standbyFired() {
	ss.mu.Lock()
	if !ss.receiving && !ss.ended {
		ss.receiving = true
		ss.passRoleLocked()
	}
	ss.mu.Unlock()
}

// receive holds the receiving role until it has a connection to serve; it
// returns it marked busy, with the role released or handed on. nil: the
// session ended.
func (ss *serverSession) receive() *serverConn {
	for {
		m, err := ss.s.Recv(context.Background())
		if err != nil {
			if !errors.Is(err, shm.ErrClosed) {
				klog.Warnf("kshm: server session ended: %v", err)
			}
			ss.mu.Lock()
			ss.ended = true
			ss.receiving = false
			parked := ss.parked
			ss.parked = nil
			ss.mu.Unlock()
			for _, w := range parked {
				select {
				case w.wake <- struct{}{}:
				default:
				}
			}
			ss.s.Close()
			return nil
		}
		switch m.Kind {
		case codec.KindRequest, codec.KindCloseConn:
			if c := ss.route(m); c != nil {
				return c
			}
		case codec.KindGoAwayAck:
			ss.s.Release(&m)
			ss.ackOnce.Do(func() { close(ss.acked) })
		default:
			ss.s.Release(&m)
			if !ss.warned { // once per session: a broken peer must not flood the log
				ss.warned = true
				klog.Warnf("kshm: server dropped a message of unknown kind %d from pid %d (logged once per session)",
					m.Kind, ss.s.PeerPID())
			}
		}
	}
}

// route queues m on its connection. If no worker serves the connection, it
// marks it busy, releases or hands on the receiving role and returns it:
// the caller serves it.
func (ss *serverSession) route(m shm.Message) *serverConn {
	ss.mu.Lock()
	c := ss.conns[m.Aux]
	if c == nil {
		if m.Kind == codec.KindCloseConn { // already ended (by us)
			ss.mu.Unlock()
			ss.s.Release(&m)
			return nil
		}
		if len(ss.conns) >= maxServerConns {
			ss.mu.Unlock()
			ss.s.Release(&m)
			klog.Warnf("kshm: client pid %d opened more than %d virtual connections; closing its session",
				ss.s.PeerPID(), maxServerConns)
			ss.s.Close()
			return nil
		}
		c = &serverConn{ss: ss, id: m.Aux}
		ss.conns[m.Aux] = c
		counters.serverConns.Add(1)
	}
	c.queue = append(c.queue, m)
	if m.Kind == codec.KindRequest {
		ss.ts.queued.Add(1)
	}
	if c.busy {
		ss.mu.Unlock()
		return nil
	}
	c.busy = true
	ss.busy++
	if ss.s.Waiting() {
		ss.passRoleLocked()
	} else {
		ss.receiving = false
		if len(ss.conns) == 1 {
			ss.standby.Reset(standbyOneConn)
		} else {
			ss.standby.Reset(standbyAfter)
		}
	}
	ss.mu.Unlock()
	return c
}

// maxServerConns bounds the virtual connections one session may have open:
// a client that exceeds it is broken or hostile.
const maxServerConns = 1 << 16

// serveConn serves c's queued messages in order until none is left.
func (ss *serverSession) serveConn(c *serverConn) {
	for {
		ss.mu.Lock()
		if len(c.queue) == 0 || ss.sessionDone() {
			c.busy = false
			ss.busy--
			ss.mu.Unlock()
			return
		}
		m := c.queue[0]
		copy(c.queue, c.queue[1:])
		c.queue[len(c.queue)-1] = shm.Message{}
		c.queue = c.queue[:len(c.queue)-1]
		if m.Kind == codec.KindRequest {
			ss.ts.queued.Add(-1)
		}
		ss.mu.Unlock()
		if !c.process(m) {
			ss.mu.Lock()
			if ss.conns[c.id] == c {
				delete(ss.conns, c.id)
			}
			rest := c.queue
			c.queue = nil
			c.busy = false
			ss.busy--
			ss.mu.Unlock()
			c.drop(rest)
			counters.serverConns.Add(-1)
			return
		}
	}
}

func (ss *serverSession) sessionDone() bool {
	select {
	case <-ss.s.Done():
		return true
	default:
		return false
	}
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

	queue []shm.Message // requests and closes not yet served (ss.mu)
	busy  bool          // a worker is serving it (ss.mu)

	// Touched only by the worker serving the connection (one at a time,
	// ordered by ss.mu) and the trans handler it calls.
	ctx        context.Context // from OnActive
	active     bool            // OnActive succeeded, OnInactive not yet called
	cur        shm.Message     // the request being served
	callID     uint64
	lastInline bool // the last response went over the session socket

	closing atomic.Bool // Close was called: end after the current request
}

// process serves one message of the connection; false when the connection
// ended.
func (c *serverConn) process(m shm.Message) bool {
	ts := c.ss.ts
	if m.Kind == codec.KindCloseConn {
		c.ss.s.Release(&m)
		c.end()
		return false
	}
	if !c.active {
		ctx, err := ts.hdl.OnActive(context.Background(), c)
		c.ctx, c.active = ctx, true
		if err != nil {
			// A connection limiter, typically. Kitex's servers close the
			// connection, which calls OnInactive (the limiter releases
			// there what its OnActive counted): so do we.
			ts.hdl.OnError(ctx, err, c)
			c.ss.s.Release(&m)
			c.reject(m.ID)
			c.end()
			return false
		}
	}
	c.cur, c.callID = m, m.ID
	ts.inflight.Add(1)
	err := ts.onRead(c.ctx, c)
	c.ss.s.Release(&c.cur) // idempotent: covers paths that never decoded it
	c.cur = shm.Message{}
	ts.inflight.Add(-1)
	counters.callsServed.Add(1)
	if err == nil && c.closing.Load() {
		err = errConnClosed
	}
	if err != nil {
		// Kitex closes a connection whose OnRead failed (a QPS limiter, a
		// request it could not decode, a panic): so do we, and the client
		// learns at once.
		if !errors.Is(err, shm.ErrClosed) && !errors.Is(err, errConnClosed) {
			ts.hdl.OnError(c.ctx, err, c)
		}
		c.reject(m.ID)
		c.end()
		return false
	}
	return true
}

// end calls OnInactive once, if OnActive succeeded.
func (c *serverConn) end() {
	if c.active {
		c.active = false
		c.ss.ts.hdl.OnInactive(c.ctx, c)
	}
}

// reject tells the client that the server ended the connection without
// answering call id: its call fails at once. It goes the way the last
// response went, so it never overtakes it.
func (c *serverConn) reject(id uint64) {
	s := c.ss.s
	if c.ss.sessionDone() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var err error
	if c.lastInline {
		err = s.SendInline(ctx, id, c.id, codec.KindConnClosed, nil)
	} else {
		err = s.Send(ctx, id, c.id, codec.KindConnClosed)
	}
	if err != nil && !errors.Is(err, shm.ErrClosed) {
		klog.Warnf("kshm: telling client pid %d that vconn %d closed: %v", s.PeerPID(), c.id, err)
	}
}

// drop releases messages that will not be served.
func (c *serverConn) drop(rest []shm.Message) {
	for i := range rest {
		if rest[i].Kind == codec.KindRequest {
			c.ss.ts.queued.Add(-1)
		}
		c.ss.s.Release(&rest[i])
	}
}

// finish ends a connection left when the session ended (no worker is left).
func (c *serverConn) finish() {
	rest := c.queue
	c.queue = nil
	c.drop(rest)
	c.end()
	counters.serverConns.Add(-1)
}

func (c *serverConn) newWriteBuffer(ctx context.Context) remote.ByteBuffer {
	wb := codec.NewWriteBuffer(ctx, c.ss.s, c.callID, c.id, codec.KindResponse)
	wb.ReportInline(&c.lastInline)
	return wb
}

// IsActive implements remote.IsActive.
func (c *serverConn) IsActive() bool {
	return !c.closing.Load() && !c.ss.sessionDone()
}

func (c *serverConn) Read([]byte) (int, error)  { return 0, errNotStream }
func (c *serverConn) Write([]byte) (int, error) { return 0, errNotStream }

// Close ends the connection after the request being served: the client's
// call on it, if it gets no response, fails at once.
func (c *serverConn) Close() error {
	c.closing.Store(true)
	return nil
}
func (c *serverConn) LocalAddr() net.Addr              { return c.ss.ts.unixAddr }
func (c *serverConn) RemoteAddr() net.Addr             { return c.ss.peer }
func (c *serverConn) SetDeadline(time.Time) error      { return nil }
func (c *serverConn) SetReadDeadline(time.Time) error  { return nil }
func (c *serverConn) SetWriteDeadline(time.Time) error { return nil }
func (c *serverConn) String() string {
	return fmt.Sprintf("kshm server vconn %d (peer pid %d)", c.id, c.ss.s.PeerPID())
}

// peerAddr is the RemoteAddr of a server-side virtual connection: the
// client process, by its pid and uid from SO_PEERCRED, so that ACL
// middleware and access logs see who called. Network() is "kshm";
// String() is "kshm:pid=1234,uid=1000".
type peerAddr struct{ s string }

func newPeerAddr(pid int, uid uint32) *peerAddr {
	return &peerAddr{s: fmt.Sprintf("kshm:pid=%d,uid=%d", pid, uid)}
}

func (a *peerAddr) Network() string { return "kshm" }
func (a *peerAddr) String() string  { return a.s }

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
