package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	if role := os.Getenv(envRole); role != "" {
		os.Exit(runChild(role))
	}
	os.Exit(m.Run())
}

// testWriter passes the soak's report to the test log, line by line.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// TestSoak_Short is the short variant of `make soak`: the same run for
// about 40 seconds (20 with -short; KSHM_SOAK_DURATION overrides), with
// clients killed every 2 s and the server every 8 s on average, and the
// server replaced first 7 s in (5 s with -short), before any server kill,
// then every 6 s on average among the kills, with no call failing during a
// replacement. (make soak replaces it every 30 s on average.) Regions grow
// from 1 MiB and shrink again, on both sides, with every grown region
// released at the end.
func TestSoak_Short(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Duration = 40 * time.Second
	if testing.Short() {
		cfg.Duration = 20 * time.Second
	}
	if v, err := time.ParseDuration(os.Getenv("KSHM_SOAK_DURATION")); err == nil {
		cfg.Duration = v
	}
	cfg.Clients, cfg.Goroutines = 3, 8
	cfg.ClientKillEvery, cfg.ServerKillEvery = 2*time.Second, 8*time.Second
	cfg.ServerReplaceEvery = 6 * time.Second
	// Generous: under make test other packages run beside this one.
	cfg.CallTimeout = 10 * time.Second
	cfg.Seed = time.Now().UnixNano()
	cfg.Dir = t.TempDir()
	cfg.Command = func() *exec.Cmd { return exec.Command(os.Args[0], "-test.run=^$") }
	cfg.Stderr = testWriter{t}
	rep, err := Run(cfg, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Passed() {
		t.Fatalf("soak failed: %s", strings.Join(rep.Failures, "; "))
	}
	if rep.ServerReplacements == 0 || rep.ReplacementErrors != 0 {
		t.Fatalf("%d server replacements with %d failed calls: want at least one, with none", rep.ServerReplacements, rep.ReplacementErrors)
	}
	// Run checks growth and shrinking on both sides together; here each
	// side must have done both.
	for _, g := range []struct {
		who string
		g   Growth
	}{{"clients", rep.ClientGrowth}, {"servers", rep.ServerGrowth}} {
		if g.g.Grows == 0 || g.g.Shrinks == 0 {
			t.Errorf("the %s' regions grew %d times and shrank %d times: want both", g.who, g.g.Grows, g.g.Shrinks)
		}
	}
}
