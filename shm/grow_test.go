package shm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
)

// growConfig starts at 4 MiB per side and may grow to 64 MiB; grown regions
// idle for 300 ms are released.
func growConfig() Config {
	c := DefaultConfig()
	c.RingEntries = 256
	c.MaxMessageSize = 4 << 20
	c.ShrinkAfter = 300 * time.Millisecond
	return c
}

// sendVerified sends one message of size bytes with a pattern seeded by id,
// and checks it byte for byte on the receiver.
func sendVerified(t testing.TB, from, to *Session, id uint64, size int) {
	t.Helper()
	b, err := from.Alloc(size)
	if err != nil {
		t.Fatalf("Alloc(%d): %v (stats %+v)", size, err, from.Stats())
	}
	fill(b.Bytes(), id)
	if err := from.Send(context.Background(), id, 0, 0, b); err != nil {
		t.Fatal(err)
	}
	m := recvOne(t, to)
	want := make([]byte, size)
	fill(want, id)
	if m.ID != id || m.Inline() || !bytes.Equal(m.AppendTo(nil), want) {
		t.Fatalf("message %d: inline %v, %d bytes, content differs", id, m.Inline(), m.Len())
	}
	if size > 4<<20-MinBlockSize*1024 { // held now: its region is mapped on both sides
		if fs, ts := from.Stats(), to.Stats(); fs.Regions < 2 || ts.PeerRegions < 2 || fs.CommittedBytes <= 4<<20 {
			t.Fatalf("%d bytes received with %d regions committed (%d bytes), %d mapped by the receiver",
				size, fs.Regions, fs.CommittedBytes, ts.PeerRegions)
		}
	}
	to.Release(&m)
}

// waitRegions waits until s has ours regions of its own and the peer maps
// peers of ours.
func waitRegions(t testing.TB, s, peer *Session, ours int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, pst := s.Stats(), peer.Stats()
		if st.Regions == ours && pst.PeerRegions == ours {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("regions: ours %d, mapped by the peer %d, want %d (%+v)", st.Regions, pst.PeerRegions, ours, s.Regions())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestGrow_StartsSmallGrowsAndShrinksUnderVerifiedTraffic(t *testing.T) {
	before := memfdCounts(t)
	cfg := growConfig()
	cli, srv := pair(t, cfg, cfg)
	if st := cli.Stats(); st.CommittedBytes > 4<<20 || st.Regions != 1 {
		t.Fatalf("a new session commits %d bytes in %d regions, want at most 4 MiB in one", st.CommittedBytes, st.Regions)
	}
	for round := 0; round < 2; round++ {
		id := uint64(round * 1000)
		for _, size := range []int{100, 1 << 20, 3 << 20, 4 << 20, 4<<20 - 7, 2 << 20, 4 << 20} {
			sendVerified(t, cli, srv, id, size)
			sendVerified(t, srv, cli, id+1, size)
			id += 2
		}
		cs, ss := cli.Stats(), srv.Stats()
		if cs.Grows <= uint64(round) || ss.Grows <= uint64(round) {
			t.Fatalf("round %d: grew %d and %d times", round, cs.Grows, ss.Grows)
		}
		if cs.InlineSent != 0 || ss.InlineSent != 0 {
			t.Fatalf("messages went inline: %d, %d", cs.InlineSent, ss.InlineSent)
		}
		t.Logf("round %d: client %d regions %d bytes, server %d regions %d bytes", round,
			cs.Regions, cs.CommittedBytes, ss.Regions, ss.CommittedBytes)
		// Idle: the grown regions are released on both sides.
		waitRegions(t, cli, srv, 1)
		waitRegions(t, srv, cli, 1)
		if cs := cli.Stats(); cs.Shrinks == 0 || cs.CommittedBytes > 4<<20 {
			t.Fatalf("after shrinking: %+v", cs)
		}
	}
	if g := ReadStats(); g.Grows == 0 || g.Shrinks == 0 {
		t.Fatalf("process-wide: grows %d shrinks %d", g.Grows, g.Shrinks)
	}
	cli.Close()
	srv.Close()
	shmtest.WaitBaseline(t, 5*time.Second, "memfd mappings and fds after close", before, func() []int { return memfdCounts(t) })
}

// A grown region stays while a message in it is held, and is released once
// it comes back.
func TestGrow_RegionKeptWhileAMessageIsHeld(t *testing.T) {
	cfg := growConfig()
	cli, srv := pair(t, cfg, cfg)
	b, err := cli.Alloc(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	fill(b.Bytes(), 5)
	if err := cli.Send(context.Background(), 5, 0, 0, b); err != nil {
		t.Fatal(err)
	}
	m := recvOne(t, srv)
	time.Sleep(3 * cfg.ShrinkAfter)
	if cli.Stats().Regions != 2 || srv.Stats().PeerRegions != 2 {
		t.Fatalf("a region was released while its message is held: %+v", cli.Regions())
	}
	want := make([]byte, 4<<20)
	fill(want, 5)
	if !bytes.Equal(m.AppendTo(nil), want) {
		t.Fatal("held message changed")
	}
	srv.Release(&m)
	waitRegions(t, cli, srv, 1)
}

// When the regions cannot grow, the allocation fails with ErrNoMemory and
// the reason, and the fallback is counted by reason.
func TestGrow_FallbackCountedByReason(t *testing.T) {
	t.Run("our maximum", func(t *testing.T) {
		cfg := growConfig()
		cfg.RegionSize = 12 << 20 // 4 MiB base + one 4 MiB arena
		cli, _ := pair(t, cfg, cfg)
		held, err := cli.Alloc(4 << 20)
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Free(held)
		_, err = cli.Alloc(4 << 20)
		if !errors.Is(err, ErrNoMemory) || !errors.Is(err, ErrGrowLimit) {
			t.Fatalf("Alloc beyond RegionSize = %v, want ErrNoMemory and ErrGrowLimit", err)
		}
		if f := cli.Stats().GrowFallbacks; f.Limit != 1 || f.PeerLimit != 0 || f.Memory != 0 {
			t.Fatalf("fallbacks %+v", f)
		}
		if ReadStats().GrowFallbacks.Limit == 0 {
			t.Fatal("ReadStats does not count the fallback")
		}
	})
	t.Run("peer limit", func(t *testing.T) {
		ccfg, scfg := growConfig(), growConfig()
		scfg.MaxPeerRegionSize = 6 << 20 // the server maps at most 6 MiB of the client's
		cli, _ := pair(t, ccfg, scfg)
		_, err := cli.Alloc(4 << 20)
		if !errors.Is(err, ErrNoMemory) || !errors.Is(err, ErrGrowPeerLimit) {
			t.Fatalf("Alloc beyond the peer's cap = %v, want ErrNoMemory and ErrGrowPeerLimit", err)
		}
		if f := cli.Stats().GrowFallbacks; f.PeerLimit != 1 {
			t.Fatalf("fallbacks %+v", f)
		}
		b, err := cli.Alloc(1 << 20) // the base region still serves
		if err != nil {
			t.Fatal(err)
		}
		cli.Free(b)
	})
	t.Run("fixed size", func(t *testing.T) {
		cfg := growConfig()
		cfg.RegionSize, cfg.InitialRegionSize = 8<<20, 8<<20
		cli, _ := pair(t, cfg, cfg)
		if st := cli.Stats(); st.CommittedBytes != 8<<20 {
			t.Fatalf("fixed region commits %d", st.CommittedBytes)
		}
		var bufs []Buffer
		for {
			b, err := cli.Alloc(1 << 20)
			if err != nil {
				if !errors.Is(err, ErrNoMemory) || errors.Is(err, ErrGrowLimit) {
					t.Fatalf("full fixed region: %v", err)
				}
				break
			}
			bufs = append(bufs, b)
		}
		for _, b := range bufs {
			cli.Free(b)
		}
		if cli.Stats().Grows != 0 {
			t.Fatal("a fixed-size session grew")
		}
	})
}

// Growing concurrently from many goroutines: every message intact, one
// growth step at a time.
func TestGrow_ConcurrentAllocs(t *testing.T) {
	cfg := growConfig()
	cli, srv := pair(t, cfg, cfg)
	const senders, per = 4, 8
	errc := make(chan error, senders)
	for g := 0; g < senders; g++ {
		go func() {
			for i := 0; i < per; i++ {
				id := uint64(g*per + i)
				b, err := allocWait(cli, 1<<20+int(id)*4096)
				if err != nil {
					errc <- err
					return
				}
				fill(b.Bytes(), id)
				if err := cli.Send(context.Background(), id, uint64(b.Len()), 0, b); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	for i := 0; i < senders*per; i++ {
		m := recvOne(t, srv)
		want := make([]byte, m.Aux)
		fill(want, m.ID)
		if !bytes.Equal(m.AppendTo(nil), want) {
			t.Fatalf("message %d differs", m.ID)
		}
		srv.Release(&m)
	}
	for g := 0; g < senders; g++ {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if st := cli.Stats(); st.Regions > MaxRegions || st.CommittedBytes > uint64(cfg.RegionSize) {
		t.Fatalf("grew beyond the limits: %+v", st)
	}
}

// childGrowClient dials $KSHM_SOCK and sends 4 MiB messages (each one
// grows or uses a grown region) until it is killed. It prints "grown" once
// its regions have grown.
func childGrowClient() int {
	cfg := growConfig()
	cfg.ShrinkAfter = 50 * time.Millisecond // grow and shrink all the time
	s, err := Dial(context.Background(), os.Getenv("KSHM_SOCK"), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	printed := false
	for i := uint64(0); ; i++ {
		b, err := allocWait(s, 4<<20-int(i%7)*512)
		if err != nil {
			return 0
		}
		fill(b.Bytes(), i)
		if err := s.Send(context.Background(), i, 0, 0, b); err != nil {
			return 0
		}
		if !printed && s.Stats().Grows > 0 {
			shmtest.Printf("grown")
			printed = true
		}
		if i%5 == 4 {
			time.Sleep(120 * time.Millisecond) // let grown regions go idle
		}
	}
}

// childGrowServer accepts one session, echoes every message (growing its
// own regions for the replies) and prints "grown" once it has.
func childGrowServer() int {
	s, err := acceptOne()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	printed := false
	for {
		m, err := s.Recv(context.Background())
		if err != nil {
			return 0
		}
		b, err := allocWait(s, m.Len())
		if err != nil {
			return 0
		}
		m.AppendTo(b.Bytes()[:0])
		s.Release(&m)
		if err := s.Send(context.Background(), m.ID, 0, 0, b); err != nil {
			return 0
		}
		if !printed && s.Stats().Grows > 0 {
			shmtest.Printf("grown")
			printed = true
		}
	}
}

// kill -9 of a client during growth: the server's session closes and every
// region, grown ones included, is unmapped and closed.
func TestGrow_KillClientDuringGrowth(t *testing.T) {
	before := memfdCounts(t)
	sock := filepath.Join(t.TempDir(), "s")
	cfg := growConfig()
	ln, err := Listen(sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	child := shmtest.Start(t, "grow-client", "KSHM_SOCK="+sock)
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	go func() { // receive and hold a few, release the rest
		var held []Message
		for {
			m, err := s.Recv(context.Background())
			if err != nil {
				for i := range held {
					s.Release(&held[i])
				}
				return
			}
			if len(held) < 2 && m.ID%3 == 0 {
				held = append(held, m)
				continue
			}
			s.Release(&m)
		}
	}()
	child.Expect(t, "grown", 20*time.Second)
	time.Sleep(time.Duration(100+time.Now().UnixNano()%300) * time.Millisecond)
	t.Logf("killing the client; server maps %d regions of it", s.Stats().PeerRegions)
	child.Kill()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open 5s after the client was killed")
	}
	s.Close()
	shmtest.WaitBaseline(t, 5*time.Second, "memfd mappings and fds after kill -9", before, func() []int { return memfdCounts(t) })
}

// kill -9 of the server during growth: the client's session closes and
// every region is reclaimed.
func TestGrow_KillServerDuringGrowth(t *testing.T) {
	before := memfdCounts(t)
	sock := filepath.Join(t.TempDir(), "s")
	cfg := growConfig()
	child := shmtest.Start(t, "grow-server", "KSHM_SOCK="+sock, "KSHM_REGION="+strconv.Itoa(cfg.RegionSize),
		"KSHM_MAXMSG="+strconv.Itoa(cfg.MaxMessageSize))
	child.Expect(t, "ready", 10*time.Second)
	s, err := Dial(context.Background(), sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // replies, verified
		defer close(done)
		for {
			m, err := s.Recv(context.Background())
			if err != nil {
				return
			}
			want := make([]byte, m.Len())
			fill(want, m.ID)
			if !bytes.Equal(m.AppendTo(nil), want) {
				t.Errorf("reply %d differs", m.ID)
			}
			s.Release(&m)
		}
	}()
	go func() {
		for i := uint64(0); ; i++ {
			b, err := allocWait(s, 4<<20-int(i%5)*1024)
			if err != nil {
				return
			}
			fill(b.Bytes(), i)
			if err := s.Send(context.Background(), i, 0, 0, b); err != nil {
				s.Free(b)
				return
			}
		}
	}()
	child.Expect(t, "grown", 20*time.Second)
	time.Sleep(time.Duration(50+time.Now().UnixNano()%200) * time.Millisecond)
	child.Kill()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open 5s after the server was killed")
	}
	<-done
	s.Close()
	shmtest.WaitBaseline(t, 5*time.Second, "memfd mappings and fds after kill -9", before, func() []int { return memfdCounts(t) })
}
