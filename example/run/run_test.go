package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the concurrent writes run makes.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestRun_EndToEnd builds the example server and client (with the race
// detector when the test has it), runs them as separate processes with a
// short measurement, and requires every step to succeed: every call verified,
// every buffer returned, the server stopped cleanly by SIGTERM.
func TestRun_EndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two processes; skipped in -short mode")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var out syncBuffer
	args := []string{"-duration", "200ms", "-sizes", "64,16384,1048576", "-concurrency", "2"}
	if raceEnabled {
		args = append(args, "-race")
	}
	var stdout syncBuffer
	err := run(ctx, args, &stdout, &out)
	t.Log("output:\n" + stdout.String() + "\nlogs:\n" + out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	for _, p := range compareTableProblems(stdout.String(), []string{"64 B", "16 KiB", "1 MiB"}) {
		t.Error(p)
	}
}

func TestCompareTableProblems(t *testing.T) {
	good := `Echo, concurrency 1, 1s per size and transport, the same server: kshm (shared memory) against
plain Kitex over the server's usual TCP address 127.0.0.1:1; every response verified byte for byte:
     size  kshm p50  plain p50  ratio  kshm p99  plain p99  ratio  calls kshm/plain  over shm  fallbacks  failures  GCs/100 calls
     64 B    50.0µs    100.0µs  0.50x   200.0µs    100.0µs  2.00x         7514/7425      7514          0         0            1/0
(ratio: ...)`
	if p := compareTableProblems(good, []string{"64 B"}); len(p) != 0 {
		t.Errorf("a good table: %v", p)
	}
	for name, bad := range map[string]string{
		"wrong ratio":  strings.Replace(good, "0.50x", "0.30x", 1),
		"no shm calls": strings.Replace(good, "      7514          0", "         0          0", 1),
		"failures":     strings.Replace(good, "0         0            1/0\n(", "0         2            1/0\n(", 1),
		"no GC column": strings.Replace(good, "            1/0\n(", "\n(", 1),
		"no table":     "nothing",
	} {
		if p := compareTableProblems(bad, []string{"64 B"}); len(p) == 0 {
			t.Errorf("%s: no problem found", name)
		}
	}
	if p := compareTableProblems(good, []string{"1 MiB"}); len(p) == 0 {
		t.Errorf("a missing size: no problem found")
	}
}

// compareTableProblems checks the side-by-side table the client prints: a row
// per size with kshm's and plain Kitex's p50 and p99, ratios that are what
// the latencies say, calls over both, kshm's calls over shared memory, and
// no failure.
func compareTableProblems(out string, sizes []string) []string {
	var problems []string
	errorf := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	lines := strings.Split(out, "\n")
	start := -1
	for i, l := range lines {
		if strings.Contains(l, "kshm p50") && strings.Contains(l, "plain p50") && strings.Contains(l, "over shm") {
			start = i
		}
	}
	if start < 0 {
		return []string{"no kshm / plain Kitex table in the output"}
	}
	if !strings.Contains(out, "plain Kitex over the server's usual TCP address") {
		errorf("the table does not say what it compares with")
	}
	rows := map[string][]string{}
	for _, l := range lines[start+1:] {
		f := strings.Fields(l)
		if len(f) != 13 {
			break
		}
		rows[f[0]+" "+f[1]] = f[2:]
	}
	for _, size := range sizes {
		f, ok := rows[size]
		if !ok {
			errorf("%s: no row in the table", size)
			continue
		}
		// kshm p50, plain p50, ratio, kshm p99, plain p99, ratio, calls kshm/plain, over shm, fallbacks, failures,
		// GCs per 100 calls kshm/plain
		for _, q := range [][3]int{{0, 1, 2}, {3, 4, 5}} {
			a, errA := time.ParseDuration(f[q[0]])
			b, errB := time.ParseDuration(f[q[1]])
			r, errR := strconv.ParseFloat(strings.TrimSuffix(f[q[2]], "x"), 64)
			if errA != nil || errB != nil || errR != nil || a <= 0 || b <= 0 {
				errorf("%s: latencies %q %q ratio %q do not parse", size, f[q[0]], f[q[1]], f[q[2]])
				continue
			}
			if want := float64(a) / float64(b); math.Abs(r-want) > 0.02+0.01*want {
				errorf("%s: ratio %v, but %v / %v = %.3f", size, r, a, b, want)
			}
		}
		kc, pc, ok := strings.Cut(f[6], "/")
		nk, err1 := strconv.Atoi(kc)
		np, err2 := strconv.Atoi(pc)
		shm, err3 := strconv.Atoi(f[7])
		fails, err4 := strconv.Atoi(f[9])
		if !ok || err1 != nil || err2 != nil || err3 != nil || err4 != nil {
			errorf("%s: counts %q do not parse", size, f[6:])
			continue
		}
		if nk == 0 || np == 0 || shm == 0 {
			errorf("%s: %d calls over kshm (%d over shared memory), %d over plain Kitex; want some of each", size, nk, shm, np)
		}
		if fails != 0 {
			errorf("%s: %d failures", size, fails)
		}
		kg, pg, ok := strings.Cut(f[10], "/")
		if _, err := strconv.Atoi(kg); !ok || err != nil {
			errorf("%s: GCs per 100 calls %q do not parse", size, f[10])
		} else if _, err := strconv.Atoi(pg); err != nil {
			errorf("%s: GCs per 100 calls %q do not parse", size, f[10])
		}
	}
	return problems
}

func TestRun_BadFlag(t *testing.T) {
	var out syncBuffer
	if err := run(context.Background(), []string{"-no-such-flag"}, &out, &out); err == nil {
		t.Fatal("run accepted an unknown flag")
	}
}
