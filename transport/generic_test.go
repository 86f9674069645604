package transport_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/cloudwego/gopkg/protocol/thrift"
	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/client/genericclient"
	"github.com/cloudwego/kitex/pkg/generic"

	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/transport"
)

const echoIDL = "../example/idl/echo.thrift"

func newGenericClient(t *testing.T, g generic.Generic, rec *recorder, opts ...client.Option) genericclient.Client {
	t.Helper()
	c, err := genericclient.NewClient("EchoService", g, append(opts, client.WithMiddleware(rec.mw2))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// JSON, map and binary generic calls go over shared memory to the server
// Kitex picked, and their responses are verified.
func TestGeneric_JSONMapBinaryOverShm(t *testing.T) {
	srv := startServer(t, sockPath(t))
	pid := strconv.Itoa(srv.p.Cmd.Process.Pid)
	opts := []client.Option{shmOpt(srv.sock), client.WithHostPorts(srv.addr), client.WithRPCTimeout(10 * time.Second)}
	ctx := context.Background()

	// JSON (binary fields as text: Kitex's default for JSON generic).
	p, err := generic.NewThriftFileProviderWithOption(echoIDL, []generic.ThriftIDLProviderOption{generic.WithIDLServiceName("EchoService")})
	if err != nil {
		t.Fatal(err)
	}
	jg, err := generic.JSONThriftGeneric(p)
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder()
	jc := newGenericClient(t, jg, rec, opts...)
	for i := int64(0); i < 5; i++ {
		pl := base64.StdEncoding.EncodeToString(payload(20000, i))                         // printable
		req, _ := json.Marshal(map[string]any{"payload": pl, "message": "json", "seq": i}) // the single argument
		out, err := jc.GenericCall(ctx, "Echo", string(req))
		if err != nil {
			t.Fatalf("JSON call %d: %v", i, err)
		}
		var resp struct {
			Payload string            `json:"payload"`
			Message string            `json:"message"`
			Seq     int64             `json:"seq"`
			Meta    map[string]string `json:"meta"`
		}
		if err := json.Unmarshal([]byte(out.(string)), &resp); err != nil {
			t.Fatalf("JSON call %d: %v in %.200s", i, err, out)
		}
		if resp.Payload != pl || resp.Message != "json" || resp.Seq != i || resp.Meta["pid"] != pid {
			t.Fatalf("JSON call %d: response does not match: %.200s", i, out)
		}
		if tr := rec.lastGeneric(); tr != transport.TransportShm {
			t.Fatalf("JSON call %d over %q", i, tr)
		}
	}

	// Map.
	p2, err := generic.NewThriftFileProviderWithOption(echoIDL, []generic.ThriftIDLProviderOption{generic.WithIDLServiceName("EchoService")})
	if err != nil {
		t.Fatal(err)
	}
	mg, err := generic.MapThriftGeneric(p2) // a provider serves one generic
	if err != nil {
		t.Fatal(err)
	}
	mc := newGenericClient(t, mg, rec, opts...)
	for i := int64(0); i < 5; i++ {
		pl := payload(30000, 100+i)
		out, err := mc.GenericCall(ctx, "Echo", map[string]any{"payload": pl, "message": "map", "seq": i}) // the single argument
		if err != nil {
			t.Fatalf("map call %d: %v", i, err)
		}
		m, ok := out.(map[string]any)
		if !ok {
			t.Fatalf("map call %d: %T", i, out)
		}
		got := m["payload"]
		var gotB []byte
		switch v := got.(type) {
		case []byte:
			gotB = v
		case string:
			gotB = []byte(v)
		}
		var gotPid any
		switch meta := m["meta"].(type) {
		case map[any]any:
			gotPid = meta["pid"]
		case map[string]any:
			gotPid = meta["pid"]
		case map[string]string:
			gotPid = meta["pid"]
		}
		if !bytes.Equal(gotB, pl) || m["message"] != "map" || m["seq"] != i || gotPid != pid {
			t.Fatalf("map call %d: response does not match (%T payload %d bytes, want %d, message %v, seq %T %v, meta %T)", i, got, len(gotB), len(pl), m["message"], m["seq"], m["seq"], m["meta"])
		}
		if tr := rec.lastGeneric(); tr != transport.TransportShm {
			t.Fatalf("map call %d over %q", i, tr)
		}
	}

	// Binary: the Thrift message as bytes.
	bc := newGenericClient(t, generic.BinaryThriftGeneric(), rec, opts...)
	for i := int64(0); i < 5; i++ {
		pl := payload(40000, 200+i)
		args := &echo.EchoServiceEchoArgs{Req: &echo.EchoRequest{Payload: pl, Message: "binary", Seq: i}}
		buf, err := thrift.MarshalFastMsg("Echo", thrift.CALL, int32(i+1), args)
		if err != nil {
			t.Fatal(err)
		}
		out, err := bc.GenericCall(ctx, "Echo", buf)
		if err != nil {
			t.Fatalf("binary call %d: %v", i, err)
		}
		var res echo.EchoServiceEchoResult
		if _, _, err := thrift.UnmarshalFastMsg(out.([]byte), &res); err != nil {
			t.Fatalf("binary call %d: %v", i, err)
		}
		r := res.GetSuccess()
		if r == nil || !bytes.Equal(r.Payload, pl) || r.Message != "binary" || r.Seq != i || r.Meta["pid"] != pid {
			t.Fatalf("binary call %d: response does not match", i)
		}
		if tr := rec.lastGeneric(); tr != transport.TransportShm {
			t.Fatalf("binary call %d over %q", i, tr)
		}
	}
	waitServed(t, srv, 15)
	waitClientNoBuffers(t)
	srv.stop(t)
}
