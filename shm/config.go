package shm

import (
	"fmt"
	"os"
	"time"
)

// WakeMode selects how a receiver waits for messages from its peer.
type WakeMode uint8

const (
	// WakeNotify (default): the receiver spins briefly, then marks itself
	// sleeping and blocks; a sender writes to the session socket only when
	// it sees the receiver sleeping, so under load one wake-up harvests many
	// messages.
	WakeNotify WakeMode = iota
	// WakePoll: the receiver never sleeps. Lowest latency; costs a core per
	// waiting receiver.
	WakePoll
	// WakeTimed: the receiver checks its ring every Config.PollInterval.
	// Senders never make a syscall.
	WakeTimed
)

func (m WakeMode) String() string {
	switch m {
	case WakeNotify:
		return "notify"
	case WakePoll:
		return "poll"
	case WakeTimed:
		return "timed"
	}
	return fmt.Sprintf("WakeMode(%d)", uint8(m))
}

// ParseWakeMode returns the mode named by s ("notify", "poll" or "timed"),
// as WakeMode.String prints it.
func ParseWakeMode(s string) (WakeMode, error) {
	for _, m := range []WakeMode{WakeNotify, WakePoll, WakeTimed} {
		if m.String() == s {
			return m, nil
		}
	}
	return 0, fmt.Errorf("%w: wake mode %q: want notify, poll or timed", ErrBadConfig, s)
}

// Limits of the configuration.
const (
	MinRegionSize      = 1 << 20 // 1 MiB
	MaxRegionSize      = 1 << 40 // 1 TiB; the memory check refuses what the machine cannot back
	MinBlockSize       = 512     // smallest buffer the allocator hands out
	MaxSegments        = 8       // buffers per message
	MinRingEntries     = 64
	MaxRingEntries     = 1 << 20
	MinMaxMessageSize  = 4 << 10
	defaultRegionSize  = 64 << 20
	defaultMaxMessage  = 8 << 20 // a 4 MiB payload plus its Thrift and TTHeader bytes
	defaultRingEntries = 4096
	// MaxRegions bounds the regions of one side of a session: the base
	// region and the grown ones.
	MaxRegions           = 16
	defaultInitialRegion = 4 << 20
	defaultShrinkAfter   = 5 * time.Second
)

// Config is a session's configuration. Start from DefaultConfig and change
// what you need; Validate reports the first bad setting by name.
type Config struct {
	// RegionSize is the most bytes this side's regions hold together. A
	// session starts with one region of InitialRegionSize bytes (header,
	// rings, buffer table and payload arena) and, when a message needs more
	// room, adds regions in steps up to RegionSize; grown regions idle for
	// ShrinkAfter are released.
	RegionSize int
	// InitialRegionSize is the size of the region made at the handshake.
	// 0 means min(RegionSize, 4 MiB), or RegionSize when the regions grown
	// within RegionSize could not hold a MaxMessageSize message. Equal to
	// RegionSize, the session never grows (a fixed-size region).
	InitialRegionSize int
	// ShrinkAfter is how long a grown region stays with no buffer in use
	// before it is released. 0 means 5 seconds.
	ShrinkAfter time.Duration
	// MaxMessageSize is the largest buffer Alloc hands out, and the largest
	// message accepted from the peer. The arena must hold at least one.
	MaxMessageSize int
	// RingEntries is the number of descriptors in this side's send ring
	// (a power of two). It also bounds buffers in flight (MaxBuffers).
	RingEntries int
	// MaxBuffers bounds the buffers this side may have handed to the peer
	// and not yet got back (a per-session quota). 0 means RingEntries.
	MaxBuffers int
	// WakeMode is how this side's receiver waits.
	WakeMode WakeMode
	// SpinTime is the longest a receiver in notify mode polls before it
	// sleeps: how much CPU it may spend to save a wake-up's latency. The
	// receiver adapts: while twice its median wait fits in SpinTime, it
	// polls a little longer than that wait (at least about what a wake-up
	// costs, 50 µs), so a busy session makes no syscalls; when its waits
	// are longer it polls only through a short mode of them (twice its
	// lower-quartile wait, when that is under 50 µs) or sleeps almost at
	// once, so an idle session costs no CPU. 0 sleeps at once. The default, 1 ms, polls through waits of up
	// to 500 µs (a 1 MiB round trip on a small VM, where a sleeping
	// receiver at that size measured 1.3-1.5x slower); the Kitex
	// transport's is shorter (transport.DefaultSpinTime).
	SpinTime time.Duration
	// PollInterval is the check interval in timed mode.
	PollInterval time.Duration
	// HandshakeTimeout bounds the whole handshake.
	HandshakeTimeout time.Duration
	// AllowedUIDs are the peer uids accepted. Empty means only our own uid.
	AllowedUIDs []uint32
	// SocketMode is the permission of the listening socket file.
	SocketMode os.FileMode
	// MaxInlineSize is the largest message carried over the socket (the
	// fallback for a message that gets no buffer, including one larger than
	// MaxMessageSize), sent or accepted; the peer learns it in the
	// handshake. Larger inline frames from the peer close the session, and
	// at most twice this many inline bytes are queued for our receiver.
	// 0 means the larger of MaxMessageSize and 16 MiB; set it to
	// MaxMessageSize to cap every message at MaxMessageSize.
	MaxInlineSize int
	// MaxPeerRegionSize is the largest region we map from a peer. 0 means
	// the larger of RegionSize and the default region size (64 MiB).
	MaxPeerRegionSize int
	// AcceptWakeModes are the wake modes a server lets its clients choose
	// for the server's receiver, besides its own WakeMode. Empty means
	// notify and timed: a client cannot make the server poll (spin a core
	// per session) unless the server's configuration allows it. A client
	// asking for another mode gets the server's own WakeMode.
	AcceptWakeModes []WakeMode
	// LeakThreshold: a buffer held by the peer longer than this is logged
	// once as a probable leak. 0 disables the check.
	LeakThreshold time.Duration
}

// DefaultConfig returns the default configuration.
func DefaultConfig() Config {
	return Config{
		RegionSize:       defaultRegionSize,
		MaxMessageSize:   defaultMaxMessage,
		RingEntries:      defaultRingEntries,
		WakeMode:         WakeNotify,
		SpinTime:         time.Millisecond,
		PollInterval:     time.Millisecond,
		HandshakeTimeout: 3 * time.Second,
		SocketMode:       0o600,
		LeakThreshold:    time.Minute,
		ShrinkAfter:      defaultShrinkAfter,
	}
}

// Validate checks every setting and returns an error wrapping ErrBadConfig
// that names the first bad one and its allowed range.
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrBadConfig}, a...)...)
	}
	if c.RegionSize < MinRegionSize || c.RegionSize > MaxRegionSize {
		return bad("RegionSize %d out of range [%d, %d]", c.RegionSize, MinRegionSize, MaxRegionSize)
	}
	if c.RingEntries < MinRingEntries || c.RingEntries > MaxRingEntries || c.RingEntries&(c.RingEntries-1) != 0 {
		return bad("RingEntries %d must be a power of two in [%d, %d]", c.RingEntries, MinRingEntries, MaxRingEntries)
	}
	if c.MaxBuffers < 0 || c.MaxBuffers > c.RingEntries {
		return bad("MaxBuffers %d out of range [0, RingEntries=%d]", c.MaxBuffers, c.RingEntries)
	}
	if c.MaxMessageSize < MinMaxMessageSize {
		return bad("MaxMessageSize %d below minimum %d", c.MaxMessageSize, MinMaxMessageSize)
	}
	if c.InitialRegionSize != 0 && (c.InitialRegionSize < MinRegionSize || c.InitialRegionSize > c.RegionSize) {
		return bad("InitialRegionSize %d out of range [%d, RegionSize=%d] (or 0 for the default)", c.InitialRegionSize, MinRegionSize, c.RegionSize)
	}
	init := c.initialRegion()
	arena := arenaCapacity(init, c.RingEntries, c.maxBuffers())
	if arena < MinMaxMessageSize {
		return bad("InitialRegionSize %d leaves an arena of %d bytes (rings and buffer table of RingEntries %d take the rest); raise it",
			init, arena, c.RingEntries)
	}
	if largest := max(uint64(arena), largestGrownArena(uint64(c.RegionSize-init))); uint64(c.MaxMessageSize) > largest {
		return bad("MaxMessageSize %d larger than the largest arena (%d bytes) of RegionSize %d and InitialRegionSize %d; raise RegionSize or lower MaxMessageSize",
			c.MaxMessageSize, largest, c.RegionSize, init)
	}
	if c.ShrinkAfter < 0 || c.ShrinkAfter > time.Hour {
		return bad("ShrinkAfter %v out of range [0, 1h]", c.ShrinkAfter)
	}
	switch c.WakeMode {
	case WakeNotify, WakePoll, WakeTimed:
	default:
		return bad("WakeMode %d unknown (notify, poll or timed)", c.WakeMode)
	}
	if c.SpinTime < 0 || c.SpinTime > time.Second {
		return bad("SpinTime %v out of range [0, 1s]", c.SpinTime)
	}
	for _, m := range c.AcceptWakeModes {
		if m > WakeTimed {
			return bad("AcceptWakeModes holds unknown mode %d (notify, poll or timed)", m)
		}
	}
	if c.MaxInlineSize != 0 && (c.MaxInlineSize < MinMaxMessageSize || c.MaxInlineSize > MaxInlineSize) {
		return bad("MaxInlineSize %d out of range [%d, %d] (or 0 for the default)", c.MaxInlineSize, MinMaxMessageSize, MaxInlineSize)
	}
	if c.MaxPeerRegionSize != 0 && (c.MaxPeerRegionSize < MinRegionSize || c.MaxPeerRegionSize > MaxRegionSize) {
		return bad("MaxPeerRegionSize %d out of range [%d, %d] (or 0 for the default)", c.MaxPeerRegionSize, MinRegionSize, MaxRegionSize)
	}
	// Validated in every mode: a server may run timed sessions for its
	// clients whatever its own mode.
	if c.PollInterval < time.Microsecond || c.PollInterval > time.Second {
		return bad("PollInterval %v out of range [1µs, 1s]", c.PollInterval)
	}
	if c.HandshakeTimeout <= 0 || c.HandshakeTimeout > time.Minute {
		return bad("HandshakeTimeout %v out of range (0, 1m]", c.HandshakeTimeout)
	}
	if c.SocketMode&^0o777 != 0 || c.SocketMode&0o600 != 0o600 {
		return bad("SocketMode %o must be a permission within 0777 that includes 0600", c.SocketMode)
	}
	if c.LeakThreshold < 0 {
		return bad("LeakThreshold %v must not be negative", c.LeakThreshold)
	}
	return nil
}

func (c *Config) maxBuffers() int {
	if c.MaxBuffers == 0 {
		return c.RingEntries
	}
	return c.MaxBuffers
}

// InitialRegion is the size of the region a session of this configuration
// starts with: InitialRegionSize, or its default (see InitialRegionSize).
func (c *Config) InitialRegion() int { return c.initialRegion() }

// initialRegion is the size of the base region (see InitialRegionSize).
func (c *Config) initialRegion() int {
	if c.InitialRegionSize != 0 {
		return c.InitialRegionSize
	}
	init := min(c.RegionSize, defaultInitialRegion)
	if init == c.RegionSize {
		return init
	}
	arena := uint64(arenaCapacity(init, c.RingEntries, c.maxBuffers()))
	if arena < MinMaxMessageSize {
		return c.RegionSize
	}
	if uint64(c.MaxMessageSize) > arena && uint64(c.MaxMessageSize) > largestGrownArena(uint64(c.RegionSize-init)) {
		return c.RegionSize
	}
	return init
}

// grows reports whether sessions of this configuration may add regions.
func (c *Config) grows() bool { return c.initialRegion() < c.RegionSize }

// shrinkAfter is ShrinkAfter or its default.
func (c *Config) shrinkAfter() time.Duration {
	if c.ShrinkAfter == 0 {
		return defaultShrinkAfter
	}
	return c.ShrinkAfter
}

// largestGrownArena is the arena of the largest grown region that fits in
// room bytes: a power of two after the header page.
func largestGrownArena(room uint64) uint64 {
	if room < headerSize+MinBlockSize {
		return 0
	}
	return floorPow2(room - headerSize)
}

func floorPow2(x uint64) uint64 {
	p := uint64(1)
	for p <= x/2 {
		p <<= 1
	}
	return p
}

// defaultMaxInline is the floor of the default MaxInlineSize.
const defaultMaxInline = 16 << 20

// maxInline is the largest inline message we send or accept.
func (c *Config) maxInline() uint64 {
	if c.MaxInlineSize != 0 {
		return uint64(c.MaxInlineSize)
	}
	return uint64(min(max(c.MaxMessageSize, defaultMaxInline), MaxInlineSize))
}

// maxPeerRegion is the largest peer region we map.
func (c *Config) maxPeerRegion() uint64 {
	if c.MaxPeerRegionSize != 0 {
		return uint64(c.MaxPeerRegionSize)
	}
	return uint64(max(c.RegionSize, defaultRegionSize))
}

// acceptsWakeMode reports whether a server lets a client choose m.
func (c *Config) acceptsWakeMode(m WakeMode) bool {
	if m == c.WakeMode {
		return true
	}
	if len(c.AcceptWakeModes) == 0 {
		return m == WakeNotify || m == WakeTimed
	}
	for _, a := range c.AcceptWakeModes {
		if a == m {
			return true
		}
	}
	return false
}

func (c *Config) allowed(uid uint32) bool {
	if len(c.AllowedUIDs) == 0 {
		return uid == uint32(os.Getuid())
	}
	for _, u := range c.AllowedUIDs {
		if u == uid {
			return true
		}
	}
	return false
}
