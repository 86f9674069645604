package kshmprom

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/shmkit/kshm/shm"
)

// envEchoSock: the test binary runs as the echo peer of
// TestCollector_Growth, serving this socket.
const envEchoSock = "KSHMPROM_ECHO_SOCK"

func TestMain(m *testing.M) {
	if sock := os.Getenv(envEchoSock); sock != "" {
		os.Exit(runEcho(sock))
	}
	os.Exit(m.Run())
}

// growthConfig: sessions start with a 1 MiB region and grow up to 4 MiB,
// releasing grown regions idle for 100 ms.
func growthConfig() shm.Config {
	cfg := shm.DefaultConfig()
	cfg.RegionSize, cfg.InitialRegionSize, cfg.MaxMessageSize = 4<<20, 1<<20, 256<<10
	cfg.RingEntries = 64
	cfg.ShrinkAfter = 100 * time.Millisecond
	return cfg
}

// runEcho serves one session on sock: each message comes back as a new
// buffer of the same bytes, until the session ends. It prints "ready" once
// listening.
func runEcho(sock string) int {
	ln, err := shm.Listen(sock, growthConfig())
	if err != nil {
		os.Stderr.WriteString("echo: " + err.Error() + "\n")
		return 1
	}
	defer ln.Close()
	os.Stdout.WriteString("ready\n")
	s, err := ln.Accept()
	if err != nil {
		return 1
	}
	defer s.Close()
	ctx := context.Background()
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			return 0 // the session ended
		}
		b, err := s.Alloc(m.Len())
		if err != nil {
			os.Stderr.WriteString("echo: alloc: " + err.Error() + "\n")
			return 1
		}
		m.AppendTo(b.Bytes()[:0])
		s.Release(&m)
		if err := s.Send(ctx, 0, 0, 0, b); err != nil {
			return 0
		}
	}
}

// TestCollector_Growth drives real growth over a session with an echo peer
// in another process, and checks that the exported growth series move: our
// regions grow for the requests (region_grows_total, own regions and
// committed bytes up), the peer's grow for the responses we hold (peer
// regions and mapped bytes up), an allocation beyond the 4 MiB maximum is
// refused and counted (grow_fallbacks_total{reason="limit"}), and once
// everything is back the grown regions are released
// (region_shrinks_total) and committed bytes return to the base region.
func TestCollector_Growth(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "echo.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envEchoSock+"="+sock)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("echo peer said %q, %v; want ready", line, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := shm.Dial(ctx, sock, growthConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := NewCollector()
	before := gather(t, c)

	// Six 200 KiB requests allocated at once, their responses held:
	// neither side's 1 MiB region holds them all.
	const n, size = 6, 200 << 10
	reqs := make([]shm.Buffer, n)
	for i := range reqs {
		if reqs[i], err = s.Alloc(size); err != nil {
			t.Fatal(err)
		}
		for j := range reqs[i].Bytes() {
			reqs[i].Bytes()[j] = byte(i + j)
		}
	}
	for i, b := range reqs {
		if err := s.Send(ctx, uint64(i), 0, 0, b); err != nil {
			t.Fatal(err)
		}
	}
	var held []shm.Message
	defer func() {
		for i := range held {
			s.Release(&held[i])
		}
	}()
	for range n {
		m, err := s.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if m.Len() != size || m.Inline() {
			t.Fatalf("response of %d bytes, inline %v: want %d bytes in shared memory", m.Len(), m.Inline(), size)
		}
		held = append(held, m)
	}
	grown := gather(t, c)
	for _, k := range []string{"kshm_region_grows_total", "kshm_regions/own", "kshm_regions/peer",
		"kshm_region_committed_bytes", "kshm_peer_region_mapped_bytes"} {
		if grown[k] <= before[k] {
			t.Errorf("%s did not rise with growth: %v before, %v after", k, before[k], grown[k])
		}
	}

	// Allocate beyond the maximum: refused for the limit, and counted.
	var bufs []shm.Buffer
	for len(bufs) < 64 {
		b, err := s.Alloc(size)
		if err != nil {
			if !errors.Is(err, shm.ErrGrowLimit) {
				t.Fatalf("allocation beyond the maximum: %v, want ErrGrowLimit", err)
			}
			break
		}
		bufs = append(bufs, b)
	}
	limited := gather(t, c)
	if limited["kshm_grow_fallbacks_total/limit"] <= before["kshm_grow_fallbacks_total/limit"] {
		t.Errorf("grow_fallbacks_total{reason=limit} %v after a refused allocation (before %v)",
			limited["kshm_grow_fallbacks_total/limit"], before["kshm_grow_fallbacks_total/limit"])
	}
	if limited["kshm_region_committed_bytes"] > 4<<20 {
		t.Errorf("committed %v bytes, above the 4 MiB maximum", limited["kshm_region_committed_bytes"])
	}

	// Everything back: the grown regions go once idle for ShrinkAfter.
	for _, b := range bufs {
		if err := s.Free(b); err != nil {
			t.Fatal(err)
		}
	}
	for i := range held {
		s.Release(&held[i])
	}
	held = nil
	var shrunk map[string]float64
	for deadline := time.Now().Add(20 * time.Second); ; {
		shrunk = gather(t, c)
		if shrunk["kshm_region_committed_bytes"] == before["kshm_region_committed_bytes"] || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if shrunk["kshm_region_shrinks_total"] <= before["kshm_region_shrinks_total"] ||
		shrunk["kshm_region_committed_bytes"] != before["kshm_region_committed_bytes"] ||
		shrunk["kshm_regions/own"] != before["kshm_regions/own"] {
		t.Errorf("after every buffer came back: shrinks %v (before %v), committed %v bytes in %v regions, want the base region's %v in %v",
			shrunk["kshm_region_shrinks_total"], before["kshm_region_shrinks_total"], shrunk["kshm_region_committed_bytes"],
			shrunk["kshm_regions/own"], before["kshm_region_committed_bytes"], before["kshm_regions/own"])
	}
}
