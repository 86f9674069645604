package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/bytedance/gopkg/cloud/metainfo"
	"github.com/cloudwego/kitex/client/callopt"
	"github.com/cloudwego/kitex/pkg/kerrors"

	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/example/kitex_gen/echo/mathservice"
)

// checkSeq numbers the calls of the functional checks; the measured calls
// use numbers from 1<<32 on, so the two never meet.
var checkSeq int64

// checks exercises what a transport must not break: metainfo, declared
// exceptions, timeouts (and that a late response never reaches a later
// call), oneway calls, and a second service.
func checks(ec echoservice.Client, mc mathservice.Client) error {
	ctx := context.Background()

	// Metainfo, transient and persistent, comes back in Meta.
	run := strconv.Itoa(os.Getpid())
	mctx := metainfo.WithPersistentValue(metainfo.WithValue(ctx, "kshm-example-k", "v1"), "kshm-example-run", run)
	if err := echoOnce(mctx, ec, "meta", 100); err != nil {
		return err
	}
	resp, err := ec.Echo(mctx, &echo.EchoRequest{Message: "meta"})
	if err != nil {
		return fmt.Errorf("Echo with metainfo: %w", err)
	}
	if resp.Meta["kshm-example-k"] != "v1" || resp.Meta["kshm-example-run"] != run {
		return fmt.Errorf("metainfo did not reach the server: got meta %v", resp.Meta)
	}

	// A declared exception arrives as itself; a normal call through the same
	// method still works.
	if _, err := ec.EchoOrFail(ctx, &echo.EchoRequest{Message: "fail", Seq: 7}); err == nil {
		return errors.New("EchoOrFail(fail) succeeded")
	} else if ee := (*echo.EchoError)(nil); !errors.As(err, &ee) || ee.Code != 42 {
		return fmt.Errorf("EchoOrFail(fail): want EchoError code 42, got %v", err)
	}
	if r, err := ec.EchoOrFail(ctx, &echo.EchoRequest{Message: "ok", Seq: 8}); err != nil || r.Seq != 8 || r.Message != "ok" {
		return fmt.Errorf("EchoOrFail(ok): got %v, %v", r, err)
	}

	// A call that times out returns a timeout error at its deadline, and its
	// late response is never delivered to the calls that follow.
	start := time.Now()
	_, err = ec.Sleep(ctx, &echo.EchoRequest{Message: "late", Seq: 9}, 300, callopt.WithRPCTimeout(50*time.Millisecond))
	if !errors.Is(err, kerrors.ErrRPCTimeout) {
		return fmt.Errorf("Sleep(300ms) with a 50ms timeout: want a timeout, got %v", err)
	}
	if d := time.Since(start); d > 250*time.Millisecond {
		return fmt.Errorf("Sleep(300ms) with a 50ms timeout returned after %v", d)
	}
	deadline := time.Now().Add(400 * time.Millisecond) // past the late response
	for i := 0; time.Now().Before(deadline); i++ {
		if err := echoOnce(ctx, ec, "after-timeout", 1000+i%3000); err != nil {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}

	// Oneway calls return at once.
	for i := 0; i < 10; i++ {
		if err := ec.Notify(ctx, &echo.EchoRequest{Message: "notify", Seq: int64(i)}); err != nil {
			return fmt.Errorf("Notify: %w", err)
		}
	}

	// The second service shares the server.
	if sum, err := mc.Add(ctx, 40, 2); err != nil || sum != 42 {
		return fmt.Errorf("Add(40, 2): got %d, %v", sum, err)
	}
	return nil
}

// echoOnce calls Echo with a fresh payload of size bytes and checks the
// response is the request.
func echoOnce(ctx context.Context, ec echoservice.Client, msg string, size int) error {
	checkSeq++
	req := &echo.EchoRequest{Payload: make([]byte, size), Message: msg, Seq: checkSeq}
	fill(req.Payload, checkSeq)
	resp, err := ec.Echo(ctx, req)
	if err != nil {
		return fmt.Errorf("Echo(%s, seq %d): %w", msg, req.Seq, err)
	}
	if resp.Seq != req.Seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, req.Payload) {
		return fmt.Errorf("Echo(%s, seq %d): response is for another call or corrupt (seq %d, message %q, %d bytes)",
			msg, req.Seq, resp.Seq, resp.Message, len(resp.Payload))
	}
	return nil
}
