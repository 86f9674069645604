package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	shmipc "github.com/cloudwego/shmipc-go"
)

// The "shmipc-go" baseline: github.com/cloudwego/shmipc-go v0.2.0 with its
// memory in a memfd (MemMapTypeMemFd), one session, one stream per
// concurrent caller (its streams are reused call after call, as its own
// examples do), one server goroutine per stream. Buffer slice sizes follow
// shmipc-go's own benchmark: 70% of the memory in slices that hold one
// payload, so every request and response is one contiguous slice written
// with Reserve and read with ReadBytes without copies.
func shmipcConfig(p params) *shmipc.Config {
	shmipc.SetLogLevel(5) // no logging
	c := shmipc.DefaultConfig()
	c.MemMapType = shmipc.MemMapTypeMemFd
	c.LogOutput = io.Discard
	c.QueueCap = 65536
	c.ConnectionWriteTimeout = 10 * time.Second
	c.InitializeTimeout = 10 * time.Second
	c.ShareMemoryPathPrefix = fmt.Sprintf("/dev/shm/kshm-bench-%d", os.Getpid())
	c.QueuePath = fmt.Sprintf("/dev/shm/kshm-bench-queue-%d", os.Getpid())
	slice := uint32(p.size + 256)
	// Room for a request and a response per concurrent call in the
	// payload-sized slices (70% of the memory), with a margin.
	need := 2 * uint64(p.conc+2) * uint64(slice) * 10 / 7
	capacity := uint64(32 << 20)
	for capacity < need {
		capacity *= 2
	}
	if capacity > 2<<30 {
		capacity = 2 << 30
	}
	c.ShareMemoryBufferCap = uint32(capacity)
	c.BufferSliceSizes = []*shmipc.SizePercentPair{
		{Size: slice, Percent: 70},
		{Size: 16 << 10, Percent: 20},
		{Size: 64 << 10, Percent: 10},
	}
	return c
}

type shmipcClient struct {
	size int
	sm   *shmipc.SessionManager
}

func dialShmipc(p params) (clientSide, error) {
	conf := shmipc.DefaultSessionManagerConfig()
	conf.Config = shmipcConfig(p)
	conf.Network = "unix"
	conf.Address = p.sock
	conf.SessionNum = 1
	conf.MaxStreamNum = p.conc + 16
	sm, err := shmipc.NewSessionManager(conf)
	if err != nil {
		return nil, fmt.Errorf("shmipc-go: %w", err)
	}
	return &shmipcClient{size: p.size, sm: sm}, nil
}

func (c *shmipcClient) newCaller(int) (caller, error) {
	st, err := c.sm.GetStream()
	if err != nil {
		return nil, fmt.Errorf("shmipc-go: get stream: %w", err)
	}
	return &shmipcCaller{st: st, size: c.size}, nil
}

func (c *shmipcClient) close() error { return c.sm.Close() }

type shmipcCaller struct {
	st   *shmipc.Stream
	size int
}

func (s *shmipcCaller) call(seq uint64) error {
	p, err := s.st.BufferWriter().Reserve(s.size)
	if err != nil {
		return fmt.Errorf("shmipc-go: reserve: %w", err)
	}
	fillRequest(p, seq)
	if err := s.st.Flush(false); err != nil {
		return fmt.Errorf("shmipc-go: flush: %w", err)
	}
	r := s.st.BufferReader()
	resp, err := r.ReadBytes(s.size)
	if err != nil {
		return fmt.Errorf("shmipc-go: read: %w", err)
	}
	ok := checkResponse(resp, seq)
	r.ReleasePreviousRead()
	if !ok {
		return fmt.Errorf("shmipc-go: response to call %d failed verification", seq)
	}
	return nil
}

type shmipcServer struct {
	ln       net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex // guards sessions
	sessions []*shmipc.Session
}

func serveShmipc(p params, fail func(error)) (serverSide, error) {
	_ = os.Remove(p.sock)
	ln, err := net.Listen("unix", p.sock)
	if err != nil {
		return nil, err
	}
	conf := shmipcConfig(p)
	s := &shmipcServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			sess, err := shmipc.Server(conn, conf)
			if err != nil {
				fail(fmt.Errorf("shmipc-go: server session: %w", err))
				continue
			}
			s.mu.Lock()
			s.sessions = append(s.sessions, sess)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				for {
					st, err := sess.AcceptStream()
					if err != nil {
						return
					}
					s.wg.Add(1)
					go func() {
						defer s.wg.Done()
						if err := serveShmipcStream(st, p.size); err != nil {
							fail(err)
						}
					}()
				}
			}()
		}
	}()
	return s, nil
}

func serveShmipcStream(st *shmipc.Stream, size int) error {
	defer st.Close()
	r, w := st.BufferReader(), st.BufferWriter()
	for {
		req, err := r.ReadBytes(size)
		if err != nil {
			return nil // stream or session closed
		}
		seq := requestSeq(req)
		ok := checkRequest(req, seq)
		r.ReleasePreviousRead()
		if !ok {
			return errCorruptRequest
		}
		resp, err := w.Reserve(size)
		if err != nil {
			return fmt.Errorf("shmipc-go: reserve: %w", err)
		}
		fillResponse(resp, seq)
		if err := st.Flush(false); err != nil {
			return nil
		}
	}
}

func (s *shmipcServer) close() error {
	err := s.ln.Close()
	s.mu.Lock()
	for _, sess := range s.sessions {
		sess.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
	}
	return err
}
