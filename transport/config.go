package transport

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/shmkit/kshm/shm"
)

// ErrBadConfig wraps every validation failure of a kshm setting.
var ErrBadConfig = errors.New("kshm: invalid setting")

// ErrConflict wraps every refusal of a combination kshm cannot serve: a
// client-only setting on a server (or the reverse), or a Kitex option that
// would silently take kshm out of the path.
var ErrConflict = errors.New("kshm: conflicting options")

// Limits of the transport settings.
const (
	MaxSessions        = 64
	maxUnixPathLen     = 107 // sun_path is 108 bytes with the trailing NUL
	defaultSessions    = 1
	defaultMaxIdleConn = 256

	// DefaultMaxServerSessions and DefaultMaxServerMemory are a server's
	// default limits: sessions at once, and bytes of shared memory its own
	// regions commit (sessions x RegionSize). A client beyond them is
	// served as plain Kitex on the socket.
	DefaultMaxServerSessions = 128
	DefaultMaxServerMemory   = 1 << 30
)

// Config is the transport's configuration, shared by client and server.
type Config struct {
	// SocketPath is the unix socket the server listens on and the client
	// dials. Empty: derived from the service name (DefaultSocketPath).
	SocketPath string
	// Shm is the engine configuration of every session.
	Shm shm.Config
	// Sessions is the number of sessions a client keeps per socket path.
	Sessions int
	// MaxIdleConns bounds the idle virtual connections kept per session.
	MaxIdleConns int
	// DialTimeout bounds a client's connect and handshake.
	DialTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the backoff between attempts to
	// re-establish a dead session.
	ReconnectMin, ReconnectMax time.Duration
	// MaxServerSessions and MaxServerMemory are a server's limits.
	MaxServerSessions int
	MaxServerMemory   int64
	// MaxIdleTimeout closes a virtual connection idle longer than this
	// (0: never). From Kitex's long-pool setting.
	MaxIdleTimeout time.Duration
}

// DefaultSpinTime is the Kitex transport's shm.Config.SpinTime: a receiver
// polls only through waits shorter than about a wake-up (twice the median
// wait must fit, or twice the lower-quartile one for a short mode), and
// otherwise sleeps at once. The engine's default, 1 ms, polls through the peer's work at 64-256 KiB; in a Kitex process that
// work includes the decoding and the garbage collection of both processes,
// and on the 2-vCPU VMs this was built on polling through it cost 1.4x
// netpoll's CPU per call at 64 KiB c=1, against 0.9-1.1x sleeping at once
// (with the p50 about 20 µs longer, still below netpoll's).
const DefaultSpinTime = 100 * time.Microsecond

// DefaultConfig returns the defaults: shm.DefaultConfig with SpinTime
// DefaultSpinTime, one session per socket, 3 s dial timeout, reconnect
// backoff 50 ms doubling to 2 s.
func DefaultConfig() Config {
	sc := shm.DefaultConfig()
	sc.SpinTime = DefaultSpinTime
	return Config{
		Shm:          sc,
		Sessions:     defaultSessions,
		MaxIdleConns: defaultMaxIdleConn,
		DialTimeout:  3 * time.Second,
		ReconnectMin: 50 * time.Millisecond,
		ReconnectMax: 2 * time.Second,

		MaxServerSessions: DefaultMaxServerSessions,
		MaxServerMemory:   DefaultMaxServerMemory,
	}
}

// FitMaxMessage makes the default maximum message follow the region: it
// stays shm's default (8 MiB) when the arena of RegionSize holds it, and
// becomes half the arena otherwise (never below shm.MinMaxMessageSize).
// Call it when MaxMessageSize was not set explicitly; an explicit setting
// that does not fit is refused by Validate.
func (c *Config) FitMaxMessage() {
	try := *c
	if try.Shm.Validate() == nil {
		return
	}
	try.Shm.MaxMessageSize = shm.MinMaxMessageSize
	if try.Shm.Validate() != nil {
		return // something else is wrong: Validate names it
	}
	// The largest MaxMessageSize the arena takes, by bisection over
	// Validate (the arena's size is the engine's business).
	lo, hi := shm.MinMaxMessageSize, c.Shm.MaxMessageSize
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		try.Shm.MaxMessageSize = mid
		if try.Shm.Validate() == nil {
			lo = mid
		} else {
			hi = mid
		}
	}
	c.Shm.MaxMessageSize = max(lo/2, shm.MinMaxMessageSize)
}

// Validate checks every setting; the error wraps ErrBadConfig (and
// shm.ErrBadConfig for engine settings) and names the setting by the option
// that sets it.
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrBadConfig}, a...)...)
	}
	if c.SocketPath != "" {
		if err := checkSocketPath(c.SocketPath); err != nil {
			return bad("WithSocketPath: %v", err)
		}
	}
	if c.Sessions < 1 || c.Sessions > MaxSessions {
		return bad("WithSessions: %d out of range [1, %d]", c.Sessions, MaxSessions)
	}
	if c.MaxIdleConns < 1 {
		return bad("WithMaxIdleConns: %d must be at least 1", c.MaxIdleConns)
	}
	if c.DialTimeout <= 0 || c.DialTimeout > time.Minute {
		return bad("WithDialTimeout: %v out of range (0, 1m]", c.DialTimeout)
	}
	if c.ReconnectMin <= 0 || c.ReconnectMax < c.ReconnectMin || c.ReconnectMax > 10*time.Minute {
		return bad("WithReconnectBackoff: min %v, max %v: need 0 < min <= max <= 10m", c.ReconnectMin, c.ReconnectMax)
	}
	if c.MaxServerSessions < 1 {
		return bad("WithServerLimits: at most %d sessions: must be at least 1", c.MaxServerSessions)
	}
	if c.MaxServerMemory < int64(c.Shm.RegionSize) {
		return bad("WithServerLimits: at most %d bytes of shared memory: less than one region (WithRegionSize %d)", c.MaxServerMemory, c.Shm.RegionSize)
	}
	if c.MaxIdleTimeout < 0 {
		return bad("MaxIdleTimeout %v must not be negative", c.MaxIdleTimeout)
	}
	if err := c.Shm.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrBadConfig, err)
	}
	return nil
}

func checkSocketPath(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("%q is not an absolute path", p)
	}
	if len(p) > maxUnixPathLen {
		return fmt.Errorf("%q is %d bytes, longer than a unix socket path may be (%d)", p, len(p), maxUnixPathLen)
	}
	return nil
}

// DefaultSocketPath is the socket a client without an address, a resolver
// or WithSocketPath dials: <LocalDir>/svc-<service>.sock, a symlink that
// the latest server of that service without WithSocketPath points at its
// socket. Every character of the name outside [A-Za-z0-9._-] becomes '_'.
func DefaultSocketPath(service string) (string, error) {
	if service == "" {
		return "", fmt.Errorf("%w: WithSocketPath: not set, and no service name to derive it from", ErrBadConfig)
	}
	clean := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '_'
	}, service)
	p := filepath.Join(LocalDir(), "svc-"+clean+".sock")
	if err := checkSocketPath(p); err != nil {
		return "", fmt.Errorf("%w: WithSocketPath: default path from service %q: %v", ErrBadConfig, service, err)
	}
	return p, nil
}
