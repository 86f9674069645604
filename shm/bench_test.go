package shm

import (
	"context"
	"strconv"
	"syscall"
	"testing"
)

// BenchmarkSession_RoundTrip measures an in-process round trip through both
// rings (the cross-process figures are in benchmark/). Its allocs/op is the
// hot path's heap allocations per message pair: it must be 0.
func BenchmarkSession_RoundTrip(b *testing.B) {
	for _, size := range []int{64, 4096, 65536} {
		b.Run(byteSize(size), func(b *testing.B) { roundTrip(b, size, WakePoll) })
	}
	// The default mode, where the spin policy decides between polling and
	// sleeping.
	for _, size := range []int{64, 16384} {
		b.Run("notify/"+byteSize(size), func(b *testing.B) { roundTrip(b, size, WakeNotify) })
	}
}

func roundTrip(b *testing.B, size int, mode WakeMode) {
	c := testConfig()
	c.WakeMode = mode
	scfg := testConfig()
	scfg.WakeMode = mode
	cli, srv := pair(b, c, scfg)
	ctx := context.Background()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := srv.Recv(ctx)
			if err != nil {
				return
			}
			buf, err := srv.Alloc(m.Len())
			if err != nil {
				b.Error(err)
				return
			}
			copy(buf.Bytes(), m.Segment(0))
			srv.Release(&m)
			if err := srv.Send(ctx, m.ID, 0, 0, buf); err != nil {
				return
			}
		}
	}()
	payload := make([]byte, size)
	b.SetBytes(int64(2 * size))
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := 0; i < b.N; i++ {
		buf, err := cli.Alloc(size)
		if err != nil {
			b.Fatal(err)
		}
		copy(buf.Bytes(), payload)
		if err := cli.Send(ctx, uint64(i), 0, 0, buf); err != nil {
			b.Fatal(err)
		}
		m, err := cli.Recv(ctx)
		if err != nil {
			b.Fatal(err)
		}
		copy(payload, m.Segment(0))
		cli.Release(&m)
	}
	b.StopTimer()
	// CPU of the whole process (both sides) per round trip.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	cli.Close()
	<-done
}

// BenchmarkSession_Message measures the engine's own cost per message on
// one goroutine: Alloc, Send, Recv and Release, no waiting and no other
// goroutine, so scheduling noise of a shared machine stays out of it.
func BenchmarkSession_Message(b *testing.B) {
	for _, size := range []int{64, 16384} {
		b.Run(byteSize(size), func(b *testing.B) {
			c := testConfig()
			c.WakeMode = WakePoll
			cli, srv := pair(b, c, c)
			ctx := context.Background()
			payload := make([]byte, size)
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime()
			for i := 0; i < b.N; i++ {
				buf, err := cli.Alloc(size)
				if err != nil {
					b.Fatal(err)
				}
				copy(buf.Bytes(), payload)
				if err := cli.Send(ctx, uint64(i), 0, 0, buf); err != nil {
					b.Fatal(err)
				}
				m, err := srv.Recv(ctx)
				if err != nil {
					b.Fatal(err)
				}
				copy(payload, m.Segment(0))
				srv.Release(&m)
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
		})
	}
}

// TestSession_HotPathAllocatesNothing pins what the benchmark reports.
func TestSession_HotPathAllocatesNothing(t *testing.T) {
	c := testConfig()
	c.WakeMode = WakePoll
	cli, srv := pair(t, c, c)
	ctx := context.Background()
	payload := make([]byte, 1000)
	round := func() {
		buf, err := cli.Alloc(len(payload))
		if err != nil {
			t.Fatal(err)
		}
		copy(buf.Bytes(), payload)
		if err := cli.Send(ctx, 1, 2, 3, buf); err != nil {
			t.Fatal(err)
		}
		m, err := srv.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		copy(payload, m.Segment(0))
		srv.Release(&m)
	}
	round()
	if n := testing.AllocsPerRun(1000, round); n != 0 {
		t.Fatalf("Alloc+Send+Recv+Release allocates %v times per message", n)
	}
}

// cpuTime is the process's user+system CPU time in nanoseconds.
func cpuTime() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func byteSize(n int) string {
	switch {
	case n >= 1<<20:
		return strconv.Itoa(n>>20) + "MiB"
	case n >= 1<<10:
		return strconv.Itoa(n>>10) + "KiB"
	}
	return strconv.Itoa(n) + "B"
}

// BenchmarkSession_Grown compares large messages in regions that grew
// (default 4 MiB start, 64 MiB maximum) with a fixed 64 MiB region, four
// messages in flight. Growth happens before the timer starts.
func BenchmarkSession_Grown(b *testing.B) {
	for _, size := range []int{1 << 20, 4 << 20} {
		for _, fixed := range []bool{true, false} {
			name := byteSize(size) + "/grown"
			if fixed {
				name = byteSize(size) + "/fixed"
			}
			b.Run(name, func(b *testing.B) {
				c := DefaultConfig()
				c.WakeMode = WakePoll
				c.RingEntries = 256
				if fixed {
					c.InitialRegionSize = c.RegionSize
				}
				cli, srv := pair(b, c, c)
				ctx := context.Background()
				payload := make([]byte, size)
				const inFlight = 4
				step := func(i int) {
					buf, err := cli.Alloc(size)
					if err != nil {
						b.Fatal(err)
					}
					copy(buf.Bytes(), payload)
					if err := cli.Send(ctx, uint64(i), 0, 0, buf); err != nil {
						b.Fatal(err)
					}
					if i >= inFlight-1 {
						m, err := srv.Recv(ctx)
						if err != nil {
							b.Fatal(err)
						}
						copy(payload, m.Segment(0))
						srv.Release(&m)
					}
				}
				for i := 0; i < 64; i++ { // warm up: the regions grow here
					step(i)
				}
				b.SetBytes(int64(size))
				b.ReportAllocs()
				b.ResetTimer()
				for i := 64; i < 64+b.N; i++ {
					step(i)
				}
				b.StopTimer()
				b.ReportMetric(float64(cli.Stats().CommittedBytes>>20), "MiB-committed")
			})
		}
	}
}
