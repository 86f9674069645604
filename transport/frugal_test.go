package transport_test

import (
	"testing"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/remote/codec/thrift"

	"github.com/shmkit/kshm/transport"
)

// A client encoding and decoding with frugal (no generated fast codec)
// calls over shared memory; the responses are verified.
func TestPayload_FrugalOverShm(t *testing.T) {
	srv := startServer(t, sockPath(t))
	rec := newRecorder()
	c := newEchoClient(t, shmOpt(srv.sock), client.WithHostPorts(srv.addr), client.WithMiddleware(rec.mw),
		client.WithPayloadCodec(thrift.NewThriftCodecWithConfig(thrift.FrugalReadWrite)))
	for i := int64(0); i < 20; i++ {
		if pid := echoFrom(t, c, 1000+int(i)*5000, i); pid != srv.p.Cmd.Process.Pid {
			t.Fatalf("answered by %d", pid)
		}
		if r := rec.get(i); r.transport != transport.TransportShm {
			t.Fatalf("call %d over %q", i, r.transport)
		}
	}
	waitClientNoBuffers(t)
	srv.stop(t)
}
