package transport_test

import (
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/connpool"
	"github.com/cloudwego/kitex/pkg/warmup"
	ktransport "github.com/cloudwego/kitex/transport"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/transport"
)

// Kitex options keep their meaning beside kshm: a mux client's fallback
// calls use the mux handler and pool, client.WithWarmingUp establishes the
// session before the first call, and Kitex's MaxIdlePerAddress and
// MaxIdleTimeout govern the idle virtual connections.
func TestOptions_KitexOptionsKeepMeaning(t *testing.T) {
	a := startServer(t, sockPath(t))
	b := startServer(t, "", envNoShm+"=1") // plain Kitex
	aPid, bPid := a.p.Cmd.Process.Pid, b.p.Cmd.Process.Pid

	// Mux: fallback calls to B go over a mux connection; calls to A over
	// shared memory.
	rec := newRecorder()
	mux := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr, b.addr),
		client.WithMuxConnection(1), client.WithTransportProtocol(ktransport.TTHeader), client.WithMiddleware(rec.mw))
	toA, toB := 0, 0
	for i := int64(0); i < 60; i++ {
		pid := echoFrom(t, mux, 3000, i)
		r := rec.get(i)
		switch {
		case r.addr == a.addr && pid == aPid && r.transport == transport.TransportShm:
			toA++
		case r.addr == b.addr && pid == bPid && r.transport == transport.TransportFallback:
			toB++
		default:
			t.Fatalf("mux call %d: picked %s, answered by %d over %q", i, r.addr, pid, r.transport)
		}
	}
	if toA == 0 || toB == 0 {
		t.Fatalf("%d calls to A, %d to B", toA, toB)
	}

	// Warm-up: the session exists before the first call.
	dialed := kshm.ReadStats().Client.SessionsDialed
	wc := newEchoClient(t, shmOpt(a.sock, kshm.WithSessions(2)), client.WithHostPorts(a.addr),
		client.WithWarmingUp(&warmup.ClientOption{
			ErrorHandling: warmup.FailFast,
			PoolOption:    &warmup.PoolOption{Targets: map[string][]string{"tcp": {a.addr}}, ConnNum: 1},
		}))
	if got := kshm.ReadStats().Client.SessionsDialed; got == dialed {
		t.Fatal("WithWarmingUp established no session")
	}
	echoFrom(t, wc, 100, 1)

	// Long-pool settings: one idle virtual connection per session.
	lp := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr),
		client.WithLongConnection(connpool.IdleConfig{MaxIdlePerAddress: 1, MaxIdleGlobal: 10, MaxIdleTimeout: time.Minute}))
	before := kshm.ReadStats().Client.Conns
	done := make(chan struct{})
	for g := 0; g < 4; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := 0; i < 20; i++ {
				if _, err := lp.Echo(t.Context(), &echo.EchoRequest{Payload: []byte("x")}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	for g := 0; g < 4; g++ {
		<-done
	}
	if got := kshm.ReadStats().Client.Conns - before; got > 1 {
		t.Fatalf("%d idle virtual connections kept, MaxIdlePerAddress is 1", got)
	}

	// MaxIdleTimeout closes idle virtual connections.
	it := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr),
		client.WithLongConnection(connpool.IdleConfig{MaxIdlePerAddress: 8, MaxIdleGlobal: 10, MaxIdleTimeout: 200 * time.Millisecond}))
	before = kshm.ReadStats().Client.Conns
	for g := 0; g < 4; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := 0; i < 10; i++ {
				if _, err := it.Echo(t.Context(), &echo.EchoRequest{Payload: []byte("x")}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	for g := 0; g < 4; g++ {
		<-done
	}
	if kshm.ReadStats().Client.Conns <= before {
		t.Fatal("no idle virtual connection kept after the calls")
	}
	deadline := time.Now().Add(20 * time.Second)
	for kshm.ReadStats().Client.Conns > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle virtual connections still open after MaxIdleTimeout", kshm.ReadStats().Client.Conns-before)
		}
		time.Sleep(20 * time.Millisecond)
	}

	a.stop(t)
	b.p.Kill()
}
