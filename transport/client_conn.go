package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudwego/kitex/pkg/remote"

	"github.com/shmkit/kshm/codec"
	"github.com/shmkit/kshm/shm"
)

var (
	errConnClosed    = errors.New("kshm: virtual connection closed")
	errNotStream     = errors.New("kshm: virtual connections carry Kitex messages only; Read/Write are not supported")
	errSessionClosed = fmt.Errorf("kshm: session closed during the call: %w", shm.ErrClosed)
)

// result is what the dispatcher hands a waiting call: its response or the
// reason none will come.
type result struct {
	m   shm.Message
	err error
}

// clientConn is a virtual connection: one call at a time over a client
// session. Kitex gets it from ClientPool.Get and hands it back with Put or
// Discard.
type clientConn struct {
	cs *clientSession
	id uint64

	// Per call. Kitex uses a connection for one call at a time, so these are
	// touched by one goroutine at a time; the dispatcher reaches the
	// connection only through cs.pending (under cs.mu) and resp.
	callID   uint64
	deadline time.Time
	timer    *time.Timer
	msg      shm.Message // the response being decoded; released by the read buffer
	resp     chan result // capacity 1

	// lastInline: the last request went over the session socket, so the
	// close message must follow it there (socket and ring are not ordered).
	lastInline bool
	// out: handed to Kitex by ClientPool.Get and not yet back (cs.mu).
	out bool

	closed atomic.Bool
}

func newClientConn(cs *clientSession, id uint64) *clientConn {
	counters.clientConns.Add(1)
	return &clientConn{cs: cs, id: id, resp: make(chan result, 1)}
}

// IsActive implements remote.IsActive.
func (c *clientConn) IsActive() bool { return !c.closed.Load() && c.cs.usable() }

// startCall allocates a call id and, unless the call is oneway, registers
// the connection to receive the response to it.
func (c *clientConn) startCall(oneway bool) uint64 {
	c.drain() // never hand a stale response to a new call
	c.callID = c.cs.nextCall.Add(1)
	if !oneway {
		c.cs.register(c.callID, c)
	}
	return c.callID
}

// newWriteBuffer starts a call and returns the buffer its request is
// encoded into.
func (c *clientConn) newWriteBuffer(ctx context.Context, msg remote.Message) remote.ByteBuffer {
	oneway := false
	if ri := msg.RPCInfo(); ri != nil {
		if mi := ri.Invocation().MethodInfo(); mi != nil && mi.OneWay() {
			oneway = true
		}
	}
	id := c.startCall(oneway)
	wb := codec.NewWriteBuffer(ctx, c.cs.s, id, c.id, codec.KindRequest)
	wb.ReportInline(&c.lastInline)
	return wb
}

func (c *clientConn) setReadTimeout(d time.Duration) {
	if d > 0 {
		c.deadline = time.Now().Add(d)
	} else {
		c.deadline = time.Time{}
	}
}

// Wait implements codec.Source: it blocks until the response to the current
// call arrives, the read deadline passes, or the session dies.
func (c *clientConn) Wait() (*shm.Session, *shm.Message, error) {
	var expired <-chan time.Time
	if !c.deadline.IsZero() {
		d := time.Until(c.deadline)
		if d <= 0 {
			select {
			case r := <-c.resp:
				return c.accept(r)
			default:
				return nil, nil, shm.ErrTimeout
			}
		}
		if c.timer == nil {
			c.timer = time.NewTimer(d)
		} else {
			c.timer.Reset(d)
		}
		expired = c.timer.C
		defer c.timer.Stop()
	}
	select {
	case r := <-c.resp:
		return c.accept(r)
	case <-expired:
		return nil, nil, shm.ErrTimeout
	}
}

func (c *clientConn) accept(r result) (*shm.Session, *shm.Message, error) {
	if r.err != nil {
		return nil, nil, r.err
	}
	c.msg = r.m
	return c.cs.s, &c.msg, nil
}

// drain releases a response nobody will read (a call that gave up).
func (c *clientConn) drain() {
	select {
	case r := <-c.resp:
		if r.err == nil {
			c.cs.s.Release(&r.m)
			counters.late.Add(1)
		}
	default:
	}
}

// abandon forgets the current call: a response arriving later is dropped
// by the dispatcher.
func (c *clientConn) abandon() {
	if c.callID != 0 {
		c.cs.unregister(c.callID)
	}
	c.drain()
}

// Close ends the virtual connection: the current call (if any) is abandoned
// and the server is told to end its side.
func (c *clientConn) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return errConnClosed
	}
	counters.clientConns.Add(-1)
	c.abandon()
	if c.timer != nil {
		c.timer.Stop()
	}
	c.cs.closeConn(c, c.lastInline)
	c.cs.checkIn(c)
	return nil
}

// net.Conn. Kitex reads and writes through the trans handler's buffers, never
// through these.

func (c *clientConn) Read([]byte) (int, error)  { return 0, errNotStream }
func (c *clientConn) Write([]byte) (int, error) { return 0, errNotStream }
func (c *clientConn) LocalAddr() net.Addr       { return c.cs.addr }
func (c *clientConn) RemoteAddr() net.Addr      { return c.cs.addr }
func (c *clientConn) SetDeadline(t time.Time) error {
	c.deadline = t
	return nil
}
func (c *clientConn) SetReadDeadline(t time.Time) error {
	c.deadline = t
	return nil
}
func (c *clientConn) SetWriteDeadline(time.Time) error { return nil }

func (c *clientConn) String() string {
	return fmt.Sprintf("kshm vconn %d on %s", c.id, c.cs.addr)
}

// clientSession is one shm session of a ClientPool with its dispatcher.
type clientSession struct {
	pool *ClientPool
	slot *slot
	s    *shm.Session
	addr *net.UnixAddr

	nextCall atomic.Uint64 // call ids: never reused within the session
	nextConn atomic.Uint64 // virtual connection ids

	mu       sync.Mutex // guards pending, idle, draining, dead, out, acked and clientConn.out
	pending  map[uint64]*clientConn
	idle     []*clientConn
	draining bool // server said go away: no new calls
	dead     bool
	out      int           // connections handed to Kitex and not yet back
	acked    bool          // the go-away was acknowledged
	done     chan struct{} // closed when the dispatcher has exited
}

func newClientSession(p *ClientPool, sl *slot, s *shm.Session) *clientSession {
	return &clientSession{
		pool:    p,
		slot:    sl,
		s:       s,
		addr:    &net.UnixAddr{Net: "unix", Name: p.path},
		pending: make(map[uint64]*clientConn),
		done:    make(chan struct{}),
	}
}

func (cs *clientSession) usable() bool {
	cs.mu.Lock()
	ok := !cs.dead && !cs.draining
	cs.mu.Unlock()
	return ok
}

// getConn returns an idle virtual connection or a new one; nil when the
// session takes no new calls.
func (cs *clientSession) getConn() *clientConn {
	cs.mu.Lock()
	if cs.dead || cs.draining {
		cs.mu.Unlock()
		return nil
	}
	cs.out++
	if n := len(cs.idle); n > 0 {
		c := cs.idle[n-1]
		cs.idle[n-1] = nil
		cs.idle = cs.idle[:n-1]
		c.out = true
		cs.mu.Unlock()
		return c
	}
	cs.mu.Unlock()
	c := newClientConn(cs, cs.nextConn.Add(1))
	c.out = true // not yet visible to anyone else
	return c
}

// checkIn records that Kitex gave c back; once the server asked us to go
// away and no call is left, it acknowledges, so the server can close the
// session without cutting a call off.
func (cs *clientSession) checkIn(c *clientConn) {
	cs.mu.Lock()
	ack := cs.checkInLocked(c)
	cs.mu.Unlock()
	if ack {
		cs.sendGoAwayAck()
	}
}

// checkInLocked does checkIn's accounting under cs.mu and reports whether
// the caller must send the acknowledgement.
func (cs *clientSession) checkInLocked(c *clientConn) bool {
	if !c.out {
		return false
	}
	c.out = false
	cs.out--
	ack := cs.draining && cs.out == 0 && !cs.acked && !cs.dead
	if ack {
		cs.acked = true
	}
	return ack
}

func (cs *clientSession) sendGoAwayAck() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := cs.s.Send(ctx, cs.nextCall.Add(1), 0, codec.KindGoAwayAck); err != nil && !errors.Is(err, shm.ErrClosed) {
		cs.pool.logf("kshm: acknowledging go-away: %v", err)
	}
}

// putConn keeps c for the next call, or closes it.
func (cs *clientSession) putConn(c *clientConn) {
	if c.closed.Load() {
		return
	}
	c.abandon() // a successful call has no pending entry left; be exact anyway
	cs.mu.Lock()
	if !cs.dead && !cs.draining && len(cs.idle) < cs.pool.cfg.MaxIdleConns {
		// Checked in and made idle at once: nobody can take it in between.
		ack := cs.checkInLocked(c)
		cs.idle = append(cs.idle, c)
		cs.mu.Unlock()
		if ack {
			cs.sendGoAwayAck()
		}
		return
	}
	cs.mu.Unlock()
	c.Close()
}

func (cs *clientSession) register(id uint64, c *clientConn) {
	cs.mu.Lock()
	if cs.dead {
		cs.mu.Unlock()
		c.resp <- result{err: errSessionClosed}
		return
	}
	cs.pending[id] = c
	cs.mu.Unlock()
}

func (cs *clientSession) unregister(id uint64) {
	cs.mu.Lock()
	delete(cs.pending, id)
	cs.mu.Unlock()
}

// closeConn tells the server the virtual connection is gone.
func (cs *clientSession) closeConn(c *clientConn, inline bool) {
	if !cs.usableForControl() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var err error
	if inline {
		err = cs.s.SendInline(ctx, cs.nextCall.Add(1), c.id, codec.KindCloseConn, nil)
	} else {
		err = cs.s.Send(ctx, cs.nextCall.Add(1), c.id, codec.KindCloseConn)
	}
	if err != nil && !errors.Is(err, shm.ErrClosed) {
		// The server ends the connection anyway when the session ends.
		cs.pool.logf("kshm: telling the server to close vconn %d: %v", c.id, err)
	}
}

func (cs *clientSession) usableForControl() bool {
	cs.mu.Lock()
	ok := !cs.dead
	cs.mu.Unlock()
	return ok
}

// dispatch routes responses to their calls until the session ends.
func (cs *clientSession) dispatch() {
	defer close(cs.done)
	warned := false
	for {
		m, err := cs.s.Recv(context.Background())
		if err != nil {
			cs.fail(err)
			return
		}
		switch m.Kind {
		case codec.KindResponse:
			cs.deliver(m)
		case codec.KindGoAway:
			cs.s.Release(&m)
			cs.goAway()
		default:
			cs.s.Release(&m)
			if !warned {
				warned = true
				cs.pool.logf("kshm: client dropped a message of unknown kind %d (logged once per session)", m.Kind)
			}
		}
	}
}

func (cs *clientSession) deliver(m shm.Message) {
	cs.mu.Lock()
	c := cs.pending[m.ID]
	if c != nil {
		delete(cs.pending, m.ID)
		select {
		case c.resp <- result{m: m}:
			cs.mu.Unlock()
			return
		default: // cannot happen: one call at a time per connection
		}
	}
	cs.mu.Unlock()
	// Nobody waits for it (the call timed out or its connection closed):
	// drop it and give the buffers back.
	cs.s.Release(&m)
	counters.late.Add(1)
}

func (cs *clientSession) goAway() {
	cs.mu.Lock()
	cs.draining = true
	idle := cs.idle
	cs.idle = nil
	ack := cs.out == 0 && !cs.acked && !cs.dead
	if ack {
		cs.acked = true
	}
	cs.mu.Unlock()
	for _, c := range idle {
		c.Close()
	}
	if ack {
		cs.sendGoAwayAck()
	}
	cs.pool.lost(cs)
}

// fail ends the session: every waiting call gets the error at once.
func (cs *clientSession) fail(err error) {
	cs.mu.Lock()
	cs.dead = true
	pending := cs.pending
	cs.pending = nil
	idle := cs.idle
	cs.idle = nil
	for _, c := range pending {
		select {
		case c.resp <- result{err: fmt.Errorf("%w (%v)", errSessionClosed, err)}:
		default:
		}
	}
	cs.mu.Unlock()
	for _, c := range idle {
		c.Close()
	}
	cs.s.Close()
	if !errors.Is(err, shm.ErrClosed) || !cs.pool.isClosed() {
		counters.lost.Add(1)
	}
	cs.pool.lost(cs)
}

var _ remote.IsActive = (*clientConn)(nil)
