// Package transport is kshm's Kitex transport: the client connection pool,
// the trans handlers and the server's TransServer. Users reach it through
// kshm.WithClientShmIPC and kshm.WithServerShmIPC.
//
// # Client
//
// ClientPool is the client's remote.ConnPool. It keeps Config.Sessions shm
// sessions to one socket path and hands Kitex virtual connections over them:
// one call at a time per connection, like Kitex's long connections. Each
// call gets an id from a per-session counter that is never reused; the
// request carries it as the message id and the connection id as Aux.
// Receiving is leader/followers: the caller waiting for a response calls
// Recv itself when nobody else does, hands each response of another call to
// its owner, and passes the receiving role to one parked waiter when its
// own response comes; with one call in flight nobody else is woken. A
// session's idle reader takes the free role only when no call has started
// for a while (to read a go-away). A response nobody waits for any more (the
// call timed out, its connection was discarded) is dropped and released at
// once, so it can never reach another call. A virtual connection the server
// ends without answering (codec.KindConnClosed) fails its call at once.
//
// The first call dials synchronously (so it already uses shared memory);
// when a session cannot be had, or dies, calls go to the fallback pool (the
// pool Kitex would have used: netpoll to the resolved address) and the
// session is re-established in the background with exponential backoff.
// Fallback connections live in their own pool: Put and Discard route by
// connection type.
//
// # Server
//
// The TransServer wraps Kitex's (netpoll by default): the server's usual
// address is served unchanged, and a unix socket is served beside it. Each
// connection accepted there is told apart by its first shm.PrefaceSize bytes:
// a kshm preface starts a session, anything else is served as plain Kitex
// (the bytes read are replayed), so a client without kshm reaches the server
// on either address. A session's workers take turns receiving; the worker
// that receives a request for an idle virtual connection serves it itself
// (OnActive once, OnRead per request in order, OnInactive once), handing
// the receiving role to another worker first only when more messages are
// already waiting. A connection the server ends without answering (a limiter, a
// decode error, a panic) is announced to the client. Shutdown stops
// accepting and tells each session's client to go away: the client takes no
// new calls on that session (new calls fall back, and the session is
// re-dialed in the background, which reaches a restarted server) and, once
// every call it had on the session is back, acknowledges. The server closes
// the sessions when all have acknowledged and nothing is queued or being
// served, or when the server's ExitWaitTime runs out.
//
// # Buffers
//
// Kitex's default client and server trans handlers do the encoding; the
// trans.Extension here picks the buffer per connection: codec's shm buffers
// for virtual connections, netpoll's for netpoll connections, Go net
// (bufiox) for plain connections on the unix socket. A message that finds no
// shared memory mid-encode is sent whole over the session socket
// (shm.Session.SendInline), with the same id; the close of a virtual
// connection follows its last request on the same path, since socket and
// ring are not ordered with each other.
package transport
