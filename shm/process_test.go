package shm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	switch shmtest.Role() {
	case "":
		os.Exit(m.Run())
	case "echo-server":
		os.Exit(childEchoServer())
	case "stream-server":
		os.Exit(childStreamServer())
	case "holder-client":
		os.Exit(childHolderClient())
	case "stress-client":
		os.Exit(childStressClient())
	case "grow-client":
		os.Exit(childGrowClient())
	case "grow-server":
		os.Exit(childGrowServer())
	case "fleet-client":
		os.Exit(childFleetClient())
	default:
		fmt.Fprintln(os.Stderr, "unknown child role", shmtest.Role())
		os.Exit(2)
	}
}

func childConfig() Config {
	c := testConfig()
	if v := os.Getenv("KSHM_REGION"); v != "" {
		c.RegionSize, _ = strconv.Atoi(v)
	}
	if v := os.Getenv("KSHM_MAXMSG"); v != "" {
		c.MaxMessageSize, _ = strconv.Atoi(v)
	}
	if os.Getenv("KSHM_FUTEX_ONLY") != "" {
		// Sleep at once, always on the futex, and never move to the
		// socket: only a FUTEX_WAKE from the parent wakes this child.
		c.SpinTime = 0
		futexLoadCheck = false
		futexSleepMin, futexSleepMax = time.Hour, time.Hour
	}
	return c
}

// allocWait allocates, waiting for the peer to release when memory or quota
// runs out.
func allocWait(s *Session, n int) (Buffer, error) {
	for d := time.Microsecond; ; {
		b, err := s.Alloc(n)
		if !errors.Is(err, ErrNoMemory) && !errors.Is(err, ErrQuota) {
			return b, err
		}
		time.Sleep(d)
		if d < time.Millisecond {
			d *= 2
		}
	}
}

// acceptOne listens on $KSHM_SOCK, tells the parent "ready", and returns
// the first session.
func acceptOne() (*Session, error) {
	ln, err := Listen(os.Getenv("KSHM_SOCK"), childConfig())
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	shmtest.Printf("ready")
	return ln.Accept()
}

// childEchoServer accepts one session on $KSHM_SOCK and echoes every
// message, then reports its counters when the peer says "done" (kind 9).
func childEchoServer() int {
	s, err := acceptOne()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx := context.Background()
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			shmtest.Printf("closed %v", err)
			return 0
		}
		if m.Kind == 9 {
			s.Release(&m)
			waitZero(s)
			st := s.Stats()
			shmtest.Printf("stats inuse=%d held=%d wakeups=%d futex=%d", st.InUseBuffers, st.HeldFromPeer, st.WakeupsSent, st.FutexWakeups)
			s.Close()
			return 0
		}
		b, err := allocWait(s, m.Len())
		if err != nil {
			shmtest.Printf("closed %v", err)
			return 0
		}
		p := b.Bytes()[:0]
		m.AppendTo(p)
		s.Release(&m)
		if err := s.Send(ctx, m.ID, m.Aux, m.Kind, b); err != nil {
			shmtest.Printf("closed %v", err)
			return 0
		}
	}
}

func waitZero(s *Session) {
	for i := 0; i < 500; i++ {
		if st := s.Stats(); st.InUseBuffers == 0 && st.HeldFromPeer == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sizes are drawn log-uniformly from [1, max] by a generator both processes
// seed identically, so the receiver knows what to expect.
func sizeGen(seed uint64, maxN int) func() int {
	r := rand.New(rand.NewPCG(seed, 0))
	lmax := math.Log(float64(maxN))
	return func() int {
		n := int(math.Exp(r.Float64() * lmax))
		return min(max(n, 1), maxN)
	}
}

// pattern is the source of payload bytes: the message at seq takes the bytes
// at offset seq*131 mod 1 MiB. It lives outside the Go heap (an anonymous
// mapping) so that the race detector does not shadow-track every byte copied
// from it; the data path itself is the same with and without -race.
var pattern = func() []byte {
	b, err := unix.Mmap(-1, 0, 9<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		panic(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b
}()

func fill(p []byte, seq uint64) { copy(p, pattern[seq*131%(1<<20):]) }

// childStreamServer receives $KSHM_N messages and checks each one's size,
// order and checksum; it replies to every message with its first 4 KiB, so
// both directions carry traffic. It prints the verdict and its counters.
func childStreamServer() int {
	n, _ := strconv.Atoi(os.Getenv("KSHM_N"))
	maxSize, _ := strconv.Atoi(os.Getenv("KSHM_MAXMSG"))
	s, err := acceptOne()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	next := sizeGen(42, maxSize)
	ctx := context.Background()
	bad := 0
	for i := 0; i < n; i++ {
		m, err := s.Recv(ctx)
		if err != nil {
			shmtest.Printf("result fail recv %d: %v", i, err)
			return 1
		}
		want := next()
		var crc uint32
		for k := 0; k < m.NumSegments(); k++ {
			crc = crc32.Update(crc, crc32.IEEETable, m.Segment(k))
		}
		if m.ID != uint64(i) || m.Len() != want || uint64(crc) != m.Aux {
			if bad < 5 {
				fmt.Fprintf(os.Stderr, "message %d: id %d len %d want %d crc %x want %x\n", i, m.ID, m.Len(), want, crc, m.Aux)
			}
			bad++
		}
		r := min(m.Len(), 4096)
		b, err := allocWait(s, r)
		if err != nil {
			shmtest.Printf("result fail alloc %v", err)
			return 1
		}
		copy(b.Bytes(), m.Segment(0))
		s.Release(&m)
		if err := s.Send(ctx, m.ID, uint64(crc32.ChecksumIEEE(b.Bytes())), 0, b); err != nil {
			shmtest.Printf("result fail send %v", err)
			return 1
		}
	}
	m, err := s.Recv(ctx) // the parent's "done"
	if err == nil {
		s.Release(&m)
	}
	waitZero(s)
	st := s.Stats()
	shmtest.Printf("result bad=%d inuse=%d held=%d recv=%d", bad, st.InUseBuffers, st.HeldFromPeer, st.MsgsRecv)
	s.Close()
	return 0
}

func TestProcess_StreamIntact(t *testing.T) {
	n := 1_000_000
	if testing.Short() {
		n = 20_000
	}
	if v := os.Getenv("KSHM_STREAM_N"); v != "" {
		n, _ = strconv.Atoi(v)
	}
	const maxSize = 4 << 20
	sock := filepath.Join(t.TempDir(), "s")
	env := []string{"KSHM_SOCK=" + sock, "KSHM_N=" + strconv.Itoa(n), "KSHM_MAXMSG=" + strconv.Itoa(maxSize),
		"KSHM_REGION=" + strconv.Itoa(64<<20)}
	child := shmtest.Start(t, "stream-server", env...)
	child.Expect(t, "ready", 10*time.Second)
	cfg := testConfig()
	cfg.RegionSize, cfg.MaxMessageSize = 64<<20, maxSize
	ctx := context.Background()
	s, err := Dial(ctx, sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start := time.Now()
	errc := make(chan error, 1)
	go func() { // replies
		for i := 0; i < n; i++ {
			m, err := s.Recv(ctx)
			if err != nil {
				errc <- err
				return
			}
			if m.ID != uint64(i) || uint64(crc32.ChecksumIEEE(m.Segment(0))) != m.Aux {
				errc <- fmt.Errorf("reply %d: id %d, checksum mismatch", i, m.ID)
				return
			}
			s.Release(&m)
		}
		errc <- nil
	}()
	next := sizeGen(42, maxSize)
	var bytes int64
	for i := 0; i < n; i++ {
		size := next()
		bytes += int64(size)
		// Large messages go in two segments half the time.
		var bufs []Buffer
		if size > 64<<10 && i%2 == 0 {
			a, err := allocWait(s, size/2)
			if err != nil {
				t.Fatal(err)
			}
			b, err := allocWait(s, size-size/2)
			if err != nil {
				t.Fatal(err)
			}
			bufs = []Buffer{a, b}
		} else {
			a, err := allocWait(s, size)
			if err != nil {
				t.Fatal(err)
			}
			bufs = []Buffer{a}
		}
		var crc uint32
		off := uint64(0)
		for _, b := range bufs {
			fill(b.Bytes(), uint64(i)+off)
			off += uint64(b.Len())
			crc = crc32.Update(crc, crc32.IEEETable, b.Bytes())
		}
		if err := s.Send(ctx, uint64(i), uint64(crc), 0, bufs...); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	b, _ := s.Alloc(1)
	if err := s.Send(ctx, uint64(n), 0, 9, b); err != nil {
		t.Fatal(err)
	}
	line := child.Expect(t, "result", 60*time.Second)
	waitIdle(t, s)
	el := time.Since(start)
	t.Logf("%d messages, %.1f GiB, in %v; child: %s", n, float64(bytes)/(1<<30), el.Round(time.Millisecond), line)
	if line != fmt.Sprintf("result bad=0 inuse=0 held=0 recv=%d", n+1) {
		t.Fatalf("child reports %q", line)
	}
	if st := s.Stats(); st.InUseBuffers != 0 || st.HeldFromPeer != 0 {
		t.Fatalf("parent still holds buffers: %+v", st)
	}
	if err := child.Wait(); err != nil {
		t.Fatal(err)
	}
}

// TestProcess_KillServer: kill -9 of the server closes the client's session
// at once, and every buffer the server held returns to the client.
func TestProcess_KillServer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	child := shmtest.Start(t, "echo-server", "KSHM_SOCK="+sock)
	child.Expect(t, "ready", 10*time.Second)
	s, err := Dial(context.Background(), sock, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Round trips, then leave messages with the server (unreleased echoes
	// are ours to hold; our requests are with the server).
	for i := uint64(0); i < 50; i++ {
		send(t, s, i, make([]byte, 3000))
	}
	var held []Message
	for i := 0; i < 50; i++ {
		m, err := s.Recv(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, m)
	}
	for i := uint64(100); i < 110; i++ {
		send(t, s, i, make([]byte, 100))
	}
	if st := s.Stats(); st.InUseBuffers == 0 {
		t.Fatal("expected buffers in use before the kill")
	}
	killed := time.Now()
	child.Kill()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open 5s after the server was killed")
	}
	el := time.Since(killed)
	t.Logf("session closed %v after kill -9", el)
	if el > time.Second {
		t.Errorf("session closed %v after the kill, want within a second", el)
	}
	if !errors.Is(s.Err(), ErrPeerClosed) {
		t.Fatalf("Err = %v", s.Err())
	}
	for i := range held {
		s.Release(&held[i]) // after close: a no-op that must not crash
	}
	if st := s.Stats(); st.InUseBuffers != 0 {
		t.Fatalf("in use after kill: %+v", st)
	}
	if after := ReadStats().InUseBuffers; after != 0 {
		t.Fatalf("process-wide in-use buffers %d after kill, want 0 (this is the only session)", after)
	}
	if _, err := s.Alloc(10); !errors.Is(err, ErrClosed) {
		t.Fatalf("Alloc after close: %v", err)
	}
}

// childHolderClient dials $KSHM_SOCK, receives messages and never releases
// them, then waits to be killed.
func childHolderClient() int {
	s, err := Dial(context.Background(), os.Getenv("KSHM_SOCK"), childConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	n, _ := strconv.Atoi(os.Getenv("KSHM_N"))
	for i := 0; i < n; i++ {
		if _, err := s.Recv(context.Background()); err != nil {
			return 1
		}
	}
	shmtest.Printf("holding %d", n)
	<-s.Done()
	return 0
}

// TestProcess_KillClient: kill -9 of a client holding our buffers closes the
// server's session within a second and reclaims all of them.
func TestProcess_KillClient(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := Listen(sock, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	child := shmtest.Start(t, "holder-client", "KSHM_SOCK="+sock, "KSHM_N=40")
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := uint64(0); i < 40; i++ {
		send(t, s, i, make([]byte, 10000))
	}
	child.Expect(t, "holding 40", 10*time.Second)
	if st := s.Stats(); st.InUseBuffers != 40 || st.PeerHeld != 40 {
		t.Fatalf("before kill: %+v", st)
	}
	killed := time.Now()
	child.Kill()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open 5s after the client was killed")
	}
	el := time.Since(killed)
	t.Logf("session closed %v after kill -9", el)
	if el > time.Second {
		t.Errorf("session closed %v after the kill, want within a second", el)
	}
	if st := s.Stats(); st.InUseBuffers != 0 || st.PeerHeld != 0 {
		t.Fatalf("after kill: %+v", st)
	}
	if !errors.Is(s.Err(), ErrPeerClosed) {
		t.Fatalf("Err = %v", s.Err())
	}
}

// Futex sleeps across processes: the child echo server sleeps only on the
// futex (no bound, so nothing but our FUTEX_WAKE on our own mapping of our
// ring tail can wake it), and we sleep on the futex too, woken by the
// child's. Every round trip completes, and both sides' wake-ups all went
// through the futex, none through the socket.
func TestProcess_FutexWake(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Hour)
	sock := filepath.Join(t.TempDir(), "s")
	child := shmtest.Start(t, "echo-server", "KSHM_SOCK="+sock, "KSHM_FUTEX_ONLY=1")
	child.Expect(t, "ready", 10*time.Second)
	s, err := Dial(context.Background(), sock, sleepNowConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const calls = 200
	for i := uint64(0); i < calls; i++ {
		if i%4 == 0 {
			// Let the child's receiver fall asleep before the next call.
			waitPeerAsleep(t, s)
		}
		payload := []byte(fmt.Sprintf("call %d", i))
		send(t, s, i, payload)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		m, err := s.Recv(ctx)
		cancel()
		if err != nil {
			t.Fatalf("call %d: %v (a futex sleeper that was never woken?)", i, err)
		}
		if got := string(m.AppendTo(nil)); m.ID != i || got != string(payload) {
			t.Fatalf("call %d: echo id %d %q", i, m.ID, got)
		}
		s.Release(&m)
	}
	st := s.Stats()
	waitPeerAsleep(t, s)
	if err := s.Send(context.Background(), 1, 0, 9); err != nil { // done
		t.Fatal(err)
	}
	line := child.Expect(t, "stats ", 30*time.Second)
	var inuse, held, wakeups, futex int
	if _, err := fmt.Sscanf(line, "stats inuse=%d held=%d wakeups=%d futex=%d", &inuse, &held, &wakeups, &futex); err != nil {
		t.Fatalf("child said %q: %v", line, err)
	}
	t.Logf("parent: %d wake-ups, %d through the futex, %d sleeps; child: %d wake-ups, %d through the futex",
		st.WakeupsSent, st.FutexWakeups, st.Sleeps, wakeups, futex)
	if st.FutexWakeups < calls/4 || st.FutexWakeups != st.WakeupsSent {
		t.Errorf("parent woke the child %d times, %d through the futex: want at least %d, all through the futex",
			st.WakeupsSent, st.FutexWakeups, calls/4)
	}
	if futex == 0 || futex != wakeups {
		t.Errorf("child woke us %d times, %d through the futex: want some, all through the futex", wakeups, futex)
	}
}

// waitPeerAsleep waits until the peer's receiver sleeps on the futex.
func waitPeerAsleep(t *testing.T, s *Session) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !futexAsleep(atomic.LoadUint64(&s.peerHdr.State)) {
		if time.Now().After(deadline) {
			t.Fatalf("the peer's receiver never slept on the futex: State %#x", atomic.LoadUint64(&s.peerHdr.State))
		}
		time.Sleep(50 * time.Microsecond)
	}
}
