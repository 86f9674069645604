package misbehave

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/shmkit/kshm/shm"
)

// Peer is a client session made with the real handshake
// (shm.ClientSession), plus a duplicate of its socket for raw writes.
type Peer struct {
	S   *shm.Session
	raw *os.File // a dup of the session socket

	mu   sync.Mutex // guards held
	held []shm.Message
}

// Dial connects to the kshm listener at path with cfg.
func Dial(ctx context.Context, path string, cfg shm.Config) (*Peer, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	conn := c.(*net.UnixConn)
	raw, err := conn.File()
	if err != nil {
		conn.Close()
		return nil, err
	}
	s, err := shm.ClientSession(conn, cfg)
	if err != nil {
		raw.Close()
		conn.Close()
		return nil, err
	}
	return &Peer{S: s, raw: raw}, nil
}

// WriteRaw writes b on the session socket, beside the session's own frames.
// Write whole frames only while the session itself sends no inline
// messages, or the two streams may interleave.
func (p *Peer) WriteRaw(b []byte) error {
	_, err := p.raw.Write(b)
	return err
}

// Frame returns one frame: an 8-byte header {typ, 0, 0, 0, len u32} and payload.
func Frame(typ byte, payload []byte) []byte {
	b := make([]byte, frameHdrSize+len(payload))
	b[0] = typ
	binary.LittleEndian.PutUint32(b[4:], uint32(len(payload)))
	copy(b[frameHdrSize:], payload)
	return b
}

// FloodWakeups writes n wake-up frames, batch frames per write, stopping
// early only when the socket fails. It returns how many it wrote.
func (p *Peer) FloodWakeups(n, batch int) (int, error) {
	buf := make([]byte, 0, batch*frameHdrSize)
	for range batch {
		buf = append(buf, Frame(FrameWake, nil)...)
	}
	sent := 0
	for sent < n {
		k := min(batch, n-sent)
		if _, err := p.raw.Write(buf[:k*frameHdrSize]); err != nil {
			return sent, err
		}
		sent += k
	}
	return sent, nil
}

// Call sends payload as one message and waits for the next message from the
// server, which it returns as a copy after releasing it, unless hold is set:
// then the message is kept and never released.
func (p *Peer) Call(ctx context.Context, id uint64, payload []byte, hold bool) ([]byte, bool, error) {
	b, err := p.S.Alloc(len(payload))
	if err != nil {
		return nil, false, err
	}
	copy(b.Bytes(), payload)
	if err := p.S.Send(ctx, id, 0, 0, b); err != nil {
		p.S.Free(b)
		return nil, false, err
	}
	m, err := p.S.Recv(ctx)
	if err != nil {
		return nil, false, err
	}
	out := m.AppendTo(nil)
	inline := m.Inline()
	if m.ID != id {
		err = fmt.Errorf("misbehave: reply has id %d, want %d", m.ID, id)
	}
	if hold && !inline {
		p.mu.Lock()
		p.held = append(p.held, m)
		p.mu.Unlock()
	} else {
		p.S.Release(&m)
	}
	return out, inline, err
}

// Held is the number of the server's messages kept and never released.
func (p *Peer) Held() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.held)
}

// WaitClosed waits until the session closes and returns its reason.
func (p *Peer) WaitClosed(timeout time.Duration) error {
	select {
	case <-p.S.Done():
		return p.S.Err()
	case <-time.After(timeout):
		return fmt.Errorf("misbehave: session still open after %v", timeout)
	}
}

// Close closes the session and the duplicate socket.
func (p *Peer) Close() error {
	err := p.S.Close()
	p.raw.Close()
	return err
}
