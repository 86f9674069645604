package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bytedance/gopkg/cloud/metainfo"
	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/pkg/endpoint"
	"github.com/cloudwego/kitex/pkg/rpcinfo"

	"github.com/shmkit/kshm/example/kitex_gen/echo"
	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/transport"
)

// The metainfo key that asks the example server for its pid, and the Meta
// key it answers in (example/server's whoKey and pidKey).
const (
	whoKey = "kshm-example-who"
	pidKey = "kshm-example-pid"
)

// Phase is what the calls of one phase of a -load run did, as the client
// prints it in a "mark" line (JSON).
type Phase struct {
	Calls      int64 // calls completed
	Failed     int64 // calls that returned an error
	Mismatched int64 // calls whose response was not the request
	// Per server pid, the verified calls it answered, by kshm transport
	// (transport.TransportShm, TransportInline, TransportFallback).
	Servers map[string]map[string]int64
	// Per calling goroutine, its last verified call in the phase.
	Last       []LastCall
	FirstError string `json:",omitempty"`
}

// LastCall is which server answered a goroutine's last call, and how.
type LastCall struct {
	Pid       string
	Transport string
}

// loadStats counts the calls of the current phase.
type loadStats struct {
	mu    sync.Mutex // guards cur and total
	cur   Phase
	total Phase
}

func newPhase(goroutines int) Phase {
	return Phase{Servers: map[string]map[string]int64{}, Last: make([]LastCall, goroutines)}
}

func (s *loadStats) record(g int, pid, tr string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range []*Phase{&s.cur, &s.total} {
		p.Calls++
		switch {
		case errors.Is(err, errMismatch):
			p.Mismatched++
		case err != nil:
			p.Failed++
		default:
			if p.Servers[pid] == nil {
				p.Servers[pid] = map[string]int64{}
			}
			p.Servers[pid][tr]++
			p.Last[g] = LastCall{Pid: pid, Transport: tr}
		}
		if err != nil && p.FirstError == "" {
			p.FirstError = err.Error()
		}
	}
}

// mark returns the current phase and starts the next one.
func (s *loadStats) mark(goroutines int) Phase {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.cur
	s.cur = newPhase(goroutines)
	return p
}

var errMismatch = errors.New("the response is not the request (payload, message or seq differ)")

// callInfoKey carries a *string through a call's context: the middleware
// stores the call's kshm transport tag in it.
type callInfoKey struct{}

func transportTagMW(next endpoint.Endpoint) endpoint.Endpoint {
	return func(ctx context.Context, req, resp any) error {
		err := next(ctx, req, resp)
		if p, ok := ctx.Value(callInfoKey{}).(*string); ok {
			if ri := rpcinfo.GetRPCInfo(ctx); ri != nil && ri.To() != nil {
				*p, _ = ri.To().Tag(transport.TagTransport)
			}
		}
		return err
	}
}

// runLoad is the -load mode: it calls Echo from goroutines with size-byte
// payloads, verifying every response and noting which server pid answered
// and over which kshm transport, until told to stop. It prints "calling"
// after the first verified call, and reads commands from in:
//
//	mark <name>   print "mark <name> <Phase JSON>" for the calls since the last mark
//	stop          (or end of input) stop calling, print "mark final <Phase JSON>"
//	              for the last phase and "total <Phase JSON>" for the whole run
//
// It fails if any call failed or mismatched, or if shared-memory buffers
// are still out once the calls are done.
func runLoad(opts []client.Option, size, goroutines int, in io.Reader, out io.Writer) error {
	ec, err := newClient(echoservice.NewClient, append(opts, client.WithMiddleware(transportTagMW)))
	if err != nil {
		return err
	}
	st := &loadStats{cur: newPhase(goroutines), total: newPhase(goroutines)}
	var outMu sync.Mutex // serialises out
	say := func(format string, a ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintf(out, format+"\n", a...)
	}
	stop := make(chan struct{})
	var first sync.Once
	var wg sync.WaitGroup
	var seqs atomic.Int64
	seqs.Store(2 << 32) // apart from the checks' and the measurements' numbers
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, size)
			for {
				select {
				case <-stop:
					return
				default:
				}
				seq := seqs.Add(1)
				fill(p, seq)
				var tr string
				ctx := context.WithValue(metainfo.WithValue(context.Background(), whoKey, "1"), callInfoKey{}, &tr)
				req := &echo.EchoRequest{Payload: p, Message: "load", Seq: seq}
				resp, err := ec.Echo(ctx, req)
				pid := ""
				if err == nil {
					if resp.Seq != seq || resp.Message != req.Message || !bytes.Equal(resp.Payload, p) {
						err = errMismatch
					}
					pid = resp.Meta[pidKey]
				}
				if err != nil {
					err = fmt.Errorf("Echo(seq %d): %w", seq, err)
				}
				st.record(g, pid, tr, err)
				if err == nil {
					first.Do(func() { say("calling") })
				} else {
					time.Sleep(5 * time.Millisecond) // no spinning on a failure
				}
			}
		}()
	}
	stopCalls := func() {
		close(stop)
		wg.Wait()
	}

	sc := bufio.NewScanner(in)
	for sc.Scan() {
		cmd, arg, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if cmd == "stop" {
			break
		}
		if cmd != "mark" || arg == "" {
			stopCalls()
			return fmt.Errorf("-load: unknown command %q", sc.Text())
		}
		b, err := json.Marshal(st.mark(goroutines))
		if err != nil {
			stopCalls()
			return err
		}
		say("mark %s %s", arg, b)
	}
	stopCalls()
	last := st.mark(goroutines)
	st.mu.Lock()
	total := st.total
	st.mu.Unlock()
	for _, v := range []struct {
		prefix string
		p      Phase
	}{{"mark final", last}, {"total", total}} {
		b, err := json.Marshal(v.p)
		if err != nil {
			return err
		}
		say("%s %s", v.prefix, b)
	}
	if total.Failed+total.Mismatched > 0 {
		return fmt.Errorf("%d of %d calls failed and %d mismatched; first: %s",
			total.Failed, total.Calls, total.Mismatched, total.FirstError)
	}
	if n, b := waitBuffersBack(2 * time.Second); n != 0 {
		return fmt.Errorf("%d shared-memory buffers (%d bytes) still held by the server after all calls returned", n, b)
	}
	say("buffers all returned; %s calls verified", strconv.FormatInt(total.Calls, 10))
	return nil
}
