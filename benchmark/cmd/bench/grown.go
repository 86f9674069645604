package main

import (
	"github.com/cloudwego/kitex/client"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
)

// The grown case (issue 11): Kitex throughput over kshm regions that grew
// against regions of a fixed size, at the same payload and concurrency, in
// the same run. Two transports, alike but for the region a session starts
// with:
//
//   - kshm-fixed: the initial region is the maximum (WithInitialRegionSize
//     = WithRegionSize), so the whole region is committed at the handshake
//     and never grows, as before growth existed;
//   - kshm-grown: the session starts with the default 4 MiB region and grows
//     in steps while the client warms up, until the calls in flight fit.
//
// The maximum is kitexShmOptions' region for the case (room for every call
// in flight), the wake mode notify. The client warms up until a whole
// warm-up period passes without a fallback (a message sent over the
// session socket while the regions grow counts as one), so the window
// measures grown regions. The two run back to back in each round, their
// order rotating, and only in the grown cases: the Kitex matrix keeps its
// own transports.
const (
	grownFixed = "kshm-fixed"
	grownGrown = "kshm-grown"
	// grownConc is the concurrency of the grown cases: enough calls in
	// flight that a session needs several growth steps.
	grownConc = 16
)

func kitexGrownTransports() []transportDef {
	mk := func(name string, fixed bool) transportDef {
		x := &kitexExtra{
			netpollAddr: func(p params) string { return p.sock + ".netpoll" },
			client: func(p params) []client.Option {
				return []client.Option{kshm.WithClientShmIPC(grownOptions(p, fixed)...)}
			},
			server: func(p params) []server.Option {
				return []server.Option{kshm.WithServerShmIPC(grownOptions(p, fixed)...)}
			},
			fallbacks: func() uint64 { return kshm.ReadStats().Fallbacks },
		}
		return transportDef{layer: "kitex", name: name, dial: dialKitex(x), serve: serveKitex(x)}
	}
	return []transportDef{mk(grownFixed, true), mk(grownGrown, false)}
}

// grownOptions are the kshm options of both grown transports, as the
// Kitex matrix sizes them: the largest message is the payload plus room
// for TTHeader and Thrift (no call too large for shared memory), and the
// regions can hold every call in flight (each side holds one buffer per
// call, a power of two). Fixed: the session starts with all of it.
func grownOptions(p params, fixed bool) []kshm.Option {
	maxMsg := 4 << 20
	for maxMsg < p.size+64<<10 {
		maxMsg *= 2
	}
	region := 64 << 20
	for region < (p.conc+2)*maxMsg+8<<20 {
		region *= 2
	}
	opts := []kshm.Option{
		kshm.WithSocketPath(p.sock),
		kshm.WithWakeMode(kshm.WakeNotify),
		kshm.WithMaxMessageSize(maxMsg),
		kshm.WithRegionSize(region),
	}
	if fixed {
		opts = append(opts, kshm.WithInitialRegionSize(region))
	}
	return opts
}

func isGrownTransport(d transportDef) bool {
	return d.layer == "kitex" && (d.name == grownFixed || d.name == grownGrown)
}

// grownTransportsFor is the transports a case runs, of those selected:
// the grown case runs only the two grown transports, every other case all
// but them.
func grownTransportsFor(c benchCase, defs []transportDef) []transportDef {
	var out []transportDef
	for _, d := range defs {
		if isGrownTransport(d) == c.grown {
			out = append(out, d)
		}
	}
	return out
}

// grownCases are the grown cases of a run: one per size of -grown (full
// mode: 1 MiB and 4 MiB), at grownConc, when the kitex layer runs.
func grownCases(set settings, byLayer map[string][]transportDef) []benchCase {
	if len(grownTransportsFor(benchCase{grown: true}, byLayer["kitex"])) == 0 {
		return nil
	}
	var cases []benchCase
	for _, size := range set.grownSizes {
		if size > 0 {
			cases = append(cases, benchCase{layer: "kitex", size: size, conc: grownConc, clients: 1, grown: true})
		}
	}
	return cases
}
