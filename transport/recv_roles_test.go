package transport_test

// The receive path under concurrency (issue 10 §1): callers that receive
// for each other (leader/followers) on the client, workers that hand the
// receiving role on on the server. Every response is verified byte for
// byte; nothing here asserts timing.

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/client/callopt"
	"github.com/cloudwego/kitex/pkg/kerrors"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
)

// Many callers on one session, each call answered after its own random
// delay, so responses arrive in another order than the requests: each
// caller gets exactly its own response, whoever received it.
func TestRecvRoles_ManyCallersOutOfOrder(t *testing.T) {
	srv := startRejectServer(t, "")
	c := newEchoClient(t, shmOpt(srv.sock, kshm.WithSessions(1)), client.WithHostPorts(srv.addr))
	before := kshm.ReadStats()
	const callers, calls = 32, 25
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for g := 0; g < callers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(g)))
			for i := 0; i < calls; i++ {
				seq := int64(g*1000 + i)
				n := r.Intn(40 << 10)
				if i%7 == 0 {
					n = 300<<10 + r.Intn(200<<10)
				}
				req := &echo.EchoRequest{Payload: payload(n, seq), Message: fmt.Sprint("m", seq), Seq: seq}
				resp, err := c.Sleep(context.Background(), req, int64(r.Intn(4)))
				if err != nil {
					errs <- fmt.Errorf("call %d: %w", seq, err)
					return
				}
				if resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, req.Payload) {
					errs <- fmt.Errorf("call %d got the response of %d (payload equal %v)", seq, resp.Seq, bytes.Equal(resp.Payload, req.Payload))
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := kshm.ReadStats()
	if st.CallsSent-before.CallsSent != callers*calls || st.FallbackCalls != before.FallbackCalls {
		t.Fatalf("%d calls over shm, %d fallback; want all %d over shm", st.CallsSent-before.CallsSent,
			st.FallbackCalls-before.FallbackCalls, callers*calls)
	}
	waitClientNoBuffers(t)
	srv.waitNoBuffers(t)
	srv.stop(t)
}

// A caller that holds the receiving role and times out passes the role on:
// the callers parked behind it get their responses, its own late response
// is dropped and released, and the session keeps working. Run with and
// without a timeout on the followers.
func TestRecvRoles_LeaderTimesOut(t *testing.T) {
	srv := startRejectServer(t, "")
	c := newEchoClient(t, shmOpt(srv.sock, kshm.WithSessions(1)), client.WithHostPorts(srv.addr))
	echoOK(t, c, 1)
	for round := 0; round < 3; round++ {
		lateBefore := kshm.ReadStats().LateResponses
		// Nobody else waits when the leader starts: it takes the role.
		leader := make(chan error, 1)
		go func() {
			_, err := c.Sleep(context.Background(), &echo.EchoRequest{Seq: 2}, 1500, callopt.WithRPCTimeout(300*time.Millisecond))
			leader <- err
		}()
		time.Sleep(100 * time.Millisecond)
		// Followers park behind it; their responses come after its
		// deadline, so only a passed-on role can deliver them.
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				seq := int64(100*round + 10 + g)
				req := &echo.EchoRequest{Payload: payload(1000+g*5000, seq), Seq: seq}
				var co []callopt.Option
				if g%2 == 0 {
					co = append(co, callopt.WithRPCTimeout(30*time.Second))
				}
				resp, err := call(t, "follower", func() (*echo.EchoResponse, error) {
					return c.Sleep(context.Background(), req, int64(400+50*g), co...)
				})
				if err == nil && (resp.Seq != seq || !bytes.Equal(resp.Payload, req.Payload)) {
					err = fmt.Errorf("follower %d got the response of %d", seq, resp.Seq)
				}
				if err != nil {
					errs <- err
				}
			}(g)
		}
		if err := <-leader; !kerrors.IsTimeoutError(err) {
			t.Fatalf("the leader: %v, want its RPC timeout", err)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for kshm.ReadStats().LateResponses == lateBefore {
			if time.Now().After(deadline) {
				t.Fatal("the timed-out leader's response was never received and dropped")
			}
			echoOK(t, c, int64(1000+round)) // someone must receive it
			time.Sleep(20 * time.Millisecond)
		}
	}
	echoOK(t, c, 5000) // no timeout: the role is not stuck
	waitClientNoBuffers(t)
	srv.waitNoBuffers(t)
	srv.stop(t)
}

// Many callers with short timeouts and random delays: calls time out while
// holding the role or parked, responses come late or early, and no call
// ever gets another's response; afterwards calls with no timeout work.
func TestRecvRoles_TimeoutsChurn(t *testing.T) {
	srv := startRejectServer(t, "")
	c := newEchoClient(t, shmOpt(srv.sock, kshm.WithSessions(1)), client.WithHostPorts(srv.addr))
	var ok, timeouts atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(g)))
			for i := 0; i < 30; i++ {
				seq := int64(g*1000 + i)
				req := &echo.EchoRequest{Payload: payload(r.Intn(20000), seq), Seq: seq}
				resp, err := c.Sleep(context.Background(), req, int64(r.Intn(25)), callopt.WithRPCTimeout(time.Duration(5+r.Intn(20))*time.Millisecond))
				switch {
				case kerrors.IsTimeoutError(err):
					timeouts.Add(1)
				case err != nil:
					errs <- fmt.Errorf("call %d: %w", seq, err)
					return
				case resp.Seq != seq || !bytes.Equal(resp.Payload, req.Payload):
					errs <- fmt.Errorf("crosstalk: call %d got the response of %d", seq, resp.Seq)
					return
				default:
					ok.Add(1)
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d answered, %d timed out", ok.Load(), timeouts.Load())
	var wg2 sync.WaitGroup
	for g := 0; g < 8; g++ { // no timeout: would hang if the role were lost
		wg2.Add(1)
		go func(g int) {
			defer wg2.Done()
			for i := 0; i < 10; i++ {
				echoOK(t, c, int64(90000+g*100+i))
			}
		}(g)
	}
	wg2.Wait()
	waitClientNoBuffers(t)
	srv.waitNoBuffers(t)
	srv.stop(t)
}

// Each virtual connection's messages are served in order, one at a time,
// with Kitex's connection contract: a oneway call's connection is
// discarded right after its request (Kitex does that), so its close follows
// the request closely and must never overtake it; meanwhile other callers
// keep the server's workers handing the receiving role around. Every
// request is served, every connection has OnActive once before its reads
// and OnInactive once at its end, and none is left open.
func TestRecvRoles_ConnectionOrderUnderLoad(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock) // the child with connection hooks
	c := newEchoClient(t, shmOpt(sock, kshm.WithSessions(1)), client.WithHostPorts(srv.addr))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				checkEcho(t, c, 100+i%5000, int64(50000+g*10000+i))
			}
		}(g)
	}
	const n = 300
	for i := 0; i < n; i++ {
		if err := c.Notify(context.Background(), &echo.EchoRequest{Seq: int64(i), Payload: payload(i*10, int64(i))}); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := c.Echo(context.Background(), &echo.EchoRequest{Message: "notified?"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Seq == n {
			break
		}
		if resp.Seq > n || time.Now().After(deadline) {
			t.Fatalf("server served %d of %d oneway calls", resp.Seq, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for {
		st := srv.stats(t)
		if st.ServerConns == 0 && st.InUseBuffers == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the client closed: %d server vconns, %d buffers", st.ServerConns, st.InUseBuffers)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if h := srv.hooks(t); h.Violations != 0 || h.Open != 0 || h.Reads < n {
		t.Fatalf("server connection hooks: %+v", h)
	}
	srv.stop(t)
}
