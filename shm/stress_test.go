package shm

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
)

// The close-race stress: senders, receivers and closes from either side at
// random moments, in this process and against child processes killed with
// SIGKILL, for hundreds of sessions. Nothing may crash, and mappings,
// memfds, goroutines, the session registry and the heap must return to
// their baseline.
//
// It runs briefly in `make test`. KSHM_STRESS_DURATION (a time.Duration)
// runs it that long instead: `make soak-engine`, part of `make soak`.

func stressConfig() Config {
	c := DefaultConfig()
	c.RegionSize, c.MaxMessageSize, c.RingEntries = 1<<20, 64<<10, 64
	c.SpinTime = 20 * time.Microsecond
	c.AcceptWakeModes = []WakeMode{WakeNotify, WakePoll, WakeTimed}
	c.PollInterval = 100 * time.Microsecond
	return c
}

// stressSide drives one session: senders, a receiver, and what they still
// hold when it closes (freed and released after the close).
type stressSide struct {
	s      *Session
	mu     sync.Mutex
	local  []Buffer
	held   []Message
	sent   atomic.Int64
	errors chan error
}

func (x *stressSide) fail(err error) {
	select {
	case x.errors <- err:
	default:
	}
}

func (x *stressSide) sender(rng *rand.Rand) {
	ctx := context.Background()
	for i := uint64(1); ; i++ {
		select {
		case <-x.s.Done():
			return
		default:
		}
		b, err := x.s.Alloc(1 + rng.IntN(4096))
		if err != nil {
			if errors.Is(err, ErrClosed) {
				return
			}
			runtime.Gosched()
			continue
		}
		p := b.Bytes()
		for j := range p {
			p[j] = byte(i)
		}
		switch r := rng.IntN(64); {
		case r == 0: // keep it past the close
			x.mu.Lock()
			x.local = append(x.local, b)
			x.mu.Unlock()
			continue
		case r == 1:
			if err := x.s.Free(b); err != nil {
				x.fail(fmt.Errorf("Free of a local buffer: %w", err))
			}
			continue
		case r == 2:
			if err := x.s.Send(ctx, i, 0, 0, b, b); !errors.Is(err, ErrDuplicateBuffer) && !errors.Is(err, ErrClosed) {
				x.fail(fmt.Errorf("Send(b, b) = %v", err))
			}
		}
		if err := x.s.Send(ctx, i, 0, 0, b); err != nil {
			if err := x.s.Free(b); err != nil {
				x.fail(fmt.Errorf("Free after a failed Send: %w", err))
			}
			if !errors.Is(err, ErrClosed) {
				x.fail(fmt.Errorf("Send: %w", err))
			}
			continue
		}
		x.sent.Add(1)
	}
}

func (x *stressSide) receiver(rng *rand.Rand) {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		m, err := x.s.Recv(ctx)
		cancel()
		if err != nil {
			if errors.Is(err, ErrClosed) {
				return
			}
			if !errors.Is(err, ErrTimeout) {
				x.fail(fmt.Errorf("Recv: %w", err))
			}
			continue
		}
		want := byte(m.ID)
		for i := 0; i < m.NumSegments(); i++ {
			for _, c := range m.Segment(i) {
				if c != want {
					x.fail(fmt.Errorf("message %d holds byte %d", m.ID, c))
					break
				}
			}
		}
		if rng.IntN(8) == 0 {
			x.mu.Lock()
			x.held = append(x.held, m)
			x.mu.Unlock()
			continue
		}
		x.s.Release(&m)
	}
}

// settle frees and releases what the side kept past its close.
func (x *stressSide) settle() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, b := range x.local {
		if err := x.s.Free(b); err != nil {
			return fmt.Errorf("Free after close: %w", err)
		}
	}
	for i := range x.held {
		x.s.Release(&x.held[i])
	}
	x.local, x.held = nil, nil
	return nil
}

// stressSession runs senders and a receiver on s until it closes, a closer
// after a random delay, and settles what was kept.
func stressSession(s *Session, seed uint64, closeAfter time.Duration) error {
	x := &stressSide{s: s, errors: make(chan error, 1)}
	var wg sync.WaitGroup
	for k := uint64(0); k < 3; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, k))
			if k == 2 {
				x.receiver(rng)
			} else {
				x.sender(rng)
			}
		}()
	}
	if closeAfter > 0 {
		time.AfterFunc(closeAfter, func() { s.Close() })
	}
	wg.Wait()
	s.Close()
	if err := x.settle(); err != nil {
		return err
	}
	select {
	case err := <-x.errors:
		return err
	default:
		return nil
	}
}

type stressBaseline struct {
	maps, fds, goroutines int
	heap                  uint64
}

func stressMeasure(t testing.TB) stressBaseline {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return stressBaseline{shmtest.MemfdMappings(t), shmtest.MemfdFDs(t), runtime.NumGoroutine(), ms.HeapAlloc}
}

func stressDuration() (time.Duration, bool) {
	if v := os.Getenv("KSHM_STRESS_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err == nil {
			return d, true
		}
	}
	return 0, false
}

func TestStress_CloseRace(t *testing.T) {
	long, isLong := stressDuration()
	base := stressMeasure(t)
	deadline := time.Now().Add(long)
	rounds := 0
	for rounds == 0 || (isLong && time.Now().Before(deadline)) {
		rounds++
		stressInProcess(t, uint64(rounds), 200)
		t.Logf("in-process: 200 session pairs")
		stressCrossProcess(t, uint64(rounds), 3)
		if t.Failed() {
			return
		}
	}
	t.Logf("%d rounds", rounds)
	// Everything returns to the baseline.
	shmtest.WaitBaseline(t, 10*time.Second, "memfd mappings, memfd descriptors, goroutines", []int{base.maps, base.fds, base.goroutines},
		func() []int {
			b := stressMeasure(t)
			return []int{b.maps, b.fds, b.goroutines}
		})
	registry.mu.Lock()
	live := len(registry.live)
	registry.mu.Unlock()
	if live != 0 {
		t.Fatalf("%d sessions still registered", live)
	}
	if st := ReadStats(); st.Sessions != 0 || st.InUseBuffers != 0 {
		t.Fatalf("process-wide stats after every session closed: %+v", st)
	}
	// The heap holds nothing of the sessions (a generous margin for the
	// runtime's own caches).
	if after := stressMeasure(t); after.heap > base.heap+32<<20 {
		t.Fatalf("heap %d MiB after the stress, %d MiB before", after.heap>>20, base.heap>>20)
	}
}

// stressInProcess runs n session pairs in this process, a few at a time,
// each closed from a random side at a random moment.
func stressInProcess(t *testing.T, seed uint64, n int) {
	rng := rand.New(rand.NewPCG(seed, 1))
	path := filepath.Join(t.TempDir(), "s")
	scfg := stressConfig()
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const parallel = 8
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	errc := make(chan error, n)
	for i := 0; i < n; i++ {
		ccfg := stressConfig()
		ccfg.WakeMode = []WakeMode{WakeNotify, WakeNotify, WakePoll, WakeTimed}[rng.IntN(4)]
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		cli, err := Dial(ctx, path, ccfg)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		srv, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		sem <- struct{}{}
		wg.Add(2)
		// At least 1µs: stressSession takes 0 as "never close", and a pair
		// that never closes runs until the test's timeout.
		closeAt := time.Duration(1+rng.IntN(15000)) * time.Microsecond
		first, second := cli, srv
		if rng.IntN(2) == 0 {
			first, second = srv, cli
		}
		s1, s2 := rng.Uint64(), rng.Uint64()
		go func() {
			defer wg.Done()
			if err := stressSession(first, s1, closeAt); err != nil {
				errc <- err
			}
		}()
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			var after time.Duration
			if rng := rand.New(rand.NewPCG(s2, 0)); rng.IntN(4) == 0 {
				after = closeAt // both sides close at once
			}
			if err := stressSession(second, s2, after); err != nil {
				errc <- err
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
}

// stressCrossProcess serves child clients (which run the same stress on
// their side) and kills each with SIGKILL at a random moment.
func stressCrossProcess(t *testing.T, seed uint64, kills int) {
	rng := rand.New(rand.NewPCG(seed, 2))
	sock := filepath.Join(t.TempDir(), "x")
	ln, err := Listen(sock, stressConfig())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errc := make(chan error, 1024)
	var accepted atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := uint64(0); ; i++ {
			s, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				var after time.Duration
				if i%3 == 0 {
					after = time.Duration(1+i%20) * time.Millisecond
				}
				if err := stressSession(s, seed<<32|i, after); err != nil {
					errc <- err
				}
			}()
		}
	}()
	for k := 0; k < kills; k++ {
		child := shmtest.Start(t, "stress-client", "KSHM_SOCK="+sock, fmt.Sprintf("KSHM_SEED=%d", rng.Uint64()))
		child.Expect(t, "session", 20*time.Second)
		time.Sleep(time.Duration(400+rng.IntN(500)) * time.Millisecond)
		child.Kill()
		child.Wait()
	}
	ln.Close()
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if accepted.Load() < int64(kills) {
		t.Errorf("%d sessions accepted from %d children", accepted.Load(), kills)
	}
	t.Logf("cross-process: %d sessions with %d children killed", accepted.Load(), kills)
}

// childStressClient runs four loops that each dial $KSHM_SOCK again and
// again, stressing each session and closing it at a random moment, until
// the process is killed.
func childStressClient() int {
	var seed uint64
	fmt.Sscan(os.Getenv("KSHM_SEED"), &seed)
	var once sync.Once
	errc := make(chan error, 4)
	for g := uint64(0); g < 4; g++ {
		go func() {
			rng := rand.New(rand.NewPCG(seed, 3+g))
			for {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				s, err := Dial(ctx, os.Getenv("KSHM_SOCK"), stressConfig())
				cancel()
				if err != nil {
					errc <- err
					return
				}
				once.Do(func() { shmtest.Printf("session") })
				if err := stressSession(s, rng.Uint64(), time.Duration(1+rng.IntN(20))*time.Millisecond); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	err := <-errc
	fmt.Fprintln(os.Stderr, "stress client:", err)
	return 1
}
