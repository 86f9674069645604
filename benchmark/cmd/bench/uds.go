package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// The "uds" baseline: plain unix-socket connections carrying
// length-prefixed frames (8-byte header: payload length, then seq), one
// connection per concurrent caller, one server goroutine per connection.
const udsHeader = 8

type udsClient struct {
	sock  string
	size  int
	mu    sync.Mutex
	conns []net.Conn
}

func dialUDS(p params) (clientSide, error) {
	return &udsClient{sock: p.sock, size: p.size}, nil
}

func (c *udsClient) newCaller(int) (caller, error) {
	conn, err := net.Dial("unix", c.sock)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.conns = append(c.conns, conn)
	c.mu.Unlock()
	return &udsCaller{conn: conn, buf: make([]byte, udsHeader+c.size)}, nil
}

func (c *udsClient) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var first error
	for _, conn := range c.conns {
		if err := conn.Close(); err != nil && first == nil {
			first = err
		}
	}
	c.conns = nil
	return first
}

type udsCaller struct {
	conn net.Conn
	buf  []byte
}

func (u *udsCaller) call(seq uint64) error {
	n := len(u.buf) - udsHeader
	binary.LittleEndian.PutUint32(u.buf, uint32(n))
	binary.LittleEndian.PutUint32(u.buf[4:], uint32(seq))
	fillRequest(u.buf[udsHeader:], seq)
	if _, err := u.conn.Write(u.buf); err != nil {
		return err
	}
	if _, err := io.ReadFull(u.conn, u.buf[:udsHeader]); err != nil {
		return err
	}
	if got := int(binary.LittleEndian.Uint32(u.buf)); got != n {
		return fmt.Errorf("uds: response of %d bytes, want %d", got, n)
	}
	if _, err := io.ReadFull(u.conn, u.buf[udsHeader:]); err != nil {
		return err
	}
	if !checkResponse(u.buf[udsHeader:], seq) {
		return fmt.Errorf("uds: response to call %d failed verification", seq)
	}
	return nil
}

type udsServer struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex // guards conns
	conns map[net.Conn]struct{}
}

func serveUDS(p params, fail func(error)) (serverSide, error) {
	_ = os.Remove(p.sock)
	ln, err := net.Listen("unix", p.sock)
	if err != nil {
		return nil, err
	}
	s := &udsServer{ln: ln, conns: make(map[net.Conn]struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[conn] = struct{}{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				if err := serveUDSConn(conn, p.size); err != nil {
					fail(err)
				}
			}()
		}
	}()
	return s, nil
}

// serveUDSConn serves requests of up to size bytes, with a buffer that
// grows to the largest request seen.
func serveUDSConn(conn net.Conn, size int) error {
	defer conn.Close()
	buf := make([]byte, udsHeader)
	for {
		if _, err := io.ReadFull(conn, buf[:udsHeader]); err != nil {
			if peerGone(err) {
				return nil
			}
			return err
		}
		n := int(binary.LittleEndian.Uint32(buf))
		if n > size {
			return fmt.Errorf("uds: request of %d bytes, max %d", n, size)
		}
		if len(buf) < udsHeader+n {
			buf = append(buf[:udsHeader], make([]byte, n)...)
		}
		payload := buf[udsHeader : udsHeader+n]
		if _, err := io.ReadFull(conn, payload); err != nil {
			return err
		}
		if _, err := serveRequest(payload, payload); err != nil {
			return err
		}
		if _, err := conn.Write(buf[:udsHeader+n]); err != nil {
			if peerGone(err) {
				return nil
			}
			return err
		}
	}
}

// peerGone reports whether err only says the connection ended.
func peerGone(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func (s *udsServer) close() error {
	err := s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}
