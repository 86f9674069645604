package shm

import (
	"context"
	"testing"
	"time"
)

// The spin budget follows the median wait: short waits give a short budget
// (not the whole SpinTime), waits whose double does not fit in SpinTime
// switch polling off, one long wait among short ones does not, and neither
// do rare long waits (a garbage collection now and then) that would pull a
// mean up.
func TestSpin_BudgetFollowsTypicalWait(t *testing.T) {
	s := &Session{cfg: DefaultConfig()}
	s.cfg.SpinTime = 500 * time.Microsecond
	s.waitMid = int64(wakeCost / 2)
	s.waitLow = s.waitMid
	observe := func(d time.Duration) {
		for range 400 { // the lower quartile rises by a 48th of itself per longer wait
			s.observeWait(d)
		}
	}
	within := func(what string, lo, hi time.Duration) {
		t.Helper()
		if b := s.spinBudget(); b < lo || b > hi {
			t.Fatalf("SpinTime %v, %s: budget %v, want %v..%v (median %v, lower quartile %v)", s.cfg.SpinTime, what, b, lo, hi, time.Duration(s.waitMid), time.Duration(s.waitLow))
		}
	}
	observe(5 * time.Microsecond)
	within("waits of 5 µs: the floor", wakeCost, wakeCost)
	observe(40 * time.Microsecond)
	within("waits of 40 µs: about twice the wait", 70*time.Microsecond, 95*time.Microsecond)
	s.observeWait(time.Second) // one preempted or idle wait
	within("one long wait among short ones: still polling", wakeCost, 100*time.Microsecond)
	observe(100 * time.Microsecond)
	within("waits of 100 µs: about twice the wait", 180*time.Microsecond, 225*time.Microsecond)
	observe(300 * time.Microsecond)
	within("waits of 300 µs: twice does not fit", minSpin, minSpin)
	for i := range 300 { // mostly 10 µs, every third a 5 ms pause
		if i%3 == 2 {
			s.observeWait(5 * time.Millisecond)
		} else {
			s.observeWait(10 * time.Microsecond)
		}
	}
	within("two waits in three of 10 µs, the rest 5 ms", wakeCost, wakeCost)
	observe(5 * time.Millisecond)
	within("waits of 5 ms", minSpin, minSpin)

	s.cfg.SpinTime = 100 * time.Microsecond // the Kitex transport's default
	observe(40 * time.Microsecond)
	within("waits of 40 µs", 70*time.Microsecond, 95*time.Microsecond)
	observe(60 * time.Microsecond)
	within("waits of 60 µs: twice does not fit", minSpin, minSpin)
	// Bimodal, as a Kitex server's waits with an RPC timeout on its client:
	// two in five short, the rest past the threshold. The median (80 µs)
	// says sleep; the short mode is worth polling for, about as long as it
	// lasts.
	for i := range 300 {
		if i%5 < 2 {
			s.observeWait(7 * time.Microsecond)
		} else {
			s.observeWait(80 * time.Microsecond)
		}
	}
	within("two waits in five of 7 µs, the rest 80 µs", 14*time.Microsecond, 20*time.Microsecond)
	for i := range 300 { // one in six short: too few to pay for polling
		if i%6 == 0 {
			s.observeWait(7 * time.Microsecond)
		} else {
			s.observeWait(80 * time.Microsecond)
		}
	}
	within("one wait in six of 7 µs, the rest 80 µs", minSpin, minSpin)
	for i := range 300 { // spread over 25-105 µs: no short mode
		s.observeWait(time.Duration(25+20*(i%5)) * time.Microsecond)
	}
	within("waits spread over 25-105 µs", minSpin, minSpin)

	s.cfg.SpinTime = 20 * time.Microsecond
	observe(5 * time.Microsecond)
	within("waits of 5 µs: capped", s.cfg.SpinTime, s.cfg.SpinTime)
	observe(15 * time.Microsecond)
	within("waits of 15 µs: twice does not fit", minSpin, minSpin)

	s.cfg.SpinTime = 0
	within("SpinTime 0", 0, 0)
}

// While the process has more runnable goroutines than processors, a
// poller goes on polling within its budget but yields its processor at
// every pause; with the scheduler idle it neither stops nor yields.
func TestSpin_YieldsWhenProcessIsBusy(t *testing.T) {
	s := &Session{cfg: DefaultConfig()}
	now := time.Now()
	sched.goNext.Store(now.Add(time.Hour).UnixNano()) // no refresh during the test
	sched.cpuNext.Store(now.Add(time.Hour).UnixNano())
	t.Cleanup(func() {
		sched.goNext.Store(0)
		sched.cpuNext.Store(0)
		sched.goBusy.Store(false)
		sched.goWant.Store(false)
		sched.cpuBusy.Store(false)
	})
	sched.cpuBusy.Store(false)
	sched.goWant.Store(false)
	for _, busy := range []bool{false, true} {
		sched.goBusy.Store(busy)
		if !s.keepSpinning(now, now, time.Millisecond) {
			t.Fatalf("busy %v: stopped polling with budget left", busy)
		}
		if s.keepSpinning(now.Add(time.Millisecond), now, time.Millisecond) {
			t.Fatalf("busy %v: polled past the budget", busy)
		}
		want := pausedNot
		if busy {
			want = pausedGosched
		}
		for i := 1; i < 4; i++ { // every pause, not only the first after a sample
			if got := s.pause(i); got != want {
				t.Fatalf("busy %v: pause %d did %d, want %d", busy, i, got, want)
			}
		}
	}
	// Goroutines waiting with no processor idle: one Gosched per sample.
	sched.goBusy.Store(false)
	sched.goWant.Store(true)
	if got := s.pause(1); got != pausedGosched {
		t.Fatalf("a goroutine waiting for a processor: pause did %d, want a Gosched", got)
	}
	sched.goNext.Store(now.Add(time.Hour).UnixNano())
	if got := s.pause(2); got != pausedNot {
		t.Fatalf("the same sample again: pause did %d, want nothing", got)
	}
}

// An idle session costs no CPU: a waiting receiver sleeps once and stays
// asleep (it does not poll or wake up again) until a message comes.
func TestSpin_IdleReceiverSleeps(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	errc := make(chan error, 1)
	go func() {
		m, err := srv.Recv(context.Background())
		srv.Release(&m)
		errc <- err
	}()
	for srv.Stats().Sleeps == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(3 * housekeepEvery) // housekeeping passes must not wake it
	if n := srv.Stats().Sleeps; n != 1 {
		t.Fatalf("idle receiver slept %d times, want once", n)
	}
	send(t, cli, 1, []byte("wake"))
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// machineRunnable reads /proc/loadavg; sampling allocates nothing (it runs
// in pollers).
func TestSched_SamplingAllocatesNothing(t *testing.T) {
	sched.mu.Lock()
	n, ok := sched.machineRunnable()
	sched.mu.Unlock()
	if !ok || n < 1 {
		t.Fatalf("machineRunnable = %d, %v; want at least this thread", n, ok)
	}
	for _, c := range []struct {
		in   string
		n    int
		isOK bool
	}{
		{"0.52 0.58 0.59 3/467 12345\n", 3, true},
		{"0.52 0.58 0.59 12/467 1\n", 12, true},
		{"0.52 0.58 0.59 x/467 1\n", 0, false},
		{"0.52 0.58", 0, false},
		{"", 0, false},
	} {
		if n, ok := parseRunnable([]byte(c.in)); n != c.n || ok != c.isOK {
			t.Errorf("parseRunnable(%q) = %d, %v; want %d, %v", c.in, n, ok, c.n, c.isOK)
		}
	}
	allocs := testing.AllocsPerRun(100, func() {
		sched.goNext.Store(0)
		sched.cpuNext.Store(0)
		sched.refresh(time.Now().UnixNano())
	})
	if allocs != 0 {
		t.Fatalf("a scheduler sample allocates %v times", allocs)
	}
}

func TestProcessorWanted(t *testing.T) {
	for _, c := range []struct {
		runnable, running, notInGo, procs uint64
		want                              bool
	}{
		{0, 2, 0, 2, false}, // nothing waits
		{1, 1, 0, 2, false}, // a processor is idle: the runtime wakes a thread for it
		{1, 2, 0, 2, true},  // every processor busy
		{1, 1, 1, 2, true},  // one busy in a system call
		{3, 1, 0, 1, true},
		{1, 0, 0, 1, false},
	} {
		if got := processorWanted(c.runnable, c.running, c.notInGo, c.procs); got != c.want {
			t.Errorf("processorWanted(runnable %d, running %d, not in Go %d, procs %d) = %v, want %v",
				c.runnable, c.running, c.notInGo, c.procs, got, c.want)
		}
	}
}
