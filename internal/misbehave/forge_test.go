package misbehave

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/shmkit/kshm/shm"
)

func listen(t *testing.T) (string, *shm.Listener) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s")
	cfg := PeerConfig()
	cfg.HandshakeTimeout = time.Second
	ln, err := shm.Listen(sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return sock, ln
}

// TestForge_RegionValidates: an honest forged region passes the engine's
// own validation, and a well-formed forged message arrives intact. If the
// engine's layout changes, this fails before any containment test can pass
// for the wrong reason.
func TestForge_RegionValidates(t *testing.T) {
	sock, ln := listen(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f, err := Forge(ctx, sock, ForgeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := shm.InspectRegion(f.mem); err != nil {
		t.Fatalf("forged region does not validate: %v", err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := []byte("forged but well-formed")
	if err := f.SendValid(42, 3, want); err != nil {
		t.Fatal(err)
	}
	m, err := s.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m.ID != 42 || !bytes.Equal(m.AppendTo(nil), want) {
		t.Fatalf("received id %d %q", m.ID, m.AppendTo(nil))
	}
	s.Release(&m)
}

func TestForge_CorruptHeaderRefused(t *testing.T) {
	sock, _ := listen(t)
	for name, hc := range HeaderCases {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			f, err := Forge(ctx, sock, ForgeOptions{CorruptHeader: hc})
			if err == nil {
				f.Close()
				t.Fatal("handshake with a corrupt header succeeded")
			}
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("err = %v, want ErrRefused", err)
			}
		})
	}
}

func TestPeer_CallAndHold(t *testing.T) {
	sock, ln := listen(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := Dial(ctx, sock, PeerConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	go func() { // echo
		for {
			m, err := s.Recv(ctx)
			if err != nil {
				return
			}
			b, err := s.Alloc(m.Len())
			if err != nil {
				return
			}
			m.AppendTo(b.Bytes()[:0])
			s.Release(&m)
			if s.Send(ctx, m.ID, 0, 0, b) != nil {
				return
			}
		}
	}()
	want := Payload(5, 300)
	out, inline, err := p.Call(ctx, 5, want, true)
	if err != nil || inline || !bytes.Equal(out, want) {
		t.Fatalf("call: %v inline=%v equal=%v", err, inline, bytes.Equal(out, want))
	}
	if p.Held() != 1 {
		t.Fatalf("held %d", p.Held())
	}
	if st := s.Stats(); st.PeerHeld != 1 {
		t.Fatalf("server sees %d buffers held by the peer, want 1", st.PeerHeld)
	}
}
