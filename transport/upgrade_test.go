package transport_test

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/transport"
)

// load calls Echo from goroutines with 16 KiB payloads, verifying every
// response, until stopped.
type load struct {
	c        *echoClient
	rec      *recorder
	stop     chan struct{}
	wg       sync.WaitGroup
	calls    atomic.Int64
	failed   atomic.Int64
	mu       sync.Mutex
	firstErr error
	last     map[int]struct { // per goroutine: the last call's server and transport
		pid       int
		transport string
	}
}

func startLoad(t *testing.T, c *echoClient, rec *recorder, goroutines int) *load {
	l := &load{c: c, rec: rec, stop: make(chan struct{}), last: map[int]struct {
		pid       int
		transport string
	}{}}
	t.Cleanup(func() { // before the client closes
		select {
		case <-l.stop:
		default:
			close(l.stop)
		}
		l.wg.Wait()
	})
	for g := 0; g < goroutines; g++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := int64(0); ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				seq := int64(g)<<32 | i
				p := payload(16<<10, seq)
				resp, err := c.Echo(context.Background(), &echo.EchoRequest{Payload: p, Seq: seq})
				l.calls.Add(1)
				if err == nil && (!bytes.Equal(resp.Payload, p) || resp.Seq != seq) {
					err = errMismatch
				}
				if err != nil {
					l.failed.Add(1)
					l.mu.Lock()
					if l.firstErr == nil {
						l.firstErr = err
					}
					l.mu.Unlock()
					continue
				}
				pid, _ := strconv.Atoi(resp.Meta["pid"])
				l.mu.Lock()
				l.last[g] = struct {
					pid       int
					transport string
				}{pid, rec.get(seq).transport}
				l.mu.Unlock()
			}
		}()
	}
	return l
}

type mismatchErr struct{}

func (mismatchErr) Error() string { return "response does not match the request" }

var errMismatch error = mismatchErr{}

// waitCalls waits until n more calls completed.
func (l *load) waitCalls(t *testing.T, n int64) {
	t.Helper()
	target := l.calls.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.calls.Load() < target {
		if time.Now().After(deadline) {
			t.Fatalf("load stalled at %d calls", l.calls.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitTakeover waits until the socket at path is no longer the file before.
func waitTakeover(t *testing.T, path string, before os.FileInfo) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && !os.SameFile(fi, before) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the new server never took the socket over")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func statT(t *testing.T, path string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

func (l *load) finish(t *testing.T) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	if n := l.failed.Load(); n != 0 {
		t.Fatalf("%d of %d calls failed; first: %v", n, l.calls.Load(), l.firstErr)
	}
}

// Replacing the server under load: the new server takes the socket over
// and shares the TCP port; the old one is stopped gracefully. No call
// fails, and afterwards every goroutine's calls go over shared memory to
// the new server.
func TestUpgrade_ReplaceUnderLoad(t *testing.T) {
	sock := sockPath(t)
	old := startServer(t, sock, envReuse+"=1", envExitWait+"=5000")
	rec := newRecorder()
	c := newEchoClient(t, shmOpt(sock), client.WithHostPorts(old.addr), client.WithMiddleware(rec.mw))
	l := startLoad(t, c, rec, 8)
	l.waitCalls(t, 200)

	before := statT(t, sock)
	nw := startServer(t, sock, envReuse+"=1", envAddr+"="+old.addr, envExitWait+"=5000")
	waitTakeover(t, sock, before)
	l.waitCalls(t, 200)
	if err := old.p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	old.p.Expect(t, "final ", 30*time.Second)
	if err := old.p.Wait(); err != nil {
		t.Fatalf("old server exit: %v", err)
	}
	newPid := nw.p.Cmd.Process.Pid
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.waitCalls(t, 100)
		l.mu.Lock()
		moved := len(l.last) == 8
		for _, v := range l.last {
			moved = moved && v.pid == newPid && v.transport == transport.TransportShm
		}
		l.mu.Unlock()
		if moved {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("calls did not move to the new server over shared memory: %+v", l.last)
		}
	}
	l.finish(t)
	if st := nw.stats(t); st.Server.SessionsAccepted == 0 || st.Server.CallsServed == 0 {
		t.Fatalf("new server: %+v", st.Server)
	}
	nw.stop(t)
}

// The new server is SIGKILLed during the handover: clients of the old one
// never notice, and a client that had moved to the new one comes back to
// the old one (which takes its socket path back), over shared memory.
func TestUpgrade_NewServerKilledMidHandover(t *testing.T) {
	sock := sockPath(t)
	old := startServer(t, sock, envReuse+"=1", envExitWait+"=5000")
	oldPid := old.p.Cmd.Process.Pid
	rec := newRecorder()
	c := newEchoClient(t, shmOpt(sock), client.WithHostPorts(old.addr), client.WithMiddleware(rec.mw))
	l := startLoad(t, c, rec, 8)
	l.waitCalls(t, 200)

	before := statT(t, sock)
	nw := startServer(t, sock, envReuse+"=1", envAddr+"="+old.addr, envExitWait+"=5000")
	waitTakeover(t, sock, before)
	newPid := nw.p.Cmd.Process.Pid
	// Another client (other settings: its own session) reaches the new one.
	c2 := newEchoClient(t, shmOpt(sock, kshm.WithSessions(2), kshm.WithReconnectBackoff(20*time.Millisecond, 100*time.Millisecond)),
		client.WithHostPorts(old.addr), client.WithMiddleware(rec.mw))
	if pid := echoFrom(t, c2, 16<<10, 1); pid != newPid || rec.get(1).transport != transport.TransportShm {
		t.Fatalf("second client: answered by %d over %q, want the new server %d over shared memory", pid, rec.get(1).transport, newPid)
	}
	lost := kshm.ReadStats().Client.SessionsLost
	nw.p.Kill()
	nw.p.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for kshm.ReadStats().Client.SessionsLost == lost {
		if time.Now().After(deadline) {
			t.Fatal("the second client never noticed the killed server")
		}
		time.Sleep(5 * time.Millisecond)
	}
	l.waitCalls(t, 200)
	for i := int64(2); ; i++ {
		pid := echoFrom(t, c2, 16<<10, i)
		if pid != oldPid {
			t.Fatalf("call %d answered by %d, the old server is %d", i, pid, oldPid)
		}
		if rec.get(i).transport == transport.TransportShm {
			break // back on shared memory, with the old server
		}
		if time.Now().After(deadline.Add(20 * time.Second)) {
			t.Fatal("the second client never returned to shared memory")
		}
		time.Sleep(10 * time.Millisecond)
	}
	l.finish(t)
	l.mu.Lock()
	for g, v := range l.last {
		if v.pid != oldPid || v.transport != transport.TransportShm {
			t.Errorf("goroutine %d: last call answered by %d over %q", g, v.pid, v.transport)
		}
	}
	l.mu.Unlock()
	c2.Close()
	old.stop(t)
}
