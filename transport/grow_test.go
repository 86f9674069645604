package transport_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/cloudwego/kitex/client"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
)

// With default options a session starts with 4 MiB regions; a 4 MiB
// message makes them grow and goes over shared memory, not over the session
// socket, in both directions.
func TestKitex_4MiBMessageGrowsRegionsWithDefaults(t *testing.T) {
	sock := sockPath(t)
	srv := startServer(t, sock, envRegion+"=0") // default region options
	before := kshm.ReadStats()
	c := newEchoClient(t, kshm.WithClientShmIPC(kshm.WithSocketPath(sock)), client.WithHostPorts(srv.addr))
	const n = 4 << 20
	for i := int64(0); i < 6; i++ {
		req := &echo.EchoRequest{Payload: payload(n-int(i)*1000, i), Message: fmt.Sprint(i), Seq: i}
		resp, err := c.Echo(context.Background(), req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Seq != i || !bytes.Equal(resp.Payload, req.Payload) {
			t.Fatalf("call %d: response differs", i)
		}
	}
	st := waitClientNoBuffers(t)
	sst := srv.waitNoBuffers(t)
	if st.CallsSent-before.CallsSent != 6 {
		t.Fatalf("%d calls over kshm sessions, want 6", st.CallsSent-before.CallsSent)
	}
	if st.InlineRequests != before.InlineRequests || sst.InlineResponses != 0 {
		t.Fatalf("4 MiB messages went over the socket: %d requests (no memory %d, grow limit %d, peer limit %d), %d responses",
			st.InlineRequests-before.InlineRequests, st.InlineNoMemory-before.InlineNoMemory,
			st.InlineGrowLimit-before.InlineGrowLimit, st.InlineGrowPeerLimit-before.InlineGrowPeerLimit, sst.InlineResponses)
	}
	if st.Engine.Grows == before.Engine.Grows || sst.Engine.Grows == 0 {
		t.Fatalf("regions did not grow: client %d, server %d", st.Engine.Grows-before.Engine.Grows, sst.Engine.Grows)
	}
	t.Logf("client commits %d bytes in %d regions, maps %d bytes of the server's; server commits %d bytes",
		st.Engine.CommittedBytes, st.Engine.Regions, st.Engine.PeerMappedBytes, sst.Engine.CommittedBytes)
	srv.stop(t)
}
