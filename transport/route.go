package transport

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/pkg/rpcinfo/remoteinfo"
	"github.com/cloudwego/kitex/pkg/warmup"
	ktransport "github.com/cloudwego/kitex/transport"
)

// TagTransport is the tag kshm sets on every call's rpcinfo.To() (read it
// with ri.To().Tag(TagTransport) in a middleware or tracer, after the call):
// TransportShm, TransportInline or TransportFallback.
const TagTransport = "kshm.transport"

// Values of TagTransport.
const (
	TransportShm      = "shm"      // the request went through shared memory
	TransportInline   = "inline"   // over a kshm session's socket: no shared memory for it (too large, region full)
	TransportFallback = "fallback" // over the fallback pool, as plain Kitex
)

// routeTTL is how long the socket files found for an address are trusted
// before they are looked up again (a server started later is found within
// it).
const routeTTL = time.Second

// RoutePool is the connection pool of a kshm Kitex client. For each call it
// looks at the address Kitex picked (after resolver, load balancer,
// callopt.WithHostPort, retries): when a kshm server on this host announced
// that address, the call goes over shared memory to it; otherwise the
// fallback pool (the pool Kitex would have used) sends it as plain Kitex.
//
// The servers tried for a TCP address are the one at WithSocketPath, if
// set, and those LocalDir holds for the address. A unix address equal to
// the pool's own socket (a client with no address) is served by that
// socket's server whatever it announces.
type RoutePool struct {
	cfg      Config
	explicit string // WithSocketPath, "" if none
	unixPath string // the socket that is itself a target, "" if none
	fallback remote.ConnPool

	mu     sync.Mutex // guards pools, routes, closed
	pools  map[string]*ClientPool
	routes map[string]*route
	closed bool
}

// route is what was found for one address: the pools that may serve it.
type route struct {
	ap      netip.AddrPort
	ok      bool // the address is an IP address (else: never shm)
	pools   []*ClientPool
	expires time.Time
}

// NewRoutePool returns the pool of a Kitex client. explicit is
// WithSocketPath ("" if none); unixPath is the socket a client with no
// address uses as its target ("" if none); fallback carries every call that
// shared memory does not.
func NewRoutePool(cfg Config, explicit, unixPath string, fallback remote.ConnPool) *RoutePool {
	return &RoutePool{
		cfg: cfg, explicit: explicit, unixPath: unixPath, fallback: fallback,
		pools:  make(map[string]*ClientPool),
		routes: make(map[string]*route),
	}
}

// Get implements remote.ConnPool.
func (p *RoutePool) Get(ctx context.Context, network, address string, opt remote.ConnOption) (net.Conn, error) {
	if c := p.shmConn(ctx, network, address); c != nil {
		markCall(ctx, true)
		return c, nil
	}
	counters.fallbackCalls.Add(1)
	markCall(ctx, false)
	return p.fallback.Get(ctx, network, address, opt)
}

// markCall tags the call and, for a call over shared memory, sets TTHeader
// framing on this call only (metainfo needs it; the fallback keeps the
// user's protocol).
func markCall(ctx context.Context, shm bool) {
	ri := rpcinfo.GetRPCInfo(ctx)
	if ri == nil {
		return
	}
	tag := TransportFallback
	if shm {
		tag = TransportShm
		if cfg := ri.Config(); cfg != nil {
			tp := cfg.TransportProtocol()
			if tp&ktransport.TTHeader == 0 && tp&ktransport.GRPC == 0 {
				rpcinfo.AsMutableRPCConfig(cfg).SetTransportProtocol(tp | ktransport.TTHeaderFramed)
			}
		}
	}
	setTag(ri, tag)
}

func setTag(ri rpcinfo.RPCInfo, tag string) {
	if ri == nil {
		return
	}
	if r := remoteinfo.AsRemoteInfo(ri.To()); r != nil {
		r.ForceSetTag(TagTransport, tag)
	}
}

// shmConn returns a virtual connection to the server that is the instance
// at address, or nil.
func (p *RoutePool) shmConn(ctx context.Context, network, address string) *clientConn {
	if network == "unix" {
		if address == "" {
			return nil
		}
		if address == p.unixPath || address == p.explicit {
			// The socket itself is the target.
			if cp := p.pool(address); cp != nil {
				return cp.conn(ctx, nil)
			}
			return nil
		}
		// A server whose service address is this unix socket.
		if p.explicit != "" {
			if cp := p.pool(p.explicit); cp != nil {
				return cp.conn(ctx, &target{unix: address})
			}
		}
		return nil
	}
	r := p.route(address)
	if r == nil || !r.ok {
		return nil
	}
	t := target{ap: r.ap}
	for _, cp := range r.pools {
		if c := cp.conn(ctx, &t); c != nil {
			return c
		}
	}
	return nil
}

// route returns what is known of address, looking again once it expired.
func (p *RoutePool) route(address string) *route {
	now := time.Now()
	p.mu.Lock()
	r := p.routes[address]
	p.mu.Unlock()
	if r != nil && now.Before(r.expires) {
		return r
	}
	nr := &route{expires: now.Add(routeTTL)}
	nr.ap, nr.ok = normAddr(address)
	if nr.ok {
		var paths []string
		if p.explicit != "" {
			paths = append(paths, p.explicit)
		}
		for i, c := range localCandidates(nr.ap) {
			if i > 0 && !isLocalIP(nr.ap.Addr()) {
				break // a server on every IP serves only this host's addresses
			}
			if fi, err := os.Stat(c); err == nil && fi.Mode()&os.ModeSocket != 0 {
				paths = append(paths, c)
			}
		}
		for _, path := range paths {
			if cp := p.pool(path); cp != nil {
				nr.pools = append(nr.pools, cp)
			}
		}
	}
	p.mu.Lock()
	if !p.closed {
		if len(p.routes) > 4096 { // addresses come and go with the registry
			clear(p.routes)
		}
		p.routes[address] = nr
	}
	p.mu.Unlock()
	return nr
}

// pool returns the shared pool of path, acquiring it the first time.
func (p *RoutePool) pool(path string) *ClientPool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	cp := p.pools[path]
	if cp == nil {
		cp = acquirePool(p.cfg, path)
		cp.addUser(p)
		p.pools[path] = cp
	}
	return cp
}

var localIPs = struct {
	mu      sync.Mutex
	set     map[netip.Addr]bool
	expires time.Time
}{}

// isLocalIP reports whether ip is an address of this host.
func isLocalIP(ip netip.Addr) bool {
	if ip.IsLoopback() || ip.IsUnspecified() {
		return true
	}
	localIPs.mu.Lock()
	defer localIPs.mu.Unlock()
	if time.Now().After(localIPs.expires) {
		localIPs.set = make(map[netip.Addr]bool)
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, a := range addrs {
				if pn, ok := a.(*net.IPNet); ok {
					if x, ok := netip.AddrFromSlice(pn.IP); ok {
						localIPs.set[x.Unmap()] = true
					}
				}
			}
		}
		localIPs.expires = time.Now().Add(10 * time.Second)
	}
	return localIPs.set[ip]
}

// Put implements remote.ConnPool.
func (p *RoutePool) Put(conn net.Conn) error {
	if c, ok := conn.(*clientConn); ok {
		c.cs.putConn(c)
		return nil
	}
	return p.fallback.Put(conn)
}

// Discard implements remote.ConnPool.
func (p *RoutePool) Discard(conn net.Conn) error {
	if c, ok := conn.(*clientConn); ok {
		c.Close()
		return nil
	}
	return p.fallback.Discard(conn)
}

// Clean implements remote.LongConnPool for the fallback connections.
func (p *RoutePool) Clean(network, address string) {
	if lp, ok := p.fallback.(remote.LongConnPool); ok {
		lp.Clean(network, address)
	}
}

// Dump reports the fallback pool's state (Kitex's diagnosis probe) and the
// shared sessions this client uses.
func (p *RoutePool) Dump() interface{} {
	m := map[string]interface{}{}
	if d, ok := p.fallback.(interface{ Dump() interface{} }); ok {
		m["fallback"] = d.Dump()
	}
	p.mu.Lock()
	var socks []string
	for path := range p.pools {
		socks = append(socks, path)
	}
	p.mu.Unlock()
	m["kshm_sockets"] = socks
	return m
}

// EnableReporter implements remote.ConnPoolReporter: the fallback pool
// reports its connections.
func (p *RoutePool) EnableReporter() {
	if r, ok := p.fallback.(remote.ConnPoolReporter); ok {
		r.EnableReporter()
	}
}

// WarmUp implements warmup.Pool: the sessions to every target served over
// shared memory are established now; the other targets warm the fallback
// pool as Kitex would.
func (p *RoutePool) WarmUp(eh warmup.ErrorHandling, wuo *warmup.PoolOption, co remote.ConnOption) error {
	if wuo == nil {
		return nil
	}
	rest := make(map[string][]string)
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.DialTimeout)
	defer cancel()
	for network, addrs := range wuo.Targets {
		for _, a := range addrs {
			if c := p.shmConn(ctx, network, a); c != nil {
				c.cs.putConn(c)
				continue
			}
			rest[network] = append(rest[network], a)
		}
	}
	wp, ok := p.fallback.(warmup.Pool)
	if !ok || len(rest) == 0 {
		return nil
	}
	o := *wuo
	o.Targets = rest
	return wp.WarmUp(eh, &o, co)
}

// Close implements remote.ConnPool: it gives back the shared pools (the
// last user of one closes its sessions) and closes the fallback pool.
func (p *RoutePool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return errors.New("kshm: pool already closed")
	}
	p.closed = true
	pools := p.pools
	p.pools = nil
	p.routes = nil
	p.mu.Unlock()
	for _, cp := range pools {
		cp.removeUser(p)
		releasePool(cp)
	}
	return p.fallback.Close()
}

var (
	_ remote.LongConnPool     = (*RoutePool)(nil)
	_ remote.ConnPoolReporter = (*RoutePool)(nil)
	_ warmup.Pool             = (*RoutePool)(nil)
)
