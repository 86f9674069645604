// Package shm is kshm's shared-memory IPC engine: two processes on one host
// exchange messages through memory they both map, with a unix socket for the
// handshake, wake-ups and close. It knows nothing of Kitex; a log SDK and its
// agent can use it directly.
//
// Each side of a session creates its own region (an anonymous memfd, pages
// reserved up front, sealed against resizing) and passes its descriptor to
// the peer, which maps it read-only. A process writes only into its own
// region: its payload arena, its send ring, its consumer indexes of the
// peer's rings, its release ring and its state word. Everything read from
// the peer's region is checked before use; a bad value closes the session
// with ErrCorrupt, never a panic or a read outside the mapping.
//
// A message is a list of up to MaxSegments buffers allocated in the sender's
// arena. The sender allocates, writes and sends; the receiver reads the
// segments in place (zero copy) and releases them, which returns the buffers
// to the sender's allocator.
//
//	// server
//	ln, err := shm.Listen("/tmp/app.sock", shm.DefaultConfig())
//	s, err := ln.Accept()
//	m, err := s.Recv(ctx)      // m.Segment(i) valid until Release
//	use(m.AppendTo(nil))
//	s.Release(&m)
//
//	// client
//	s, err := shm.Dial(ctx, "/tmp/app.sock", shm.DefaultConfig())
//	b, err := s.Alloc(len(data)) // ErrNoMemory etc.: fall back or retry
//	copy(b.Bytes(), data)
//	err = s.Send(ctx, id, 0, 0, b) // on error b is still ours: s.Free(b)
//
// Wake-ups are batched: a receiver in WakeNotify mode spins for about twice
// its median wait when that fits in Config.SpinTime (else for a short mode
// of its waits, or hardly at all), then marks itself sleeping and rechecks
// its ring; a sender
// writes to the socket only when it finds the receiver sleeping. WakePoll
// never sleeps; WakeTimed checks every Config.PollInterval and senders never
// make a syscall. The client asks for a mode for both sides of a session; a
// server adopts it only if its Config accepts it (AcceptWakeModes).
//
// When a peer dies its socket closes: the session closes at once, its
// in-flight operations fail with ErrClosed, and every buffer the peer held
// returns to us with the region.
//
// Lifetimes: a Buffer keeps our region mapped until Send succeeds or Free
// returns it, and a received Message keeps the peer's region mapped until
// Release; both work after close, and once every one is freed or released
// both regions and their memfds are gone. A Buffer changes hands once: a
// second Send or Free of it, or Send of a freed one, is refused with
// ErrBufferSent or ErrBufferFreed and changes nothing. Counters: Session.Stats and ReadStats;
// the same counters live in each region's header for the kshm tool.
package shm
