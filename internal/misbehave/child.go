package misbehave

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/shm"
)

// Child roles (shmtest.Start's role) and their environment. A test package
// that uses them calls RunChild from an init function:
//
//	func init() {
//		if misbehave.IsChildRole(shmtest.Role()) {
//			os.Exit(misbehave.RunChild(shmtest.Role()))
//		}
//	}
const (
	RoleForge   = "misbehave-forge"   // runs ForgeCases named in EnvCases, one session each
	RoleHold    = "misbehave-hold"    // EnvN calls of EnvSize bytes, keeping every reply
	RoleFlood   = "misbehave-flood"   // EnvN wake-up frames, then one call (EnvKitex: a check it is open)
	RoleFrame   = "misbehave-frame"   // one call, then a garbage frame on the socket
	RoleStall   = "misbehave-stall"   // EnvN stalled handshakes of each kind
	RoleGarbage = "misbehave-garbage" // connections that send no preface
	RoleProbe   = "misbehave-probe"   // tries to write, map writable, resize and unseal the server's region
	RoleDial    = "misbehave-dial"    // an ordinary client (run as another user by the test)

	EnvSock  = "KSHM_MB_SOCK"
	EnvCases = "KSHM_MB_CASES" // comma-separated ForgeCases names
	EnvN     = "KSHM_MB_N"
	EnvSize  = "KSHM_MB_SIZE"
	// EnvWait bounds how long a child waits for the server (default 10 s).
	EnvWait = "KSHM_MB_WAIT"
	// EnvKitex, when "1", says the server is a Kitex server, which answers
	// no raw engine messages: the Peer roles then make no calls.
	EnvKitex = "KSHM_MB_KITEX"
	// EnvAllow is the uid the RoleDial client accepts as its server
	// (default: only its own).
	EnvAllow = "KSHM_MB_ALLOW"
)

// IsChildRole reports whether role is one of this package's child roles.
func IsChildRole(role string) bool { return strings.HasPrefix(role, "misbehave-") }

// PeerConfig is the engine configuration of the Peer children: small.
func PeerConfig() shm.Config {
	c := shm.DefaultConfig()
	c.RegionSize, c.MaxMessageSize, c.RingEntries = 2<<20, 64<<10, 64
	c.HandshakeTimeout = 5 * time.Second
	c.LeakThreshold = 0
	return c
}

// ForgeCases are the forger's misbehaviours, each on a fresh session: every
// one must make the server close that session as corrupt.
var ForgeCases = map[string]func(f *Forger) error{
	"garbage descriptor": func(f *Forger) error {
		r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
		d := Desc{ID: r.Uint64(), Aux: r.Uint64(), Off: r.Uint64(), Len: r.Uint32(), Slot: r.Uint32(), Gen: r.Uint32(),
			Seq: uint32(f.Tail()) + 1 + r.Uint32()%1000, Kind: uint16(r.Uint32()), Flags: uint16(r.Uint32())}
		return f.Publish(d)
	},
	"offset past the arena": func(f *Forger) error {
		return f.Publish(Desc{Off: f.ArenaSize() - 10, Len: 100, Slot: 0, Gen: 1, Seq: uint32(f.Tail())})
	},
	"offset overflowing": func(f *Forger) error {
		return f.Publish(Desc{Off: math.MaxUint64 - 5, Len: 100, Slot: 0, Gen: 1, Seq: uint32(f.Tail())})
	},
	"length past the maximum message": func(f *Forger) error {
		return f.Publish(Desc{Off: 0, Len: 64<<10 + 1, Slot: 0, Gen: 1, Seq: uint32(f.Tail())})
	},
	"length past the arena": func(f *Forger) error {
		return f.Publish(Desc{Off: 0, Len: math.MaxUint32, Slot: 0, Gen: 1, Seq: uint32(f.Tail())})
	},
	"slot out of range": func(f *Forger) error {
		return f.Publish(Desc{Off: 0, Len: 10, Slot: 1 << 20, Gen: 1, Seq: uint32(f.Tail())})
	},
	"unknown flags": func(f *Forger) error {
		return f.Publish(Desc{Off: 0, Len: 10, Slot: 0, Gen: 1, Seq: uint32(f.Tail()), Flags: 0x40})
	},
	"message of too many segments": func(f *Forger) error {
		var ds []Desc
		for i := range 9 {
			ds = append(ds, Desc{Off: 0, Len: 10, Slot: uint32(i), Gen: 1, Seq: uint32(f.Tail()) + uint32(i), Flags: DescMore})
		}
		return f.Publish(ds...)
	},
	"runaway ring index": func(f *Forger) error { return f.SetRingTail(1 << 40) },
	"release of a buffer never held": func(f *Forger) error {
		return f.Release(3<<32 | 1)
	},
	"release ring overrun": func(f *Forger) error {
		toks := make([]uint64, 0, 4096)
		for i := range 4096 {
			toks = append(toks, uint64(i)<<32|1)
		}
		return f.Release(toks...)
	},
	"unknown frame type": func(f *Forger) error { return f.WriteFrame(0x77, nil) },
	"frame reserved bytes": func(f *Forger) error {
		b := Frame(FrameWake, nil)
		b[2] = 9
		_, err := f.Conn.Write(b)
		return err
	},
	"inline frame too large": func(f *Forger) error {
		b := Frame(FrameInline, nil)
		binary.LittleEndian.PutUint32(b[4:], math.MaxUint32)
		_, err := f.Conn.Write(b)
		return err
	},
	"inline frame with reserved bytes set": func(f *Forger) error {
		meta := make([]byte, 24+5)
		meta[20] = 1
		return f.WriteFrame(FrameInline, meta)
	},
	"wake frame with payload": func(f *Forger) error { return f.WriteFrame(FrameWake, []byte("xyz")) },
}

// ForgeCaseNames are the names of ForgeCases, sorted.
func ForgeCaseNames() []string {
	var n []string
	for k := range ForgeCases {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

// HeaderCases corrupt the forger's region header before it is sent: the
// server must refuse the handshake.
var HeaderCases = map[string]func(h []byte){
	"magic":          func(h []byte) { h[0] ^= 0xff },
	"layout version": func(h []byte) { binary.LittleEndian.PutUint32(h[8:], 99) },
	"region size":    func(h []byte) { binary.LittleEndian.PutUint64(h[16:], 1<<40) },
	"arena offset":   func(h []byte) { binary.LittleEndian.PutUint64(h[64:], 4096) },
	"arena size":     func(h []byte) { binary.LittleEndian.PutUint64(h[72:], 1<<40) },
	"max message":    func(h []byte) { binary.LittleEndian.PutUint64(h[80:], 1<<40) },
	"ring entries":   func(h []byte) { binary.LittleEndian.PutUint32(h[32:], 100) },
}

// RunChild runs the scenario of role and returns the exit status. It prints
// lines (shmtest.Printf) the parent waits for.
func RunChild(role string) int {
	sock := os.Getenv(EnvSock)
	n, _ := strconv.Atoi(os.Getenv(EnvN))
	size, _ := strconv.Atoi(os.Getenv(EnvSize))
	wait := 10 * time.Second
	if v, err := time.ParseDuration(os.Getenv(EnvWait)); err == nil {
		wait = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	kitex := os.Getenv(EnvKitex) == "1"
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "misbehave %s (pid %d): "+format+"\n", append([]any{role, os.Getpid()}, a...)...)
		shmtest.Printf("fail "+format, a...)
		return 1
	}
	switch role {
	case RoleForge:
		for _, name := range strings.Split(os.Getenv(EnvCases), ",") {
			if hc, ok := HeaderCases[name]; ok {
				_, err := Forge(ctx, sock, ForgeOptions{CorruptHeader: hc})
				shmtest.Printf("header %s refused=%v: %v", name, err != nil, err)
				continue
			}
			fc, ok := ForgeCases[name]
			if !ok {
				return fail("no case %q", name)
			}
			f, err := Forge(ctx, sock, ForgeOptions{})
			if err != nil {
				return fail("forge %s: %v", name, err)
			}
			if err := f.SendValid(1, 0, []byte("a well-formed message first")); err != nil {
				return fail("%s: valid message: %v", name, err)
			}
			if err := fc(f); err != nil {
				return fail("%s: %v", name, err)
			}
			reason, err := f.WaitClosed(wait)
			f.Close()
			if err != nil {
				shmtest.Printf("case %s open: %v", name, err)
				continue
			}
			shmtest.Printf("case %s closed: %s", name, reason)
		}
		shmtest.Printf("done")
		return 0
	case RoleHold:
		p, err := Dial(ctx, sock, PeerConfig())
		if err != nil {
			return fail("dial: %v", err)
		}
		defer p.Close()
		inline := 0
		for i := range n {
			payload := payloadFor(uint64(i), size)
			out, in, err := p.Call(ctx, uint64(i), payload, true)
			if err != nil {
				return fail("call %d: %v", i, err)
			}
			if !bytes.Equal(out, payload) {
				return fail("call %d: reply differs", i)
			}
			if in {
				inline++
			}
		}
		shmtest.Printf("held %d inline %d", p.Held(), inline)
		select { // hold until killed (bounded)
		case <-p.S.Done():
			shmtest.Printf("closed %v", p.S.Err())
		case <-time.After(2 * time.Minute):
		}
		return 0
	case RoleFlood:
		p, err := Dial(ctx, sock, PeerConfig())
		if err != nil {
			return fail("dial: %v", err)
		}
		defer p.Close()
		sent, err := p.FloodWakeups(n, 1024)
		shmtest.Printf("flooded %d %v", sent, err)
		if kitex {
			select {
			case <-p.S.Done():
				shmtest.Printf("after closed %v", p.S.Err())
			case <-time.After(500 * time.Millisecond):
				shmtest.Printf("after open")
			}
			return 0
		}
		payload := payloadFor(1, 1000)
		out, _, err := p.Call(ctx, 1, payload, false)
		switch {
		case err != nil:
			shmtest.Printf("after closed %v", err)
		case !bytes.Equal(out, payload):
			shmtest.Printf("after mismatch")
		default:
			shmtest.Printf("after served")
		}
		return 0
	case RoleFrame:
		p, err := Dial(ctx, sock, PeerConfig())
		if err != nil {
			return fail("dial: %v", err)
		}
		defer p.Close()
		payload := payloadFor(1, 100)
		if !kitex {
			if out, _, err := p.Call(ctx, 1, payload, false); err != nil || !bytes.Equal(out, payload) {
				return fail("first call: %v", err)
			}
		}
		if err := p.WriteRaw(Frame(0x5a, []byte("garbage"))); err != nil {
			return fail("write: %v", err)
		}
		shmtest.Printf("closed %v", p.WaitClosed(wait))
		return 0
	case RoleProbe:
		var pr Probe
		f, err := Forge(ctx, sock, ForgeOptions{Probe: &pr})
		if err != nil {
			return fail("forge: %v", err)
		}
		f.Close()
		var breaches []string
		for name, err := range map[string]error{"map-writable": pr.MapWritable, "write": pr.Write, "grow": pr.Grow,
			"shrink": pr.Shrink, "add-seal": pr.Unseal} {
			if err == nil {
				breaches = append(breaches, name)
			}
		}
		sort.Strings(breaches)
		shmtest.Printf("probe breaches=%q map-writable=%v write=%v grow=%v shrink=%v add-seal=%v seals=%#x",
			breaches, pr.MapWritable, pr.Write, pr.Grow, pr.Shrink, pr.Unseal, pr.Seals)
		return 0
	case RoleDial:
		cfg := PeerConfig()
		if v, err := strconv.ParseUint(os.Getenv(EnvAllow), 10, 32); err == nil {
			cfg.AllowedUIDs = []uint32{uint32(v)}
		}
		p, err := Dial(ctx, sock, cfg)
		if err == nil {
			p.Close()
		}
		shmtest.Printf("dial not-allowed=%v: %v", errors.Is(err, shm.ErrPeerNotAllowed), err)
		return 0
	case RoleStall:
		kinds := []StallKind{StallSilent, StallPreface, StallHalfHello, StallBeforeReady}
		var conns []*net.UnixConn
		for range n {
			for _, k := range kinds {
				c, err := Stall(ctx, sock, k)
				if err != nil {
					return fail("stall %v: %v", k, err)
				}
				conns = append(conns, c)
				defer c.Close()
			}
		}
		shmtest.Printf("stalled %d", len(conns))
		return waitAllClosed(conns, wait)
	case RoleGarbage:
		garbage := [][]byte{
			[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
			{0xff, 'K', 'S', 'H', 'M', 0, 0, 2}, // a preface of another version
			payloadFor(9, 4096),
			{0xff},
		}
		var conns []*net.UnixConn
		for range max(n, 1) {
			for _, g := range garbage {
				c, err := Garbage(ctx, sock, g)
				if err != nil {
					return fail("garbage: %v", err)
				}
				conns = append(conns, c)
				defer c.Close()
			}
		}
		shmtest.Printf("garbage %d", len(conns))
		return waitAllClosed(conns, wait)
	}
	return fail("unknown role %q", role)
}

// payloadFor is the payload of call id: size bytes both sides can recompute.
func payloadFor(id uint64, size int) []byte {
	p := make([]byte, size)
	r := rand.New(rand.NewPCG(id, 0x6b73686d))
	for i := 0; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], r.Uint64())
	}
	return p
}

// Payload is payloadFor, for the parent side of a test.
func Payload(id uint64, size int) []byte { return payloadFor(id, size) }

func waitAllClosed(conns []*net.UnixConn, wait time.Duration) int {
	closed := 0
	for _, c := range conns {
		if WaitServerClose(c, wait) {
			closed++
		}
	}
	shmtest.Printf("closed %d of %d", closed, len(conns))
	return 0
}
