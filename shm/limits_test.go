package shm_test

import (
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/misbehave"
	. "github.com/shmkit/kshm/shm"
)

// forged returns a server session whose client is a Forger in this process:
// a peer that does exactly what the test says, and never reads its socket
// unless told.
func forged(t *testing.T, scfg Config, o misbehave.ForgeOptions) (*Session, *misbehave.Forger) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f, err := misbehave.Forge(ctx, path, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, f
}

func recvOne(t testing.TB, s *Session) Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := s.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func limitConfig() Config {
	c := DefaultConfig()
	c.HandshakeTimeout = 5 * time.Second
	c.RegionSize, c.MaxMessageSize, c.RingEntries = 2<<20, 64<<10, 64
	c.MaxInlineSize = c.MaxMessageSize // the strict cap
	return c
}

// A peer that never reads its socket cannot block our senders: wake-ups
// are written without blocking. Before the fix wakePeer wrote with no
// deadline while holding wmu, and Send blocked forever once the socket
// buffer was full.
func TestPeerLimit_WakeWritesNeverBlock(t *testing.T) {
	s, f := forged(t, limitConfig(), misbehave.ForgeOptions{})
	done := make(chan error, 1)
	go func() {
		// Each message finds the peer asleep in a new epoch, so each asks
		// for a wake-up; far more than a socket buffer holds.
		for i := uint64(1); i <= 100000; i++ {
			f.SetState(i<<32 | 1)
			if err := s.Send(context.Background(), i, 0, 0); err != nil {
				done <- err
				return
			}
			f.SetPeerRingHead(i) // the peer "consumes" without reading the socket
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Send blocked on a peer that does not read its socket")
	}
	if st := s.Stats(); st.WakeupsSent == 0 || st.WakeupsSent >= 100000 {
		t.Fatalf("wake-ups sent %d: want some written and the rest dropped on a full socket", st.WakeupsSent)
	}
}

// Close unblocks a writer stuck on a peer that does not read. Before the
// fix close took wmu, held by the writer, and both blocked forever.
func TestPeerLimit_CloseUnblocksWriter(t *testing.T) {
	cfg := limitConfig()
	s, _ := forged(t, cfg, misbehave.ForgeOptions{MaxMessage: 64 << 10})
	errc := make(chan error, 1)
	go func() {
		data := make([]byte, 60<<10)
		for {
			if err := s.SendInline(context.Background(), 1, 0, 0, data); err != nil {
				errc <- err
				return
			}
		}
	}()
	time.Sleep(100 * time.Millisecond) // let the socket fill
	closed := make(chan struct{})
	go func() {
		s.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close blocked behind a writer")
	}
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("blocked SendInline = %v, want ErrClosed", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("SendInline still blocked after Close")
	}
}

// An inline frame above our MaxMessageSize closes the session before
// anything is allocated for it. Before the fix frames up to 64 MiB were
// allocated whatever our limit.
func TestPeerLimit_InlineFrameAboveOurMaximum(t *testing.T) {
	s, f := forged(t, limitConfig(), misbehave.ForgeOptions{})
	hdr := InlineFrame(0)[:FrameHeaderSize]
	binary.LittleEndian.PutUint32(hdr[4:], InlineMetaSize+(1<<20))
	if _, err := f.Conn.Write(hdr); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("session still open")
	}
	if !errors.Is(s.Err(), ErrCorrupt) {
		t.Fatalf("Err = %v, want ErrCorrupt", s.Err())
	}
}

// Inline messages queued for a receiver that does not take them are
// bounded in bytes: the reader stops reading the socket, so the peer's
// writes block instead of our heap growing. Before the fix 256 frames of
// up to 64 MiB each could be queued.
func TestPeerLimit_InlineBytesQueuedAreBounded(t *testing.T) {
	cfg := limitConfig()
	s, f := forged(t, cfg, misbehave.ForgeOptions{})
	const frames = 100
	frame := InlineFrame(cfg.MaxMessageSize)
	wrote := make(chan int, 1)
	go func() {
		n := 0
		for ; n < frames; n++ {
			if _, err := f.Conn.Write(frame); err != nil {
				break
			}
		}
		wrote <- n
	}()
	time.Sleep(300 * time.Millisecond)
	q, budget, n := s.InlineQueued()
	if q > budget || int64(n*cfg.MaxMessageSize) > budget {
		t.Fatalf("%d inline bytes (%d messages of %d bytes) queued, budget %d", q, n, cfg.MaxMessageSize, budget)
	}
	// Taking them lets the peer go on; all arrive intact.
	for i := 0; i < frames; i++ {
		m := recvOne(t, s)
		if !m.Inline() || m.Len() != cfg.MaxMessageSize {
			t.Fatalf("message %d: inline %v, %d bytes", i, m.Inline(), m.Len())
		}
		s.Release(&m)
	}
	if n := <-wrote; n != frames {
		t.Fatalf("peer wrote %d frames of %d", n, frames)
	}
}

// Each side announces its inline cap: SendInline refuses what the peer
// would refuse, and accepts up to the peer's cap (by default above
// MaxMessageSize, the fallback for messages too large for a buffer).
func TestPeerLimit_InlineCapAnnounced(t *testing.T) {
	strict := limitConfig()
	lax := limitConfig()
	lax.MaxInlineSize = 0 // the default: max(MaxMessageSize, 16 MiB)
	path := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(path, lax)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, err := Dial(ctx, path, strict)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	big := make([]byte, 100<<10)
	if err := srv.SendInline(ctx, 1, 0, 0, big); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("SendInline above the peer's cap = %v, want ErrTooLarge", err)
	}
	if err := cli.SendInline(ctx, 2, 0, 0, big); err != nil {
		t.Fatalf("SendInline within the peer's cap = %v", err)
	}
	m := recvOne(t, srv)
	if m.ID != 2 || m.Len() != len(big) {
		t.Fatalf("got id %d, %d bytes", m.ID, m.Len())
	}
	srv.Release(&m)
	if cli.Err() != nil || srv.Err() != nil {
		t.Fatalf("closed: %v / %v", cli.Err(), srv.Err())
	}
}

// A peer region whose pages are not reserved is refused before we map it.
func TestPeerLimit_SparseRegionRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(path, limitConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if f, err := misbehave.Forge(ctx, path, misbehave.ForgeOptions{Sparse: true}); err == nil {
		f.Close()
		t.Fatal("a sparse peer region was accepted")
	}
}

// A peer region larger than our MaxPeerRegionSize is refused from the
// hello, before we reserve anything. Before the fix anything up to 1 TiB
// was mapped.
func TestPeerLimit_RegionAboveOurCapRefused(t *testing.T) {
	cfg := limitConfig()
	cfg.MaxPeerRegionSize = 4 << 20
	path := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f, err := misbehave.Forge(ctx, path, misbehave.ForgeOptions{RegionSize: 8 << 20})
	if !errors.Is(err, misbehave.ErrRefused) {
		if f != nil {
			f.Close()
		}
		t.Fatalf("Forge with an 8 MiB region against a 4 MiB cap = %v, want a refusal", err)
	}
	// And on the client side.
	big := cfg
	big.RegionSize, big.InitialRegionSize = 8<<20, 8<<20 // a base region of 8 MiB
	path2 := filepath.Join(t.TempDir(), "s2")
	ln2, err := Listen(path2, big)
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	if s, err := Dial(ctx, path2, cfg); !errors.Is(err, ErrHandshake) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("Dial to a server with an 8 MiB region and our 4 MiB cap = %v, want ErrHandshake", err)
	}
}

// A peer announcing more of its regions than we map (too large, too many,
// or a bad index) is refused: that session closes with ErrRegionLimit, and
// another session of the same listener is unaffected.
func TestPeerLimit_GrownRegionsCapped(t *testing.T) {
	cases := []struct {
		name     string
		announce func(f *misbehave.Forger) error
	}{
		{"too large", func(f *misbehave.Forger) error { return f.AnnounceRegion(1, 8<<20, 2<<20) }},
		{"too many", func(f *misbehave.Forger) error {
			for i := uint32(1); i <= MaxRegions; i++ {
				if err := f.AnnounceRegion(i, 64<<10, 2<<20); err != nil {
					return err
				}
			}
			return nil
		}},
		{"index out of range", func(f *misbehave.Forger) error { return f.AnnounceRegion(MaxRegions, 64<<10, 2<<20) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := limitConfig()
			cfg.MaxPeerRegionSize = 4 << 20 // the forger's 2 MiB base region and a little more
			path := filepath.Join(t.TempDir(), "s")
			ln, err := Listen(path, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			good, err := Dial(ctx, path, limitConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer good.Close()
			gs, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer gs.Close()
			f, err := misbehave.Forge(ctx, path, misbehave.ForgeOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			c.announce(f) // writes may fail once the server has closed
			select {
			case <-s.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("session still open after the peer announced regions above our caps")
			}
			if !errors.Is(s.Err(), ErrCorrupt) || !errors.Is(s.Err(), ErrRegionLimit) {
				t.Fatalf("Err = %v, want ErrCorrupt and ErrRegionLimit", s.Err())
			}
			// The other session still works.
			b, err := good.Alloc(1000)
			if err != nil {
				t.Fatal(err)
			}
			if err := good.Send(ctx, 1, 0, 0, b); err != nil {
				t.Fatal(err)
			}
			m, err := gs.Recv(ctx)
			if err != nil {
				t.Fatal(err)
			}
			gs.Release(&m)
		})
	}
}
