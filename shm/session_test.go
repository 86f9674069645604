package shm

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// testConfig is small so tests reserve little memory.
func testConfig() Config {
	c := DefaultConfig()
	c.RegionSize = 8 << 20
	c.MaxMessageSize = 1 << 20
	c.RingEntries = 256
	return c
}

// pair returns a connected client and server session in this process.
func pair(t testing.TB, ccfg, scfg Config) (cli, srv *Session) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cli, err = Dial(ctx, path, ccfg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return cli, srv
}

func send(t testing.TB, s *Session, id uint64, payload []byte) {
	t.Helper()
	b, err := s.Alloc(len(payload))
	if err != nil {
		t.Fatal(err)
	}
	copy(b.Bytes(), payload)
	if err := s.Send(context.Background(), id, id*2, 7, b); err != nil {
		t.Fatal(err)
	}
}

func TestSession_PingPong(t *testing.T) {
	for _, mode := range []WakeMode{WakeNotify, WakePoll, WakeTimed} {
		t.Run(mode.String(), func(t *testing.T) {
			c := testConfig()
			c.WakeMode = mode
			sc := testConfig()
			sc.AcceptWakeModes = []WakeMode{WakeNotify, WakePoll, WakeTimed}
			cli, srv := pair(t, c, sc)
			if srv.Config().WakeMode != mode {
				t.Fatalf("server wake mode %v, want the client's %v", srv.Config().WakeMode, mode)
			}
			for i := uint64(1); i <= 200; i++ {
				p := bytes.Repeat([]byte{byte(i)}, int(i*37%5000))
				send(t, cli, i, p)
				m, err := srv.Recv(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				got := m.AppendTo(nil)
				if m.ID != i || m.Aux != i*2 || m.Kind != 7 || !bytes.Equal(got, p) {
					t.Fatalf("message %d: id %d aux %d kind %d len %d", i, m.ID, m.Aux, m.Kind, len(got))
				}
				send(t, srv, i, got)
				srv.Release(&m)
				r, err := cli.Recv(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if r.ID != i || !bytes.Equal(r.AppendTo(nil), p) {
					t.Fatalf("reply %d wrong", i)
				}
				cli.Release(&r)
			}
			waitIdle(t, cli, srv)
		})
	}
}

// waitIdle waits until neither side has buffers in use.
func waitIdle(t testing.TB, ss ...*Session) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, s := range ss {
		for {
			st := s.Stats()
			if st.InUseBuffers == 0 && st.HeldFromPeer == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("buffers still in use: %+v", st)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestSession_CloseWakesPeer(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() { // runs last: every goroutine the sessions started has exited
		for i := 0; runtime.NumGoroutine() > before && i < 500; i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Errorf("%d goroutines after close, %d before", n, before)
		}
	})
	cli, srv := pair(t, testConfig(), testConfig())
	defer srv.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := srv.Recv(context.Background())
		errc <- err
	}()
	time.Sleep(10 * time.Millisecond)
	cli.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Recv after peer close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Recv did not return after the peer closed")
	}
	if !errors.Is(srv.Err(), ErrPeerClosed) {
		t.Fatalf("Err = %v, want ErrPeerClosed", srv.Err())
	}
}

// Alloc reclaims what the peer has released once every reclaimEvery calls,
// not at each (the peer's receiver writes the release ring, so every read
// of it is a cache-line transfer), and at once when no slot is free or no
// arena has room: no Alloc fails, and no region grows, for want of a
// buffer the peer has given back.
func TestAlloc_ReclaimsEveryFewAndWhenOutOfRoom(t *testing.T) {
	ctx := context.Background()
	roundTrips := func(t *testing.T, cli, srv *Session, n, size int) {
		t.Helper()
		payload := make([]byte, size)
		for i := range n {
			payload[0] = byte(i)
			send(t, cli, uint64(i), payload)
			m, err := srv.Recv(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if m.Len() != size || m.Segment(0)[0] != byte(i) {
				t.Fatalf("round trip %d: got %d bytes", i, m.Len())
			}
			srv.Release(&m)
		}
	}
	reclaimed := func(s *Session) uint64 {
		s.allocMu.Lock()
		defer s.allocMu.Unlock()
		return s.allocCounts.reclaimed
	}

	t.Run("every few", func(t *testing.T) {
		cli, srv := pair(t, testConfig(), testConfig())
		for range 5 {
			cli.Stats() // reclaims everything released so far
			cli.allocMu.Lock()
			cli.reclaimIn = reclaimEvery // as right after a reclaim
			cli.allocMu.Unlock()
			before, pass := reclaimed(cli), cli.coarseNow.Load()
			roundTrips(t, cli, srv, reclaimEvery-1, 64)
			some := reclaimed(cli) - before
			roundTrips(t, cli, srv, 1, 64)
			all := reclaimed(cli) - before
			if cli.coarseNow.Load() != pass {
				continue // a housekeeping pass (it reclaims too) ran in the window
			}
			if some != 0 || all != reclaimEvery-1 {
				t.Fatalf("the %d Allocs after a reclaim reclaimed %d buffers, and the next one %d; want 0, then the %d released", reclaimEvery-1, some, all-some, reclaimEvery-1)
			}
			return
		}
		t.Fatal("a housekeeping pass ran in every window")
	})

	t.Run("no free slot", func(t *testing.T) {
		c := testConfig()
		c.MaxBuffers = 2
		cli, srv := pair(t, c, testConfig())
		roundTrips(t, cli, srv, 4*reclaimEvery, 64)
	})

	t.Run("no room in the arena", func(t *testing.T) {
		c := testConfig()
		c.RegionSize, c.InitialRegionSize, c.MaxMessageSize = 1<<20, 1<<20, 512<<10
		cli, srv := pair(t, c, testConfig())
		roundTrips(t, cli, srv, 2*reclaimEvery, 400<<10) // one buffer of that size fits at a time
	})

	t.Run("no growth", func(t *testing.T) {
		c := testConfig()
		c.RegionSize, c.InitialRegionSize, c.MaxMessageSize = 8<<20, 1<<20, 512<<10
		cli, srv := pair(t, c, testConfig())
		roundTrips(t, cli, srv, 2*reclaimEvery, 400<<10)
		if st := cli.Stats(); st.Grows != 0 || st.Regions != 1 {
			t.Fatalf("one message at a time grew the regions: %d grows, %d regions", st.Grows, st.Regions)
		}
	})
}
