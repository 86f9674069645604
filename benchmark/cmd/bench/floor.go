package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The "floor" engine row: the benchmark's work with no transport at all.
// The client shares one memfd with the server; it writes a whole request
// into it and stores the call's number in a flag word; the server, polling
// that word, checks every byte of the request, writes a whole response
// into a second area and stores the number in a second flag word, which
// the client polls; the client then checks every byte of the response.
// That is exactly what every engine transport's two processes do with a
// payload, minus allocation, descriptors, rings and wake-ups, with both
// sides polling without pause: on a 2-vCPU machine it measures what moving
// the payload between the two cores costs, the least any shared-memory
// transport can take for this benchmark. It runs at concurrency 1 only.
//
// Layout: the request's flag word at 0, the response's at 128 (their own
// cache lines, and not adjacent ones), a closed word at 256; the request
// area from floorHeader, the response area after it.
const (
	floorReqFlag  = 0
	floorRespFlag = 128
	floorClosed   = 256
	floorHeader   = 4096
)

func floorArea(size int) int { return (max(size, 1) + 4095) &^ 4095 }

func floorWord(mem []byte, off int) *uint64 { return (*uint64)(unsafe.Pointer(&mem[off])) }

type floorClient struct {
	conn *net.UnixConn
	mem  []byte
	size int
	used atomic.Bool
}

func dialFloor(p params) (clientSide, error) {
	if p.conc != 1 {
		return nil, fmt.Errorf("floor: concurrency %d: it runs at concurrency 1 only", p.conc)
	}
	area := floorArea(p.size)
	n := floorHeader + 2*area
	fd, err := unix.MemfdCreate("kshm-bench-floor", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("floor: memfd: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(n)); err != nil {
		return nil, fmt.Errorf("floor: ftruncate: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("floor: mmap: %w", err)
	}
	c, err := net.Dial("unix", p.sock)
	if err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	conn := c.(*net.UnixConn)
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	ack := make([]byte, 1)
	if _, _, err := conn.WriteMsgUnix([]byte{1}, unix.UnixRights(fd), nil); err == nil {
		_, err = conn.Read(ack)
	}
	if err != nil {
		conn.Close()
		unix.Munmap(mem)
		return nil, fmt.Errorf("floor: handshake: %w", err)
	}
	conn.SetDeadline(time.Time{})
	return &floorClient{conn: conn, mem: mem, size: p.size}, nil
}

func (c *floorClient) newCaller(worker int) (caller, error) {
	if !c.used.CompareAndSwap(false, true) {
		return nil, errors.New("floor: one caller only")
	}
	return c, nil
}

func (c *floorClient) call(seq uint64) error {
	area := floorArea(c.size)
	req := c.mem[floorHeader : floorHeader+c.size]
	resp := c.mem[floorHeader+area : floorHeader+area+c.size]
	fillRequest(req, seq)
	atomic.StoreUint64(floorWord(c.mem, floorReqFlag), seq+1)
	for i := 1; atomic.LoadUint64(floorWord(c.mem, floorRespFlag)) != seq+1; i++ {
		if i&(1<<20-1) == 0 && atomic.LoadUint64(floorWord(c.mem, floorClosed)) != 0 {
			return errors.New("floor: server gone")
		}
	}
	if !checkResponse(resp, seq) {
		return fmt.Errorf("floor: response to call %d failed verification", seq)
	}
	return nil
}

func (c *floorClient) close() error {
	atomic.StoreUint64(floorWord(c.mem, floorClosed), 1)
	err := c.conn.Close()
	if merr := unix.Munmap(c.mem); err == nil {
		err = merr
	}
	return err
}

type floorServer struct {
	ln   *net.UnixListener
	stop atomic.Bool
	wg   sync.WaitGroup
}

func serveFloor(p params, fail func(error)) (serverSide, error) {
	_ = os.Remove(p.sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: p.sock, Net: "unix"})
	if err != nil {
		return nil, err
	}
	s := &floorServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			conn, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer conn.Close()
				if err := s.serveConn(conn, p.size); err != nil {
					fail(err)
				}
			}()
		}
	}()
	return s, nil
}

func (s *floorServer) serveConn(conn *net.UnixConn, size int) error {
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	b, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := conn.ReadMsgUnix(b, oob)
	if err != nil {
		return fmt.Errorf("floor: handshake: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return fmt.Errorf("floor: handshake: no descriptor (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return fmt.Errorf("floor: handshake: %d descriptors (%v)", len(fds), err)
	}
	area := floorArea(size)
	n := floorHeader + 2*area
	mem, err := unix.Mmap(fds[0], 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	unix.Close(fds[0])
	if err != nil {
		return fmt.Errorf("floor: mmap: %w", err)
	}
	defer unix.Munmap(mem)
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("floor: handshake: %w", err)
	}
	req := mem[floorHeader : floorHeader+size]
	resp := mem[floorHeader+area : floorHeader+area+size]
	var last uint64
	for i := 1; ; i++ {
		v := atomic.LoadUint64(floorWord(mem, floorReqFlag))
		if v == last {
			if i&(1<<16-1) == 0 && (atomic.LoadUint64(floorWord(mem, floorClosed)) != 0 || s.stop.Load()) {
				return nil
			}
			continue
		}
		last = v
		if _, err := serveRequest(req, resp); err != nil {
			atomic.StoreUint64(floorWord(mem, floorClosed), 1)
			return err
		}
		atomic.StoreUint64(floorWord(mem, floorRespFlag), v)
	}
}

func (s *floorServer) close() error {
	err := s.ln.Close()
	s.stop.Store(true)
	s.wg.Wait()
	return err
}
