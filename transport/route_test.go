package transport_test

import (
	"bytes"
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/client/callopt"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/rpcinfo"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/transport"
)

// callRecord is what a client middleware saw of one call: the address Kitex
// picked and how kshm carried it.
type callRecord struct {
	addr, transport string
}

// recorder is a client middleware keeping the last call's record per seq.
type recorder struct {
	mu      sync.Mutex
	last    map[int64]callRecord
	generic string // the transport of the last call seen by mw2
}

func newRecorder() *recorder { return &recorder{last: map[int64]callRecord{}} }

func (r *recorder) mw(next endpoint.Endpoint) endpoint.Endpoint {
	return func(ctx context.Context, req, resp any) error {
		err := next(ctx, req, resp)
		ri := rpcinfo.GetRPCInfo(ctx)
		var rec callRecord
		if a := ri.To().Address(); a != nil {
			rec.addr = a.String()
		}
		rec.transport, _ = ri.To().Tag(transport.TagTransport)
		if args, ok := req.(*echo.EchoServiceEchoArgs); ok {
			r.mu.Lock()
			r.last[args.Req.Seq] = rec
			r.mu.Unlock()
		}
		return err
	}
}

// mw2 records the transport of any call (generic calls have no seq).
func (r *recorder) mw2(next endpoint.Endpoint) endpoint.Endpoint {
	return func(ctx context.Context, req, resp any) error {
		err := next(ctx, req, resp)
		tr, _ := rpcinfo.GetRPCInfo(ctx).To().Tag(transport.TagTransport)
		r.mu.Lock()
		r.generic = tr
		r.mu.Unlock()
		return err
	}
}

func (r *recorder) lastGeneric() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.generic
}

func (r *recorder) get(seq int64) callRecord {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last[seq]
}

// waitServed waits until the server counted exactly n calls served over
// shared memory (its counter follows the response by a moment).
func waitServed(t *testing.T, s *testServer, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := s.stats(t).Server.CallsServed
		if got == n {
			return
		}
		if got > n || time.Now().After(deadline) {
			t.Fatalf("server served %d calls over shared memory, want %d", got, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echoFrom calls Echo with a payload of n bytes and checks the response
// byte for byte; it returns the pid of the server that answered.
func echoFrom(t *testing.T, c *echoClient, n int, seq int64, co ...callopt.Option) int {
	t.Helper()
	p := payload(n, seq)
	resp, err := c.Echo(context.Background(), &echo.EchoRequest{Payload: p, Seq: seq}, co...)
	if err != nil {
		t.Fatalf("call %d: %v", seq, err)
	}
	if !bytes.Equal(resp.Payload, p) || resp.Seq != seq {
		t.Fatalf("call %d: response does not match the request", seq)
	}
	pid, err := strconv.Atoi(resp.Meta["pid"])
	if err != nil {
		t.Fatalf("call %d: no pid in the response: %v", seq, resp.Meta)
	}
	return pid
}

// The reported bug: a client given B's address and A's socket got every
// answer from A. Every call must be answered by the instance Kitex picked;
// only calls to A go over shared memory.
func TestRoute_PickedInstanceAnswers(t *testing.T) {
	a := startServer(t, sockPath(t))
	b := startServer(t, sockPath(t))
	aPid, bPid := a.p.Cmd.Process.Pid, b.p.Cmd.Process.Pid

	rec := newRecorder()
	c := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(b.addr), client.WithMiddleware(rec.mw))
	for i := int64(0); i < 20; i++ {
		if pid := echoFrom(t, c, 3000, i); pid != bPid {
			t.Fatalf("call %d to B (%s) answered by pid %d, B is %d, A is %d", i, b.addr, pid, bPid, aPid)
		}
		if r := rec.get(i); r.addr != b.addr || r.transport != transport.TransportFallback {
			t.Fatalf("call %d: %+v, want B's address over the fallback", i, r)
		}
	}
	// callopt.WithHostPort picks A: over shared memory, answered by A.
	for i := int64(100); i < 110; i++ {
		if pid := echoFrom(t, c, 3000, i, callopt.WithHostPort(a.addr)); pid != aPid {
			t.Fatalf("call %d to A answered by pid %d", i, pid)
		}
		if r := rec.get(i); r.addr != a.addr || r.transport != transport.TransportShm {
			t.Fatalf("call %d: %+v, want A's address over shared memory", i, r)
		}
	}

	// Both resolved: the load balancer's pick answers each call.
	c2 := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr, b.addr), client.WithMiddleware(rec.mw))
	toA, toB := 0, 0
	for i := int64(1000); i < 1200; i++ {
		pid := echoFrom(t, c2, 2000, i)
		r := rec.get(i)
		switch r.addr {
		case a.addr:
			toA++
			if pid != aPid || r.transport != transport.TransportShm {
				t.Fatalf("call %d picked A: answered by %d over %q", i, pid, r.transport)
			}
		case b.addr:
			toB++
			if pid != bPid || r.transport != transport.TransportFallback {
				t.Fatalf("call %d picked B: answered by %d over %q", i, pid, r.transport)
			}
		default:
			t.Fatalf("call %d picked %q", i, r.addr)
		}
	}
	if toA == 0 || toB == 0 {
		t.Fatalf("the load balancer sent %d calls to A and %d to B", toA, toB)
	}
	waitServed(t, a, uint64(10+toA))
	if st := b.stats(t); st.CallsServed != 0 {
		t.Fatalf("B served %d calls over shared memory, want 0", st.CallsServed)
	}
	waitClientNoBuffers(t)
	a.stop(t)
	b.stop(t)
}

// Zero configuration: two servers without a socket path, and a client with
// WithClientShmIPC() and no options: each picked server answers over
// shared memory.
func TestRoute_ZeroConfigTwoServers(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	a := startServer(t, "", "TMPDIR="+tmp)
	b := startServer(t, "", "TMPDIR="+tmp)
	aPid, bPid := a.p.Cmd.Process.Pid, b.p.Cmd.Process.Pid

	rec := newRecorder()
	c := newEchoClient(t, kshm.WithClientShmIPC(), client.WithHostPorts(a.addr, b.addr), client.WithMiddleware(rec.mw))
	toA, toB := 0, 0
	for i := int64(0); i < 100; i++ {
		pid := echoFrom(t, c, 5000, i)
		r := rec.get(i)
		want := aPid
		if r.addr == b.addr {
			want = bPid
			toB++
		} else {
			toA++
		}
		if pid != want || r.transport != transport.TransportShm {
			t.Fatalf("call %d picked %s: answered by %d over %q", i, r.addr, pid, r.transport)
		}
	}
	if toA == 0 || toB == 0 {
		t.Fatalf("the load balancer sent %d calls to A and %d to B", toA, toB)
	}
	waitServed(t, a, uint64(toA))
	waitServed(t, b, uint64(toB))
	waitClientNoBuffers(t)
	a.stop(t)
	b.stop(t)
}

// A socket left by a killed server is replaced by the next server on the
// same address, and clients reach the new one over shared memory.
func TestRoute_StaleSocketReplaced(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	a := startServer(t, "", "TMPDIR="+tmp)
	a.p.Kill()
	a.p.Wait()
	a2 := startServer(t, "", "TMPDIR="+tmp, envAddr+"="+a.addr)
	rec := newRecorder()
	c := newEchoClient(t, kshm.WithClientShmIPC(kshm.WithRegionSize(testRegion)), client.WithHostPorts(a.addr), client.WithMiddleware(rec.mw))
	for i := int64(0); i < 10; i++ {
		if pid := echoFrom(t, c, 1000, i); pid != a2.p.Cmd.Process.Pid {
			t.Fatalf("answered by %d", pid)
		}
		if r := rec.get(i); r.transport != transport.TransportShm {
			t.Fatalf("call %d over %q", i, r.transport)
		}
	}
	a2.stop(t)
}

// A server whose usual address is a unix socket: a client given that
// address and the kshm socket reaches it over shared memory.
func TestRoute_UnixServiceAddress(t *testing.T) {
	dir := t.TempDir()
	svcAddr := dir + "/svc.sock"
	srv := startServer(t, dir+"/k.sock", envUnixAddr+"="+svcAddr)
	if srv.addr != svcAddr {
		t.Fatalf("server address %q", srv.addr)
	}
	rec := newRecorder()
	c := newEchoClient(t, shmOpt(srv.sock), client.WithHostPorts(svcAddr), client.WithMiddleware(rec.mw))
	for i := int64(0); i < 10; i++ {
		if pid := echoFrom(t, c, 2000, i); pid != srv.p.Cmd.Process.Pid {
			t.Fatalf("answered by %d", pid)
		}
		if r := rec.get(i); r.transport != transport.TransportShm {
			t.Fatalf("call %d to %s over %q", i, r.addr, r.transport)
		}
	}
	srv.stop(t)
}
