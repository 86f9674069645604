package main

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestRun_Upgrade runs the upgrade demonstration (servers and client as
// separate processes, built with the race detector when the test has it),
// short, and checks its report: no call failed or mismatched, every
// replacement's old server exited on SIGTERM, and after each replacement the
// calls went over shared memory to the new server.
func TestRun_Upgrade(t *testing.T) {
	bin := t.TempDir()
	var buildLog syncBuffer
	start := time.Now()
	if err := buildExample(bin, raceEnabled, &buildLog); err != nil {
		t.Fatalf("%v\n%s", err, buildLog.String())
	}
	t.Logf("built server and client in %v", time.Since(start).Round(time.Millisecond))
	for _, tc := range []struct {
		name         string
		zeroConfig   bool
		replacements int
	}{
		{"socket-path", false, 2},
		{"zero-config", true, 1}, // no socket path on either side
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			cfg := upgradeConfig{race: raceEnabled, concurrency: 8, size: 16 << 10, phase: 300 * time.Millisecond,
				replacements: tc.replacements, readyWait: 60 * time.Second, stopWait: 30 * time.Second, zeroConfig: tc.zeroConfig, binDir: bin}
			var stdout, logs syncBuffer
			rep, err := upgrade(ctx, cfg, &stdout, &logs)
			t.Log("output:\n" + stdout.String())
			if err != nil {
				t.Log("logs:\n" + logs.String())
				t.Fatalf("upgrade: %v", err)
			}
			if rep.Total.Calls == 0 || rep.Total.Failed != 0 || rep.Total.Mismatched != 0 {
				t.Fatalf("%d calls, %d failed, %d mismatched", rep.Total.Calls, rep.Total.Failed, rep.Total.Mismatched)
			}
			if len(rep.Replacements) != tc.replacements {
				t.Fatalf("%d replacements, want %d", len(rep.Replacements), tc.replacements)
			}
			seen := map[int]bool{}
			for i, r := range rep.Replacements {
				if r.OldPid == r.NewPid || seen[r.NewPid] {
					t.Errorf("replacement %d: %d -> %d is not a new server", i+1, r.OldPid, r.NewPid)
				}
				seen[r.OldPid], seen[r.NewPid] = true, true
				if r.After.shmTo(r.NewPid) == 0 || !r.After.allLastShmTo(r.NewPid) {
					t.Errorf("replacement %d: after %d exited: answered %s, last calls %+v; want shared memory to %d",
						i+1, r.OldPid, r.After.answeredBy(), r.After.Last, r.NewPid)
				}
			}
			if !strings.Contains(stdout.String(), "upgrade: PASS") {
				t.Error("no PASS verdict printed")
			}
		})
	}
}

// TestUpgradeReport_Fails checks the verdict's own checks: a failed call,
// or calls that stayed off shared memory after a replacement, are problems.
func TestUpgradeReport_Fails(t *testing.T) {
	after := Phase{Calls: 10, Servers: map[string]map[string]int64{"2": {"fallback": 10}},
		Last: []struct{ Pid, Transport string }{{"2", "fallback"}}}
	if after.shmTo(2) != 0 || after.allLastShmTo(2) {
		t.Errorf("calls over fallback counted as shared memory")
	}
	good := Phase{Calls: 10, Servers: map[string]map[string]int64{"2": {"shm": 10}},
		Last: []struct{ Pid, Transport string }{{"2", "shm"}, {"2", "shm"}}}
	if good.shmTo(2) != 10 || !good.allLastShmTo(2) || good.allLastShmTo(3) {
		t.Errorf("shared-memory calls to 2 not recognised")
	}
	if (Phase{}).allLastShmTo(2) {
		t.Errorf("a phase without calls passes")
	}
}
