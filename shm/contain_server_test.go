package shm_test

// Containment tests: a server in this process, misbehaving peers in child
// processes (internal/misbehave), well-behaved clients beside them. This file
// holds the harness; contain_peer_test.go the tests.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/misbehave"
	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/shm"
)

// The misbehaving children are this test binary run again; their roles are
// dispatched here, before the package's TestMain.
func init() {
	if misbehave.IsChildRole(shmtest.Role()) {
		os.Exit(misbehave.RunChild(shmtest.Role()))
	}
}

// containConfig is the server's configuration: small regions.
func containConfig() shm.Config {
	c := shm.DefaultConfig()
	c.RegionSize, c.MaxMessageSize, c.RingEntries = 2<<20, 64<<10, 64
	c.HandshakeTimeout = 2 * time.Second
	return c
}

// ended is a server session that closed.
type ended struct {
	pid   int
	err   error
	stats shm.SessionStats
}

// echoServer accepts sessions and echoes every message. A reply that finds
// no shared memory (quota or arena exhausted by a peer that does not
// release) goes inline over the socket, as the Kitex transport does.
type echoServer struct {
	sock  string
	ln    *shm.Listener
	ended chan ended
	wg    sync.WaitGroup

	mu   sync.Mutex // guards live
	live map[*shm.Session]*served
}

type served struct {
	replies, inline atomic.Int64
}

func startEchoServer(t *testing.T, cfg shm.Config) *echoServer {
	t.Helper()
	return startEchoServerAt(t, filepath.Join(t.TempDir(), "s"), cfg)
}

func startEchoServerAt(t *testing.T, sock string, cfg shm.Config) *echoServer {
	t.Helper()
	ln, err := shm.Listen(sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	es := &echoServer{sock: sock, ln: ln, ended: make(chan ended, 1024), live: map[*shm.Session]*served{}}
	es.wg.Add(1)
	go func() {
		defer es.wg.Done()
		for {
			s, err := ln.Accept()
			if err != nil {
				return
			}
			sv := &served{}
			es.mu.Lock()
			es.live[s] = sv
			es.mu.Unlock()
			es.wg.Add(1)
			go es.serve(s, sv)
		}
	}()
	t.Cleanup(es.stop)
	return es
}

func (es *echoServer) serve(s *shm.Session, sv *served) {
	defer es.wg.Done()
	ctx := context.Background()
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			break
		}
		if err := es.reply(ctx, s, sv, &m); err != nil {
			break
		}
	}
	st := s.Stats()
	es.mu.Lock()
	delete(es.live, s)
	es.mu.Unlock()
	es.ended <- ended{pid: s.PeerPID(), err: s.Err(), stats: st}
}

func (es *echoServer) reply(ctx context.Context, s *shm.Session, sv *served, m *shm.Message) error {
	defer s.Release(m)
	b, err := s.Alloc(m.Len())
	if errors.Is(err, shm.ErrQuota) || errors.Is(err, shm.ErrNoMemory) {
		sv.inline.Add(1)
		return s.SendInline(ctx, m.ID, m.Aux, m.Kind, m.AppendTo(nil))
	}
	if err != nil {
		return err
	}
	m.AppendTo(b.Bytes()[:0])
	if err := s.Send(ctx, m.ID, m.Aux, m.Kind, b); err != nil {
		s.Free(b)
		return err
	}
	sv.replies.Add(1)
	return nil
}

// session returns the live server session of peer pid, or nil.
func (es *echoServer) session(pid int) (*shm.Session, *served) {
	es.mu.Lock()
	defer es.mu.Unlock()
	for s, sv := range es.live {
		if s.PeerPID() == pid {
			return s, sv
		}
	}
	return nil, nil
}

// waitEnded waits for n sessions of peer pid to close and returns them.
func (es *echoServer) waitEnded(t *testing.T, pid, n int, timeout time.Duration) []ended {
	t.Helper()
	var got []ended
	deadline := time.After(timeout)
	for len(got) < n {
		select {
		case e := <-es.ended:
			if e.pid == pid {
				got = append(got, e)
			}
		case <-deadline:
			t.Fatalf("%d of %d sessions of pid %d closed within %v", len(got), n, pid, timeout)
		}
	}
	return got
}

func (es *echoServer) stop() {
	es.ln.Close()
	es.mu.Lock()
	for s := range es.live {
		s.Close()
	}
	es.mu.Unlock()
	es.wg.Wait()
}

// goodClient is a well-behaved client that calls the echo server in a loop
// and checks every reply byte for byte, until stopped.
type goodClient struct {
	s      *shm.Session
	calls  atomic.Int64
	inline atomic.Int64
	stopc  chan struct{}
	done   chan struct{}
	err    error // first failure; read after done
}

func startGoodClient(t *testing.T, sock string) *goodClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := containConfig()
	s, err := shm.Dial(ctx, sock, cfg)
	if err != nil {
		t.Fatalf("a well-behaved client cannot connect: %v", err)
	}
	g := &goodClient{s: s, stopc: make(chan struct{}), done: make(chan struct{})}
	go g.loop()
	t.Cleanup(func() { g.stop(); s.Close() })
	return g
}

func (g *goodClient) loop() {
	defer close(g.done)
	sizes := []int{1, 100, 1000, 4096, 30000, 65536}
	for i := uint64(1); ; i++ {
		select {
		case <-g.stopc:
			return
		default:
		}
		if err := g.call(i, sizes[i%uint64(len(sizes))]); err != nil {
			g.err = fmt.Errorf("call %d: %w", i, err)
			return
		}
		g.calls.Add(1)
	}
}

func (g *goodClient) call(id uint64, size int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	want := misbehave.Payload(id, size)
	b, err := g.s.Alloc(size)
	if err != nil {
		return err
	}
	copy(b.Bytes(), want)
	if err := g.s.Send(ctx, id, 0, 0, b); err != nil {
		g.s.Free(b)
		return err
	}
	m, err := g.s.Recv(ctx)
	if err != nil {
		return err
	}
	defer g.s.Release(&m)
	if m.Inline() {
		g.inline.Add(1)
	}
	if m.ID != id || !bytes.Equal(m.AppendTo(nil), want) {
		return fmt.Errorf("reply id %d (want %d), %d bytes (want %d), content differs", m.ID, id, m.Len(), size)
	}
	return nil
}

func (g *goodClient) stop() {
	select {
	case <-g.stopc:
	default:
		close(g.stopc)
	}
	<-g.done
}

// check stops the client and fails the test unless every call succeeded
// through shared memory and at least one was made.
func (g *goodClient) check(t *testing.T) {
	t.Helper()
	g.stop()
	if g.err != nil {
		t.Fatalf("well-behaved client: %v", g.err)
	}
	if g.calls.Load() == 0 {
		t.Fatal("well-behaved client made no call")
	}
	if n := g.inline.Load(); n != 0 {
		t.Errorf("well-behaved client got %d replies inline: the misbehaving peer took its memory", n)
	}
	select {
	case <-g.s.Done():
		t.Fatalf("well-behaved client's session closed: %v", g.s.Err())
	default:
	}
}

// regionCount is the number of kshm regions this process owns.
func regionCount(t *testing.T) int {
	t.Helper()
	files, err := shm.RegionFiles(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	return len(files)
}

// waitRegions waits until this process owns exactly n regions: every
// closed session's memfd is gone.
func waitRegions(t *testing.T, n int) {
	t.Helper()
	var got int
	for range 100 {
		if got = regionCount(t); got == n {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("this process owns %d kshm regions, want %d (a closed session's region leaked)", got, n)
}
