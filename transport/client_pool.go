package transport

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudwego/kitex/pkg/klog"
	"github.com/cloudwego/kitex/pkg/remote"

	"github.com/shmkit/kshm/shm"
)

// ClientPool hands out virtual connections over a few shm sessions to one
// socket path. Dead sessions are re-established in the background with
// exponential backoff; calls meanwhile fall back. Every session starts with
// the server's announcement of the addresses it serves (see RoutePool).
//
// Kitex clients do not use it directly: a RoutePool per Kitex client shares
// one ClientPool per socket path and configuration with every other Kitex
// client of the process (acquirePool). Used directly as a Kitex pool, it
// sends every call over its sessions and the rest to fallback, whatever the
// address.
type ClientPool struct {
	cfg      Config
	path     string
	fallback remote.ConnPool // nil in a shared pool

	key  string // registry key; refs guarded by the registry's lock
	refs int

	slots []*slot
	next  atomic.Uint32 // round robin over slots

	mu       sync.Mutex // guards sessions, users, closed
	sessions map[*clientSession]struct{}
	users    map[*RoutePool]struct{} // Kitex clients sharing this pool
	closed   bool
	done     chan struct{}   // closed by Close
	ctx      context.Context // canceled by Close: bounds background dials
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

// slot holds one of the pool's sessions, or the job of re-establishing it.
type slot struct {
	mu           sync.Mutex // guards cur, ann, tried, reconnecting; held during a first, synchronous dial
	cur          *clientSession
	ann          *announce // what cur's server announced
	tried        bool
	reconnecting bool
}

// NewClientPool returns a pool dialing path with cfg; fallback serves calls
// that cannot use shared memory and receives Put/Discard of its own
// connections.
func NewClientPool(cfg Config, path string, fallback remote.ConnPool) *ClientPool {
	p := &ClientPool{
		cfg:      cfg,
		path:     path,
		fallback: fallback,
		sessions: make(map[*clientSession]struct{}),
		users:    make(map[*RoutePool]struct{}),
		done:     make(chan struct{}),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.slots = make([]*slot, cfg.Sessions)
	for i := range p.slots {
		p.slots[i] = &slot{}
	}
	if cfg.MaxIdleTimeout > 0 {
		p.wg.Add(1)
		go p.reapIdle()
	}
	return p
}

// reapIdle closes virtual connections idle for MaxIdleTimeout (Kitex's
// long-pool setting): each tick, the connections at the bottom of a
// session's idle stack that were there, in the same order, at the previous
// tick (calls take and return connections at the top). A connection is
// closed after one to two MaxIdleTimeout of idleness.
func (p *ClientPool) reapIdle() {
	defer p.wg.Done()
	t := time.NewTicker(p.cfg.MaxIdleTimeout)
	defer t.Stop()
	prev := map[*clientSession][]*clientConn{}
	for {
		select {
		case <-p.done:
			return
		case <-t.C:
		}
		p.mu.Lock()
		sessions := make([]*clientSession, 0, len(p.sessions))
		for cs := range p.sessions {
			sessions = append(sessions, cs)
		}
		p.mu.Unlock()
		next := make(map[*clientSession][]*clientConn, len(sessions))
		for _, cs := range sessions {
			cs.mu.Lock()
			old := prev[cs]
			k := 0
			for k < len(old) && k < len(cs.idle) && cs.idle[k] == old[k] {
				k++
			}
			stale := append([]*clientConn(nil), cs.idle[:k]...)
			n := copy(cs.idle, cs.idle[k:])
			clear(cs.idle[n:])
			cs.idle = cs.idle[:n]
			next[cs] = append([]*clientConn(nil), cs.idle...)
			cs.mu.Unlock()
			for _, c := range stale {
				c.Close()
			}
		}
		prev = next
	}
}

// SocketPath is the path the pool dials.
func (p *ClientPool) SocketPath() string { return p.path }

// Get implements remote.ConnPool.
func (p *ClientPool) Get(ctx context.Context, network, address string, opt remote.ConnOption) (net.Conn, error) {
	if c := p.conn(ctx, nil); c != nil {
		return c, nil
	}
	counters.fallbackCalls.Add(1)
	if p.fallback == nil {
		return nil, errNoFallback
	}
	return p.fallback.Get(ctx, network, address, opt)
}

var errNoFallback = errors.New("kshm: no session and no fallback pool")

// conn returns a virtual connection over a session whose server serves
// target (any session when target is nil), or nil.
func (p *ClientPool) conn(ctx context.Context, target *target) *clientConn {
	if cs := p.session(ctx, target); cs != nil {
		return cs.getConn()
	}
	return nil
}

// session returns a usable session (whose server serves target, unless
// target is nil): the next slot's in round robin (dialing it if it was
// never tried), else any usable one.
func (p *ClientPool) session(ctx context.Context, target *target) *clientSession {
	n := uint32(len(p.slots))
	start := p.next.Add(1)
	sl := p.slots[start%n]
	if cs := sl.usable(target); cs != nil {
		return cs
	}
	if cs := p.firstDial(ctx, sl, target); cs != nil {
		return cs
	}
	for i := uint32(1); i < n; i++ {
		if cs := p.slots[(start+i)%n].usable(target); cs != nil {
			return cs
		}
	}
	return nil
}

// usable returns the slot's session if it takes calls for target.
func (sl *slot) usable(target *target) *clientSession {
	sl.mu.Lock()
	cs, ann := sl.cur, sl.ann
	sl.mu.Unlock()
	if cs != nil && cs.usable() && (target == nil || ann.serves(*target)) {
		return cs
	}
	return nil
}

// firstDial establishes a slot's session synchronously the first time it is
// needed, so that the first call already uses shared memory. It is bounded
// by Config.DialTimeout, not by Kitex's connect timeout (50 ms by default,
// shorter than creating and mapping two regions may take on a loaded
// machine; a failed dial only means fallback). Later attempts happen in the
// background.
func (p *ClientPool) firstDial(ctx context.Context, sl *slot, target *target) *clientSession {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.cur != nil && sl.cur.usable() && (target == nil || sl.ann.serves(*target)) {
		return sl.cur
	}
	if sl.tried || p.isClosed() {
		return nil
	}
	sl.tried = true
	cs, ann, err := p.dial(ctx, sl)
	if err != nil {
		p.logf("kshm: no session to %s, calls fall back to Kitex's transport: %v", p.path, err)
		p.startReconnect(sl)
		return nil
	}
	sl.cur, sl.ann = cs, ann
	if target != nil && !ann.serves(*target) {
		return nil
	}
	return cs
}

// dial establishes a session and reads the server's announcement before
// the session carries anything else.
func (p *ClientPool) dial(ctx context.Context, sl *slot) (*clientSession, *announce, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.DialTimeout)
	defer cancel()
	s, err := shm.Dial(ctx, p.path, p.cfg.Shm)
	if err != nil {
		return nil, nil, err
	}
	ann, err := recvAnnounce(ctx, s)
	if err != nil {
		s.Close()
		return nil, nil, err
	}
	cs := newClientSession(p, sl, s)
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		s.Close()
		return nil, nil, errPoolClosed
	}
	p.sessions[cs] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	counters.dialed.Add(1)
	counters.clientSessions.Add(1)
	go func() {
		defer p.wg.Done()
		cs.dispatch()
		counters.clientSessions.Add(-1)
		p.mu.Lock()
		delete(p.sessions, cs)
		p.mu.Unlock()
	}()
	return cs, ann, nil
}

var errPoolClosed = errors.New("kshm: connection pool closed")

// addUser and removeUser track the Kitex clients (RoutePools) sharing this
// pool, whose fallback connections a go-away must clean.
func (p *ClientPool) addUser(rp *RoutePool) {
	p.mu.Lock()
	p.users[rp] = struct{}{}
	p.mu.Unlock()
}

func (p *ClientPool) removeUser(rp *RoutePool) {
	p.mu.Lock()
	delete(p.users, rp)
	p.mu.Unlock()
}

// cleanFallbacks drops the idle plain-Kitex connections that the pool's
// users keep to its socket path. It runs when the server behind the path
// sends a go-away, before the acknowledgement: that server closes its plain
// connections once every session has acknowledged, and a call must not
// pick a pooled connection to it after that. New fallback connections dial
// the path again, which by then leads to the server that replaced it.
func (p *ClientPool) cleanFallbacks() {
	p.mu.Lock()
	users := make([]*RoutePool, 0, len(p.users))
	for rp := range p.users {
		users = append(users, rp)
	}
	p.mu.Unlock()
	for _, rp := range users {
		rp.Clean("unix", p.path)
	}
	if lp, ok := p.fallback.(remote.LongConnPool); ok {
		lp.Clean("unix", p.path)
	}
}

// lost is called when a session dies or is told to go away: its slot gets
// a new session in the background.
func (p *ClientPool) lost(cs *clientSession) {
	sl := cs.slot
	sl.mu.Lock()
	if sl.cur == cs {
		sl.cur = nil
	}
	if sl.cur == nil {
		p.startReconnect(sl)
	}
	sl.mu.Unlock()
}

// startReconnect starts the slot's reconnect loop unless it runs. sl.mu held.
func (p *ClientPool) startReconnect(sl *slot) {
	if sl.reconnecting {
		return
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.wg.Add(1)
	p.mu.Unlock()
	sl.reconnecting = true
	go p.reconnect(sl)
}

func (p *ClientPool) reconnect(sl *slot) {
	defer p.wg.Done()
	// The first attempt is immediate: after a go-away the socket usually
	// leads to the server that replaced this one already.
	backoff := p.cfg.ReconnectMin
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-p.done:
			sl.mu.Lock()
			sl.reconnecting = false
			sl.mu.Unlock()
			return
		case <-t.C:
		}
		cs, ann, err := p.dial(p.ctx, sl)
		if err == nil {
			sl.mu.Lock()
			sl.cur, sl.ann = cs, ann
			sl.reconnecting = false
			sl.mu.Unlock()
			klog.Infof("kshm: session to %s re-established", p.path)
			return
		}
		t.Reset(backoff)
		backoff *= 2
		if backoff > p.cfg.ReconnectMax {
			backoff = p.cfg.ReconnectMax
		}
	}
}

// Put implements remote.ConnPool.
func (p *ClientPool) Put(conn net.Conn) error {
	if c, ok := conn.(*clientConn); ok {
		c.cs.putConn(c)
		return nil
	}
	if p.fallback == nil {
		return conn.Close()
	}
	return p.fallback.Put(conn)
}

// Discard implements remote.ConnPool: the virtual connection is closed (its
// call, if unfinished, abandoned).
func (p *ClientPool) Discard(conn net.Conn) error {
	if c, ok := conn.(*clientConn); ok {
		c.Close()
		return nil
	}
	if p.fallback == nil {
		return conn.Close()
	}
	return p.fallback.Discard(conn)
}

// Clean implements remote.LongConnPool for the fallback connections.
func (p *ClientPool) Clean(network, address string) {
	if lp, ok := p.fallback.(remote.LongConnPool); ok {
		lp.Clean(network, address)
	}
}

// Close implements remote.ConnPool: it closes every session, stops the
// background work and waits for it, and closes the fallback pool.
func (p *ClientPool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	close(p.done)
	p.cancel()
	sessions := make([]*clientSession, 0, len(p.sessions))
	for cs := range p.sessions {
		sessions = append(sessions, cs)
	}
	p.mu.Unlock()
	for _, cs := range sessions {
		cs.s.Close()
	}
	p.wg.Wait()
	if p.fallback == nil {
		return nil
	}
	return p.fallback.Close()
}

func (p *ClientPool) isClosed() bool {
	p.mu.Lock()
	c := p.closed
	p.mu.Unlock()
	return c
}

func (p *ClientPool) logf(format string, a ...any) {
	if p.isClosed() {
		return
	}
	klog.Warnf(format, a...)
}

var _ remote.LongConnPool = (*ClientPool)(nil)
