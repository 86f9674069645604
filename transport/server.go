package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudwego/kitex/pkg/klog"
	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/utils"

	"github.com/shmkit/kshm/shm"
)

// NewTransServerFactory wraps the server's trans server factory (Kitex's
// netpoll one by default). The TransServer it makes runs the wrapped server
// on the server's usual address and, beside it, accepts on a unix socket:
// kshm sessions (told by their preface) and plain Kitex connections.
//
// service returns the server's service name when the socket path is derived
// (called at Run). handlers is the factory that NewSvrTransHandlerFactory
// returned for the same server: the server must use it.
func NewTransServerFactory(inner remote.TransServerFactory, cfg Config, service func() string,
	handlers remote.ServerTransHandlerFactory,
) remote.TransServerFactory {
	f, _ := handlers.(*svrFactory)
	return &transServerFactory{inner: inner, cfg: cfg, service: service, handlers: f}
}

type transServerFactory struct {
	inner    remote.TransServerFactory
	cfg      Config
	service  func() string
	handlers *svrFactory
}

func (f *transServerFactory) NewTransServer(opt *remote.ServerOption, hdl remote.ServerTransHandler) remote.TransServer {
	ts := &TransServer{
		opt:      opt,
		hdl:      hdl,
		cfg:      f.cfg,
		service:  f.service,
		stopc:    make(chan struct{}),
		sessions: make(map[*serverSession]struct{}),
		plain:    make(map[*plainConn]struct{}),
		accepted: make(map[net.Conn]struct{}),
	}
	if f.handlers == nil || !f.handlers.made.Load() {
		ts.initErr = fmt.Errorf("%w: WithServerShmIPC: the server's trans handler factory was replaced after "+
			"WithServerShmIPC; put WithServerShmIPC after server.WithTransHandlerFactory", ErrConflict)
	}
	if f.inner != nil {
		ts.inner = f.inner.NewTransServer(opt, hdl)
	}
	return ts
}

// TransServer is the composite trans server of WithServerShmIPC.
type TransServer struct {
	opt     *remote.ServerOption
	hdl     remote.ServerTransHandler
	cfg     Config
	inner   remote.TransServer
	service func() string
	initErr error

	// Set when the socket is published (listenUnix), read-only after.
	path     string        // the socket
	unixAddr *net.UnixAddr // path as an address
	alias    string        // the service-name symlink to it, "" if none
	ann      *announce     // what every session is told first

	refusedOnce sync.Once     // logging of the first session refused for a limit
	stopc       chan struct{} // closed by Shutdown

	inflight     atomic.Int64 // requests being served on the unix socket
	queued       atomic.Int64 // requests received on sessions, not yet being served
	shuttingDown atomic.Bool

	mu          sync.Mutex // guards ln, lnFile, sessions, plain, accepted
	ln          *net.UnixListener
	lnFile      os.FileInfo // the socket file ln created
	sessions    map[*serverSession]struct{}
	handshaking int // sessions in their handshake (counted against the limits)
	plain       map[*plainConn]struct{}
	accepted    map[net.Conn]struct{} // conns still reading their preface
	wg          sync.WaitGroup        // accept loop and connection goroutines
}

// SocketPath is where the server accepts kshm sessions (known once the
// server listens).
func (ts *TransServer) SocketPath() string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.path
}

// CreateListener implements remote.TransServer: the usual address's listener
// from the wrapped server, and the unix socket.
func (ts *TransServer) CreateListener(addr net.Addr) (net.Listener, error) {
	if ts.initErr != nil {
		return nil, ts.initErr
	}
	if addr != nil && addr.Network() == "unix" && ts.cfg.SocketPath != "" && addr.String() == ts.cfg.SocketPath {
		return nil, fmt.Errorf("%w: WithSocketPath: %s is also the server's service address", ErrBadConfig, ts.cfg.SocketPath)
	}
	ln, err := ts.inner.CreateListener(addr)
	if err != nil {
		return nil, err
	}
	if err := ts.listenUnix(ln.Addr()); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// listenUnix publishes the unix socket: at WithSocketPath, or else in
// LocalDir under the name of the service address addr (with a symlink
// named for the service, for clients that have no address). Whatever socket
// was there is replaced atomically: a server still running on it keeps its
// sessions until it stops (see the upgrade procedure in the README).
// errStopped: the server was stopped before it started serving.
var errStopped = errors.New("kshm: server stopped before it served")

func (ts *TransServer) listenUnix(addr net.Addr) error {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.shuttingDown.Load() {
		return errStopped
	}
	if ts.ln != nil {
		return nil
	}
	path, alias := ts.cfg.SocketPath, ""
	if path == "" {
		if _, err := ensureLocalDir(); err != nil {
			return err
		}
		p, err := LocalSocketPath(addr)
		if err != nil {
			return err
		}
		path = p
		if name := ts.service(); name != "" {
			if a, err := DefaultSocketPath(name); err == nil {
				alias = a
			}
		}
	}
	ln, fi, err := bindReplace(path, ts.cfg.Shm.SocketMode, shm.ListenUnix)
	if err != nil {
		return err
	}
	if alias != "" {
		if err := publishAlias(alias, path); err != nil {
			klog.Warnf("kshm: service alias %s: %v", alias, err)
			alias = ""
		}
	}
	ts.ln, ts.lnFile, ts.path, ts.alias = ln, fi, path, alias
	ts.unixAddr = &net.UnixAddr{Net: "unix", Name: path}
	ts.ann = newAnnounce(addr)
	return nil
}

// BootstrapServer implements remote.TransServer: it starts accepting on the
// unix socket, then runs the wrapped server until it stops.
func (ts *TransServer) BootstrapServer(ln net.Listener) error {
	if ts.initErr != nil {
		return ts.initErr
	}
	var addr net.Addr
	if ln != nil {
		addr = ln.Addr()
	}
	if err := ts.listenUnix(addr); err != nil { // a listener given by server.WithListener skips CreateListener
		if errors.Is(err, errStopped) {
			// Stop ran before Kitex started serving: start nothing, or
			// the netpoll server would serve (and Run block) after it.
			return nil
		}
		return err
	}
	ts.mu.Lock()
	uln, path := ts.ln, ts.path
	ts.mu.Unlock()
	klog.Infof("KITEX: kshm server accepting on %s", path)
	ts.wg.Add(2)
	go ts.acceptLoop(uln)
	go ts.watchSocket()
	if ts.shuttingDown.Load() {
		return nil
	}
	return ts.inner.BootstrapServer(ln)
}

// watchSocket takes the socket path back when the server that replaced
// this one is gone (killed during a handover, or stopped and removed its
// socket) while this one still runs: clients then return to a live server.
func (ts *TransServer) watchSocket() {
	defer ts.wg.Done()
	t := time.NewTicker(watchInterval)
	defer t.Stop()
	for {
		select {
		case <-ts.stopc:
			return
		case <-t.C:
		}
		ts.mu.Lock()
		path, ours := ts.path, ts.lnFile
		ts.mu.Unlock()
		if ours == nil {
			return
		}
		fi, err := os.Stat(path)
		if err == nil && os.SameFile(fi, ours) {
			continue
		}
		if err == nil {
			// Another server's socket: leave it while it accepts. (Closing
			// at once, before sending anything, is not logged there.)
			c, derr := net.DialTimeout("unix", path, time.Second)
			if derr == nil {
				c.Close()
				continue
			}
			if !errors.Is(derr, syscall.ECONNREFUSED) && !errors.Is(derr, os.ErrNotExist) {
				continue
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := ts.republish(); err != nil {
			klog.Warnf("kshm: taking %s back: %v", path, err)
		}
	}
}

// watchInterval is how often a server checks that its socket path still
// leads to a live server.
const watchInterval = 500 * time.Millisecond

// republish binds the socket path anew and accepts on it.
func (ts *TransServer) republish() error {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.shuttingDown.Load() || ts.ln == nil {
		return nil
	}
	ln, fi, err := bindReplace(ts.path, ts.cfg.Shm.SocketMode, shm.ListenUnix)
	if err != nil {
		return err
	}
	if ts.alias != "" {
		_ = publishAlias(ts.alias, ts.path)
	}
	old := ts.ln
	ts.ln, ts.lnFile = ln, fi
	old.Close() // its path is gone: nobody can connect to it any more
	ts.wg.Add(1)
	go ts.acceptLoop(ln)
	klog.Infof("KITEX: kshm server took %s back (the server that had replaced it is gone)", ts.path)
	return nil
}

func (ts *TransServer) acceptLoop(ln *net.UnixListener) {
	defer ts.wg.Done()
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if ts.shuttingDown.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			klog.Errorf("KITEX: kshm accept on %s: %v", ts.path, err)
			d := ts.opt.AcceptFailedDelayTime
			if d <= 0 {
				d = 10 * time.Millisecond
			}
			time.Sleep(d)
			continue
		}
		ts.mu.Lock()
		if ts.shuttingDown.Load() {
			ts.mu.Unlock()
			conn.Close()
			continue
		}
		ts.accepted[conn] = struct{}{}
		ts.wg.Add(1)
		ts.mu.Unlock()
		go ts.handleConn(conn)
	}
}

// handleConn reads the preface and serves the connection as a kshm session
// or as plain Kitex.
func (ts *TransServer) handleConn(conn *net.UnixConn) {
	defer ts.wg.Done()
	var pre [shm.PrefaceSize]byte
	_ = conn.SetReadDeadline(time.Now().Add(ts.cfg.Shm.HandshakeTimeout))
	n, err := io.ReadFull(conn, pre[:])
	_ = conn.SetReadDeadline(time.Time{})
	ts.mu.Lock()
	delete(ts.accepted, conn)
	stopping := ts.shuttingDown.Load()
	ts.mu.Unlock()
	if err != nil || stopping {
		var ne net.Error
		switch {
		case err != nil && n > 0:
			klog.Warnf("kshm: connection on %s sent %d bytes, then: %v", ts.path, n, err)
		case errors.As(err, &ne) && ne.Timeout():
			klog.Warnf("kshm: connection on %s sent nothing within %v; closed", ts.path, ts.cfg.Shm.HandshakeTimeout)
		}
		conn.Close()
		return
	}
	if shm.IsPreface(pre[:]) {
		ts.serveSession(conn)
		return
	}
	ts.servePlain(newPlainConn(conn, pre[:]))
}

func (ts *TransServer) serveSession(conn *net.UnixConn) {
	// Limits: a session beyond them is refused before the handshake (no
	// memory is committed); the client falls back to plain Kitex.
	ts.mu.Lock()
	n := len(ts.sessions) + ts.handshaking
	over := n >= ts.cfg.MaxServerSessions || int64(n+1)*int64(ts.cfg.Shm.RegionSize) > ts.cfg.MaxServerMemory
	if !over {
		ts.handshaking++
	}
	ts.mu.Unlock()
	if over {
		counters.refused.Add(1)
		ts.refusedOnce.Do(func() {
			klog.Warnf("kshm: %s: a session beyond the server's limits (%d sessions, %d bytes of shared memory) was refused; "+
				"such clients are served as plain Kitex (logged once, counted in Stats.Server.SessionsRefused)",
				ts.path, ts.cfg.MaxServerSessions, ts.cfg.MaxServerMemory)
		})
		conn.Close()
		return
	}
	s, err := shm.ServerSession(conn, ts.cfg.Shm)
	ts.mu.Lock()
	ts.handshaking--
	ts.mu.Unlock()
	if err != nil {
		klog.Warnf("kshm: session handshake on %s: %v", ts.path, err)
		conn.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), ts.cfg.Shm.HandshakeTimeout)
	err = sendAnnounce(ctx, s, ts.ann)
	cancel()
	if err != nil {
		klog.Warnf("kshm: session on %s: sending the announcement: %v", ts.path, err)
		s.Close()
		return
	}
	ss := &serverSession{ts: ts, s: s, conns: make(map[uint64]*serverConn), acked: make(chan struct{})}
	ts.mu.Lock()
	if ts.shuttingDown.Load() {
		ts.mu.Unlock()
		s.Close()
		return
	}
	ts.sessions[ss] = struct{}{}
	ts.mu.Unlock()
	counters.accepted.Add(1)
	counters.serverSessions.Add(1)
	ss.serve()
	counters.serverSessions.Add(-1)
	ts.mu.Lock()
	delete(ts.sessions, ss)
	ts.mu.Unlock()
}

// servePlain serves a Kitex connection without kshm, as Kitex's gonet server
// does: OnActive, then OnRead for each request, then OnInactive.
func (ts *TransServer) servePlain(pc *plainConn) {
	ts.mu.Lock()
	if ts.shuttingDown.Load() {
		ts.mu.Unlock()
		pc.Close()
		return
	}
	ts.plain[pc] = struct{}{}
	ts.mu.Unlock()
	counters.plain.Add(1)
	defer func() {
		ts.mu.Lock()
		delete(ts.plain, pc)
		ts.mu.Unlock()
		pc.Close()
	}()
	ctx, err := ts.hdl.OnActive(context.Background(), pc)
	defer ts.hdl.OnInactive(ctx, pc) // after a failed OnActive too, as Kitex's servers do (the connection limiter releases there)
	if err != nil {
		ts.hdl.OnError(ctx, err, pc)
		return
	}
	for {
		if _, err := pc.r.Peek(1); err != nil {
			return
		}
		ts.inflight.Add(1)
		err := ts.onRead(ctx, pc)
		ts.inflight.Add(-1)
		if err != nil {
			if !errors.Is(err, io.EOF) && !pc.closed.Load() {
				ts.hdl.OnError(ctx, err, pc)
			}
			return
		}
	}
}

// onRead calls the handler, keeping a panic from taking the process down
// the way Kitex's trans servers do (logged; the connection closes).
func (ts *TransServer) onRead(ctx context.Context, conn net.Conn) (err error) {
	defer func() {
		if r := recover(); r != nil {
			klog.CtxErrorf(ctx, "KITEX: kshm panic in OnRead: %v", r)
			err = fmt.Errorf("kshm: panic in OnRead: %v", r)
		}
	}()
	return ts.hdl.OnRead(ctx, conn)
}

// Shutdown implements remote.TransServer. It stops accepting, tells every
// session's client to go away, lets requests in flight finish within the
// server's ExitWaitTime, then closes sessions and connections; the wrapped
// server shuts down at the same time.
func (ts *TransServer) Shutdown() error {
	if !ts.shuttingDown.CompareAndSwap(false, true) {
		return nil
	}
	wait := ts.opt.ExitWaitTime
	deadline := time.Now().Add(wait)
	innerErr := make(chan error, 1)
	go func() {
		if ts.inner == nil {
			innerErr <- nil
			return
		}
		innerErr <- ts.inner.Shutdown()
	}()

	close(ts.stopc)
	ts.closeListener()
	ts.mu.Lock()
	sessions := make([]*serverSession, 0, len(ts.sessions))
	for ss := range ts.sessions {
		sessions = append(sessions, ss)
	}
	for c := range ts.accepted {
		c.Close()
	}
	ts.mu.Unlock()
	for _, ss := range sessions {
		ss.goAway()
	}
	// Wait until every session's client has acknowledged the go-away (it
	// has no call left) and nothing is queued or being served; plain
	// connections get a short grace for requests already written.
	grace := time.Now().Add(min(50*time.Millisecond, wait))
	for time.Now().Before(deadline) {
		if ts.inflight.Load() == 0 && ts.queued.Load() == 0 && !time.Now().Before(grace) && allDrained(sessions) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}

	ts.mu.Lock()
	for ss := range ts.sessions {
		ss.s.Close()
	}
	for pc := range ts.plain {
		pc.Close()
	}
	ts.mu.Unlock()

	done := make(chan struct{})
	go func() {
		ts.wg.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-time.After(time.Until(deadline) + time.Second):
		err = fmt.Errorf("kshm: connections still busy after ExitWaitTime %v", wait)
	}
	if e := <-innerErr; e != nil && err == nil {
		err = e
	}
	return err
}

func allDrained(sessions []*serverSession) bool {
	for _, ss := range sessions {
		if !ss.drained() {
			return false
		}
	}
	return true
}

func (ts *TransServer) closeListener() {
	ts.mu.Lock()
	ln, fi := ts.ln, ts.lnFile
	ts.ln, ts.lnFile = nil, nil
	ts.mu.Unlock()
	if ln != nil {
		ln.Close()
		// Remove the socket file if it is still ours (not a newer server's
		// that replaced it), and our alias to it.
		if cur, err := os.Stat(ts.path); err == nil && os.SameFile(cur, fi) {
			os.Remove(ts.path)
			if ts.alias != "" {
				removeAlias(ts.alias, ts.path)
			}
		}
	}
}

// ConnCount implements remote.TransServer: the wrapped server's connections
// plus kshm virtual connections and plain connections on the unix socket.
func (ts *TransServer) ConnCount() utils.AtomicInt {
	n := 0
	if ts.inner != nil {
		c := ts.inner.ConnCount()
		n = c.Value()
	}
	ts.mu.Lock()
	n += len(ts.plain)
	for ss := range ts.sessions {
		ss.mu.Lock()
		n += len(ss.conns)
		ss.mu.Unlock()
	}
	ts.mu.Unlock()
	return utils.AtomicInt(n)
}

var _ remote.TransServer = (*TransServer)(nil)
