package registrytest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/server"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/transport"
)

const (
	roleServer = "registry-server"
	envEtcd    = "KSHM_R_ETCD" // etcd client URL
	envShm     = "KSHM_R_SHM"  // "1": a kshm server, else plain Kitex
	service    = "echo-registry"
)

func TestMain(m *testing.M) {
	switch shmtest.Role() {
	case "":
		os.Exit(m.Run())
	case roleServer:
		os.Exit(runServer())
	default:
		os.Exit(2)
	}
}

type echoImpl struct{}

func (*echoImpl) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{Payload: req.Payload, Seq: req.Seq, Meta: map[string]string{"pid": strconv.Itoa(os.Getpid())}}, nil
}

func (*echoImpl) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{}, nil
}

func (*echoImpl) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	return &echo.EchoResponse{}, nil
}
func (*echoImpl) Notify(ctx context.Context, req *echo.EchoRequest) error { return nil }

// runServer registers itself in etcd and serves until SIGTERM.
func runServer() int {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{os.Getenv(envEtcd)}, DialTimeout: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cli.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	opts := []server.Option{
		server.WithListener(ln),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: service}),
		server.WithRegistry(NewRegistry(cli)),
		server.WithExitWaitTime(time.Second),
	}
	if os.Getenv(envShm) == "1" {
		opts = append(opts, kshm.WithServerShmIPC(kshm.WithRegionSize(8<<20)))
	}
	svr := echoservice.NewServer(&echoImpl{}, opts...)
	errc := make(chan error, 1)
	go func() { errc <- svr.Run() }()
	// Ready once registered.
	for i := 0; ; i++ {
		resp, err := cli.Get(context.Background(), key(service, ln.Addr().String()))
		if err == nil && len(resp.Kvs) == 1 {
			break
		}
		if i > 1000 {
			fmt.Fprintln(os.Stderr, "never registered")
			return 1
		}
		time.Sleep(10 * time.Millisecond)
	}
	shmtest.Printf("ready %s", ln.Addr())
	if err := <-errc; err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func startEtcd(t *testing.T) string {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	cfg.LogLevel = "error"
	free := func() url.URL {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return url.URL{Scheme: "http", Host: l.Addr().String()}
	}
	cu, pu := free(), free()
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		t.Fatal("etcd not ready")
	}
	return cu.String()
}

// Two instances of one service registered in etcd, one a kshm server and
// one plain Kitex: the calls the load balancer sends to the kshm instance go
// over shared memory, the others over the network, all verified.
func TestRegistry_EtcdTwoInstances(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	etcdURL := startEtcd(t)
	start := func(shm string) (*shmtest.Proc, string) {
		p := shmtest.Start(t, roleServer, envEtcd+"="+etcdURL, envShm+"="+shm, "TMPDIR="+tmp)
		addr := strings.TrimPrefix(p.Expect(t, "ready ", 60*time.Second), "ready ")
		return p, addr
	}
	ps, shmAddr := start("1")
	pp, plainAddr := start("0")

	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{etcdURL}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	var mu sync.Mutex
	var lastAddr, lastTr string
	kc, err := client.NewClient(echoservice.NewServiceInfoForClient(),
		client.WithDestService(service),
		client.WithResolver(NewResolver(cli)),
		kshm.WithClientShmIPC(kshm.WithRegionSize(8<<20)),
		client.WithMiddleware(func(next endpoint.Endpoint) endpoint.Endpoint {
			return func(ctx context.Context, req, resp any) error {
				err := next(ctx, req, resp)
				ri := rpcinfo.GetRPCInfo(ctx)
				mu.Lock()
				lastAddr = ri.To().Address().String()
				lastTr, _ = ri.To().Tag(transport.TagTransport)
				mu.Unlock()
				return err
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.(interface{ Close() error }).Close()
	toShm, toPlain := 0, 0
	for i := int64(0); i < 100; i++ {
		p := bytes.Repeat([]byte{byte(i)}, 10000+int(i))
		var res echo.EchoServiceEchoResult
		if err := kc.Call(context.Background(), "Echo", &echo.EchoServiceEchoArgs{Req: &echo.EchoRequest{Payload: p, Seq: i}}, &res); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		r := res.GetSuccess()
		if r == nil || !bytes.Equal(r.Payload, p) || r.Seq != i {
			t.Fatalf("call %d: response does not match", i)
		}
		mu.Lock()
		addr, tr := lastAddr, lastTr
		mu.Unlock()
		switch addr {
		case shmAddr:
			toShm++
			if r.Meta["pid"] != strconv.Itoa(ps.Cmd.Process.Pid) || tr != transport.TransportShm {
				t.Fatalf("call %d to the kshm instance: answered by %s over %q", i, r.Meta["pid"], tr)
			}
		case plainAddr:
			toPlain++
			if r.Meta["pid"] != strconv.Itoa(pp.Cmd.Process.Pid) || tr != transport.TransportFallback {
				t.Fatalf("call %d to the plain instance: answered by %s over %q", i, r.Meta["pid"], tr)
			}
		default:
			t.Fatalf("call %d picked %q", i, addr)
		}
	}
	if toShm == 0 || toPlain == 0 {
		t.Fatalf("%d calls to the kshm instance, %d to the plain one", toShm, toPlain)
	}
	for _, p := range []*shmtest.Proc{ps, pp} {
		p.Cmd.Process.Signal(syscall.SIGTERM)
		if err := p.Wait(); err != nil {
			t.Errorf("server exit: %v", err)
		}
	}
}
