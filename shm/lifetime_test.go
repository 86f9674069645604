package shm

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
)

// memfdCounts is what must return to its baseline once sessions are gone.
func memfdCounts(t testing.TB) []int {
	return []int{shmtest.MemfdMappings(t), shmtest.MemfdFDs(t)}
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

// The lifetime word under concurrency: operations and holds start and end
// while close happens; the mapping is "unmapped" exactly once, never while
// an operation or hold is active, drained is closed once every operation
// has ended, and nothing starts after close.
func TestLifetime_UnmapOnceWhenLastUserLeaves(t *testing.T) {
	for round := 0; round < 200; round++ {
		var l lifetime
		var unmaps, active atomic.Int32
		l.init(func() {
			if active.Load() != 0 {
				t.Error("unmapped while a user was active")
			}
			unmaps.Add(1)
		})
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 50; i++ {
					switch (g + i) % 3 {
					case 0:
						if l.beginOp() {
							active.Add(1)
							active.Add(-1)
							l.endOp()
						}
					case 1:
						if l.acquireHolds(1) {
							active.Add(1)
							active.Add(-1)
							l.dropHolds(1)
						}
					case 2: // a cache: a batch taken, handed out, returned in parts
						if l.acquireHolds(holdBatch) {
							active.Add(1)
							active.Add(-1)
							l.dropHolds(holdBatch - 1)
							l.dropHolds(1)
						}
					}
				}
			}()
		}
		l.close()
		<-l.drained
		if l.beginOp() || l.acquireHolds(1) {
			t.Fatal("a user started after close")
		}
		wg.Wait()
		if n := unmaps.Load(); n != 1 {
			t.Fatalf("round %d: unmapped %d times", round, n)
		}
	}
}

// The reported crash: one buffer named twice in a message, then sent again.
// Before the fix the first Send was accepted and the second killed the
// process (SIGSEGV: the reference count underflowed and both regions were
// unmapped under a live session).
func TestSend_BufferNamedTwiceIsRefused(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	ctx := context.Background()
	b, err := cli.Alloc(100)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Send(ctx, 1, 0, 0, b, b); !errors.Is(err, ErrDuplicateBuffer) {
		t.Fatalf("Send(b, b) = %v, want ErrDuplicateBuffer", err)
	}
	// Refused means untouched: the buffer is still the caller's.
	if err := cli.Send(ctx, 2, 0, 0, b); err != nil {
		t.Fatalf("Send(b) after the refusal = %v", err)
	}
	if err := cli.Send(ctx, 3, 0, 0, b); !errors.Is(err, ErrBufferSent) {
		t.Fatalf("second Send(b) = %v, want ErrBufferSent", err)
	}
	if err := cli.Free(b); !errors.Is(err, ErrBufferSent) {
		t.Fatalf("Free of a sent buffer = %v, want ErrBufferSent", err)
	}
	m := recvOne(t, srv)
	if m.ID != 2 || m.NumSegments() != 1 {
		t.Fatalf("received id %d with %d segments, want id 2 with 1", m.ID, m.NumSegments())
	}
	srv.Release(&m)
	// The session is still usable, and nothing more arrived.
	send(t, cli, 4, []byte("after"))
	if m := recvOne(t, srv); m.ID != 4 {
		t.Fatalf("next message id %d, want 4", m.ID)
	} else {
		srv.Release(&m)
	}
	waitIdle(t, cli, srv)
	if cli.Err() != nil || srv.Err() != nil {
		t.Fatalf("sessions closed: %v / %v", cli.Err(), srv.Err())
	}
}

func TestFree_DoubleFreeAndSendAfterFree(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	ctx := context.Background()
	b, err := cli.Alloc(100)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Free(b); err != nil {
		t.Fatal(err)
	}
	if err := cli.Free(b); !errors.Is(err, ErrBufferFreed) {
		t.Fatalf("second Free = %v, want ErrBufferFreed", err)
	}
	if err := cli.Send(ctx, 1, 0, 0, b); !errors.Is(err, ErrBufferFreed) {
		t.Fatalf("Send after Free = %v, want ErrBufferFreed", err)
	}
	// The slot is reused: the stale value must not free or send the new
	// buffer.
	nb, err := cli.Alloc(100)
	if err != nil {
		t.Fatal(err)
	}
	if nb.slot != b.slot {
		t.Fatalf("expected the slot to be reused (%d, %d)", nb.slot, b.slot)
	}
	if err := cli.Free(b); !errors.Is(err, ErrBufferFreed) {
		t.Fatalf("Free of a stale buffer = %v, want ErrBufferFreed", err)
	}
	if err := cli.Send(ctx, 2, 0, 0, b); !errors.Is(err, ErrBufferFreed) {
		t.Fatalf("Send of a stale buffer = %v, want ErrBufferFreed", err)
	}
	if err := cli.Free(Buffer{}); !errors.Is(err, ErrForeignBuffer) {
		t.Fatalf("Free(Buffer{}) = %v, want ErrForeignBuffer", err)
	}
	if err := cli.Send(ctx, 3, 0, 0, Buffer{}); !errors.Is(err, ErrForeignBuffer) {
		t.Fatalf("Send(Buffer{}) = %v, want ErrForeignBuffer", err)
	}
	// A buffer of another session (the server's, same slot and generation)
	// is not ours: refused, and the other session's buffer is untouched.
	other, err := srv.Alloc(100)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Free(other); !errors.Is(err, ErrForeignBuffer) {
		t.Fatalf("Free of another session's buffer = %v, want ErrForeignBuffer", err)
	}
	if err := cli.Send(ctx, 5, 0, 0, other); !errors.Is(err, ErrForeignBuffer) {
		t.Fatalf("Send of another session's buffer = %v, want ErrForeignBuffer", err)
	}
	if err := srv.Free(other); err != nil {
		t.Fatalf("the other session's own Free: %v", err)
	}
	if err := cli.Send(ctx, 4, 0, 0, nb); err != nil {
		t.Fatal(err)
	}
	m := recvOne(t, srv)
	if m.ID != 4 {
		t.Fatalf("received id %d, want 4", m.ID)
	}
	srv.Release(&m)
	waitIdle(t, cli, srv)
}

// Many goroutines send (or free) one Buffer value at once: exactly one
// wins, and the peer receives the buffer at most once. Before the fix the
// state check and the marking were separate steps and several passed.
func TestSend_ConcurrentSendAndFreeOfOneBuffer(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	ctx := context.Background()
	const rounds, racers = 200, 4
	sent := 0
	for r := 0; r < rounds; r++ {
		b, err := cli.Alloc(64)
		if err != nil {
			t.Fatal(err)
		}
		var wins atomic.Int32
		var sends atomic.Int32
		var wg sync.WaitGroup
		for i := 0; i < racers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var err error
				if i == 0 && r%2 == 1 {
					err = cli.Free(b)
				} else {
					err = cli.Send(ctx, uint64(r), 0, 0, b)
					if err == nil {
						sends.Add(1)
					}
				}
				switch {
				case err == nil:
					wins.Add(1)
				case errors.Is(err, ErrBufferSent), errors.Is(err, ErrBufferFreed):
				default:
					t.Errorf("unexpected error %v", err)
				}
			}()
		}
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("round %d: %d winners, want exactly 1", r, wins.Load())
		}
		sent += int(sends.Load())
	}
	for i := 0; i < sent; i++ {
		m := recvOne(t, srv)
		srv.Release(&m)
	}
	ctx2, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if m, err := srv.Recv(ctx2); err == nil {
		t.Fatalf("an extra message %d arrived: a buffer was sent twice", m.ID)
	}
	waitIdle(t, cli, srv)
}

// Closing releases everything: buffers still local at close and messages
// still held are released after it, and every mapping and memfd goes.
// Before the fix Free after close returned without dropping the buffer's
// reference, so both regions and a memfd stayed forever.
func TestClose_ReleasesEverything(t *testing.T) {
	base := memfdCounts(t)
	for _, closer := range []string{"client", "server"} {
		t.Run(closer, func(t *testing.T) {
			cli, srv := pair(t, testConfig(), testConfig())
			var local []Buffer
			for i := 0; i < 5; i++ {
				b, err := cli.Alloc(1000)
				if err != nil {
					t.Fatal(err)
				}
				local = append(local, b)
			}
			for i := uint64(0); i < 5; i++ {
				send(t, cli, i, []byte("held by the server"))
			}
			var held []Message
			for i := 0; i < 5; i++ {
				held = append(held, recvOne(t, srv))
			}
			if closer == "client" {
				cli.Close()
			} else {
				srv.Close()
			}
			for _, s := range []*Session{cli, srv} {
				select {
				case <-s.Done():
				case <-time.After(10 * time.Second):
					t.Fatal("session still open after its peer closed")
				}
			}
			cli.Close()
			srv.Close()
			// Local buffers and received messages keep their mapping alive...
			for _, b := range local {
				b.Bytes()[0] = 1
			}
			for i := range held {
				if string(held[i].Segment(0)) != "held by the server" {
					t.Fatal("a held message changed after close")
				}
			}
			// ...until they are freed and released, after close.
			for _, b := range local {
				if err := cli.Free(b); err != nil {
					t.Fatalf("Free after close: %v", err)
				}
			}
			for i := range held {
				srv.Release(&held[i])
			}
			shmtest.WaitBaseline(t, 5*time.Second, "memfd mappings and descriptors after close", base, func() []int { return memfdCounts(t) })
		})
	}
}

// The hold caches (the allocator's, the Recv turn's, the release path's)
// are settled at close: once both sides are closed, each lifetime word
// counts exactly the buffers still local and the messages still held, so
// the last Free or Release unmaps, not earlier and not never. Traffic
// of more than a few batches first leaves every cache partly full.
func TestClose_SettlesHoldCaches(t *testing.T) {
	base := memfdCounts(t)
	for _, closer := range []string{"client", "server"} {
		t.Run(closer, func(t *testing.T) {
			cli, srv := pair(t, testConfig(), testConfig())
			ctx := context.Background()
			for i := 0; i < 3*holdBatch+7; i++ {
				send(t, cli, uint64(i), []byte("ping"))
				m := recvOne(t, srv)
				srv.Release(&m)
				send(t, srv, uint64(i), []byte("pong"))
				m = recvOne(t, cli)
				cli.Release(&m)
			}
			local, err := cli.Alloc(100)
			if err != nil {
				t.Fatal(err)
			}
			send(t, cli, 1, []byte("held by the server")) // sent, never released
			send(t, srv, 2, []byte("released late"))      // received below, released after close
			late := recvOne(t, cli)
			held := recvOne(t, srv)
			own, err := srv.Alloc(100) // freed only after close
			if err != nil {
				t.Fatal(err)
			}
			if closer == "client" {
				cli.Close()
			} else {
				srv.Close()
			}
			for _, s := range []*Session{cli, srv} {
				<-s.Done()
				s.Close()
			}
			holds := func(s *Session) uint64 { return s.life.word.Load() &^ lifeClosing }
			// Client: the local buffer and the message it holds. Server: its
			// unfreed buffer and the message it holds. Buffers sent and not
			// released hold nothing after close.
			if h := holds(cli); h != 2 {
				t.Errorf("client lifetime word counts %d holds after close, want 2", h)
			}
			if h := holds(srv); h != 2 {
				t.Errorf("server lifetime word counts %d holds after close, want 2", h)
			}
			if err := cli.Free(local); err != nil {
				t.Fatal(err)
			}
			cli.Release(&late)
			srv.Release(&held)
			if h := holds(cli); h != 0 {
				t.Errorf("client: %d holds left", h)
			}
			if _, err := srv.Recv(ctx); !errors.Is(err, ErrClosed) {
				t.Errorf("Recv after close = %v, want ErrClosed", err)
			}
			if h := holds(srv); h != 1 { // its own buffer
				t.Errorf("server: %d holds left, want 1", h)
			}
			if err := srv.Free(own); err != nil {
				t.Fatal(err)
			}
			shmtest.WaitBaseline(t, 5*time.Second, "memfd mappings and descriptors after close", base, func() []int { return memfdCounts(t) })
		})
	}
}

// The receiver's counters ride on stores it makes anyway: the message count
// on the end of the Recv turn, the buffers received on our consumer index
// (less empty messages). They count exactly, held buffers included, while
// open and after close.
func TestStats_ReceiverCountsWithoutOwnAtomics(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	ctx := context.Background()
	if err := cli.Send(ctx, 1, 0, 0); err != nil { // empty
		t.Fatal(err)
	}
	send(t, cli, 2, []byte("one"))
	a, err := cli.Alloc(10)
	if err != nil {
		t.Fatal(err)
	}
	b, err := cli.Alloc(20)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Send(ctx, 3, 0, 0, a, b); err != nil {
		t.Fatal(err)
	}
	var held []Message
	for i := 0; i < 3; i++ {
		held = append(held, recvOne(t, srv))
	}
	check := func(when string, msgs, bytes uint64, heldBufs int64) {
		t.Helper()
		st := srv.Stats()
		if st.MsgsRecv != msgs || st.BytesRecv != bytes || st.HeldFromPeer != heldBufs {
			t.Errorf("%s: MsgsRecv %d BytesRecv %d HeldFromPeer %d, want %d %d %d",
				when, st.MsgsRecv, st.BytesRecv, st.HeldFromPeer, msgs, bytes, heldBufs)
		}
	}
	check("all held", 3, 33, 3)
	srv.Release(&held[1])
	check("one released", 3, 33, 2)
	srv.Close()
	check("after close", 3, 33, 2)
	srv.Release(&held[2])
	check("released after close", 3, 33, 0)
	srv.Release(&held[0])
}

// Recv returns the zero Message on error: a caller that defers Release does
// not drop a reference it never had. Before the fix the message came back
// half filled (id and the first segment) from a corrupt second descriptor.
func TestRecv_ZeroMessageOnError(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	b, err := cli.Alloc(10)
	if err != nil {
		t.Fatal(err)
	}
	publish(cli,
		desc{ID: 9, Off: cli.local.slots[b.slot].Off, Len: 10, Slot: b.slot, Gen: b.gen, Seq: uint32(cli.localTail), Flags: descMore},
		desc{ID: 9, Off: 0, Len: 10, Slot: 1 << 30, Seq: uint32(cli.localTail) + 1})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := srv.Recv(ctx)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Recv = %v, want ErrCorrupt", err)
	}
	if m.ID != 0 || m.NumSegments() != 0 || m.Len() != 0 || m.Inline() {
		t.Fatalf("Recv returned a half-filled message on error: id %d, %d segments", m.ID, m.NumSegments())
	}
	srv.Release(&m)                     // a no-op
	if err := cli.Free(b); err != nil { // it was never sent: still ours
		t.Fatal(err)
	}
}

// Segments are checked against the smaller of our and the peer's maximum.
// Before the fix only the peer's counted, so a peer with a larger limit
// could hand us segments larger than we accept.
func TestRecv_SegmentAboveOurMaximumIsCorrupt(t *testing.T) {
	ccfg := testConfig()
	ccfg.MaxMessageSize = 1 << 20
	scfg := testConfig()
	scfg.MaxMessageSize = 64 << 10
	cli, srv := pair(t, ccfg, scfg)
	if srv.recvLimit != 64<<10 || cli.recvLimit != 64<<10 {
		t.Fatalf("receive limits %d / %d, want 64 KiB on both sides", srv.recvLimit, cli.recvLimit)
	}
	send(t, cli, 1, make([]byte, 128<<10))
	expectCorrupt(t, srv)
}

// The peer's MaxMessage is copied once, at validation: rewriting the header
// later changes nothing.
func TestValidateHeader_MaxMessageReadOnce(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	want := srv.peerMax
	atomic.StoreUint64(&cli.localHdr.MaxMessage, 1<<40)
	if srv.peerMax != want || srv.peer.geo.maxMessage != want {
		t.Fatalf("peer maximum changed to %d", srv.peerMax)
	}
}

// Timed mode checks ctx at every poll. Before the fix it checked every 64
// polls: with a 1 s interval, a 20 ms deadline returned after 63 s.
func TestRecv_TimedModeHonoursCtx(t *testing.T) {
	c := testConfig()
	c.WakeMode = WakeTimed
	c.PollInterval = time.Second
	_, srv := pair(t, c, c)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := srv.Recv(ctx)
		errc <- err
	}()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("Recv = %v, want ErrTimeout", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Recv in timed mode ignored its deadline")
	}
}

// A Recv waiting for another's turn honours its ctx. Before the fix it
// waited on a mutex until the other returned.
func TestRecv_WaitingForTurnHonoursCtx(t *testing.T) {
	_, srv := pair(t, testConfig(), testConfig())
	first := make(chan error, 1)
	go func() {
		_, err := srv.Recv(context.Background()) // waits until close
		first <- err
	}()
	for !srv.recvTurn.held() {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := srv.Recv(ctx)
		errc <- err
	}()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("second Recv = %v, want ErrTimeout", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a Recv waiting for its turn ignored its deadline")
	}
	srv.Close()
	if err := <-first; !errors.Is(err, ErrClosed) {
		t.Fatalf("first Recv = %v, want ErrClosed", err)
	}
}

// The server chooses the wake modes it accepts: by default a client cannot
// make it poll. Before the fix the server adopted any mode.
func TestHandshake_ServerRefusesPollByDefault(t *testing.T) {
	c := testConfig()
	c.WakeMode = WakePoll
	cli, srv := pair(t, c, testConfig())
	if got := srv.Config().WakeMode; got != WakeNotify {
		t.Fatalf("server wake mode %v, want its own (notify)", got)
	}
	if got := cli.Config().WakeMode; got != WakePoll {
		t.Fatalf("client wake mode %v, want poll", got)
	}
	// Mixed modes still work.
	send(t, cli, 1, []byte("x"))
	m := recvOne(t, srv)
	srv.Release(&m)
	send(t, srv, 2, []byte("y"))
	m = recvOne(t, cli)
	cli.Release(&m)
}

func TestConfig_PollIntervalValidatedInEveryMode(t *testing.T) {
	c := DefaultConfig()
	c.PollInterval = 0
	if err := c.Validate(); !errors.Is(err, ErrBadConfig) {
		t.Fatalf("Validate with PollInterval 0 in notify mode = %v, want ErrBadConfig", err)
	}
}

// The wake-flood excess decays: an honest long-lived peer that now and then
// wakes a sleep twice is never closed as a flood. Before the fix the count
// of wake-ups minus sleeps only grew.
func TestFloodCheck_Decays(t *testing.T) {
	var f floodCheck
	sleeps := uint32(0)
	for pass := 0; pass < 10000; pass++ {
		sleeps++
		for range 2 { // two wake-ups for one sleep
			if err := f.wake(sleeps); err != nil {
				t.Fatalf("pass %d: %v", pass, err)
			}
		}
		if pass%100 == 99 {
			f.decay()
		}
	}
	// A real flood is still caught.
	var err error
	for i := 0; i < 2*wakeSlack && err == nil; i++ {
		err = f.wake(sleeps)
	}
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flood not detected: %v", err)
	}
}

// A stale read of the peer's epoch never moves lastWake backwards, so a
// sleep is not woken twice. Before the fix a sender holding an older epoch
// swapped it in.
func TestWake_LastWakeNeverMovesBackwards(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	cli.sendMu.Lock()
	defer cli.sendMu.Unlock()
	state := func(epoch uint64) { atomic.StoreUint64(&srv.localHdr.State, epoch<<32|1) }
	needsWake := func() bool { w, _ := cli.peerNeedsWake(); return w }
	state(5)
	if !needsWake() {
		t.Fatal("a sleeping peer was not woken")
	}
	state(3) // a stale view
	if needsWake() {
		t.Fatal("an older epoch was woken")
	}
	state(5)
	if needsWake() {
		t.Fatal("epoch 5 woken twice: lastWake moved backwards")
	}
	state(6)
	if !needsWake() {
		t.Fatal("a newer sleep was not woken")
	}
	atomic.StoreUint64(&srv.localHdr.State, 0)
}

// Senders waiting for room in a full ring read the tail only under sendMu
// (the race detector flagged the old backoff closure).
func TestSend_FullRingConcurrentSenders(t *testing.T) {
	c := testConfig()
	c.RingEntries = 64
	cli, srv := pair(t, c, c)
	const senders, each = 4, 100
	var wg sync.WaitGroup
	for g := 0; g < senders; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if err := cli.Send(context.Background(), uint64(i), 0, 0); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for i := 0; i < senders*each; i++ {
		if i%50 == 0 {
			time.Sleep(time.Millisecond) // let the ring fill
		}
		m := recvOne(t, srv)
		srv.Release(&m)
	}
	wg.Wait()
}
