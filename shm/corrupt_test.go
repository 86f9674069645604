package shm

import (
	"bytes"
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// publish writes d into s's send ring at its tail and publishes it, as a
// broken or hostile peer would: through the real mapped structures.
func publish(s *Session, ds ...desc) {
	s.sendMu.Lock()
	mask := s.local.geo.ringEntries - 1
	for _, d := range ds {
		s.local.ring[s.localTail&mask] = d
		s.localTail++
	}
	atomic.StoreUint64(&s.localHdr.RingTail, s.localTail)
	s.sendMu.Unlock()
	s.wakePeer()
}

func expectCorrupt(t *testing.T, srv *Session) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := srv.Recv(ctx)
	if !errors.Is(err, ErrClosed) || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Recv = %v, want ErrClosed wrapping ErrCorrupt", err)
	}
	if !errors.Is(srv.Err(), ErrCorrupt) {
		t.Fatalf("Err = %v", srv.Err())
	}
}

func TestCorrupt_Descriptors(t *testing.T) {
	cases := map[string]func(s *Session) []desc{
		"offset outside arena": func(s *Session) []desc {
			return []desc{{Off: s.local.geo.arenaSize - 10, Len: 100, Slot: 0, Seq: uint32(s.localTail)}}
		},
		"huge offset": func(s *Session) []desc {
			return []desc{{Off: math.MaxUint64 - 5, Len: 100, Slot: 0, Seq: uint32(s.localTail)}}
		},
		"length beyond max": func(s *Session) []desc {
			return []desc{{Off: 0, Len: math.MaxUint32, Slot: 0, Seq: uint32(s.localTail)}}
		},
		"bad sequence": func(s *Session) []desc {
			return []desc{{Off: 0, Len: 10, Slot: 0, Seq: uint32(s.localTail) + 3}}
		},
		"slot out of range": func(s *Session) []desc {
			return []desc{{Off: 0, Len: 10, Slot: 1 << 30, Seq: uint32(s.localTail)}}
		},
		"unknown flags": func(s *Session) []desc {
			return []desc{{Off: 0, Len: 10, Slot: 0, Seq: uint32(s.localTail), Flags: 0x80}}
		},
		"too many segments": func(s *Session) []desc {
			var ds []desc
			for i := 0; i <= MaxSegments; i++ {
				ds = append(ds, desc{Off: 0, Len: 10, Slot: 0, Seq: uint32(s.localTail) + uint32(i), Flags: descMore})
			}
			return ds
		},
		"segments of different messages": func(s *Session) []desc {
			return []desc{
				{ID: 1, Off: 0, Len: 10, Slot: 0, Seq: uint32(s.localTail), Flags: descMore},
				{ID: 2, Off: 0, Len: 10, Slot: 0, Seq: uint32(s.localTail) + 1},
			}
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			cli, srv := pair(t, testConfig(), testConfig())
			publish(cli, mk(cli)...)
			expectCorrupt(t, srv)
			select { // the client learns
			case <-cli.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("client session still open after the server closed it")
			}
		})
	}
}

func TestCorrupt_RingTailRunaway(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	atomic.StoreUint64(&cli.localHdr.RingTail, 1<<40)
	cli.wakePeer()
	expectCorrupt(t, srv)
}

func TestCorrupt_ReleaseOfUnheldBuffer(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	// The client "releases" a server buffer it never received.
	atomic.StoreUint64(&cli.local.rel[0], 3<<32|1)
	atomic.StoreUint64(&cli.localHdr.RelTail, 1)
	if _, err := srv.Alloc(100); !errors.Is(err, ErrClosed) {
		t.Fatalf("Alloc after a bogus release = %v, want ErrClosed", err)
	}
	if !errors.Is(srv.Err(), ErrCorrupt) {
		t.Fatalf("Err = %v", srv.Err())
	}
}

func TestCorrupt_HeaderRejectedAtMap(t *testing.T) {
	r, err := createRegion(2<<20, 64, 64, 64, 64<<10, 2<<20, roleClient, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.unmap()
	mutations := map[string]func(h *regionHeader){
		"magic":     func(h *regionHeader) { h.Magic++ },
		"version":   func(h *regionHeader) { h.Version = 99 },
		"size":      func(h *regionHeader) { h.Size *= 2 },
		"ring":      func(h *regionHeader) { h.RingEntries = 100 },
		"arena off": func(h *regionHeader) { h.ArenaOff += 4096 },
		"max msg":   func(h *regionHeader) { h.MaxMessage = 1 << 40 },
		"block":     func(h *regionHeader) { h.BlockSize = 64 },
		"region":    func(h *regionHeader) { h.Region = 3 },
		"max total": func(h *regionHeader) { h.MaxTotal = 1 << 20 },
	}
	for name, mut := range mutations {
		t.Run(name, func(t *testing.T) {
			saved := *r.hdr
			defer func() { *r.hdr = saved }()
			mut(r.hdr)
			fd, err := dupFD(r.fd)
			if err != nil {
				t.Fatal(err)
			}
			if p, err := mapPeerRegion(fd, MaxRegionSize); !errors.Is(err, ErrCorrupt) {
				if p != nil {
					p.unmap()
				}
				t.Fatalf("mapPeerRegion = %v, want ErrCorrupt", err)
			}
		})
	}
	fd, _ := dupFD(r.fd)
	p, err := mapPeerRegion(fd, MaxRegionSize)
	if err != nil {
		t.Fatalf("intact region rejected: %v", err)
	}
	p.unmap()
}

func TestRegion_LargerThanMemoryFails(t *testing.T) {
	// Ask for far more than the machine has: the check reads MemAvailable and
	// the memory cgroup read-only, and nothing is reserved.
	_, err := createRegion(1<<40, 64, 64, 64, 64<<10, 1<<40, roleClient, 0)
	if !errors.Is(err, ErrInsufficientMemory) {
		t.Fatalf("createRegion(1 TiB) = %v, want ErrInsufficientMemory", err)
	}
	t.Log(err)
	// Through Dial: the client's region cannot be made; the error says so.
	cfg := testConfig()
	scfg := cfg
	scfg.MaxPeerRegionSize = MaxRegionSize // let the client's own check speak
	path := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	big := cfg
	big.RegionSize, big.InitialRegionSize = 1<<40, 1<<40 // a fixed-size region of 1 TiB
	if _, err := Dial(context.Background(), path, big); !errors.Is(err, ErrInsufficientMemory) {
		t.Fatalf("Dial with a 1 TiB region = %v", err)
	}
}

func TestHandshake_UIDNotAllowed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	scfg := testConfig()
	scfg.AllowedUIDs = []uint32{uint32(os.Getuid()) + 4242}
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = Dial(context.Background(), path, testConfig())
	if !errors.Is(err, ErrPeerNotAllowed) {
		t.Fatalf("Dial = %v, want ErrPeerNotAllowed", err)
	}
	// And the client refuses a server whose uid it does not allow.
	ln2, err := Listen(filepath.Join(t.TempDir(), "t"), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	ccfg := testConfig()
	ccfg.AllowedUIDs = []uint32{uint32(os.Getuid()) + 1}
	if _, err := Dial(context.Background(), ln2.Addr().String(), ccfg); !errors.Is(err, ErrPeerNotAllowed) {
		t.Fatalf("Dial to a disallowed server = %v", err)
	}
}

func TestListen_SocketMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(path, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket mode %v, want 0600 socket", fi.Mode())
	}
}

func TestConfig_ValidateNamesSetting(t *testing.T) {
	cases := map[string]func(c *Config){
		"RegionSize":       func(c *Config) { c.RegionSize = 10 },
		"RingEntries":      func(c *Config) { c.RingEntries = 100 },
		"MaxMessageSize":   func(c *Config) { c.MaxMessageSize = 1 << 30 },
		"WakeMode":         func(c *Config) { c.WakeMode = 9 },
		"HandshakeTimeout": func(c *Config) { c.HandshakeTimeout = 0 },
		"SocketMode":       func(c *Config) { c.SocketMode = 0o400 },
		"MaxBuffers":       func(c *Config) { c.MaxBuffers = -1 },
	}
	for name, mut := range cases {
		c := DefaultConfig()
		mut(&c)
		err := c.Validate()
		if !errors.Is(err, ErrBadConfig) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: Validate = %v", name, err)
		}
	}
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("default config invalid: %v", err)
	}
}

func TestCorrupt_WakeFloodClosesSession(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	var f [frameHeaderSize]byte
	putFrameHeader(f[:], frameWake, 0)
	flood := bytes.Repeat(f[:], wakeSlack+100)
	cli.wmu.Lock()
	cli.conn.Write(flood)
	cli.wmu.Unlock()
	select {
	case <-srv.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a wake-up flood did not close the session")
	}
	if !errors.Is(srv.Err(), ErrCorrupt) {
		t.Fatalf("Err = %v, want ErrCorrupt", srv.Err())
	}
}

// Send reads the peer's consumer index of our ring (a cache line the peer's
// receiver writes at every message) only when the index it last read
// leaves too little room; it only grows, so the room that one leaves is
// never more than there is. A corrupt index, one ahead of our tail, is
// therefore found when the ring looks full, and closes the session then.
func TestCorrupt_PeerHeadReadWhenRingLooksFull(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	ctx := context.Background()
	entries := int(cli.local.geo.ringEntries)
	atomic.StoreUint64(&srv.localHdr.PeerRingHead, 1<<40) // the server "consumed" far more than was sent
	for i := range entries {
		if err := cli.Send(ctx, uint64(i), 0, 0); err != nil {
			t.Fatalf("send %d of %d with room in the ring as last read: %v", i, entries, err)
		}
	}
	err := cli.Send(ctx, uint64(entries), 0, 0)
	if !errors.Is(err, ErrClosed) || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("send with the ring full as last read = %v, want ErrClosed wrapping ErrCorrupt", err)
	}
	if !errors.Is(cli.Err(), ErrCorrupt) {
		t.Fatalf("Err = %v", cli.Err())
	}
}
