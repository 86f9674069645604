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
	f    func(*transport.Config)
}

// WithSocketPath sets the unix socket where the server accepts kshm sessions
// (and plain Kitex clients) and the client dials. Default:
// <os.TempDir()>/kshm-<service>.sock, from the server's service name
// (server.WithServerBasicInfo) and the client's destination service (the
// name given to NewClient): give both the same name. A server with neither
// fails at Run with an error naming this setting.
func WithSocketPath(path string) Option {
	return Option{"WithSocketPath", func(c *transport.Config) { c.SocketPath = path }}
}

// WithRegionSize sets the most shared memory each side of a session commits
// (default 64 MiB; shm.MinRegionSize to shm.MaxRegionSize). A session starts
// with a 4 MiB region and grows in steps up to this when messages need room,
// releasing grown regions once idle; see WithInitialRegionSize.
func WithRegionSize(bytes int) Option {
	return Option{"WithRegionSize", func(c *transport.Config) { c.Shm.RegionSize = bytes }}
}

// WithInitialRegionSize sets the size of the region a session starts with
// (default 4 MiB, at most WithRegionSize). Equal to WithRegionSize, regions
// never grow: the whole size is committed at once, as before growth existed.
func WithInitialRegionSize(bytes int) Option {
	return Option{"WithInitialRegionSize", func(c *transport.Config) { c.Shm.InitialRegionSize = bytes }}
}

// WithMaxMessageSize sets the largest message carried in shared memory
// (default 8 MiB: a 4 MiB payload with its headers). A larger message goes over the session socket.
func WithMaxMessageSize(bytes int) Option {
	return Option{"WithMaxMessageSize", func(c *transport.Config) { c.Shm.MaxMessageSize = bytes }}
}

// WithWakeMode sets how this side waits for messages (default WakeNotify).
func WithWakeMode(m WakeMode) Option {
	return Option{"WithWakeMode", func(c *transport.Config) { c.Shm.WakeMode = m }}
}

// WithPollInterval sets the check interval of WakeTimed.
func WithPollInterval(d time.Duration) Option {
	return Option{"WithPollInterval", func(c *transport.Config) { c.Shm.PollInterval = d }}
}

// WithSessions sets how many sessions a client keeps to its socket path
// (default 1; each has its own regions and dispatcher).
func WithSessions(n int) Option {
	return Option{"WithSessions", func(c *transport.Config) { c.Sessions = n }}
}

// WithAllowedUIDs sets the peer uids accepted (default: only our own uid).
func WithAllowedUIDs(uids ...uint32) Option {
	return Option{"WithAllowedUIDs", func(c *transport.Config) { c.Shm.AllowedUIDs = append([]uint32(nil), uids...) }}
}

// WithSocketMode sets the permission of the server's socket file (default
// 0600; must include 0600).
func WithSocketMode(mode os.FileMode) Option {
	return Option{"WithSocketMode", func(c *transport.Config) { c.Shm.SocketMode = mode }}
}

// WithHandshakeTimeout bounds a session's handshake (default 3 s), and on
// the server the wait for a new connection's first bytes.
func WithHandshakeTimeout(d time.Duration) Option {
	return Option{"WithHandshakeTimeout", func(c *transport.Config) { c.Shm.HandshakeTimeout = d }}
}

// WithDialTimeout bounds a client's dial and handshake (default 3 s).
func WithDialTimeout(d time.Duration) Option {
	return Option{"WithDialTimeout", func(c *transport.Config) { c.DialTimeout = d }}
}

// WithReconnectBackoff sets the backoff between attempts to re-establish a
// dead session: min, doubling up to max (default 50 ms to 2 s).
func WithReconnectBackoff(min, max time.Duration) Option {
	return Option{"WithReconnectBackoff", func(c *transport.Config) { c.ReconnectMin, c.ReconnectMax = min, max }}
}

// WithMaxIdleConns bounds the idle virtual connections a client keeps per
// session (default 256).
func WithMaxIdleConns(n int) Option {
	return Option{"WithMaxIdleConns", func(c *transport.Config) { c.MaxIdleConns = n }}
}

// WithShmConfig replaces the whole engine configuration (advanced: ring
// entries, buffer quota, spin time, leak threshold). Options after it still
// apply.
func WithShmConfig(cfg shm.Config) Option {
	return Option{"WithShmConfig", func(c *transport.Config) { c.Shm = cfg }}
}

// buildConfig applies opts to the defaults and validates the result.
func buildConfig(opts []Option) (transport.Config, []string, error) {
	cfg := transport.DefaultConfig()
	names := make([]string, 0, len(opts))
	for _, o := range opts {
		if o.f == nil {
			return cfg, nil, fmt.Errorf("%w: zero kshm.Option", transport.ErrBadConfig)
		}
		o.f(&cfg)
		names = append(names, o.name)
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
	cfg, names, err := buildConfig(opts)
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
// over sessions to the server's unix socket, falling back to Kitex's netpoll
// transport (to the address Kitex resolved, e.g. client.WithHostPorts; to the
// unix socket when none is configured) whenever no session or no shared
// memory can be had. It also sets TTHeaderFramed when the transport protocol
// is left at Kitex's default (Framed), so metainfo travels.
//
// An invalid setting panics in NewClient, naming the setting (as Kitex's own
// options do). The option takes over the connection pool and the client trans
// handler factory; a pool set with client.WithConnPool, or the long/short
// pool that client.WithLongConnection / WithShortConnection selects, serves
// the fallback calls.
func WithClientShmIPC(opts ...Option) client.Option {
	cfg, names, err := buildConfig(opts)
	return client.Option{F: func(o *client.Options, di *utils.Slice) {
		if err != nil {
			panic(err)
		}
		di.Push(fmt.Sprintf("WithClientShmIPC(%s)", strings.Join(names, ", ")))
		// The rest needs the final options (service name, resolver, pool
		// config), so it runs after every other option.
		o.TailOptions = append(o.TailOptions, client.Option{F: func(o *client.Options, di *utils.Slice) {
			applyClient(o, cfg)
		}})
	}}
}

func applyClient(o *client.Options, cfg transport.Config) {
	path := cfg.SocketPath
	if path == "" {
		p, err := transport.DefaultSocketPath(o.Svr.ServiceName)
		if err != nil {
			panic(err)
		}
		path = p
	}
	fallback := o.RemoteOpt.ConnPool
	if fallback == nil {
		fallback = defaultPool(o)
	}
	o.RemoteOpt.ConnPool = transport.NewClientPool(cfg, path, fallback)
	o.RemoteOpt.CliHandlerFactory = transport.NewCliTransHandlerFactory()
	if o.Resolver == nil && o.Proxy == nil {
		o.Resolver = unixResolver(path)
	}
	if o.Configs.TransportProtocol() == ktransport.Framed {
		rpcinfo.AsMutableRPCConfig(o.Configs).SetTransportProtocol(ktransport.TTHeaderFramed)
	}
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

	Engine shm.Stats // the engine's counters
}

// ReadStats returns kshm's process-wide counters.
func ReadStats() Stats {
	e := shm.ReadStats()
	t := transport.ReadCounters()
	r := codec.ReadFallbackReasons()
	return Stats{
		InlineNoMemory: r.NoMemory,
		InlineQuota:    r.Quota,
		InlineTooLarge: r.TooLarge,

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
		Engine:              e,
	}
}
