package main

import (
	"fmt"
	"sync"
)

// params describe one measurement to a transport.
type params struct {
	sock string // socket path (or host:port for TCP) the server listens on
	size int    // payload bytes of each request and each response
	conc int    // concurrent calls of the client
	// scale: the scale case. Each transport runs its default configuration
	// (kshm's default region and message size), and a server takes requests
	// of any size up to size (the light clients' and the heavy client's).
	scale bool
}

// clientSide is a connected client: one caller per concurrent worker.
type clientSide interface {
	newCaller(worker int) (caller, error)
	close() error
}

// caller makes one round trip at a time: it writes a whole request for seq,
// waits for the response and checks all of it.
type caller interface {
	call(seq uint64) error
}

// serverSide is a listening server; it serves every connection it accepts
// until close.
type serverSide interface {
	close() error
}

type transportDef struct {
	layer string // "engine" or "kitex"
	name  string // e.g. "kshm", "uds", "shmipc-go", "netpoll-tcp"
	// tcp: the address is host:port on loopback instead of a socket path.
	tcp   bool
	dial  func(p params) (clientSide, error)
	serve func(p params, fail func(error)) (serverSide, error)
}

func (d transportDef) id() string { return d.layer + "/" + d.name }

// allTransports lists the transports in the order they run within a case.
func allTransports() []transportDef {
	var ts []transportDef
	ts = append(ts, kshmEngineTransports()...)
	ts = append(ts,
		transportDef{layer: "engine", name: "uds", dial: dialUDS, serve: serveUDS},
		transportDef{layer: "engine", name: "shmipc-go", dial: dialShmipc, serve: serveShmipc},
		transportDef{layer: "engine", name: "floor", dial: dialFloor, serve: serveFloor},
	)
	ts = append(ts, kitexTransports()...)
	ts = append(ts, kitexGrownTransports()...)
	return ts
}

func findTransport(id string) (transportDef, error) {
	for _, d := range allTransports() {
		if d.id() == id {
			return d, nil
		}
	}
	return transportDef{}, fmt.Errorf("unknown transport %q", id)
}

// firstError keeps the first error reported by any goroutine.
type firstError struct {
	mu  sync.Mutex
	err error
	n   int
}

func (f *firstError) set(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.n++
	f.mu.Unlock()
}

func (f *firstError) get() (error, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err, f.n
}
