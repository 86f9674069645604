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
	"github.com/cloudwego/netpoll"

	"github.com/shmkit/kshm/codec"
	"github.com/shmkit/kshm/shm"
)

var (
	errConnClosed = errors.New("kshm: virtual connection closed")
	errNotStream  = errors.New("kshm: virtual connections carry Kitex messages only; Read/Write are not supported")
	// errSessionClosed: the session ended with the call in flight. Like a
	// netpoll connection closed under a call, it is netpoll.ErrConnClosed
	// (and shm.ErrClosed), so Kitex classifies it as a closed connection.
	errSessionClosed = fmt.Errorf("kshm: session closed during the call: %w (%w)", shm.ErrClosed, netpoll.ErrConnClosed)
	// errConnReset: the server ended the virtual connection without
	// answering (KindConnClosed). It is what a Kitex client over netpoll
	// gets when the server closes its connection: netpoll.ErrConnClosed.
	errConnReset = fmt.Errorf("kshm: the server closed the virtual connection without a response: %w", netpoll.ErrConnClosed)
)

// result is the outcome of a call: its response or the reason none will
// come.
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
	// touched by one goroutine at a time.
	callID   uint64
	deadline time.Time
	timer    *time.Timer
	recvCtx  deadlineCtx // receive's context while the deadline is set
	msg      shm.Message // the response being decoded; released by the read buffer

	// The waiter's state, guarded by cs.mu.
	pendingID uint64        // call registered in cs.pending, 0 if none
	got       bool          // res holds the current call's outcome
	res       result        //
	lead      bool          // handed the receiving role while parked
	parked    bool          // in cs.followers
	wake      chan struct{} // capacity 1: got or lead was set while parked

	// lastInline: the last request went over the session socket, so the
	// close message must follow it there (socket and ring are not ordered).
	lastInline bool
	// out: handed to Kitex by ClientPool.Get and not yet back (cs.mu).
	out bool

	broken atomic.Bool // the server ended this virtual connection
	closed atomic.Bool
}

func newClientConn(cs *clientSession, id uint64) *clientConn {
	counters.clientConns.Add(1)
	return &clientConn{cs: cs, id: id, wake: make(chan struct{}, 1)}
}

// IsActive implements remote.IsActive.
func (c *clientConn) IsActive() bool {
	return !c.closed.Load() && !c.broken.Load() && c.cs.usable()
}

// startCall allocates a call id and, unless the call is oneway, registers
// the connection to receive the response to it.
func (c *clientConn) startCall(oneway bool) uint64 {
	c.callID = c.cs.nextCall.Add(1)
	c.cs.register(c, c.callID, oneway)
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
// call arrives, the read deadline passes, the server ends the virtual
// connection, or the session dies.
//
// The waiting goroutine receives from the session itself (leader/followers,
// see clientSession): when nobody else receives, it takes the receiving role
// and polls the session until its own response comes, handing responses of
// other calls to their owners on the way; otherwise it parks until the
// receiver hands it its response or the role. With one call in flight the
// caller reads its own response and no other goroutine runs.
func (c *clientConn) Wait() (*shm.Session, *shm.Message, error) {
	cs := c.cs
	cs.mu.Lock()
	for {
		if c.got {
			c.leaveLocked()
			r := c.takeLocked()
			cs.mu.Unlock()
			return c.accept(r)
		}
		if cs.dead {
			c.leaveLocked()
			cs.mu.Unlock()
			return nil, nil, errSessionClosed
		}
		if c.lead || !cs.receiving {
			if c.parked {
				cs.unparkLocked(c)
			}
			c.lead = false
			cs.receiving = true
			cs.mu.Unlock()
			return c.receive()
		}
		if !c.deadline.IsZero() && !time.Now().Before(c.deadline) {
			c.leaveLocked()
			cs.mu.Unlock()
			return nil, nil, shm.ErrTimeout
		}
		if !c.parked { // a spurious wake-up leaves it parked
			c.parked = true
			cs.followers = append(cs.followers, c)
		}
		cs.stopIdleReaderLocked()
		cs.mu.Unlock()
		timedOut := c.park()
		cs.mu.Lock()
		if timedOut && !c.got {
			c.leaveLocked()
			cs.mu.Unlock()
			return nil, nil, shm.ErrTimeout
		}
	}
}

// leaveLocked takes c out of the followers as its waiter leaves Wait
// without receiving; a role it was handed meanwhile goes on to the next
// follower. cs.mu held.
func (c *clientConn) leaveLocked() {
	if c.parked {
		c.cs.unparkLocked(c)
	}
	if c.lead {
		c.lead = false
		c.cs.passRoleLocked()
	}
}

// park blocks until the receiver signals (true) or the deadline passes.
func (c *clientConn) park() (timedOut bool) {
	if c.deadline.IsZero() {
		<-c.wake
		return false
	}
	d := time.Until(c.deadline)
	if d <= 0 {
		return true
	}
	if c.timer == nil {
		c.timer = time.NewTimer(d)
	} else {
		c.timer.Reset(d)
	}
	select {
	case <-c.wake:
		c.timer.Stop()
		return false
	case <-c.timer.C:
		return true
	}
}

// receive holds the session's receiving role until this call's outcome is
// known; it always leaves with the role passed on.
func (c *clientConn) receive() (*shm.Session, *shm.Message, error) {
	cs := c.cs
	ctx := context.Background()
	if !c.deadline.IsZero() {
		c.recvCtx.arm(c.deadline)
		defer c.recvCtx.disarm()
		ctx = &c.recvCtx
	}
	for {
		m, err := cs.s.Recv(ctx)
		switch {
		case err == nil:
			cs.handle(m)
		case errors.Is(err, shm.ErrTimeout) || (ctx.Err() != nil && !errors.Is(err, shm.ErrClosed)):
			// our deadline passed (Recv's own timer may fire before ctx's)
		default:
			cs.fail(err) // every waiter, this one included, fails at once
		}
		cs.mu.Lock()
		if c.got {
			r := c.takeLocked()
			cs.passRoleLocked()
			cs.mu.Unlock()
			return c.accept(r)
		}
		if err != nil {
			cs.passRoleLocked()
			dead := cs.dead
			cs.mu.Unlock()
			if dead {
				return nil, nil, errSessionClosed
			}
			return nil, nil, shm.ErrTimeout
		}
		cs.mu.Unlock()
	}
}

// takeLocked returns the call's outcome and clears it. cs.mu held.
func (c *clientConn) takeLocked() result {
	r := c.res
	c.res, c.got = result{}, false
	return r
}

// setLocked records the call's outcome and wakes its waiter if parked.
// cs.mu held.
func (c *clientConn) setLocked(r result) {
	c.res, c.got = r, true
	if c.parked {
		c.cs.unparkLocked(c)
		c.signal()
	}
}

func (c *clientConn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *clientConn) accept(r result) (*shm.Session, *shm.Message, error) {
	if r.err != nil {
		return nil, nil, r.err
	}
	c.msg = r.m
	return c.cs.s, &c.msg, nil
}

// dropLocked releases an outcome nobody will read (a call that gave up).
// cs.mu held.
func (c *clientConn) dropLocked() {
	if c.got {
		if c.res.err == nil {
			c.cs.s.Release(&c.res.m)
			counters.late.Add(1)
		}
		c.res, c.got = result{}, false
	}
}

// abandon forgets the current call: a response arriving later is dropped
// by whoever receives it.
func (c *clientConn) abandon() {
	cs := c.cs
	cs.mu.Lock()
	if c.pendingID != 0 {
		if cs.pending[c.pendingID] == c {
			delete(cs.pending, c.pendingID)
		}
		c.pendingID = 0
	}
	c.dropLocked()
	cs.mu.Unlock()
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

// clientSession is one shm session of a ClientPool.
//
// Receiving is leader/followers. At most one goroutine at a time holds the
// receiving role (receiving) and calls Recv: normally a caller waiting for
// its response (clientConn.Wait). It hands each message that is not its own
// to its owner, handles go-away and connection-closed messages itself, and
// when its own response comes passes the role to one parked follower, if
// there is one, or leaves it free. A waiter that finds the role taken parks
// until it is handed its response or the role. When no call has started for
// idleAfter, the session's idle reader (dispatch) takes the free role, so
// that a go-away or a late response is read with no call waiting; the next
// call that starts makes it step down.
type clientSession struct {
	pool *ClientPool
	slot *slot
	s    *shm.Session
	addr *net.UnixAddr

	nextCall atomic.Uint64 // call ids: never reused within the session
	nextConn atomic.Uint64 // virtual connection ids

	// mu guards pending, conns, idle, draining, dead, out, acked, receiving,
	// followers, started, idleCancel and the waiter state of every
	// clientConn (pendingID, got, res, lead, parked, out).
	mu         sync.Mutex
	pending    map[uint64]*clientConn // by call id
	conns      map[uint64]*clientConn // open virtual connections, by id
	idle       []*clientConn
	draining   bool // server said go away: no new calls
	dead       bool
	out        int  // connections handed to Kitex and not yet back
	acked      bool // the go-away was acknowledged
	receiving  bool // a goroutine holds the receiving role
	followers  []*clientConn
	started    uint64             // calls started, for the idle reader
	idleCancel context.CancelFunc // set while the idle reader holds the role

	warned atomic.Bool   // an unknown message kind was logged
	done   chan struct{} // closed when the idle reader has exited
}

// idleAfter is how long no call must have started before the idle reader
// takes the free receiving role.
const idleAfter = 20 * time.Millisecond

func newClientSession(p *ClientPool, sl *slot, s *shm.Session) *clientSession {
	return &clientSession{
		pool:    p,
		slot:    sl,
		s:       s,
		addr:    &net.UnixAddr{Net: "unix", Name: p.path},
		pending: make(map[uint64]*clientConn),
		conns:   make(map[uint64]*clientConn),
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
	defer cs.mu.Unlock()
	if cs.dead || cs.draining {
		return nil
	}
	cs.out++
	if n := len(cs.idle); n > 0 {
		c := cs.idle[n-1]
		cs.idle[n-1] = nil
		cs.idle = cs.idle[:n-1]
		c.out = true
		return c
	}
	c := newClientConn(cs, cs.nextConn.Add(1))
	c.out = true
	cs.conns[c.id] = c
	return c
}

// checkIn records that Kitex gave c back; once the server asked us to go
// away and no call is left, it acknowledges, so the server can close the
// session without cutting a call off.
func (cs *clientSession) checkIn(c *clientConn) {
	cs.mu.Lock()
	delete(cs.conns, c.id)
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
	if !cs.dead && !cs.draining && !c.broken.Load() && len(cs.idle) < cs.pool.cfg.MaxIdleConns {
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

// register makes c the receiver of call id's response (unless oneway) and
// asks the idle reader to step down: the caller will want the role.
func (cs *clientSession) register(c *clientConn, id uint64, oneway bool) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	c.dropLocked() // never hand a stale outcome to a new call
	cs.started++
	if oneway {
		return
	}
	cs.stopIdleReaderLocked()
	switch {
	case cs.dead:
		c.res, c.got = result{err: errSessionClosed}, true
	case c.broken.Load():
		c.res, c.got = result{err: errConnReset}, true
	default:
		cs.pending[id] = c
		c.pendingID = id
	}
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

// passRoleLocked hands the receiving role to the longest-parked follower,
// or leaves it free. cs.mu held by the role's holder.
func (cs *clientSession) passRoleLocked() {
	if len(cs.followers) == 0 {
		cs.receiving = false
		return
	}
	f := cs.followers[0]
	cs.unparkLocked(f)
	f.lead = true
	f.signal()
}

// unparkLocked removes c from the followers. cs.mu held.
func (cs *clientSession) unparkLocked(c *clientConn) {
	c.parked = false
	for i, f := range cs.followers {
		if f == c {
			copy(cs.followers[i:], cs.followers[i+1:])
			cs.followers[len(cs.followers)-1] = nil
			cs.followers = cs.followers[:len(cs.followers)-1]
			return
		}
	}
}

// stopIdleReaderLocked asks the idle reader to give up the role. cs.mu held.
func (cs *clientSession) stopIdleReaderLocked() {
	if cs.idleCancel != nil {
		cs.idleCancel()
		cs.idleCancel = nil
	}
}

// handle acts on one received message: a response goes to its call, a
// go-away or connection-closed message is acted on.
func (cs *clientSession) handle(m shm.Message) {
	switch m.Kind {
	case codec.KindResponse:
		cs.deliver(m)
	case codec.KindGoAway:
		cs.s.Release(&m)
		cs.goAway()
	case codec.KindConnClosed:
		cs.s.Release(&m)
		cs.connClosed(m.Aux)
	default:
		cs.s.Release(&m)
		if cs.warned.CompareAndSwap(false, true) {
			cs.pool.logf("kshm: client dropped a message of unknown kind %d (logged once per session)", m.Kind)
		}
	}
}

func (cs *clientSession) deliver(m shm.Message) {
	cs.mu.Lock()
	if c := cs.pending[m.ID]; c != nil {
		delete(cs.pending, m.ID)
		c.pendingID = 0
		c.setLocked(result{m: m})
		cs.mu.Unlock()
		return
	}
	cs.mu.Unlock()
	// Nobody waits for it (the call timed out or its connection closed):
	// drop it and give the buffers back.
	cs.s.Release(&m)
	counters.late.Add(1)
}

// connClosed: the server ended virtual connection id without answering.
// Its call in flight fails at once; the connection is never used again.
func (cs *clientSession) connClosed(id uint64) {
	cs.mu.Lock()
	c := cs.conns[id]
	if c == nil {
		cs.mu.Unlock()
		return
	}
	c.broken.Store(true)
	if c.pendingID != 0 {
		delete(cs.pending, c.pendingID)
		c.pendingID = 0
		c.setLocked(result{err: errConnReset})
	}
	wasIdle := false
	for i, ic := range cs.idle {
		if ic == c {
			cs.idle = append(cs.idle[:i], cs.idle[i+1:]...)
			wasIdle = true
			break
		}
	}
	cs.mu.Unlock()
	if wasIdle {
		c.Close()
	}
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
	cs.pool.cleanFallbacks()
	if ack {
		cs.sendGoAwayAck()
	}
	cs.pool.lost(cs)
}

// dispatch is the session's idle reader. It receives only while no call
// has started for idleAfter and nobody else receives, and it notices the
// session's end when nobody receives at all.
func (cs *clientSession) dispatch() {
	defer close(cs.done)
	t := time.NewTimer(idleAfter)
	defer t.Stop()
	var seen uint64
	for {
		select {
		case <-cs.s.Done():
			err := cs.s.Err()
			if err == nil {
				err = shm.ErrClosed
			}
			cs.fail(err)
			return
		case <-t.C:
		}
		cs.mu.Lock()
		if cs.dead {
			cs.mu.Unlock()
			return
		}
		if cs.receiving || cs.started != seen {
			seen = cs.started
			cs.mu.Unlock()
			t.Reset(idleAfter)
			continue
		}
		ctx, cancel := context.WithCancel(context.Background())
		cs.receiving = true
		cs.idleCancel = cancel
		cs.mu.Unlock()
		cs.readIdle(ctx)
		cancel()
		cs.mu.Lock()
		cs.idleCancel = nil
		if !cs.dead {
			cs.passRoleLocked()
		}
		seen = cs.started
		cs.mu.Unlock()
		t.Reset(idleAfter)
	}
}

// readIdle receives until ctx is canceled (a call wants the role) or the
// session ends.
func (cs *clientSession) readIdle(ctx context.Context) {
	for {
		m, err := cs.s.Recv(ctx)
		if err != nil {
			if errors.Is(err, shm.ErrClosed) || (ctx.Err() == nil && !errors.Is(err, shm.ErrTimeout)) {
				cs.fail(err)
			}
			return
		}
		cs.handle(m)
	}
}

// fail ends the session: every waiting call gets the error at once.
func (cs *clientSession) fail(err error) {
	cs.mu.Lock()
	if cs.dead {
		cs.mu.Unlock()
		return
	}
	cs.dead = true
	callErr := fmt.Errorf("%w (%v)", errSessionClosed, err)
	for id, c := range cs.pending {
		delete(cs.pending, id)
		c.pendingID = 0
		c.setLocked(result{err: callErr})
	}
	for _, f := range cs.followers { // none should be left; never strand one
		f.parked = false
		f.signal()
	}
	cs.followers = nil
	cs.stopIdleReaderLocked()
	idle := cs.idle
	cs.idle = nil
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
