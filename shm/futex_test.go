package shm

import (
	"context"
	"errors"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// sleepNowConfig is testConfig with no polling: a receiver that finds
// nothing sleeps at once.
func sleepNowConfig() Config {
	c := testConfig()
	c.SpinTime = 0
	return c
}

// setFutexSleep makes futex sleeps last d (both bounds) for one test.
func setFutexSleep(t *testing.T, d time.Duration) {
	t.Helper()
	oldMin, oldMax := futexSleepMin, futexSleepMax
	futexSleepMin, futexSleepMax = d, d
	t.Cleanup(func() { futexSleepMin, futexSleepMax = oldMin, oldMax })
}

// requireFutex skips without futex_waitv, and makes receivers sleep on
// the futex whatever the scheduler's load says (under -race other
// goroutines are often runnable).
func requireFutex(t *testing.T) {
	t.Helper()
	if !futexWaitvOK {
		t.Skip("the kernel has no futex_waitv (Linux 5.16+): receivers sleep on the socket only")
	}
	futexLoadCheck = false
	t.Cleanup(func() { futexLoadCheck = true })
}

// waitState polls s's State word until ok says yes (5 s at most).
func waitState(t *testing.T, s *Session, what string, ok func(st uint64) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok(atomic.LoadUint64(&s.localHdr.State)) {
		if time.Now().After(deadline) {
			t.Fatalf("receiver never %s: State %#x", what, atomic.LoadUint64(&s.localHdr.State))
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func futexAsleep(st uint64) bool  { return st&stateFutex != 0 && st&sleeperCount != 0 }
func socketAsleep(st uint64) bool { return st&stateFutex == 0 && st&sleeperCount != 0 }

// recvAsync runs one Recv on s and delivers its message (released) or
// error.
func recvAsync(ctx context.Context, s *Session) <-chan recvResult {
	c := make(chan recvResult, 1)
	go func() {
		m, err := s.Recv(ctx)
		r := recvResult{err: err, id: m.ID}
		if err == nil {
			r.data = m.AppendTo(nil)
			s.Release(&m)
		}
		c <- r
	}()
	return c
}

type recvResult struct {
	id   uint64
	data []byte
	err  error
}

func wantRecv(t *testing.T, c <-chan recvResult, id uint64, data string) {
	t.Helper()
	select {
	case r := <-c:
		if r.err != nil || r.id != id || string(r.data) != data {
			t.Fatalf("Recv: id %d %q err %v, want id %d %q", r.id, r.data, r.err, id, data)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Recv did not return: the sleeping receiver was not woken")
	}
}

// A receiver that sleeps on the futex is woken by the sender's FUTEX_WAKE,
// with no wake frame on the socket.
func TestFutex_SenderWakesSleeper(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Minute)
	cli, srv := pair(t, sleepNowConfig(), sleepNowConfig())
	got := recvAsync(context.Background(), srv)
	waitState(t, srv, "slept on the futex", futexAsleep)
	send(t, cli, 7, []byte("futex"))
	wantRecv(t, got, 7, "futex")
	st := cli.Stats()
	if st.FutexWakeups != 1 || st.WakeupsSent != 1 {
		t.Fatalf("sender: %d wake-ups, %d through the futex; want 1 and 1", st.WakeupsSent, st.FutexWakeups)
	}
	if n := cli.events.wakeupsSent.Load(); n != 0 {
		t.Fatalf("sender wrote %d wake frames on the socket, want 0", n)
	}
	if n := srv.Stats().Sleeps; n != 1 {
		t.Fatalf("receiver slept %d times, want 1", n)
	}
	if st := atomic.LoadUint64(&srv.localHdr.State); st&sleeperMask != 0 {
		t.Fatalf("receiver still marked sleeping after Recv: State %#x", st)
	}
}

// A futex sleep is bounded: the receiver then sleeps on the socket (no
// thread held), is woken by a wake frame, and its sleep counts once.
func TestFutex_LongWaitMovesToSocket(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Millisecond)
	cli, srv := pair(t, sleepNowConfig(), sleepNowConfig())
	got := recvAsync(context.Background(), srv)
	waitState(t, srv, "moved to the socket", socketAsleep)
	send(t, cli, 8, []byte("socket"))
	wantRecv(t, got, 8, "socket")
	st := cli.Stats()
	if st.WakeupsSent != 1 || st.FutexWakeups != 0 {
		t.Fatalf("sender: %d wake-ups, %d through the futex; want 1 through the socket", st.WakeupsSent, st.FutexWakeups)
	}
	if n := srv.Stats().Sleeps; n != 1 {
		t.Fatalf("receiver slept %d times, want 1 (a futex sleep that moves to the socket counts once)", n)
	}
}

// A sender that predates futex sleeps writes a wake frame even though the
// receiver sleeps on the futex; the reader rings the doorbell.
func TestFutex_OldSenderWakesThroughSocket(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Minute)
	futexWakeEnabled = false
	t.Cleanup(func() { futexWakeEnabled = true })
	cli, srv := pair(t, sleepNowConfig(), sleepNowConfig())
	got := recvAsync(context.Background(), srv)
	waitState(t, srv, "slept on the futex", futexAsleep)
	send(t, cli, 9, []byte("old sender"))
	wantRecv(t, got, 9, "old sender")
	if st := cli.Stats(); st.WakeupsSent != 1 || st.FutexWakeups != 0 {
		t.Fatalf("sender: %d wake-ups, %d through the futex; want 1 through the socket", st.WakeupsSent, st.FutexWakeups)
	}
}

// An inline message (the socket fallback) wakes a futex sleeper.
func TestFutex_InlineMessageWakes(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Minute)
	cli, srv := pair(t, sleepNowConfig(), sleepNowConfig())
	got := recvAsync(context.Background(), srv)
	waitState(t, srv, "slept on the futex", futexAsleep)
	if err := cli.SendInline(context.Background(), 10, 0, 0, []byte("inline")); err != nil {
		t.Fatal(err)
	}
	wantRecv(t, got, 10, "inline")
}

// Cancelling the ctx (no deadline), the ctx's deadline and closing the
// session each end a futex sleep then, not when the sleep's bound passes.
func TestFutex_CancelAndCloseWake(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Minute)
	_, srv := pair(t, sleepNowConfig(), sleepNowConfig())

	ctx, cancel := context.WithCancel(context.Background())
	got := recvAsync(ctx, srv)
	waitState(t, srv, "slept on the futex", futexAsleep)
	cancel()
	select {
	case r := <-got:
		if !errors.Is(r.err, context.Canceled) {
			t.Fatalf("Recv after cancel: %v, want context.Canceled", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("cancel did not wake the futex sleeper")
	}

	// A deadline ends the sleep at the deadline, not at the sleep's bound.
	dctx, dcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer dcancel()
	got = recvAsync(dctx, srv)
	select {
	case r := <-got:
		if !errors.Is(r.err, ErrTimeout) {
			t.Fatalf("Recv past its deadline: %v, want ErrTimeout", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the deadline did not end the futex sleep")
	}
	if n := srv.Stats().Sleeps; n < 2 {
		t.Fatalf("receiver slept %d times, want 2 (one per Recv)", n)
	}

	got = recvAsync(context.Background(), srv)
	waitState(t, srv, "slept on the futex", futexAsleep)
	srv.Close()
	select {
	case r := <-got:
		if !errors.Is(r.err, ErrClosed) {
			t.Fatalf("Recv after Close: %v, want ErrClosed", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not wake the futex sleeper")
	}
}

// A peer that keeps waking our futex for nothing cannot keep our receiver
// polling: past wakeSlack such wake-ups the session sleeps on the socket,
// and still delivers messages.
func TestFutex_SpuriousWakeFloodFallsBack(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Minute)
	cli, srv := pair(t, sleepNowConfig(), sleepNowConfig())
	got := recvAsync(context.Background(), srv)
	waitState(t, srv, "slept on the futex", futexAsleep)
	deadline := time.Now().Add(60 * time.Second)
	for {
		// What a misbehaving peer can do: FUTEX_WAKE on its ring tail.
		futexWakeShared(&cli.localHdr.RingTail)
		if socketAsleep(atomic.LoadUint64(&srv.localHdr.State)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the receiver kept sleeping on the futex under a flood of wake-ups")
		}
		time.Sleep(10 * time.Microsecond)
	}
	if n := srv.Stats().Sleeps; n <= wakeSlack {
		t.Fatalf("receiver slept %d times before falling back, want more than %d", n, wakeSlack)
	}
	send(t, cli, 11, []byte("after the flood"))
	wantRecv(t, got, 11, "after the flood")
	if err := srv.Err(); err != nil {
		t.Fatalf("session closed: %v", err)
	}
}

// A receiver sleeps on the futex only while no goroutine waits for a
// processor: a thread blocked in the kernel keeps its processor until
// sysmon takes it away.
func TestFutex_NotWhileGoroutinesWait(t *testing.T) {
	if !futexWaitvOK {
		t.Skip("no futex_waitv")
	}
	s := &Session{cfg: DefaultConfig()}
	now := time.Now()
	sched.goNext.Store(now.Add(time.Hour).UnixNano()) // no refresh during the test
	sched.cpuNext.Store(now.Add(time.Hour).UnixNano())
	t.Cleanup(func() {
		sched.goNext.Store(0)
		sched.cpuNext.Store(0)
		sched.goBusy.Store(false)
		sched.goWant.Store(false)
	})
	sched.goBusy.Store(false)
	sched.goWant.Store(false)
	if !s.futexUsable() {
		t.Fatal("futex not used with an idle scheduler")
	}
	sched.goWant.Store(true)
	if s.futexUsable() {
		t.Fatal("futex used while a goroutine waits for a processor")
	}
	sched.goWant.Store(false)
	sched.goBusy.Store(true)
	if s.futexUsable() {
		t.Fatal("futex used with more runnable goroutines than processors")
	}
	sched.goBusy.Store(false)
	s.futexOff = true
	if s.futexUsable() {
		t.Fatal("futex used after a wake-up flood switched it off")
	}
}

// Futex sleepers leave one processor free: with GOMAXPROCS 2 one receiver
// of the process sleeps on a futex and a second on the socket; with
// GOMAXPROCS 1 none sleeps on a futex. Both are woken by their senders.
func TestFutex_LeavesOneProcessorFree(t *testing.T) {
	requireFutex(t)
	setFutexSleep(t, time.Minute)
	for _, procs := range []int{2, 1} {
		old := runtime.GOMAXPROCS(procs)
		cliA, srvA := pair(t, sleepNowConfig(), sleepNowConfig())
		cliB, srvB := pair(t, sleepNowConfig(), sleepNowConfig())
		gotA := recvAsync(context.Background(), srvA)
		gotB := recvAsync(context.Background(), srvB)
		asleep := func(st uint64) bool { return st&sleeperCount != 0 }
		waitState(t, srvA, "slept", asleep)
		waitState(t, srvB, "slept", asleep)
		onFutex := 0
		for _, s := range []*Session{srvA, srvB} {
			if futexAsleep(atomic.LoadUint64(&s.localHdr.State)) {
				onFutex++
			}
		}
		if want := procs - 1; onFutex != want {
			t.Errorf("GOMAXPROCS %d: %d receivers asleep on a futex, want %d", procs, onFutex, want)
		}
		send(t, cliA, 1, []byte("a"))
		send(t, cliB, 2, []byte("b"))
		wantRecv(t, gotA, 1, "a")
		wantRecv(t, gotB, 2, "b")
		runtime.GOMAXPROCS(old)
	}
}
