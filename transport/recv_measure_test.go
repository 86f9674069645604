package transport_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/trace"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	ktransport "github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
)

// procCost is what a process has spent so far: context switches of all its
// threads (voluntary and not) and CPU time.
type procCost struct {
	vcs, ivcs int64
	cpu       time.Duration
}

// readProcCost sums /proc/PID/task/*/status (threads that exited are lost,
// but Go rarely ends threads) and reads utime+stime from /proc/PID/stat.
func readProcCost(t testing.TB, pid int) procCost {
	t.Helper()
	var c procCost
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread exited
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				c.vcs += n
			}
			if v, ok := strings.CutPrefix(l, "nonvoluntary_ctxt_switches:"); ok {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				c.ivcs += n
			}
		}
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64) // fields 14 and 15 of stat
	st, _ := strconv.ParseInt(f[12], 10, 64)
	c.cpu = time.Duration(ut+st) * (time.Second / 100) // USER_HZ
	return c
}

// threadSwitches returns each thread's voluntary and involuntary context
// switches, by thread id.
func threadSwitches(pid int) map[string][2]int64 {
	out := map[string][2]int64{}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	for _, p := range tasks {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var v [2]int64
		for _, l := range strings.Split(string(b), "\n") {
			if x, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
				v[0], _ = strconv.ParseInt(strings.TrimSpace(x), 10, 64)
			}
			if x, ok := strings.CutPrefix(l, "nonvoluntary_ctxt_switches:"); ok {
				v[1], _ = strconv.ParseInt(strings.TrimSpace(x), 10, 64)
			}
		}
		out[filepath.Base(filepath.Dir(p))] = v
	}
	return out
}

// threadDeltas formats the per-thread switches per call between two
// snapshots, busiest first.
func threadDeltas(a, b map[string][2]int64, calls int) string {
	type d struct {
		tid  string
		v, i float64
	}
	var ds []d
	for tid, y := range b {
		x := a[tid]
		if y[0]-x[0]+y[1]-x[1] > 0 {
			ds = append(ds, d{tid, float64(y[0]-x[0]) / float64(calls), float64(y[1]-x[1]) / float64(calls)})
		}
	}
	slices.SortFunc(ds, func(p, q d) int {
		if p.v+p.i > q.v+q.i {
			return -1
		}
		return 1
	})
	var sb strings.Builder
	for _, x := range ds {
		fmt.Fprintf(&sb, " %s:%.2f+%.2f", x.tid, x.v, x.i)
	}
	return sb.String()
}

// TestMeasure_RecvPath measures Kitex echo at c=1 from this process to a
// child server: p50, p99, context switches and CPU per call of both
// processes, kshm against plain Kitex over the same unix socket, rounds
// alternating. It only runs with KSHM_MEASURE=1 (it asserts nothing about
// timing; it prints numbers). KSHM_MEASURE_CALLS sets the calls per row.
func TestMeasure_RecvPath(t *testing.T) {
	if os.Getenv("KSHM_MEASURE") == "" {
		t.Skip("set KSHM_MEASURE=1 to measure")
	}
	calls := 3000
	if n, err := strconv.Atoi(os.Getenv("KSHM_MEASURE_CALLS")); err == nil && n > 0 {
		calls = n
	}
	sock := sockPath(t)
	srv := startServer(t, sock)
	kc := newEchoClient(t, shmOpt(sock))
	pc := newEchoClient(t, client.WithHostPorts(sock), client.WithTransportProtocol(ktransport.TTHeaderFramed))
	child := srv.p.Cmd.Process.Pid
	self := os.Getpid()
	sizes := []int{64, 16 << 10}
	if os.Getenv("KSHM_MEASURE_1MIB") != "" {
		sizes = append(sizes, 1<<20)
	}
	for round := 1; round <= 3; round++ {
		for _, size := range sizes {
			for _, mode := range []string{"kshm", "plain"} {
				c := kc
				if mode == "plain" {
					c = pc
				}
				req := &echo.EchoRequest{Payload: payload(size, int64(size))}
				ctx := context.Background()
				for i := 0; i < 300; i++ {
					if _, err := c.Echo(ctx, req); err != nil {
						t.Fatal(err)
					}
				}
				before := kshm.ReadStats()
				ta0, tb0 := threadSwitches(self), threadSwitches(child)
				a0, b0 := readProcCost(t, self), readProcCost(t, child)
				lat := make([]time.Duration, calls)
				if path := os.Getenv("KSHM_MEASURE_TRACE"); path != "" && round == 1 && mode == "kshm" && size == 64 {
					f, err := os.Create(path)
					if err != nil {
						t.Fatal(err)
					}
					if err := trace.Start(f); err != nil {
						t.Fatal(err)
					}
					defer f.Close()
				}
				for i := range lat {
					start := time.Now()
					if _, err := c.Echo(ctx, req); err != nil {
						t.Fatal(err)
					}
					lat[i] = time.Since(start)
				}
				a1, b1 := readProcCost(t, self), readProcCost(t, child)
				if os.Getenv("KSHM_MEASURE_TRACE") != "" && round == 1 && mode == "kshm" && size == 64 {
					trace.Stop()
				}
				ta1, tb1 := threadSwitches(self), threadSwitches(child)
				after := kshm.ReadStats()
				slices.Sort(lat)
				n := float64(calls)
				cs := float64(a1.vcs-a0.vcs+a1.ivcs-a0.ivcs+b1.vcs-b0.vcs+b1.ivcs-b0.ivcs) / n
				t.Logf("round %d %-5s %6d B: p50 %6.1f µs p99 %7.1f µs | ctxsw/call %.2f (client %.2f+%.2f, server %.2f+%.2f) | cpu/call %5.1f µs | shm calls %d",
					round, mode, size,
					float64(lat[calls/2])/1e3, float64(lat[calls*99/100])/1e3, cs,
					float64(a1.vcs-a0.vcs)/n, float64(a1.ivcs-a0.ivcs)/n,
					float64(b1.vcs-b0.vcs)/n, float64(b1.ivcs-b0.ivcs)/n,
					float64(a1.cpu-a0.cpu+b1.cpu-b0.cpu)/n/1e3,
					after.CallsSent-before.CallsSent)
				if os.Getenv("KSHM_MEASURE_THREADS") != "" {
					t.Logf("  client threads (voluntary+involuntary per call):%s", threadDeltas(ta0, ta1, calls))
					t.Logf("  server threads:%s", threadDeltas(tb0, tb1, calls))
				}
			}
		}
	}
	// c=16: throughput, both processes' switches and CPU per call.
	for round := 1; round <= 2; round++ {
		for _, size := range []int{64, 16 << 10} {
			for _, mode := range []string{"kshm", "plain"} {
				c := kc
				if mode == "plain" {
					c = pc
				}
				const conc = 16
				per := calls / conc * 2
				a0, b0 := readProcCost(t, self), readProcCost(t, child)
				start := time.Now()
				var wg sync.WaitGroup
				for g := 0; g < conc; g++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						req := &echo.EchoRequest{Payload: payload(size, int64(size))}
						for i := 0; i < per; i++ {
							if _, err := c.Echo(context.Background(), req); err != nil {
								t.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				el := time.Since(start)
				a1, b1 := readProcCost(t, self), readProcCost(t, child)
				n := float64(conc * per)
				t.Logf("c=16 round %d %-5s %6d B: %7.0f calls/s | ctxsw/call %.2f | cpu/call %5.1f µs",
					round, mode, size, n/el.Seconds(),
					float64(a1.vcs-a0.vcs+a1.ivcs-a0.ivcs+b1.vcs-b0.vcs+b1.ivcs-b0.ivcs)/n,
					float64(a1.cpu-a0.cpu+b1.cpu-b0.cpu)/n/1e3)
			}
		}
	}
	srv.stop(t)
}
