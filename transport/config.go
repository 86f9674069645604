package transport

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/shmkit/kshm/shm"
)

// ErrBadConfig wraps every validation failure of a kshm setting.
var ErrBadConfig = errors.New("kshm: invalid setting")

// Limits of the transport settings.
const (
	MaxSessions        = 64
	maxUnixPathLen     = 107 // sun_path is 108 bytes with the trailing NUL
	defaultSessions    = 1
	defaultMaxIdleConn = 256
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
}

// DefaultConfig returns the defaults: shm.DefaultConfig, one session per
// socket, 3 s dial timeout, reconnect backoff 50 ms doubling to 2 s.
func DefaultConfig() Config {
	return Config{
		Shm:          shm.DefaultConfig(),
		Sessions:     defaultSessions,
		MaxIdleConns: defaultMaxIdleConn,
		DialTimeout:  3 * time.Second,
		ReconnectMin: 50 * time.Millisecond,
		ReconnectMax: 2 * time.Second,
	}
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

// DefaultSocketPath is the socket path both sides derive from a service name
// when none is configured: <os.TempDir()>/kshm-<service>.sock, with every
// character outside [A-Za-z0-9._-] replaced by '_'.
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
	p := filepath.Join(os.TempDir(), "kshm-"+clean+".sock")
	if err := checkSocketPath(p); err != nil {
		return "", fmt.Errorf("%w: WithSocketPath: default path from service %q: %v", ErrBadConfig, service, err)
	}
	return p, nil
}

// socketPath resolves the configured or default path.
func (c *Config) socketPath(service string) (string, error) {
	if c.SocketPath != "" {
		return c.SocketPath, nil
	}
	return DefaultSocketPath(service)
}
