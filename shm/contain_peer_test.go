package shm_test

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/misbehave"
	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/shm"
)

func childEnv(es *echoServer, kv ...string) []string {
	return append([]string{misbehave.EnvSock + "=" + es.sock}, kv...)
}

// TestContain_ForgedPeerInput: a peer in another process with a region it
// writes by hand sends garbage descriptors, offsets and lengths out of
// range, a runaway ring index, bogus releases and bad frames, each on its
// own session, and offers corrupt region headers. Each forged session is
// closed as corrupt with its reason logged and sent to the peer; each bad
// header is refused at the handshake; a well-behaved client calling all
// along sees nothing, the server accepts new sessions after, and no closed
// session's region is left behind.
func TestContain_ForgedPeerInput(t *testing.T) {
	log := misbehave.CaptureLog(t)
	es := startEchoServer(t, containConfig())
	good := startGoodClient(t, es.sock)

	cases := misbehave.ForgeCaseNames()
	var headers []string
	for name := range misbehave.HeaderCases {
		headers = append(headers, name)
	}
	all := append(append([]string(nil), cases...), headers...)
	child := shmtest.Start(t, misbehave.RoleForge, childEnv(es, misbehave.EnvCases+"="+strings.Join(all, ","))...)
	pid := child.Cmd.Process.Pid
	for _, name := range cases {
		line := child.Expect(t, "case "+name+" ", 30*time.Second)
		if !strings.HasPrefix(line, "case "+name+" closed: ") || !strings.Contains(line, "corrupt") {
			t.Errorf("%s: the peer saw %q, want its session closed with a corrupt-data reason", name, line)
		}
	}
	for _, name := range headers {
		line := child.Expect(t, "header "+name+" ", 30*time.Second)
		if !strings.HasPrefix(line, "header "+name+" refused=true") {
			t.Errorf("corrupt header %s: %q, want the handshake refused", name, line)
		}
	}
	child.Expect(t, "done", 30*time.Second)

	for _, e := range es.waitEnded(t, pid, len(cases), 10*time.Second) {
		if !errors.Is(e.err, shm.ErrCorrupt) {
			t.Errorf("a forged session closed with %v, want ErrCorrupt", e.err)
		}
		t.Logf("closed: %v", e.err)
	}
	if got := log.Lines(fmt.Sprintf("closing session with pid %d", pid), "corrupt"); len(got) != len(cases) {
		t.Errorf("%d sessions closed with a logged reason, want %d", len(got), len(cases))
	}
	if got := log.Lines(es.sock, "handshake"); len(got) < len(headers) {
		t.Errorf("%d refused handshakes logged, want %d", len(got), len(headers))
	}
	good.check(t)
	t.Logf("%d forged sessions closed, %d headers refused; the good client made %d calls meanwhile",
		len(cases), len(headers), good.calls.Load())

	// The server still accepts sessions, and no region of a closed session
	// is left: 2 regions for each of the two good clients' sessions here
	// (the client's and the server's side, both in this process).
	good2 := startGoodClient(t, es.sock)
	for good2.calls.Load() < 10 && good2.err == nil {
		time.Sleep(time.Millisecond)
	}
	good2.check(t)
	waitRegions(t, 4)
}

// TestContain_GarbageFrameAfterHandshake: a peer that did the real
// handshake writes a garbage frame on its socket; only its session closes.
func TestContain_GarbageFrameAfterHandshake(t *testing.T) {
	log := misbehave.CaptureLog(t)
	es := startEchoServer(t, containConfig())
	good := startGoodClient(t, es.sock)
	child := shmtest.Start(t, misbehave.RoleFrame, childEnv(es)...)
	pid := child.Cmd.Process.Pid
	line := child.Expect(t, "closed", 30*time.Second)
	if !strings.Contains(line, "unknown frame type") {
		t.Errorf("peer saw %q, want its session closed for an unknown frame type", line)
	}
	e := es.waitEnded(t, pid, 1, 10*time.Second)[0]
	if !errors.Is(e.err, shm.ErrCorrupt) {
		t.Errorf("server session closed with %v, want ErrCorrupt", e.err)
	}
	if len(log.Lines(fmt.Sprintf("closing session with pid %d", pid), "unknown frame type")) != 1 {
		t.Error("the reason was not logged")
	}
	good.check(t)
}

// TestContain_UnreleasedBuffers: a peer that never releases what the server
// sends it holds at most the server's quota for that session (here 16
// buffers, or an arena's worth); beyond it the server's replies to it fall
// back to the socket, still intact, while a well-behaved client's replies
// all stay in shared memory. The held buffers are logged as probable leaks,
// and all come back when the peer dies.
func TestContain_UnreleasedBuffers(t *testing.T) {
	cases := []struct {
		name       string
		maxBuffers int
		region     int
		size       int
		n          int
		want       error
	}{
		{"quota", 16, 2 << 20, 1000, 40, shm.ErrQuota},
		{"arena", 0, 1 << 20, 60000, 30, shm.ErrNoMemory},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			log := misbehave.CaptureLog(t)
			cfg := containConfig()
			cfg.MaxBuffers, cfg.RegionSize = c.maxBuffers, c.region
			cfg.LeakThreshold = 300 * time.Millisecond
			es := startEchoServer(t, cfg)
			good := startGoodClient(t, es.sock)
			child := shmtest.Start(t, misbehave.RoleHold, childEnv(es,
				misbehave.EnvN+"="+strconv.Itoa(c.n), misbehave.EnvSize+"="+strconv.Itoa(c.size))...)
			pid := child.Cmd.Process.Pid
			var held, inline int
			line := child.Expect(t, "held ", 60*time.Second)
			if _, err := fmt.Sscanf(line, "held %d inline %d", &held, &inline); err != nil {
				t.Fatalf("child: %q", line)
			}
			if held+inline != c.n || inline == 0 || held == 0 {
				t.Fatalf("peer holds %d replies and got %d inline of %d calls; want some of each", held, inline, c.n)
			}
			if c.maxBuffers > 0 && held != c.maxBuffers {
				t.Errorf("peer holds %d buffers, quota is %d", held, c.maxBuffers)
			}
			s, sv := es.session(pid)
			if s == nil {
				t.Fatal("server has no session with the peer")
			}
			st := s.Stats()
			if st.PeerHeld != int64(held) || sv.inline.Load() != int64(inline) || st.FailedAllocs < uint64(inline) {
				t.Errorf("server session: peer holds %d (want %d), %d inline (want %d), %d failed allocations",
					st.PeerHeld, held, sv.inline.Load(), inline, st.FailedAllocs)
			}
			if errors.Is(c.want, shm.ErrQuota) != (st.QuotaHits > 0) {
				t.Errorf("quota hits %d: want them only when the quota is the limit", st.QuotaHits)
			}
			// The leak scan names the peer (every 5th quiet housekeeping pass).
			deadline := time.Now().Add(20 * time.Second)
			for len(log.Lines(fmt.Sprintf("probable leak: peer pid %d", pid))) == 0 && time.Now().Before(deadline) {
				time.Sleep(50 * time.Millisecond)
			}
			if len(log.Lines(fmt.Sprintf("probable leak: peer pid %d", pid))) == 0 {
				t.Error("no probable leak logged for the peer that holds buffers")
			}
			// Each held buffer is logged once, however many scans pass
			// (one every second of a quiet socket): wait for two more.
			time.Sleep(2500 * time.Millisecond)
			if n := len(log.Lines(fmt.Sprintf("probable leak: peer pid %d", pid))); n != held {
				t.Errorf("%d probable leaks logged for %d held buffers, want each logged once", n, held)
			}
			good.check(t)
			t.Logf("peer holds %d, %d replies to it inline; good client: %d calls, all in shared memory",
				held, inline, good.calls.Load())

			// The peer dies: everything it held comes back to the server.
			child.Kill()
			e := es.waitEnded(t, pid, 1, 10*time.Second)[0]
			if !errors.Is(e.err, shm.ErrPeerClosed) {
				t.Errorf("session closed with %v, want ErrPeerClosed", e.err)
			}
			deadline = time.Now().Add(5 * time.Second)
			for shm.ReadStats().InUseBuffers != 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if n := shm.ReadStats().InUseBuffers; n != 0 {
				t.Errorf("%d buffers still in use in this process after the peer died and the good client went idle", n)
			}
		})
	}
}

// TestContain_WakeupFlood: a peer writes a flood of wake-up frames. They
// cost the server reading 8-byte frames; the well-behaved client is not
// disturbed, and the flooder is either still served correctly or closed as
// corrupt with a logged reason, never anything in between.
func TestContain_WakeupFlood(t *testing.T) {
	log := misbehave.CaptureLog(t)
	es := startEchoServer(t, containConfig())
	good := startGoodClient(t, es.sock)
	child := shmtest.Start(t, misbehave.RoleFlood, childEnv(es, misbehave.EnvN+"=300000")...)
	pid := child.Cmd.Process.Pid
	flooded := child.Expect(t, "flooded ", 120*time.Second)
	after := child.Expect(t, "after ", 60*time.Second)
	switch {
	case after == "after served":
		if s, _ := es.session(pid); s == nil {
			t.Error("the flooder was served but the server has no session with it")
		}
	case strings.HasPrefix(after, "after closed"):
		e := es.waitEnded(t, pid, 1, 10*time.Second)[0]
		if !errors.Is(e.err, shm.ErrCorrupt) || len(log.Lines(fmt.Sprintf("closing session with pid %d", pid))) == 0 {
			t.Errorf("flooder closed with %v and no logged reason", e.err)
		}
	default:
		t.Errorf("flooder: %q", after)
	}
	good.check(t)
	t.Logf("%s; %s; good client made %d calls meanwhile", flooded, after, good.calls.Load())
}

// TestContain_StalledHandshakes: connections that stop at each point of the
// handshake, and connections that send garbage instead of the preface, do
// not keep a well-behaved client from connecting meanwhile; each is closed
// after the handshake timeout with a logged reason, and none leaves a
// region behind.
func TestContain_StalledHandshakes(t *testing.T) {
	for role, prefix := range map[string]string{misbehave.RoleStall: "stalled ", misbehave.RoleGarbage: "garbage "} {
		t.Run(role, func(t *testing.T) {
			log := misbehave.CaptureLog(t)
			cfg := containConfig()
			cfg.HandshakeTimeout = 3 * time.Second
			es := startEchoServer(t, cfg)
			child := shmtest.Start(t, role, childEnv(es, misbehave.EnvN+"=4")...)
			line := child.Expect(t, prefix, 30*time.Second)
			var n int
			fmt.Sscanf(line[strings.LastIndexByte(line, ' ')+1:], "%d", &n)
			// While those connections hang, a well-behaved client gets through.
			good := startGoodClient(t, es.sock)
			for good.calls.Load() < 10 && good.err == nil {
				time.Sleep(time.Millisecond)
			}
			if s, _ := es.session(good.s.PeerPID()); s == nil {
				t.Error("the well-behaved client's session was not accepted")
			}
			want := fmt.Sprintf("closed %d of %d", n, n)
			if got := child.Expect(t, "closed ", 60*time.Second); got != want || n == 0 {
				t.Errorf("child: %q, want %q", got, want)
			}
			if got := log.Lines(es.sock); len(got) < n {
				t.Errorf("%d connections closed with a logged reason, want %d", len(got), n)
			}
			good.check(t)
			waitRegions(t, 2)
			t.Logf("%d bad connections closed; good client made %d calls meanwhile", n, good.calls.Load())
		})
	}
}
