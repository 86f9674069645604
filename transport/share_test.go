package transport_test

import (
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/transport"
)

// Two Kitex clients of one process reaching the same server share its
// session; closing one leaves the other's calls on shared memory.
func TestShare_ClientsShareSessions(t *testing.T) {
	a := startServer(t, sockPath(t))
	pid := a.p.Cmd.Process.Pid
	pools0, sessions0 := transport.SharedPools(), kshm.ReadStats().Client.Sessions // other tests' clients
	rec := newRecorder()
	c1 := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr), client.WithMiddleware(rec.mw))
	c2 := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr), client.WithMiddleware(rec.mw))
	for i := int64(0); i < 10; i++ {
		for _, c := range []*echoClient{c1, c2} {
			if got := echoFrom(t, c, 4000, i); got != pid {
				t.Fatalf("answered by %d", got)
			}
			if r := rec.get(i); r.transport != transport.TransportShm {
				t.Fatalf("call %d over %q", i, r.transport)
			}
		}
	}
	if st := a.stats(t); st.Server.SessionsAccepted != 1 || st.Server.Sessions != 1 {
		t.Fatalf("server accepted %d sessions (%d open), want 1 shared by both clients", st.Server.SessionsAccepted, st.Server.Sessions)
	}
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	for i := int64(100); i < 110; i++ {
		echoFrom(t, c2, 4000, i)
		if r := rec.get(i); r.transport != transport.TransportShm {
			t.Fatalf("after closing the other client, call %d over %q", i, r.transport)
		}
	}
	if err := c2.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for kshm.ReadStats().Client.Sessions != sessions0 || transport.SharedPools() != pools0 {
		if time.Now().After(deadline) {
			t.Fatalf("after closing both clients: %d client sessions, %d shared pools, want %d and %d as before",
				kshm.ReadStats().Client.Sessions, transport.SharedPools(), sessions0, pools0)
		}
		time.Sleep(10 * time.Millisecond)
	}
	a.stop(t)
}

// Beyond the server's session limit a client is refused a session and is
// served as plain Kitex: over its address, or on the socket when it has no
// address.
func TestShare_ServerLimitServesPlain(t *testing.T) {
	a := startServer(t, sockPath(t), envMaxSess+"=1")
	pid := a.p.Cmd.Process.Pid
	rec := newRecorder()
	c1 := newEchoClient(t, shmOpt(a.sock), client.WithHostPorts(a.addr), client.WithMiddleware(rec.mw))
	echoFrom(t, c1, 1000, 1)
	if r := rec.get(1); r.transport != transport.TransportShm {
		t.Fatalf("first client over %q", r.transport)
	}
	// Other settings: another session, beyond the limit.
	c2 := newEchoClient(t, shmOpt(a.sock, kshm.WithSessions(2)), client.WithHostPorts(a.addr), client.WithMiddleware(rec.mw))
	for i := int64(10); i < 20; i++ {
		if got := echoFrom(t, c2, 1000, i); got != pid {
			t.Fatalf("answered by %d", got)
		}
		if r := rec.get(i); r.transport != transport.TransportFallback {
			t.Fatalf("call %d beyond the limit over %q", i, r.transport)
		}
	}
	c3 := newEchoClient(t, shmOpt(a.sock, kshm.WithSessions(3)), client.WithMiddleware(rec.mw)) // no address: the socket
	for i := int64(20); i < 30; i++ {
		if got := echoFrom(t, c3, 1000, i); got != pid {
			t.Fatalf("answered by %d", got)
		}
	}
	st := a.stats(t)
	if st.Server.SessionsRefused == 0 || st.Server.SessionsAccepted != 1 || st.Server.PlainConns == 0 {
		t.Fatalf("server: %+v, want sessions refused, 1 accepted, plain connections on the socket", st.Server)
	}
	c1.Close()
	c2.Close()
	c3.Close()
	a.stop(t)
}
