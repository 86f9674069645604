package codec

// Message kinds used by kshm's Kitex transport (shm.Message.Kind). The
// message id (shm.Message.ID) is the call id, unique within a session for its
// whole life; Aux is the virtual connection id.
const (
	// KindRequest carries one Kitex request (client to server).
	KindRequest uint16 = 1
	// KindResponse carries the response to the request with the same id
	// (server to client).
	KindResponse uint16 = 2
	// KindCloseConn tells the server that the client closed the virtual
	// connection Aux: the server finishes what it has queued for it, then
	// ends it (OnInactive). Carries no payload.
	KindCloseConn uint16 = 3
	// KindGoAway tells the client that the server is shutting down: take no
	// new virtual connections on this session. Carries no payload.
	KindGoAway uint16 = 4
	// KindGoAwayAck tells the server that the client has no call left on
	// the session after a go-away: it can close the session. No payload.
	KindGoAwayAck uint16 = 5
	// KindConnClosed tells the client that the server ended the virtual
	// connection Aux without answering (a connection or QPS limiter, a
	// request it could not decode, a panic): the call in flight on it, if
	// any, fails at once, as a Kitex call over a connection the server
	// closed does. The id is the call the server was serving, 0 if none.
	// It travels the way the connection's last response did (ring or
	// socket), so it never overtakes it. No payload.
	KindConnClosed uint16 = 6
)
