package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	shmipc "github.com/cloudwego/shmipc-go"
)

// The "shmipc-go" baseline: github.com/cloudwego/shmipc-go v0.2.0 with its
// memory in a memfd (MemMapTypeMemFd), one session, one stream per
// concurrent caller (its streams are reused call after call, as its own
// examples do), one server goroutine per stream. The buffer slices are
// configured as a user who knows the payload size would: 70% of the memory
// in slices that hold one whole payload, so that every request and response
// is one contiguous slice written with Reserve and read with ReadBytes
// without copies, and enough capacity for a request and a response per
// call in flight.
//
// shmipc-go takes buffer slices from FIFO free lists (pop at the head, push
// at the tail), so a session touches every slice of a list once before it
// reuses any; each first touch of a page of its memfd is a page fault in
// both processes (about 10 µs each on a 2-vCPU VM). The payload-sized list
// holds tens of slices, so for its first few hundred milliseconds at 256 KiB
// to 1 MiB a session pays hundreds of faults per call (2.8 ms at 256 KiB and
// 10.6 ms at 1 MiB, where a warm session takes a few hundred µs): a short
// measurement window measured only that. A long-running user pays it once;
// the client warms up until it has cycled through the list (warmCalls).
var shmipcConfigs atomic.Int64

func shmipcConfig(p params) *shmipc.Config {
	shmipc.SetLogLevel(5) // no logging
	c := shmipc.DefaultConfig()
	c.MemMapType = shmipc.MemMapTypeMemFd
	c.LogOutput = io.Discard
	c.QueueCap = 65536
	c.ConnectionWriteTimeout = 10 * time.Second
	c.InitializeTimeout = 10 * time.Second
	// shmipc-go keeps one buffer manager per path in a process-wide table:
	// a path of its own per configuration keeps a test that runs several
	// sizes in one process from reusing the first size's slices.
	n := shmipcConfigs.Add(1)
	c.ShareMemoryPathPrefix = fmt.Sprintf("/dev/shm/kshm-bench-%d-%d", os.Getpid(), n)
	c.QueuePath = fmt.Sprintf("/dev/shm/kshm-bench-queue-%d-%d", os.Getpid(), n)
	c.ShareMemoryBufferCap, c.BufferSliceSizes = shmipcSliceSizes(p.size, p.conc)
	return c
}

// shmipcSlack is what a slice holds beyond the payload (shmipc-go's slices
// carry no header of their own; the margin keeps a payload in one slice).
const shmipcSlack = 256

// shmipcSliceSizes returns the shared-memory capacity and the buffer slice
// lists (in ascending order of size, as shmipc-go sorts them anyway) for payloads of
// size bytes with conc calls in flight: 70% of the memory in payload-sized
// slices, with room for twice a request and a response per call in flight
// (slices return to the free list some time after their message was read:
// with room for only one of each, a 1 MiB run at 16 calls in flight fell
// back 4 times), the rest in 16 KiB and 64 KiB slices.
func shmipcSliceSizes(size, conc int) (uint32, []*shmipc.SizePercentPair) {
	slice := uint32(size + shmipcSlack)
	need := 4 * uint64(conc+2) * uint64(slice) * 10 / 7
	capacity := uint64(32 << 20)
	for capacity < need {
		capacity *= 2
	}
	if capacity > 2<<30 {
		capacity = 2 << 30
	}
	pairs := []*shmipc.SizePercentPair{
		{Size: slice, Percent: 70},
		{Size: 16 << 10, Percent: 20},
		{Size: 64 << 10, Percent: 10},
	}
	sort.SliceStable(pairs, func(i, j int) bool { return pairs[i].Size < pairs[j].Size })
	return uint32(capacity), pairs
}

// shmipcPayloadSlices is the number of payload-sized slices shmipc-go
// carves out of the capacity (its createBufferManager, approximately).
func shmipcPayloadSlices(size, conc int) int {
	capacity, pairs := shmipcSliceSizes(size, conc)
	for _, p := range pairs {
		if p.Size == uint32(size+shmipcSlack) {
			return int(uint64(capacity) * uint64(p.Percent) / 100 / uint64(p.Size))
		}
	}
	return 0
}

// shmipcFallbacks adds up the messages that a session wrote over its unix
// socket instead of shared memory, and its failed shared-memory allocations.
func shmipcFallbacks(s *shmipc.Session) uint64 {
	_, st, _ := s.GetMetrics()
	return st.FallbackWriteCount + st.AllocShmErrorCount
}

type shmipcClient struct {
	size     int
	conc     int
	scale    bool
	sm       *shmipc.SessionManager
	mu       sync.Mutex // guards sessions
	sessions map[*shmipc.Session]bool
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
	return &shmipcClient{size: p.size, conc: p.conc, scale: p.scale, sm: sm, sessions: map[*shmipc.Session]bool{}}, nil
}

func (c *shmipcClient) newCaller(int) (caller, error) {
	st, err := c.sm.GetStream()
	if err != nil {
		return nil, fmt.Errorf("shmipc-go: get stream: %w", err)
	}
	c.mu.Lock()
	c.sessions[st.Session()] = true
	c.mu.Unlock()
	return &shmipcCaller{st: st, size: c.size, scale: c.scale}, nil
}

// warmCalls is the number of calls that touch every payload-sized slice
// once (each call takes one for its request and one for its response), with
// a margin.
// Slices under a page share pages, so that a call touches a fresh page
// only every few calls; those are not waited for.
func (c *shmipcClient) warmCalls() int {
	if c.size+shmipcSlack < 4096 {
		return 0
	}
	return shmipcPayloadSlices(c.size, c.conc)
}

// fallbacks counts the client's messages that did not go through shared
// memory (see shmipcFallbacks).
func (c *shmipcClient) fallbacks() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n uint64
	for s := range c.sessions {
		n += shmipcFallbacks(s)
	}
	return n
}

func (c *shmipcClient) close() error { return c.sm.Close() }

type shmipcCaller struct {
	st    *shmipc.Stream
	size  int
	scale bool // requests carry a 4-byte length first
}

// shmipcLen is the length prefix of a request in the scale case, where one
// server takes requests of different sizes.
const shmipcLen = 4

func (s *shmipcCaller) call(seq uint64) error {
	n := s.size
	if s.scale {
		n += shmipcLen
	}
	p, err := s.st.BufferWriter().Reserve(n)
	if err != nil {
		return fmt.Errorf("shmipc-go: reserve: %w", err)
	}
	if s.scale {
		binary.LittleEndian.PutUint32(p, uint32(s.size))
		p = p[shmipcLen:]
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
						if err := serveShmipcStream(st, p.size, p.scale); err != nil {
							fail(err)
						}
					}()
				}
			}()
		}
	}()
	return s, nil
}

// serveShmipcStream serves requests of size bytes, or in the scale case
// requests of up to size bytes, each after its 4-byte length.
func serveShmipcStream(st *shmipc.Stream, size int, scale bool) error {
	defer st.Close()
	r, w := st.BufferReader(), st.BufferWriter()
	for {
		n := size
		if scale {
			h, err := r.ReadBytes(shmipcLen)
			if err != nil {
				return nil // stream or session closed
			}
			if n = int(binary.LittleEndian.Uint32(h)); n > size || n < minSize {
				return fmt.Errorf("shmipc-go: request of %d bytes, want %d to %d", n, minSize, size)
			}
		}
		req, err := r.ReadBytes(n)
		if err != nil {
			return nil // stream or session closed
		}
		seq := requestSeq(req)
		ok := checkRequest(req, seq)
		r.ReleasePreviousRead()
		if !ok {
			return errCorruptRequest
		}
		resp, err := w.Reserve(n)
		if err != nil {
			return fmt.Errorf("shmipc-go: reserve: %w", err)
		}
		fillResponse(resp, seq)
		if err := st.Flush(false); err != nil {
			return nil
		}
	}
}

// fallbacks counts the server's messages that did not go through shared
// memory (see shmipcFallbacks).
func (s *shmipcServer) fallbacks() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n uint64
	for _, sess := range s.sessions {
		n += shmipcFallbacks(sess)
	}
	return n
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
