package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// The baseline's configuration gives every payload one contiguous slice,
// with room for a request and a response per call in flight.
func TestShmipcSliceSizes_CoverThePayload(t *testing.T) {
	for _, size := range []int{8, 64, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20} {
		for _, conc := range []int{1, 16, 64} {
			capacity, pairs := shmipcSliceSizes(size, conc)
			var largest uint32
			for i, p := range pairs {
				if i > 0 && p.Size < pairs[i-1].Size {
					t.Errorf("%d B c%d: slice sizes not ascending: %d after %d", size, conc, p.Size, pairs[i-1].Size)
				}
				largest = max(largest, p.Size)
			}
			if largest < uint32(size) {
				t.Errorf("%d B c%d: largest slice %d holds no payload", size, conc, largest)
			}
			if n := shmipcPayloadSlices(size, conc); n < 4*(conc+2) {
				t.Errorf("%d B c%d: %d payload slices in %d bytes, want at least %d", size, conc, n, capacity, 4*(conc+2))
			}
		}
	}
}

// TestShmipcBaseline_NoFallbackFewAllocs runs the baseline's client and
// server (in one process, over a unix socket) at sizes up to 1 MiB, and
// requires that no message went over the unix socket instead of shared
// memory (shmipc-go's FallbackWriteCount and AllocShmErrorCount, both
// sides) and that a call allocates little.
func TestShmipcBaseline_NoFallbackFewAllocs(t *testing.T) {
	if raceEnabled {
		// shmipc-go v0.2.0 has data races of its own (in its session set-up)
		// that the race detector reports, so under -race the test runs
		// itself again in a build without it.
		runWithoutRace(t, "TestShmipcBaseline_NoFallbackFewAllocs")
		return
	}
	const maxAllocs = 4
	for _, size := range []int{64, 64 << 10, 256 << 10, 1 << 20} {
		p := params{sock: filepath.Join(t.TempDir(), "s.sock"), size: size, conc: 1}
		srv, err := serveShmipc(p, func(err error) { t.Error(err) })
		if err != nil {
			t.Fatal(err)
		}
		cs, err := dialShmipc(p)
		if err != nil {
			srv.close()
			t.Fatal(err)
		}
		c, err := cs.newCaller(0)
		if err != nil {
			t.Fatal(err)
		}
		var seq uint64
		call := func() {
			seq++
			if err := c.call(seq); err != nil {
				t.Fatal(err)
			}
		}
		// Cycle through every slice once, then measure.
		for i := 0; i < cs.(*shmipcClient).warmCalls()+10; i++ {
			call()
		}
		allocs := testing.AllocsPerRun(50, call)
		cf, sf := cs.(*shmipcClient).fallbacks(), srv.(*shmipcServer).fallbacks()
		if err := cs.close(); err != nil {
			t.Error(err)
		}
		if err := srv.close(); err != nil {
			t.Error(err)
		}
		if cf != 0 || sf != 0 {
			t.Errorf("%d B: %d client and %d server messages fell back to the unix socket", size, cf, sf)
		}
		if allocs > maxAllocs {
			t.Errorf("%d B: %.1f allocations per call, want at most %d", size, allocs, maxAllocs)
		}
		t.Logf("%d B: %.1f allocations per call (client and server), %d fallbacks", size, allocs, cf+sf)
	}
}

// runWithoutRace runs the test named name of this package with the go
// command, without the race detector, and fails t if it fails.
func runWithoutRace(t *testing.T, name string) {
	t.Helper()
	goCmd := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goCmd); err != nil {
		if goCmd, err = exec.LookPath("go"); err != nil {
			t.Skip("no go command to run the test without the race detector")
		}
	}
	cmd := exec.Command(goCmd, "test", "-count=1", "-v", "-run", "^"+name+"$", ".")
	cmd.Env = os.Environ()
	out, err := cmd.CombinedOutput()
	t.Logf("without the race detector:\n%s", out)
	if err != nil {
		t.Fatalf("%s without the race detector: %v", name, err)
	}
}
