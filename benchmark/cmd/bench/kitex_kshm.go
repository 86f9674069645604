package main

import (
	"time"

	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
)

// kitexKshmTransports: the echo service over kshm in each wake-up mode. The
// server keeps its usual netpoll address (a unix socket beside the kshm
// one), which the client's fallback calls use; the largest message is the
// payload plus room for the TTHeader and Thrift framing, so that no call
// falls back for being too large, and the regions hold every call in flight.
func kitexKshmTransports() []transportDef {
	mk := func(name string, mode kshm.WakeMode, rpcTimeout time.Duration) transportDef {
		x := &kitexExtra{
			rpcTimeout:  rpcTimeout,
			netpollAddr: func(p params) string { return p.sock + ".netpoll" },
			client: func(p params) []client.Option {
				return []client.Option{kshm.WithClientShmIPC(kitexShmOptions(p, mode)...)}
			},
			server: func(p params) []server.Option {
				return []server.Option{kshm.WithServerShmIPC(kitexShmOptions(p, mode)...)}
			},
			fallbacks: func() uint64 { return kshm.ReadStats().Fallbacks },
		}
		return transportDef{layer: "kitex", name: name, dial: dialKitex(x), serve: serveKitex(x)}
	}
	return []transportDef{
		mk("kshm", kshm.WakeNotify, 0),
		mk("kshm-poll", kshm.WakePoll, 0),
		mk("kshm-timed", kshm.WakeTimed, 0),
		mk("kshm-rpctimeout", kshm.WakeNotify, rpcTimeoutVariant),
	}
}

func kitexShmOptions(p params, mode kshm.WakeMode) []kshm.Option {
	maxMsg := 4 << 20
	for maxMsg < p.size+64<<10 {
		maxMsg *= 2
	}
	region := 64 << 20
	for region < (p.conc+2)*maxMsg+8<<20 {
		region *= 2
	}
	return []kshm.Option{
		kshm.WithSocketPath(p.sock),
		kshm.WithWakeMode(mode),
		kshm.WithMaxMessageSize(maxMsg),
		kshm.WithRegionSize(region),
	}
}
