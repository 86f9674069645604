package shm

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// testConfig is small so tests reserve little memory.
func testConfig() Config {
	c := DefaultConfig()
	c.RegionSize = 8 << 20
	c.MaxMessageSize = 1 << 20
	c.RingEntries = 256
	return c
}

// pair returns a connected client and server session in this process.
func pair(t testing.TB, ccfg, scfg Config) (cli, srv *Session) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := Listen(path, scfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cli, err = Dial(ctx, path, ccfg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return cli, srv
}

func send(t testing.TB, s *Session, id uint64, payload []byte) {
	t.Helper()
	b, err := s.Alloc(len(payload))
	if err != nil {
		t.Fatal(err)
	}
	copy(b.Bytes(), payload)
	if err := s.Send(context.Background(), id, id*2, 7, b); err != nil {
		t.Fatal(err)
	}
}

func TestSession_PingPong(t *testing.T) {
	for _, mode := range []WakeMode{WakeNotify, WakePoll, WakeTimed} {
		t.Run(mode.String(), func(t *testing.T) {
			c := testConfig()
			c.WakeMode = mode
			sc := testConfig()
			sc.AcceptWakeModes = []WakeMode{WakeNotify, WakePoll, WakeTimed}
			cli, srv := pair(t, c, sc)
			if srv.Config().WakeMode != mode {
				t.Fatalf("server wake mode %v, want the client's %v", srv.Config().WakeMode, mode)
			}
			for i := uint64(1); i <= 200; i++ {
				p := bytes.Repeat([]byte{byte(i)}, int(i*37%5000))
				send(t, cli, i, p)
				m, err := srv.Recv(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				got := m.AppendTo(nil)
				if m.ID != i || m.Aux != i*2 || m.Kind != 7 || !bytes.Equal(got, p) {
					t.Fatalf("message %d: id %d aux %d kind %d len %d", i, m.ID, m.Aux, m.Kind, len(got))
				}
				send(t, srv, i, got)
				srv.Release(&m)
				r, err := cli.Recv(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if r.ID != i || !bytes.Equal(r.AppendTo(nil), p) {
					t.Fatalf("reply %d wrong", i)
				}
				cli.Release(&r)
			}
			waitIdle(t, cli, srv)
		})
	}
}

// waitIdle waits until neither side has buffers in use.
func waitIdle(t testing.TB, ss ...*Session) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, s := range ss {
		for {
			st := s.Stats()
			if st.InUseBuffers == 0 && st.HeldFromPeer == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("buffers still in use: %+v", st)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestSession_CloseWakesPeer(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() { // runs last: every goroutine the sessions started has exited
		for i := 0; runtime.NumGoroutine() > before && i < 500; i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Errorf("%d goroutines after close, %d before", n, before)
		}
	})
	cli, srv := pair(t, testConfig(), testConfig())
	defer srv.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := srv.Recv(context.Background())
		errc <- err
	}()
	time.Sleep(10 * time.Millisecond)
	cli.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Recv after peer close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Recv did not return after the peer closed")
	}
	if !errors.Is(srv.Err(), ErrPeerClosed) {
		t.Fatalf("Err = %v, want ErrPeerClosed", srv.Err())
	}
}
