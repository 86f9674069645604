// Package misbehave holds kshm peers written to misbehave, for containment
// tests: a server must survive each of them, close only the offending
// session with a logged reason, and keep serving everyone else.
//
//   - Peer does the real client handshake (shm.ClientSession) and keeps a
//     duplicate of the session socket, so it can also write raw frames on
//     it: a flood of wake-ups, garbage frames. Through its Session it can
//     receive and never release (exhausting the server's quota for it).
//   - Forger speaks the handshake itself and owns a region it can write
//     anything into: garbage descriptors, offsets and lengths out of range,
//     a runaway ring index, release entries for buffers it never held, a
//     corrupt header.
//   - Stall and Garbage open connections that never finish a handshake, or
//     that send bytes that are no kshm preface at all.
//
// Child runs named scenarios in a child test process (see RunChild), so
// that the misbehaving peer is another process, as it would be in
// production. Nothing here is for use outside tests.
package misbehave
