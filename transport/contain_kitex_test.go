package transport_test

// Containment at the Kitex level: a Kitex server with kshm in this process,
// a well-behaved Kitex client calling it, and misbehaving peers
// (internal/misbehave) in child processes on the same unix socket.

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/internal/misbehave"
	"github.com/shmkit/kshm/internal/shmtest"
)

// The misbehaving children are this test binary run again; their roles are
// dispatched here, before the package's TestMain.
func init() {
	if misbehave.IsChildRole(shmtest.Role()) {
		os.Exit(misbehave.RunChild(shmtest.Role()))
	}
}

const containService = "kshm-contain"

type containEcho struct{}

func (*containEcho) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (*containEcho) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (*containEcho) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{Payload: req.Payload, Message: req.Message, Seq: req.Seq}, nil
}

func (*containEcho) Notify(ctx context.Context, req *echo.EchoRequest) error { return nil }

// startContainServer runs a Kitex echo server with kshm on sock in this
// process and stops it at cleanup.
func startContainServer(t *testing.T, sock string, opts ...kshm.Option) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svr := echoservice.NewServer(&containEcho{},
		server.WithListener(ln),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: containService}),
		kshm.WithServerShmIPC(append([]kshm.Option{kshm.WithSocketPath(sock)}, opts...)...),
	)
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()
	for i := 0; ; i++ {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		if i > 500 {
			t.Fatalf("kitex server not listening on %s: %v", sock, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() {
		svr.Stop()
		<-runErr
	})
}

// kitexCaller is a well-behaved Kitex client over kshm that calls Echo from
// a few goroutines until stopped, checking every response byte for byte.
type kitexCaller struct {
	kc    client.Client
	calls atomic.Int64
	stopc chan struct{}
	wg    sync.WaitGroup

	mu  sync.Mutex // guards err
	err error
}

func startKitexCaller(t *testing.T, sock string, goroutines int) *kitexCaller {
	t.Helper()
	kc, err := client.NewClient(echoservice.NewServiceInfoForClient(), client.WithDestService(containService),
		kshm.WithClientShmIPC(kshm.WithSocketPath(sock)))
	if err != nil {
		t.Fatal(err)
	}
	c := &kitexCaller{kc: kc, stopc: make(chan struct{})}
	for g := range goroutines {
		c.wg.Add(1)
		go c.loop(uint64(g))
	}
	t.Cleanup(func() { c.stop(); kc.(interface{ Close() error }).Close() })
	return c
}

func (c *kitexCaller) loop(g uint64) {
	defer c.wg.Done()
	r := rand.New(rand.NewPCG(g, 1))
	sizes := []int{0, 10, 1000, 8 << 10, 100 << 10}
	for seq := int64(g) << 32; ; seq++ {
		select {
		case <-c.stopc:
			return
		default:
		}
		p := make([]byte, sizes[r.IntN(len(sizes))])
		for i := range p {
			p[i] = byte(r.Uint32())
		}
		req := &echo.EchoRequest{Payload: p, Message: fmt.Sprint("m", seq), Seq: seq}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var res echo.EchoServiceEchoResult
		err := c.kc.Call(ctx, "Echo", &echo.EchoServiceEchoArgs{Req: req}, &res)
		cancel()
		if err == nil {
			if resp := res.GetSuccess(); resp == nil || resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, p) {
				err = fmt.Errorf("response to call %d differs from its request", seq)
			}
		}
		if err != nil {
			c.mu.Lock()
			if c.err == nil {
				c.err = err
			}
			c.mu.Unlock()
			return
		}
		c.calls.Add(1)
	}
}

func (c *kitexCaller) stop() {
	select {
	case <-c.stopc:
	default:
		close(c.stopc)
	}
	c.wg.Wait()
}

// check stops the caller and fails the test unless every call succeeded.
func (c *kitexCaller) check(t *testing.T) {
	t.Helper()
	c.stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		t.Fatalf("well-behaved Kitex client: %v", c.err)
	}
	if c.calls.Load() == 0 {
		t.Fatal("well-behaved Kitex client made no call")
	}
}

// waitCalls waits until the caller has made n more calls than it had.
func (c *kitexCaller) waitCalls(t *testing.T, n int64) {
	t.Helper()
	target := c.calls.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for c.calls.Load() < target {
		c.mu.Lock()
		err := c.err
		c.mu.Unlock()
		if err != nil || time.Now().After(deadline) {
			c.check(t)
			t.Fatalf("well-behaved Kitex client made %d calls, want %d", c.calls.Load(), target)
		}
		time.Sleep(time.Millisecond)
	}
}

func containSock(t *testing.T) string { return filepath.Join(t.TempDir(), "c.sock") }

// TestContainKitex_ForgedPeers: forged kshm peers send garbage descriptors,
// out-of-range offsets and lengths, bogus releases and bad frames to a Kitex
// server, and offer corrupt region headers. Each forged session is closed
// as corrupt with its reason logged; the Kitex client calling all along
// sees every response intact.
func TestContainKitex_ForgedPeers(t *testing.T) {
	log := misbehave.CaptureLog(t)
	sock := containSock(t)
	startContainServer(t, sock, kshm.WithRegionSize(4<<20), kshm.WithMaxMessageSize(1<<20))
	caller := startKitexCaller(t, sock, 4)
	caller.waitCalls(t, 10)
	before := kshm.ReadStats().Engine.Corrupt

	cases := misbehave.ForgeCaseNames()
	var headers []string
	for name := range misbehave.HeaderCases {
		headers = append(headers, name)
	}
	all := append(append([]string(nil), cases...), headers...)
	child := shmtest.Start(t, misbehave.RoleForge, misbehave.EnvSock+"="+sock, misbehave.EnvCases+"="+strings.Join(all, ","))
	pid := child.Cmd.Process.Pid
	for _, name := range cases {
		line := child.Expect(t, "case "+name+" ", 30*time.Second)
		if !strings.HasPrefix(line, "case "+name+" closed: ") || !strings.Contains(line, "corrupt") {
			t.Errorf("%s: the peer saw %q, want its session closed with a corrupt-data reason", name, line)
		}
	}
	for _, name := range headers {
		if line := child.Expect(t, "header "+name+" ", 30*time.Second); !strings.HasPrefix(line, "header "+name+" refused=true") {
			t.Errorf("corrupt header %s: %q, want the handshake refused", name, line)
		}
	}
	child.Expect(t, "done", 30*time.Second)
	caller.waitCalls(t, 10)

	if got := kshm.ReadStats().Engine.Corrupt - before; got != uint64(len(cases)) {
		t.Errorf("%d sessions closed as corrupt, want %d", got, len(cases))
	}
	if got := log.Lines(fmt.Sprintf("closing session with pid %d", pid), "corrupt"); len(got) != len(cases) {
		t.Errorf("%d sessions closed with a logged reason, want %d", len(got), len(cases))
	}
	if got := log.Lines("session handshake on " + sock); len(got) < len(headers) {
		t.Errorf("%d refused handshakes logged, want %d", len(got), len(headers))
	}
	caller.check(t)
	t.Logf("%d forged sessions closed, %d headers refused; the Kitex client made %d calls meanwhile",
		len(cases), len(headers), caller.calls.Load())
}

// TestContainKitex_BadConnections: connections that stall at each point of
// the handshake, that send garbage instead of a preface or a Kitex frame,
// a peer that floods wake-ups and one that writes a garbage frame after
// its handshake: the Kitex client keeps calling, every bad connection is
// closed, and the flooder is either still served or closed as corrupt.
func TestContainKitex_BadConnections(t *testing.T) {
	log := misbehave.CaptureLog(t)
	sock := containSock(t)
	startContainServer(t, sock, kshm.WithHandshakeTimeout(3*time.Second), kshm.WithRegionSize(4<<20), kshm.WithMaxMessageSize(1<<20))
	caller := startKitexCaller(t, sock, 4)
	caller.waitCalls(t, 10)

	env := []string{misbehave.EnvSock + "=" + sock, misbehave.EnvN + "=3", misbehave.EnvWait + "=30s", misbehave.EnvKitex + "=1"}
	stall := shmtest.Start(t, misbehave.RoleStall, env...)
	garbage := shmtest.Start(t, misbehave.RoleGarbage, env...)
	frame := shmtest.Start(t, misbehave.RoleFrame, env...)
	flood := shmtest.Start(t, misbehave.RoleFlood, misbehave.EnvSock+"="+sock, misbehave.EnvN+"=300000", misbehave.EnvKitex+"=1")

	stall.Expect(t, "stalled ", 30*time.Second)
	garbage.Expect(t, "garbage ", 30*time.Second)
	// While those hang, the Kitex client's calls go on.
	caller.waitCalls(t, 10)

	if line := frame.Expect(t, "closed", 30*time.Second); !strings.Contains(line, "unknown frame type") {
		t.Errorf("garbage frame: the peer saw %q, want its session closed for an unknown frame type", line)
	}
	if len(log.Lines(fmt.Sprintf("closing session with pid %d", frame.Cmd.Process.Pid), "unknown frame type")) != 1 {
		t.Error("the garbage frame's reason was not logged")
	}
	flooded := flood.Expect(t, "flooded ", 120*time.Second)
	after := flood.Expect(t, "after ", 60*time.Second)
	if after != "after open" && !strings.HasPrefix(after, "after closed") {
		t.Errorf("flooder: %q", after)
	}
	if strings.HasPrefix(after, "after closed") &&
		len(log.Lines(fmt.Sprintf("closing session with pid %d", flood.Cmd.Process.Pid))) == 0 {
		t.Error("the flooder was closed without a logged reason")
	}
	for name, p := range map[string]*shmtest.Proc{"stalled handshakes": stall, "garbage connections": garbage} {
		line := p.Expect(t, "closed ", 60*time.Second)
		var n, of int
		if _, err := fmt.Sscanf(line, "closed %d of %d", &n, &of); err != nil || n != of || n == 0 {
			t.Errorf("%s: %q, want all closed by the server", name, line)
		}
	}
	caller.waitCalls(t, 10)
	caller.check(t)
	t.Logf("%s; %s; the Kitex client made %d calls meanwhile", flooded, after, caller.calls.Load())
}
