package main

import (
	"context"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/bytedance/gopkg/cloud/metainfo"

	"github.com/shmkit/kshm/example/kitex_gen/echo"
)

// echoHandler implements echo.EchoService.
type echoHandler struct {
	notified atomic.Int64 // Notify calls received
}

// Echo returns the request's payload, message and seq, and in Meta every
// metainfo value (transient and persistent) that came with the call; when
// the call carries the transient value whoKey, Meta[pidKey] is the server's
// process id (which server answered, during an upgrade).
func (h *echoHandler) Echo(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	return reply(ctx, req), nil
}

// EchoOrFail is Echo, except that it fails with an EchoError when the
// message is "fail".
func (h *echoHandler) EchoOrFail(ctx context.Context, req *echo.EchoRequest) (*echo.EchoResponse, error) {
	if req.Message == "fail" {
		return nil, &echo.EchoError{Code: 42, Message: "failed as asked, seq " + strconv.FormatInt(req.Seq, 10)}
	}
	return reply(ctx, req), nil
}

// Sleep is Echo after a pause of millis milliseconds (capped at a minute).
// It returns early, with the context's error, when the call is cancelled.
func (h *echoHandler) Sleep(ctx context.Context, req *echo.EchoRequest, millis int64) (*echo.EchoResponse, error) {
	d := time.Duration(min(max(millis, 0), 60_000)) * time.Millisecond
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return reply(ctx, req), nil
}

// Notify only counts the calls it receives.
func (h *echoHandler) Notify(ctx context.Context, req *echo.EchoRequest) error {
	h.notified.Add(1)
	return nil
}

// The metainfo key that asks for the server's pid, and the Meta key of it.
const (
	whoKey = "kshm-example-who"
	pidKey = "kshm-example-pid"
)

var pid = strconv.Itoa(os.Getpid())

func reply(ctx context.Context, req *echo.EchoRequest) *echo.EchoResponse {
	resp := &echo.EchoResponse{
		Payload: req.Payload,
		Message: req.Message,
		Seq:     req.Seq,
	}
	transient := metainfo.GetAllValues(ctx)
	persistent := metainfo.GetAllPersistentValues(ctx)
	if len(transient)+len(persistent) > 0 {
		resp.Meta = make(map[string]string, len(transient)+len(persistent))
		for k, v := range transient {
			resp.Meta[k] = v
		}
		for k, v := range persistent {
			resp.Meta[k] = v
		}
		if _, ok := transient[whoKey]; ok {
			resp.Meta[pidKey] = pid
		}
	}
	return resp
}

// mathHandler implements echo.MathService.
type mathHandler struct{}

func (*mathHandler) Add(ctx context.Context, a, b int64) (int64, error) {
	return a + b, nil
}
