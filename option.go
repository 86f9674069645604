// Package kshm lets two processes on one host make Kitex calls through shared
// memory: one option on the server (WithServerShmIPC), one on the client
// (WithClientShmIPC). Calls fall back to Kitex's ordinary netpoll transport
// whenever shared memory cannot serve them.
package kshm

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cloudwego/kitex/client"
	kconnpool "github.com/cloudwego/kitex/pkg/connpool"
	"github.com/cloudwego/kitex/pkg/discovery"
	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/remote/connpool"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/pkg/utils"
	"github.com/cloudwego/kitex/server"
	ktransport "github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm/codec"
	"github.com/shmkit/kshm/shm"
	"github.com/shmkit/kshm/transport"
)

// WakeMode selects how a receiver waits for messages (see shm.WakeMode).
type WakeMode = shm.WakeMode

// Wake modes.
const (
	WakeNotify = shm.WakeNotify // default: sleep, woken through the socket only when asleep
	WakePoll   = shm.WakePoll   // never sleep: lowest latency, costs a core per receiver
	WakeTimed  = shm.WakeTimed  // check every poll interval: senders never make a syscall
)

// Option configures kshm on a client or a server.
type Option struct {
	name string
	side side
	f    func(*transport.Config)
}

// side says where an option means something.
type side uint8

const (
	bothSides  side = iota
	clientSide      // refused by WithServerShmIPC
	serverSide      // refused by WithClientShmIPC
)

// WithSocketPath sets a unix socket explicitly: where the server accepts
// kshm sessions (and plain Kitex clients), and a server the client tries.
//
// Without it, a server publishes its socket in the per-host directory
// transport.LocalDir() (0700) under the name of its service address, and a
// client finds the server of the address Kitex picked there: nothing to
// configure on one host. With it, the client still sends over shared memory
// only the calls whose picked address that socket's server announced
// (its listen address); a client with no address and no resolver sends
// every call to it.
func WithSocketPath(path string) Option {
	return Option{"WithSocketPath", bothSides, func(c *transport.Config) { c.SocketPath = path }}
}

// WithRegionSize sets the most shared memory each side of a session commits
// (default 64 MiB; shm.MinRegionSize to shm.MaxRegionSize). A session starts
// with a 4 MiB region and grows in steps up to this when messages need room,
// releasing grown regions once idle; see WithInitialRegionSize. Any size in
// that range works alone: unless WithMaxMessageSize is given, the largest
// message in shared memory follows the region (see WithMaxMessageSize), and
// larger ones go over the session socket (counted in Stats.InlineTooLarge).
func WithRegionSize(bytes int) Option {
	return Option{"WithRegionSize", bothSides, func(c *transport.Config) { c.Shm.RegionSize = bytes }}
}

// WithInitialRegionSize sets the size of the region a session starts with
// (default 4 MiB, at most WithRegionSize). Equal to WithRegionSize, regions
// never grow: the whole size is committed at once, as before growth existed.
func WithInitialRegionSize(bytes int) Option {
	return Option{"WithInitialRegionSize", bothSides, func(c *transport.Config) { c.Shm.InitialRegionSize = bytes }}
}

// WithMaxMessageSize sets the largest message carried in shared memory
// (default 8 MiB, a 4 MiB payload with its headers, or half the arena when
// the region cannot hold 8 MiB). A larger message goes over the session
// socket. Given explicitly, it must fit the region's arena: a contradiction
// with WithRegionSize is refused at startup.
func WithMaxMessageSize(bytes int) Option {
	return Option{"WithMaxMessageSize", bothSides, func(c *transport.Config) { c.Shm.MaxMessageSize = bytes }}
}

// WithWakeMode sets how this side waits for messages (default WakeNotify).
func WithWakeMode(m WakeMode) Option {
	return Option{"WithWakeMode", bothSides, func(c *transport.Config) { c.Shm.WakeMode = m }}
}

// WithPollInterval sets the check interval of WakeTimed.
func WithPollInterval(d time.Duration) Option {
	return Option{"WithPollInterval", bothSides, func(c *transport.Config) { c.Shm.PollInterval = d }}
}

// WithSpinTime sets how long this side's receiver may poll before it sleeps
// in WakeNotify mode (default transport.DefaultSpinTime, 100 µs; 0 sleeps at
// once; at most 1 s). It polls only while twice its median wait fits (or,
// for a short mode of its waits, twice the lower-quartile wait while that is
// under 50 µs): a longer SpinTime buys latency with CPU when the peer takes longer to
// answer (see shm.Config.SpinTime).
func WithSpinTime(d time.Duration) Option {
	return Option{"WithSpinTime", bothSides, func(c *transport.Config) { c.Shm.SpinTime = d }}
}

// WithSessions sets how many sessions a client keeps to its socket path
// (default 1; each has its own regions and receive roles).
func WithSessions(n int) Option {
	return Option{"WithSessions", clientSide, func(c *transport.Config) { c.Sessions = n }}
}

// WithAllowedUIDs sets the peer uids accepted (default: only our own uid).
func WithAllowedUIDs(uids ...uint32) Option {
	return Option{"WithAllowedUIDs", bothSides, func(c *transport.Config) { c.Shm.AllowedUIDs = append([]uint32(nil), uids...) }}
}

// WithSocketMode sets the permission of the server's socket file (default
// 0600; must include 0600).
func WithSocketMode(mode os.FileMode) Option {
	return Option{"WithSocketMode", serverSide, func(c *transport.Config) { c.Shm.SocketMode = mode }}
}

// WithHandshakeTimeout bounds a session's handshake (default 3 s), and on
// the server the wait for a new connection's first bytes.
func WithHandshakeTimeout(d time.Duration) Option {
	return Option{"WithHandshakeTimeout", bothSides, func(c *transport.Config) { c.Shm.HandshakeTimeout = d }}
}

// WithDialTimeout bounds a client's dial and handshake (default 3 s).
func WithDialTimeout(d time.Duration) Option {
	return Option{"WithDialTimeout", clientSide, func(c *transport.Config) { c.DialTimeout = d }}
}

// WithReconnectBackoff sets the backoff between attempts to re-establish a
// dead session: min, doubling up to max (default 50 ms to 2 s).
func WithReconnectBackoff(min, max time.Duration) Option {
	return Option{"WithReconnectBackoff", clientSide, func(c *transport.Config) { c.ReconnectMin, c.ReconnectMax = min, max }}
}

// WithMaxIdleConns bounds the idle virtual connections a client keeps per
// session (default 256).
func WithMaxIdleConns(n int) Option {
	return Option{"WithMaxIdleConns", clientSide, func(c *transport.Config) { c.MaxIdleConns = n }}
}

// WithServerLimits bounds what a server gives kshm clients: at most
// sessions sessions at once, and at most bytes of shared memory committed
// by its own regions (sessions x WithRegionSize). A client beyond either is
// served as plain Kitex on the socket (its calls still work), counted in
// Stats.Server.SessionsRefused and logged once. Defaults:
// transport.DefaultMaxServerSessions (128) and
// transport.DefaultMaxServerMemory (1 GiB). Server only.
func WithServerLimits(sessions int, bytes int64) Option {
	return Option{"WithServerLimits", serverSide, func(c *transport.Config) {
		c.MaxServerSessions, c.MaxServerMemory = sessions, bytes
	}}
}

// WithShmConfig replaces the whole engine configuration (advanced: ring
// entries, buffer quota, spin time, leak threshold). Options after it still
// apply.
func WithShmConfig(cfg shm.Config) Option {
	return Option{"WithShmConfig", bothSides, func(c *transport.Config) { c.Shm = cfg }}
}

// buildConfig applies opts to the defaults and validates the result. An
// option of the other side is refused, naming it.
func buildConfig(opts []Option, on side) (transport.Config, []string, error) {
	cfg := transport.DefaultConfig()
	names := make([]string, 0, len(opts))
	explicitMax := false
	for _, o := range opts {
		if o.f == nil {
			return cfg, nil, fmt.Errorf("%w: zero kshm.Option", transport.ErrBadConfig)
		}
		if o.side != bothSides && o.side != on {
			where, other := "WithServerShmIPC", "client"
			if on == clientSide {
				where, other = "WithClientShmIPC", "server"
			}
			return cfg, nil, fmt.Errorf("%w: %s: %s is a %s setting", transport.ErrConflict, where, o.name, other)
		}
		o.f(&cfg)
		names = append(names, o.name)
		if o.name == "WithMaxMessageSize" || o.name == "WithShmConfig" {
			explicitMax = true
		}
	}
	if !explicitMax {
		cfg.FitMaxMessage()
	}
	return cfg, names, cfg.Validate()
}

// WithServerShmIPC makes a Kitex server also accept calls on a unix socket:
// kshm sessions (calls through shared memory) and plain Kitex clients, told
// apart by the kshm preface. The server's usual address keeps serving as
// before. Graceful shutdown honours server.WithExitWaitTime.
//
// An invalid setting panics when the server is constructed, naming the
// setting (as Kitex's own options do). Put it after
// server.WithTransHandlerFactory / WithTransServerFactory if you use those;
// it wraps what they set.
func WithServerShmIPC(opts ...Option) server.Option {
	cfg, names, err := buildConfig(opts, serverSide)
	return server.Option{F: func(o *server.Options, di *utils.Slice) {
		if err != nil {
			panic(err)
		}
		di.Push(fmt.Sprintf("WithServerShmIPC(%s)", strings.Join(names, ", ")))
		handlers := transport.NewSvrTransHandlerFactory(o.RemoteOpt.SvrHandlerFactory)
		o.RemoteOpt.SvrHandlerFactory = handlers
		service := func() string { return o.Svr.ServiceName }
		o.RemoteOpt.TransServerFactory = transport.NewTransServerFactory(o.RemoteOpt.TransServerFactory, cfg, service, handlers)
	}}
}

// WithClientShmIPC makes a Kitex client send its calls through shared memory
// whenever the instance Kitex picked for a call (resolver, load balancer,
// callopt.WithHostPort, retries) is a kshm server on this host: the server
// announces the addresses it serves, and a client finds it in the per-host
// directory (or at WithSocketPath). Every other call goes through the pool
// Kitex would have used, exactly as without kshm (same protocol, same pool
// settings). A client with no address and no resolver sends its calls to
// the socket itself (WithSocketPath, or the one its destination service's
// server published).
//
// Calls over shared memory use TTHeaderFramed (so metainfo travels);
// fallback calls keep the client's transport protocol. Each call's
// rpcinfo.To() carries the tag transport.TagTransport: "shm", "inline" or
// "fallback". All Kitex clients of the process reaching the same server
// with the same settings share its sessions.
//
// Kitex's long-pool settings (client.WithLongConnection) govern the idle
// virtual connections: MaxIdlePerAddress (split over the sessions) unless
// WithMaxIdleConns is given, and MaxIdleTimeout; client.WithWarmingUp establishes sessions;
// Dump and the connection reporter reach the fallback pool. A mux or custom
// trans handler serves the fallback calls. gRPC (unary over HTTP/2) is
// refused at NewClient: kshm could not carry those calls.
//
// An invalid setting panics in NewClient, naming the setting (as Kitex's own
// options do).
func WithClientShmIPC(opts ...Option) client.Option {
	cfg, names, err := buildConfig(opts, clientSide)
	return client.Option{F: func(o *client.Options, di *utils.Slice) {
		if err != nil {
			panic(err)
		}
		di.Push(fmt.Sprintf("WithClientShmIPC(%s)", strings.Join(names, ", ")))
		explicitIdle := false
		for _, n := range names {
			explicitIdle = explicitIdle || n == "WithMaxIdleConns"
		}
		// The rest needs the final options (service name, resolver, pool
		// config), so it runs after every other option.
		o.TailOptions = append(o.TailOptions, client.Option{F: func(o *client.Options, di *utils.Slice) {
			applyClient(o, cfg, explicitIdle)
		}})
	}}
}

func applyClient(o *client.Options, cfg transport.Config, explicitIdle bool) {
	if tp := o.Configs.TransportProtocol(); tp&ktransport.GRPC != 0 {
		panic(fmt.Errorf("%w: WithClientShmIPC: client.WithTransportProtocol(transport.GRPC): Kitex sends gRPC calls "+
			"over its own HTTP/2 pool, which kshm cannot carry; use TTHeader (streaming over TTHeader or gRPC "+
			"streaming stay on the server's address beside kshm) or drop WithClientShmIPC", transport.ErrConflict))
	}
	if o.PoolCfg != nil && !explicitIdle {
		// Kitex's long-pool settings govern idle virtual connections too.
		cfg.MaxIdleConns = max((o.PoolCfg.MaxIdlePerAddress+cfg.Sessions-1)/cfg.Sessions, 1) // per session
		cfg.MaxIdleTimeout = o.PoolCfg.MaxIdleTimeout
	}
	unixPath := ""
	if o.Resolver == nil && o.Proxy == nil {
		unixPath = cfg.SocketPath
		if unixPath == "" {
			p, err := transport.DefaultSocketPath(o.Svr.ServiceName)
			if err != nil {
				panic(err)
			}
			unixPath = p
		}
		o.Resolver = unixResolver(unixPath)
	}
	fallback := o.RemoteOpt.ConnPool
	if fallback == nil {
		fallback = defaultPool(o)
	}
	o.RemoteOpt.ConnPool = transport.NewRoutePool(cfg, cfg.SocketPath, unixPath, fallback)
	o.RemoteOpt.CliHandlerFactory = transport.NewCliTransHandlerFactory(o.RemoteOpt.CliHandlerFactory)
}

// defaultPool is the pool Kitex would have made for these options.
func defaultPool(o *client.Options) remote.ConnPool {
	if o.PoolCfg != nil {
		if *o.PoolCfg == (kconnpool.IdleConfig{}) {
			return connpool.NewShortPool(o.Svr.ServiceName)
		}
		return connpool.NewLongPool(o.Svr.ServiceName, *o.PoolCfg)
	}
	return connpool.NewLongPool(o.Svr.ServiceName, kconnpool.IdleConfig{
		MaxIdlePerAddress: 10,
		MaxIdleGlobal:     100,
		MaxIdleTimeout:    time.Minute,
	})
}

// unixResolver resolves every call to the kshm socket, so that fallback
// calls of a client without any address configured reach the server's unix
// socket as plain Kitex.
func unixResolver(path string) discovery.Resolver {
	ins := []discovery.Instance{discovery.NewInstance("unix", path, discovery.DefaultWeight, nil)}
	return &discovery.SynthesizedResolver{
		ResolveFunc: func(ctx context.Context, key string) (discovery.Result, error) {
			return discovery.Result{Cacheable: true, CacheKey: "kshm:" + path, Instances: ins}, nil
		},
		TargetFunc: func(ctx context.Context, target rpcinfo.EndpointInfo) string { return "kshm:" + path },
		NameFunc:   func() string { return "kshm:" + path },
	}
}

// Stats are kshm's process-wide counters.
type Stats struct {
	Sessions     int64  // open sessions (client and server side)
	Calls        uint64 // calls carried over kshm sessions: requests sent by clients plus requests served
	Fallbacks    uint64 // client calls over Kitex's netpoll transport plus requests and responses sent over a session socket
	InUseBuffers int64  // shared-memory buffers this process allocated and has not got back
	InUseBytes   int64

	CallsSent       uint64 // client requests sent over kshm sessions
	CallsServed     uint64 // requests served from kshm sessions
	FallbackCalls   uint64 // client calls that found no session
	InlineRequests  uint64 // requests that found no shared memory mid-encode (sent over the socket)
	InlineResponses uint64 // responses likewise
	LateResponses   uint64 // responses to calls that had given up: dropped and released
	SessionsDialed  uint64 // client sessions established
	SessionsServed  uint64 // server sessions accepted
	SessionsLost    uint64 // client sessions that died
	PlainConns      uint64 // plain Kitex connections accepted on the unix socket
	ClientConns     int64  // client virtual connections open now
	ServerConns     int64  // server virtual connections open now

	// Why messages went over a session socket (sums to InlineRequests +
	// InlineResponses): arena full, buffer quota reached, message larger
	// than the maximum message size.
	InlineNoMemory, InlineQuota, InlineTooLarge uint64
	// Of InlineNoMemory, those for which the regions could not grow: our
	// WithRegionSize reached, the peer's limit reached, no memory for a
	// region. Engine has the bytes committed and mapped.
	InlineGrowLimit, InlineGrowPeerLimit, InlineGrowNoMemory uint64

	// Client and Server separate the two sides of this process.
	Client ClientStats
	Server ServerStats

	Engine shm.Stats // the engine's counters
}

// ClientStats are the client side's counters (every Kitex client of the
// process together).
type ClientStats struct {
	Sessions       int64  // client sessions open now
	SessionsDialed uint64 // established
	SessionsLost   uint64 // died (server gone, error)
	SharedPools    int    // socket paths (and settings) in use, each shared by every client of the process
	Conns          int64  // virtual connections open now
	CallsShm       uint64 // requests sent over a session (shared memory or its socket)
	CallsInline    uint64 // of those, requests sent over the session socket
	CallsFallback  uint64 // calls sent as plain Kitex by the fallback pool (other instance, or no session)
	LateResponses  uint64 // responses to calls that had given up
}

// ServerStats are the server side's counters.
type ServerStats struct {
	Sessions         int64  // server sessions open now
	SessionsAccepted uint64 // accepted
	SessionsRefused  uint64 // refused for WithServerLimits (those clients are served as plain Kitex)
	Conns            int64  // virtual connections open now
	CallsServed      uint64 // requests served from sessions
	InlineResponses  uint64 // responses sent over the session socket
	PlainConns       uint64 // plain Kitex connections accepted on the socket
}

// ReadStats returns kshm's process-wide counters.
func ReadStats() Stats {
	e := shm.ReadStats()
	t := transport.ReadCounters()
	r := codec.ReadFallbackReasons()
	return Stats{
		InlineNoMemory:      r.NoMemory,
		InlineQuota:         r.Quota,
		InlineTooLarge:      r.TooLarge,
		InlineGrowLimit:     r.GrowLimit,
		InlineGrowPeerLimit: r.GrowPeerLimit,
		InlineGrowNoMemory:  r.GrowNoMemory,
		Sessions:            e.Sessions,
		Calls:               t.CallsSent + t.CallsServed,
		Fallbacks:           t.FallbackCalls + t.InlineRequests + t.InlineResponses,
		InUseBuffers:        e.InUseBuffers,
		InUseBytes:          e.InUseBytes,
		CallsSent:           t.CallsSent,
		CallsServed:         t.CallsServed,
		FallbackCalls:       t.FallbackCalls,
		InlineRequests:      t.InlineRequests,
		InlineResponses:     t.InlineResponses,
		LateResponses:       t.LateResponses,
		SessionsDialed:      t.SessionsDialed,
		SessionsServed:      t.SessionsAccepted,
		SessionsLost:        t.SessionsLost,
		PlainConns:          t.PlainConns,
		ClientConns:         t.ClientConns,
		ServerConns:         t.ServerConns,
		Client: ClientStats{
			Sessions:       t.ClientSessions,
			SessionsDialed: t.SessionsDialed,
			SessionsLost:   t.SessionsLost,
			SharedPools:    transport.SharedPools(),
			Conns:          t.ClientConns,
			CallsShm:       t.CallsSent,
			CallsInline:    t.InlineRequests,
			CallsFallback:  t.FallbackCalls,
			LateResponses:  t.LateResponses,
		},
		Server: ServerStats{
			Sessions:         t.ServerSessions,
			SessionsAccepted: t.SessionsAccepted,
			SessionsRefused:  t.SessionsRefused,
			Conns:            t.ServerConns,
			CallsServed:      t.CallsServed,
			InlineResponses:  t.InlineResponses,
			PlainConns:       t.PlainConns,
		},
		Engine: e,
	}
}
