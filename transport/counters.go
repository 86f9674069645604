package transport

import "sync/atomic"

// Counters are the transport's process-wide counters (kshm.ReadStats adds
// the engine's).
type Counters struct {
	// CallsSent: client requests sent over a kshm session (shared memory
	// or, for a message that found no memory, the session socket).
	CallsSent uint64
	// CallsServed: requests a server received over kshm sessions.
	CallsServed uint64
	// FallbackCalls: client calls that went over Kitex's netpoll transport
	// because no session could be had.
	FallbackCalls uint64
	// InlineRequests / InlineResponses: messages that found no shared memory
	// mid-encode and went over the session socket instead.
	InlineRequests, InlineResponses uint64
	// LateResponses: responses that arrived after their call had given up
	// (timed out); dropped and released.
	LateResponses uint64
	// SessionsDialed / SessionsAccepted: sessions established.
	SessionsDialed, SessionsAccepted uint64
	// SessionsLost: client sessions that died (peer gone, error).
	SessionsLost uint64
	// PlainConns: non-kshm Kitex connections served on the unix socket.
	PlainConns uint64
	// ClientConns / ServerConns: virtual connections open now.
	ClientConns, ServerConns int64
	// SessionsRefused: sessions a server refused for its limits (those
	// clients are served as plain Kitex).
	SessionsRefused uint64
	// ClientSessions / ServerSessions: sessions open now, by side.
	ClientSessions, ServerSessions int64
}

var counters struct {
	callsSent, callsServed, fallbackCalls atomic.Uint64
	inlineRequests, inlineResponses, late atomic.Uint64
	dialed, accepted, lost, plain         atomic.Uint64
	clientConns, serverConns              atomic.Int64
	refused                               atomic.Uint64
	clientSessions, serverSessions        atomic.Int64
}

// ReadCounters returns the transport counters.
func ReadCounters() Counters {
	return Counters{
		CallsSent:        counters.callsSent.Load(),
		CallsServed:      counters.callsServed.Load(),
		FallbackCalls:    counters.fallbackCalls.Load(),
		InlineRequests:   counters.inlineRequests.Load(),
		InlineResponses:  counters.inlineResponses.Load(),
		LateResponses:    counters.late.Load(),
		SessionsDialed:   counters.dialed.Load(),
		SessionsAccepted: counters.accepted.Load(),
		SessionsLost:     counters.lost.Load(),
		PlainConns:       counters.plain.Load(),
		ClientConns:      counters.clientConns.Load(),
		ServerConns:      counters.serverConns.Load(),
		SessionsRefused:  counters.refused.Load(),
		ClientSessions:   counters.clientSessions.Load(),
		ServerSessions:   counters.serverSessions.Load(),
	}
}
