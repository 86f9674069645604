// Package pbtest tests Kitex Protobuf across processes: unary calls carried
// over shared memory by kshm, and gRPC streaming staying on the server's
// usual (TCP) address beside kshm. The child server is this test binary run
// again (internal/shmtest).
package pbtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/internal/pbtest/kitex_gen/kshmpb"
	"github.com/shmkit/kshm/internal/pbtest/kitex_gen/kshmpb/pbecho"
	"github.com/shmkit/kshm/internal/pbtest/kitex_gen/kshmpb/pbstream"
	"github.com/shmkit/kshm/internal/pbtest/kitex_gen/kshmtt"
	"github.com/shmkit/kshm/internal/pbtest/kitex_gen/kshmtt/ttstream"
	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/transport"
)

const (
	roleServer  = "pb-server"
	envSock     = "KSHM_PB_SOCK"
	serviceName = "kshm-pbtest"
)

func TestMain(m *testing.M) {
	switch shmtest.Role() {
	case "":
		os.Exit(m.Run())
	case roleServer:
		os.Exit(runServer())
	default:
		fmt.Fprintln(os.Stderr, "unknown child role", shmtest.Role())
		os.Exit(2)
	}
}

// transform is what the server does to a payload: every byte plus one, so
// that a response cannot be the request's own bytes handed back.
func transform(p []byte) []byte {
	out := make([]byte, len(p))
	for i, b := range p {
		out[i] = b + 1
	}
	return out
}

// fromNetwork names the network of the caller's address as the server saw it.
func fromNetwork(ctx context.Context) string {
	ri := rpcinfo.GetRPCInfo(ctx)
	if ri == nil || ri.From() == nil || ri.From().Address() == nil {
		return "none"
	}
	return ri.From().Address().Network()
}

type echoImpl struct{}

func (*echoImpl) Echo(ctx context.Context, req *kshmpb.EchoRequest) (*kshmpb.EchoResponse, error) {
	return &kshmpb.EchoResponse{
		Payload: transform(req.Payload),
		Message: "echo:" + req.Message + " pid=" + strconv.Itoa(os.Getpid()),
		Seq:     req.Seq,
	}, nil
}

type streamImpl struct{}

func (*streamImpl) EchoBidi(stream kshmpb.PBStream_EchoBidiServer) error {
	network := fromNetwork(stream.Context())
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp := &kshmpb.EchoResponse{
			Payload: transform(req.Payload),
			Message: "stream:" + req.Message + " pid=" + strconv.Itoa(os.Getpid()) + " net=" + network,
			Seq:     req.Seq,
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

type ttStreamImpl struct{}

func (*ttStreamImpl) TTEchoBidi(ctx context.Context, stream kshmtt.TTStream_TTEchoBidiServer) error {
	network := fromNetwork(ctx)
	for {
		req, err := stream.Recv(ctx)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp := &kshmtt.StreamResponse{
			Payload: transform(req.Payload),
			Message: "tt:" + req.Message + " pid=" + strconv.Itoa(os.Getpid()) + " net=" + network,
			Seq:     req.Seq,
		}
		if err := stream.Send(ctx, resp); err != nil {
			return err
		}
	}
}

// runServer serves PBEcho (unary), PBStream (gRPC bidirectional streaming)
// and TTStream (TTHeader bidirectional streaming, Thrift) on
// a TCP port of 127.0.0.1 with kshm on the unix socket KSHM_PB_SOCK. It
// prints "ready <tcp address>" and runs until killed (or SIGTERM, which
// Kitex handles with a graceful stop).
func runServer() int {
	sock := os.Getenv(envSock)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	svr := pbecho.NewServer(&echoImpl{},
		server.WithListener(ln),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: serviceName}),
		kshm.WithServerShmIPC(kshm.WithSocketPath(sock)),
	)
	if err := pbstream.RegisterService(svr, &streamImpl{}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := ttstream.RegisterService(svr, &ttStreamImpl{}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()
	for i := 0; ; i++ { // ready when the socket accepts
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		select {
		case err := <-runErr:
			fmt.Fprintln(os.Stderr, "server.Run:", err)
			return 1
		default:
		}
		if i > 1000 {
			fmt.Fprintln(os.Stderr, "server not ready:", err)
			return 1
		}
		time.Sleep(10 * time.Millisecond)
	}
	shmtest.Printf("ready %s", ln.Addr())
	if err := <-runErr; err != nil {
		fmt.Fprintln(os.Stderr, "server.Run:", err)
		return 1
	}
	return 0
}

// startServer starts the child server and returns its TCP address and
// socket path. The child is killed and reaped at test cleanup.
func startServer(t *testing.T) (*shmtest.Proc, string, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "pb.sock")
	p := shmtest.Start(t, roleServer, envSock+"="+sock)
	line := p.Expect(t, "ready ", 60*time.Second)
	return p, strings.TrimPrefix(line, "ready "), sock
}

type tagKey struct{}

// tagRecorder is a client middleware that stores the call's kshm transport
// tag (read from rpcinfo.To() after the call) in the *string the context
// carries.
func tagRecorder(next endpoint.Endpoint) endpoint.Endpoint {
	return func(ctx context.Context, req, resp any) error {
		err := next(ctx, req, resp)
		if p, ok := ctx.Value(tagKey{}).(*string); ok {
			*p, _ = rpcinfo.GetRPCInfo(ctx).To().Tag(transport.TagTransport)
		}
		return err
	}
}

func payload(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	r.Read(b)
	return b
}

// newShmClient makes a Kitex Protobuf (TTHeader) client with kshm, pointed
// at the server's TCP address: kshm finds the server behind it at sock.
func newShmClient(t *testing.T, addr, sock string) pbecho.Client {
	t.Helper()
	c, err := pbecho.NewClient(serviceName,
		client.WithHostPorts(addr),
		client.WithMiddleware(tagRecorder),
		client.WithRPCTimeout(20*time.Second),
		kshm.WithClientShmIPC(kshm.WithSocketPath(sock)),
	)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// checkUnary makes one Kitex Protobuf call and verifies the response byte
// for byte and that it went over shared memory.
func checkUnary(t *testing.T, c pbecho.Client, pid int, seq int64, p []byte) {
	t.Helper()
	var tag string
	ctx := context.WithValue(context.Background(), tagKey{}, &tag)
	msg := "m" + strconv.FormatInt(seq, 10)
	resp, err := c.Echo(ctx, &kshmpb.EchoRequest{Payload: p, Message: msg, Seq: seq})
	if err != nil {
		t.Fatalf("Echo seq %d (%d bytes): %v", seq, len(p), err)
	}
	if want := transform(p); !bytes.Equal(resp.Payload, want) {
		t.Fatalf("Echo seq %d: payload of %d bytes differs from the %d expected", seq, len(resp.Payload), len(want))
	}
	if want := "echo:" + msg + " pid=" + strconv.Itoa(pid); resp.Message != want || resp.Seq != seq {
		t.Fatalf("Echo seq %d: got message %q seq %d, want %q seq %d", seq, resp.Message, resp.Seq, want, seq)
	}
	if tag != transport.TransportShm {
		t.Fatalf("Echo seq %d (%d bytes): transport tag %q, want %q", seq, len(p), tag, transport.TransportShm)
	}
}

// TestProtobufOverShm: Kitex Protobuf unary calls between processes go
// through shared memory (the rpcinfo tag and the client counters say so)
// and their responses are right byte for byte, sequentially and
// concurrently, from empty to 1 MiB payloads.
func TestProtobufOverShm(t *testing.T) {
	p, addr, sock := startServer(t)
	pid := p.Cmd.Process.Pid
	c := newShmClient(t, addr, sock)
	defer runtime.KeepAlive(c)

	before := kshm.ReadStats()
	r := rand.New(rand.NewSource(1))
	sizes := []int{0, 1, 100, 4 << 10, 64 << 10, 1 << 20}
	var seq int64
	for _, n := range sizes {
		seq++
		checkUnary(t, c, pid, seq, payload(r, n))
	}

	const workers, perWorker = 8, 25
	var wg sync.WaitGroup
	errs := make(chan string, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(w) + 100))
			for i := 0; i < perWorker; i++ {
				s := int64(1000*(w+1) + i)
				p := payload(r, r.Intn(32<<10))
				var tag string
				ctx := context.WithValue(context.Background(), tagKey{}, &tag)
				resp, err := c.Echo(ctx, &kshmpb.EchoRequest{Payload: p, Message: "c", Seq: s})
				switch {
				case err != nil:
					errs <- fmt.Sprintf("seq %d: %v", s, err)
					return
				case !bytes.Equal(resp.Payload, transform(p)) || resp.Seq != s:
					errs <- fmt.Sprintf("seq %d: wrong response (seq %d, %d bytes)", s, resp.Seq, len(resp.Payload))
					return
				case tag != transport.TransportShm:
					errs <- fmt.Sprintf("seq %d: transport tag %q", s, tag)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if t.Failed() {
		return
	}
	after := kshm.ReadStats()
	calls := uint64(len(sizes) + workers*perWorker)
	if got := after.CallsSent - before.CallsSent; got < calls {
		t.Fatalf("CallsSent grew by %d, want at least %d", got, calls)
	}
	if got := after.FallbackCalls - before.FallbackCalls; got != 0 {
		t.Fatalf("FallbackCalls grew by %d, want 0", got)
	}
}

// TestGRPCStreamingBesideShm: a server with kshm keeps serving gRPC
// bidirectional streaming on its TCP address to a plain Kitex gRPC client,
// while a kshm client's Kitex Protobuf unary calls to the same server go
// over shared memory, at the same time.
func TestGRPCStreamingBesideShm(t *testing.T) {
	p, addr, sock := startServer(t)
	pid := p.Cmd.Process.Pid
	uc := newShmClient(t, addr, sock)
	sc, err := pbstream.NewClient(serviceName, client.WithHostPorts(addr)) // gRPC (the generated default)
	if err != nil {
		t.Fatal(err)
	}
	// Kitex closes a client's connection pool when the client is garbage
	// collected: keep both alive while their streams and calls run.
	defer runtime.KeepAlive(sc)
	defer runtime.KeepAlive(uc)

	var wg sync.WaitGroup
	unaryErr := make(chan error, 1)
	stop := make(chan struct{})
	wg.Add(1)
	go func() { // kshm unary calls while the streams run
		defer wg.Done()
		r := rand.New(rand.NewSource(7))
		for i := int64(1); ; i++ {
			select {
			case <-stop:
				if i == 1 {
					unaryErr <- errors.New("no unary call finished while the streams ran")
				} else {
					unaryErr <- nil
				}
				return
			default:
			}
			pl := payload(r, r.Intn(16<<10))
			var tag string
			ctx := context.WithValue(context.Background(), tagKey{}, &tag)
			resp, err := uc.Echo(ctx, &kshmpb.EchoRequest{Payload: pl, Message: "u", Seq: i})
			switch {
			case err != nil:
				unaryErr <- fmt.Errorf("unary seq %d: %w", i, err)
				return
			case !bytes.Equal(resp.Payload, transform(pl)) || resp.Seq != i:
				unaryErr <- fmt.Errorf("unary seq %d: wrong response", i)
				return
			case tag != transport.TransportShm:
				unaryErr <- fmt.Errorf("unary seq %d: transport tag %q, want %q", i, tag, transport.TransportShm)
				return
			}
		}
	}()

	const streams, msgs = 3, 20
	streamErrs := make(chan error, streams)
	for s := 0; s < streams; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			streamErrs <- runStream(sc, pid, s, msgs)
		}(s)
	}
	for s := 0; s < streams; s++ {
		if err := <-streamErrs; err != nil {
			t.Error(err)
		}
	}
	close(stop)
	wg.Wait()
	if err := <-unaryErr; err != nil {
		t.Error(err)
	}
	// And once more, sequentially, after the streams: still shared memory.
	checkUnary(t, uc, pid, 1<<40, payload(rand.New(rand.NewSource(9)), 200<<10))
}

// runStream sends msgs messages on one bidirectional stream, each answered
// before the next, checks every response byte for byte and that the server
// saw the stream arrive over TCP.
func runStream(sc pbstream.Client, pid, s, msgs int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := sc.EchoBidi(ctx)
	if err != nil {
		return fmt.Errorf("stream %d: EchoBidi: %w", s, err)
	}
	r := rand.New(rand.NewSource(int64(s) + 50))
	for i := 0; i < msgs; i++ {
		seq := int64(s*1000 + i)
		pl := payload(r, r.Intn(64<<10))
		msg := "s" + strconv.FormatInt(seq, 10)
		if err := st.Send(&kshmpb.EchoRequest{Payload: pl, Message: msg, Seq: seq}); err != nil {
			return fmt.Errorf("stream %d: Send %d: %w", s, i, err)
		}
		resp, err := st.Recv()
		if err != nil {
			return fmt.Errorf("stream %d: Recv %d: %w", s, i, err)
		}
		if !bytes.Equal(resp.Payload, transform(pl)) {
			return fmt.Errorf("stream %d msg %d: payload of %d bytes differs", s, i, len(resp.Payload))
		}
		want := "stream:" + msg + " pid=" + strconv.Itoa(pid) + " net=tcp"
		if resp.Message != want || resp.Seq != seq {
			return fmt.Errorf("stream %d msg %d: got %q seq %d, want %q seq %d", s, i, resp.Message, resp.Seq, want, seq)
		}
	}
	if err := st.Close(); err != nil {
		return fmt.Errorf("stream %d: Close: %w", s, err)
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("stream %d: Recv after Close: %v, want EOF", s, err)
	}
	return nil
}

// TestTTHeaderStreamingBesideShm: the same for TTHeader streaming (Thrift:
// Kitex v0.16.3 carries no Protobuf over TTHeader streaming): a plain Kitex
// TTHeader streaming client reaches the kshm server on its TCP address
// while a kshm client's unary calls go over shared memory.
func TestTTHeaderStreamingBesideShm(t *testing.T) {
	p, addr, sock := startServer(t)
	pid := p.Cmd.Process.Pid
	uc := newShmClient(t, addr, sock)
	sc, err := ttstream.NewClient(serviceName, client.WithHostPorts(addr)) // TTHeader streaming (the generated default)
	if err != nil {
		t.Fatal(err)
	}
	defer runtime.KeepAlive(sc) // see TestGRPCStreamingBesideShm
	defer runtime.KeepAlive(uc)
	checkUnary(t, uc, pid, 1, payload(rand.New(rand.NewSource(3)), 10<<10))
	const streams, msgs = 3, 20
	errs := make(chan error, streams)
	for s := 0; s < streams; s++ {
		go func(s int) { errs <- runTTStream(sc, pid, s, msgs) }(s)
	}
	// kshm unary calls while the streams run.
	r := rand.New(rand.NewSource(4))
	for i := int64(2); i < 40; i++ {
		checkUnary(t, uc, pid, i, payload(r, r.Intn(16<<10)))
	}
	for s := 0; s < streams; s++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	checkUnary(t, uc, pid, 1<<40, payload(r, 200<<10))
}

func runTTStream(sc ttstream.Client, pid, s, msgs int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := sc.TTEchoBidi(ctx)
	if err != nil {
		return fmt.Errorf("tt stream %d: TTEchoBidi: %w", s, err)
	}
	r := rand.New(rand.NewSource(int64(s) + 70))
	for i := 0; i < msgs; i++ {
		seq := int64(s*1000 + i)
		pl := payload(r, r.Intn(64<<10))
		msg := "t" + strconv.FormatInt(seq, 10)
		if err := st.Send(ctx, &kshmtt.StreamRequest{Payload: pl, Message: msg, Seq: seq}); err != nil {
			return fmt.Errorf("tt stream %d: Send %d: %w", s, i, err)
		}
		resp, err := st.Recv(ctx)
		if err != nil {
			return fmt.Errorf("tt stream %d: Recv %d: %w", s, i, err)
		}
		if !bytes.Equal(resp.Payload, transform(pl)) {
			return fmt.Errorf("tt stream %d msg %d: payload of %d bytes differs", s, i, len(resp.Payload))
		}
		want := "tt:" + msg + " pid=" + strconv.Itoa(pid) + " net=tcp"
		if resp.Message != want || resp.Seq != seq {
			return fmt.Errorf("tt stream %d msg %d: got %q seq %d, want %q seq %d", s, i, resp.Message, resp.Seq, want, seq)
		}
	}
	if err := st.CloseSend(ctx); err != nil {
		return fmt.Errorf("tt stream %d: CloseSend: %w", s, err)
	}
	if _, err := st.Recv(ctx); !errors.Is(err, io.EOF) {
		return fmt.Errorf("tt stream %d: Recv after CloseSend: %v, want EOF", s, err)
	}
	return nil
}
