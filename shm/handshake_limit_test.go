package shm

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The client's uid is checked before the server reads its hello or reserves
// anything: a disallowed client that sends only the preface is refused at
// once. Before the fix the server first waited for the hello.
func TestHandshake_UIDCheckedBeforeHello(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	scfg := testConfig()
	scfg.AllowedUIDs = []uint32{uint32(os.Getuid()) + 4242}
	scfg.HandshakeTimeout = time.Minute
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(preface[:]); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(20 * time.Second)) // far below the server's minute
	b := make([]byte, helloSize)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("no refusal before the hello: %v", err)
	}
	h, err := decodeHello(b)
	if err != nil || h.Status != statusRefused || h.Reason != errNotAllowedReason {
		t.Fatalf("got %+v, %v; want a refusal for the uid", h, err)
	}
}

// Server handshakes are bounded process-wide: with every slot taken, a
// client is refused (ErrBusy on the server) instead of making the server
// reserve another region; once slots free up, clients are served again.
func TestHandshake_ConcurrentHandshakesBounded(t *testing.T) {
	for range maxServerHandshakes {
		serverHandshakes.c <- struct{}{}
	}
	held := maxServerHandshakes
	t.Cleanup(func() {
		for ; held > 0; held-- {
			serverHandshakes.release()
		}
	})
	path := filepath.Join(t.TempDir(), "s")
	scfg := testConfig()
	scfg.HandshakeTimeout = 100 * time.Millisecond
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if s, err := Dial(ctx, path, testConfig()); !errors.Is(err, ErrHandshake) {
		if s != nil {
			s.Close()
		}
		t.Fatalf("Dial with every server handshake slot taken = %v, want a refusal", err)
	}
	for ; held > 0; held-- {
		serverHandshakes.release()
	}
	s, err := Dial(ctx, path, testConfig())
	if err != nil {
		t.Fatalf("Dial after the slots freed up: %v", err)
	}
	s.Close()
}
