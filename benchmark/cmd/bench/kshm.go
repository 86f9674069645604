package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/shmkit/kshm/shm"
)

// The kshm engine (package shm) in each wake-up mode: one session per client
// process. With one concurrent call the caller itself calls Recv; with more,
// a dispatcher goroutine receives the responses and hands each to the
// caller whose number it carries in Aux. The server serves a session inline
// in its receive loop when the client makes one call at a time, and through
// a pool of worker goroutines otherwise.
func kshmEngineTransports() []transportDef {
	mk := func(name string, mode shm.WakeMode) transportDef {
		return transportDef{layer: "engine", name: name,
			dial:  func(p params) (clientSide, error) { return dialKshm(p, mode) },
			serve: func(p params, fail func(error)) (serverSide, error) { return serveKshm(p, mode, fail) },
		}
	}
	return []transportDef{
		mk("kshm", shm.WakeNotify),
		mk("kshm-poll", shm.WakePoll),
		mk("kshm-timed", shm.WakeTimed),
	}
}

const (
	kindRequest  = 1
	kindResponse = 2
)

// kshmConfig is the default configuration in the given wake mode, with a
// region large enough for every call in flight: each side holds one buffer
// per call (its request, or its response), and the arena is a buddy
// allocator, so a buffer takes the next power of two.
//
// The scale case runs the default configuration, as a sidecar's many
// clients would.
func kshmConfig(p params, mode shm.WakeMode) shm.Config {
	cfg := shm.DefaultConfig()
	cfg.WakeMode = mode
	if p.scale {
		return cfg
	}
	block := 512
	for block < p.size {
		block *= 2
	}
	need := (p.conc+2)*block + 8<<20
	for cfg.RegionSize < need {
		cfg.RegionSize *= 2
	}
	if p.size > cfg.MaxMessageSize {
		cfg.MaxMessageSize = p.size
	}
	return cfg
}

type kshmClient struct {
	s       *shm.Session
	size    int
	conc    int
	waiters []chan shm.Message
	wg      sync.WaitGroup
}

// dialKshm dials one session. In the scale case a handshake that fails
// (timed out, or refused while the server's handshake slots are full) is
// retried with a backoff for up to 20 s, as kshm's Kitex transport
// re-dials: a hundred client processes dialling at once on a 2-vCPU
// machine overrun the default 3 s handshake timeout.
func dialKshm(p params, mode shm.WakeMode) (clientSide, error) {
	limit := 10 * time.Second
	if p.scale {
		limit = 20 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var s *shm.Session
	var err error
	for backoff := 50 * time.Millisecond; ; backoff = min(2*backoff, time.Second) {
		s, err = shm.Dial(ctx, p.sock, kshmConfig(p, mode))
		retry := p.scale && (errors.Is(err, shm.ErrHandshake) || errors.Is(err, shm.ErrBusy))
		if err == nil || !retry || ctx.Err() != nil {
			break
		}
		fmt.Fprintf(os.Stderr, "kshm dial: %v; retrying in %v\n", err, backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
	}
	if err != nil {
		return nil, err
	}
	c := &kshmClient{s: s, size: p.size, conc: p.conc}
	if p.conc > 1 {
		c.waiters = make([]chan shm.Message, p.conc)
		for i := range c.waiters {
			c.waiters[i] = make(chan shm.Message, 1)
		}
		c.wg.Add(1)
		go c.dispatch()
	}
	return c, nil
}

func (c *kshmClient) dispatch() {
	defer c.wg.Done()
	ctx := context.Background()
	for {
		m, err := c.s.Recv(ctx)
		if err != nil {
			for _, w := range c.waiters {
				close(w)
			}
			return
		}
		if m.Aux >= uint64(len(c.waiters)) {
			c.s.Release(&m)
			c.s.Close()
			continue
		}
		c.waiters[m.Aux] <- m
	}
}

func (c *kshmClient) newCaller(worker int) (caller, error) {
	k := &kshmCaller{c: c, worker: worker}
	if c.waiters != nil {
		k.wait = c.waiters[worker]
	}
	return k, nil
}

func (c *kshmClient) close() error {
	err := c.s.Close()
	c.wg.Wait()
	return err
}

type kshmCaller struct {
	c      *kshmClient
	worker int
	wait   chan shm.Message
}

// alloc retries briefly while the arena is full or the quota reached (the
// peer has not released enough buffers yet); sized regions make it rare.
func alloc(s *shm.Session, n int) (shm.Buffer, error) {
	for i := 0; ; i++ {
		b, err := s.Alloc(n)
		if err == nil || !(errors.Is(err, shm.ErrNoMemory) || errors.Is(err, shm.ErrQuota)) || i == 100000 {
			return b, err
		}
		if i < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(10 * time.Microsecond)
		}
	}
}

func (k *kshmCaller) call(seq uint64) error {
	s := k.c.s
	b, err := alloc(s, k.c.size)
	if err != nil {
		return fmt.Errorf("kshm alloc: %w", err)
	}
	fillRequest(b.Bytes(), seq)
	if err := s.Send(context.Background(), seq, uint64(k.worker), kindRequest, b); err != nil {
		s.Free(b)
		return fmt.Errorf("kshm send: %w", err)
	}
	var m shm.Message
	if k.wait == nil {
		if m, err = s.Recv(context.Background()); err != nil {
			return fmt.Errorf("kshm recv: %w", err)
		}
	} else {
		var ok bool
		if m, ok = <-k.wait; !ok {
			return fmt.Errorf("kshm recv: %w", s.Err())
		}
	}
	err = nil
	if m.ID != seq || m.NumSegments() != 1 || !checkResponse(m.Segment(0), seq) {
		err = fmt.Errorf("kshm: response %d (%d segments) to call %d failed verification", m.ID, m.NumSegments(), seq)
	}
	s.Release(&m)
	return err
}

type kshmServer struct {
	ln       *shm.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex // guards sessions
	sessions []*shm.Session
}

func serveKshm(p params, mode shm.WakeMode, fail func(error)) (serverSide, error) {
	_ = os.Remove(p.sock)
	ln, err := shm.Listen(p.sock, kshmConfig(p, mode))
	if err != nil {
		return nil, err
	}
	srv := &kshmServer{ln: ln}
	// Serve inline at concurrency 1; otherwise through a pool of up to 8
	// workers: a worker can block in Send's wake-up write, and a pool of
	// GOMAXPROCS (2 here) or a goroutine per request measured clearly
	// slower than 8 on the reference machine.
	workers := 0
	if p.conc > 1 {
		workers = min(p.conc, max(8, runtime.GOMAXPROCS(0)))
	}
	// KSHM_BENCH_SERVER_WORKERS overrides the number of worker goroutines
	// (0: serve inline in the receive loop), to compare the two.
	if v, err := strconv.Atoi(os.Getenv("KSHM_BENCH_SERVER_WORKERS")); err == nil && v >= -1 {
		workers = v
	}
	srv.wg.Add(1)
	go func() {
		defer srv.wg.Done()
		for {
			s, err := ln.Accept()
			if err != nil {
				return
			}
			srv.mu.Lock()
			srv.sessions = append(srv.sessions, s)
			srv.mu.Unlock()
			srv.wg.Add(1)
			go func() {
				defer srv.wg.Done()
				if err := serveKshmSession(s, workers); err != nil {
					fail(err)
				}
			}()
		}
	}()
	return srv, nil
}

func serveKshmSession(s *shm.Session, workers int) error {
	defer s.Close()
	ctx := context.Background()
	handle := func(m shm.Message) error {
		defer s.Release(&m)
		if m.NumSegments() != 1 {
			return fmt.Errorf("kshm: request with %d segments", m.NumSegments())
		}
		req := m.Segment(0)
		b, err := alloc(s, len(req))
		if err != nil {
			return fmt.Errorf("kshm server alloc: %w", err)
		}
		if _, err := serveRequest(req, b.Bytes()); err != nil {
			s.Free(b)
			return err
		}
		if err := s.Send(ctx, m.ID, m.Aux, kindResponse, b); err != nil {
			s.Free(b)
			if errors.Is(err, shm.ErrClosed) {
				return nil
			}
			return err
		}
		return nil
	}
	if workers == 0 {
		for {
			m, err := s.Recv(ctx)
			if err != nil {
				return nil // closed
			}
			if err := handle(m); err != nil {
				return err
			}
		}
	}
	var fails firstError
	if workers < 0 {
		// a goroutine per request
		var wg sync.WaitGroup
		for {
			m, err := s.Recv(ctx)
			if err != nil {
				break
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := handle(m); err != nil {
					fails.set(err)
					s.Close()
				}
			}()
		}
		wg.Wait()
		err, _ := fails.get()
		return err
	}
	work := make(chan shm.Message, 1024)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for m := range work {
				if err := handle(m); err != nil {
					fails.set(err)
					s.Close()
				}
			}
		}()
	}
	for {
		m, err := s.Recv(ctx)
		if err != nil {
			break
		}
		work <- m
	}
	close(work)
	wg.Wait()
	err, _ := fails.get()
	return err
}

func (srv *kshmServer) close() error {
	err := srv.ln.Close()
	srv.mu.Lock()
	for _, s := range srv.sessions {
		s.Close()
	}
	srv.mu.Unlock()
	srv.wg.Wait()
	return err
}
