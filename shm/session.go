package shm

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The session's code is split by concern:
//
//	session.go   the Session type and its creation
//	lifetime.go  references to the mappings, Close
//	send.go      Alloc, Free, Send, SendInline, reclaiming released buffers
//	grow.go      regions that grow and shrink in steps
//	recv.go      Recv, Release
//	wake.go      the sleep/wake protocol and the spin policy
//	reader.go    the socket reader and housekeeping
//	counters.go  counters, Stats, ReadStats

const (
	housekeepEvery   = 200 * time.Millisecond
	leakScanEvery    = 5 // housekeeping passes between leak scans
	inlineQueueLen   = 256
	frameBodyTimeout = 10 * time.Second // longest a frame's body may take to arrive
)

// cacheLinePad keeps the fields of one side (sender, receiver, allocator) off
// the cache lines of the others.
type cacheLinePad [64]byte

// Session is one end of a shared-memory session: a unix-socket connection
// and two regions, ours (read-write) and the peer's (read-only).
//
// Alloc, Free, Send, SendInline, Release, Stats and Close are safe for
// concurrent use. Recv may be called concurrently; callers are served one at
// a time, and one waiting for its turn still honours its ctx.
type Session struct {
	cfg       Config
	conn      *net.UnixConn
	rc        syscall.RawConn // conn's descriptor, for the raw reads and writes (rawio_linux.go)
	role      uint32
	local     *region // ours: written only by this process
	peer      *region // the peer's: read-only
	localHdr  *regionHeader
	peerHdr   *regionHeader
	peerPID   int32
	peerUID   uint32
	life      lifetime // who still uses the mappings (lifetime.go)
	peerMax   uint64   // the peer's MaxMessage, copied once when its header was validated
	recvLimit uint64   // largest segment accepted: min(our MaxMessageSize, peerMax)
	inlineMax uint64   // largest inline message we accept (Config.MaxInlineSize)
	peerInMax uint64   // largest inline message the peer accepts (its hello)
	peerCap   uint64   // most bytes of our regions the peer maps (its hello)

	// slotWords is the state of each of our buffer slots, gen<<32|state, in
	// the Go heap: Send, Free and reclaim change it by compare-and-swap
	// (send.go), so a buffer changes hands once, and a stale Buffer is
	// refused without touching the mapping. The region's buffer table
	// mirrors it for operators.
	slotWords []atomic.Uint64
	spans     [MaxRegions]atomic.Pointer[arenaSpan] // our arenas, to tell our Buffers from others'
	coarseNow atomic.Int64                          // unix nanoseconds of the last housekeeping pass

	// peerRegs are the peer's grown regions we map (index 1 up), set by the
	// reader; peerMapped counts the bytes of all the peer's regions mapped.
	peerRegs   [MaxRegions]atomic.Pointer[peerRegion]
	peerMapped atomic.Uint64

	_ cacheLinePad
	// allocMu guards our regions and their allocators (locals, committed,
	// grow), the free slot stack, the consumer index of the peer's release
	// ring, reclaimIn, leakLogged, allocCounts and growCounts.
	allocMu     sync.Mutex
	locals      [MaxRegions]*localRegion // index 0 is the base region
	committed   uint64                   // bytes of our regions, with one being grown
	grow        *growth                  // the growth step in progress, if any
	freeSlots   []uint32
	peerRelHead uint64
	leakLogged  []uint32 // generation of the slot last logged as a leak
	allocCounts allocCounters
	growCounts  growCounters
	// allocHolds are holds taken from life in batches and not yet given to
	// a buffer. A buffer in use (local, or sent and not reclaimed) has one
	// more, which Free and reclaim give back here. allocClosed: close has
	// settled them (settleHolds); Alloc then refuses, and Free drops its
	// buffer's hold from the word.
	allocHolds  uint64
	reclaimIn   int // Allocs until the next reclaim (send.go)
	allocClosed bool

	_ cacheLinePad
	// sendMu guards localTail, the producer index of our send ring,
	// headSeen and sendCounts.
	sendMu     sync.Mutex
	localTail  uint64
	headSeen   uint64 // the peer's consumer index of our ring, as last read
	sendCounts sendCounters
	lastWake   atomic.Uint64 // epoch+1 of the peer's sleep we last woke

	_ cacheLinePad
	// recvTurn admits one Recv at a time; the holder owns peerHead (our
	// consumer index of the peer's send ring), recvTurn.count (messages
	// received through the ring), waitAvg, waitMid, waitLow, recvHolds (holds
	// taken from life in batches: they keep the mappings while the holder
	// reads the peer's ring, and each received message with segments takes
	// one) and recvSettled (they were returned after close, and
	// recvDrained closed).
	recvTurn      turn
	peerHead      uint64
	recvHolds     uint64
	recvSettled   bool
	recvDrained   chan struct{}
	finalHead     uint64 // peerHead when the turn settled; read after recvDrained
	waitAvg       int64  // mean wait in nanoseconds, for the futex sleep's bound (wake.go)
	waitMid       int64  // median wait in nanoseconds, for the spin budget (wake.go)
	waitLow       int64  // lower quartile of the waits, whether to poll at all (wake.go)
	events        eventCounters
	recvWake      chan struct{}
	doorbell      atomic.Uint32 // rung to wake a futex sleeper from this process (wake.go)
	futexSleeping atomic.Bool   // the receiver sleeps on the futex
	futexSpurious int           // net futex wake-ups that found nothing
	futexOff      bool          // too many: sleep on the socket only
	inlineQ       chan Message
	inlineBytes   atomic.Int64  // bytes of inline messages queued and not yet received
	inlineRoom    chan struct{} // signalled when a queued inline message is taken

	_ cacheLinePad
	// relMu guards relTail, the producer index of our release ring,
	// relHeadSeen, released (peer buffers released by us) and relHolds (holds of
	// released messages, returned to life in batches; settled by close).
	relMu       sync.Mutex
	relTail     uint64
	relHeadSeen uint64 // the peer's consumer index of our release ring, as last read
	released    uint64
	relHolds    uint64

	// wmu serialises writes to conn. Nobody waits for it while closing:
	// close unblocks a writer by closing conn.
	wmu         sync.Mutex
	wakePending atomic.Bool // a wake-up to write, by whoever holds wmu next
	ctrlPending atomic.Bool // control frames queued, to write by whoever holds wmu next
	ctrlStuck   atomic.Bool // the last flush found the socket full
	// ctrlMu guards ctrlQ, the control frames (grow.go) not yet written.
	ctrlMu sync.Mutex
	ctrlQ  []ctrlFrame

	closeOnce sync.Once
	done      chan struct{}
	errMu     sync.Mutex
	err       error // why the session closed; guarded by errMu
	readerEnd chan struct{}
}

func newSession(cfg Config, conn *net.UnixConn, role uint32, local, peer *region, peerPID int32, peerUID uint32, peerMaxInline, peerCap uint64) *Session {
	s := &Session{
		cfg: cfg, conn: conn, role: role, local: local, peer: peer,
		localHdr: local.hdr, peerHdr: peer.hdr, peerPID: peerPID, peerUID: peerUID,
		peerMax:     peer.geo.maxMessage,
		inlineMax:   cfg.maxInline(),
		peerInMax:   peerMaxInline,
		peerCap:     peerCap,
		committed:   local.geo.size,
		recvTurn:    newTurn(),
		recvDrained: make(chan struct{}),
		recvWake:    make(chan struct{}, 1),
		inlineQ:     make(chan Message, inlineQueueLen),
		inlineRoom:  make(chan struct{}, 1),
		done:        make(chan struct{}),
		readerEnd:   make(chan struct{}),
	}
	s.recvLimit = min(uint64(cfg.MaxMessageSize), s.peerMax)
	s.rc = rawConnOf(conn)
	n := uint32(local.geo.slotCount)
	s.slotWords = make([]atomic.Uint64, n)
	s.locals[0] = &localRegion{r: local, base: addrOf(local.arena), size: local.geo.size,
		buddy: newBuddy(local.geo.arenaSize), active: true}
	s.spans[0].Store(&arenaSpan{base: addrOf(local.arena), size: local.geo.arenaSize})
	s.peerMapped.Store(peer.geo.size)
	s.freeSlots = make([]uint32, n)
	for i := range s.freeSlots {
		s.freeSlots[i] = n - 1 - uint32(i)
		s.slotWords[i].Store(freedWord(0)) // free: ready for generation 1 (send.go)
	}
	s.leakLogged = make([]uint32, n)
	s.waitAvg = int64(waitSampleCap / 4)
	s.waitMid = int64(wakeCost / 2) // poll until the session has waited a few times
	s.waitLow = s.waitMid
	s.coarseNow.Store(time.Now().UnixNano())
	s.life.init(func() {
		s.unmapGrown()
		local.unmap()
		peer.unmap()
	})
	register(s)
	go s.reader()
	return s
}

// Config returns the session's configuration (a server's WakeMode is the
// one its client asked for, when the server accepts it).
func (s *Session) Config() Config { return s.cfg }

// PeerPID is the peer's process id, PeerUID its user id (SO_PEERCRED).
func (s *Session) PeerPID() int    { return int(s.peerPID) }
func (s *Session) PeerUID() uint32 { return s.peerUID }

// turn admits one goroutine at a time, and lets a waiting one give up when
// its ctx ends or the session closes (a sync.Mutex cannot). Its word also
// carries a count the holder keeps (the messages received through the
// ring), published by the store that ends each turn, so that counting
// costs no read-modify-write of its own.
type turn struct {
	word    atomic.Uint64 // count<<1 | held
	count   uint64        // the holder's count; published by give
	waiters atomic.Int32
	free    chan struct{}
}

func newTurn() turn { return turn{free: make(chan struct{}, 1)} }

func (t *turn) tryTake() bool {
	w := t.word.Load()
	return w&1 == 0 && t.word.CompareAndSwap(w, w|1)
}

// held reports whether someone holds the turn.
func (t *turn) held() bool { return t.word.Load()&1 != 0 }

// published is the count as of the end of the last turn.
func (t *turn) published() uint64 { return t.word.Load() >> 1 }

// give ends the holder's turn, publishing its count, and wakes a waiter if
// there is one.
func (t *turn) give() {
	t.word.Store(t.count << 1)
	if t.waiters.Load() > 0 {
		select {
		case t.free <- struct{}{}:
		default:
		}
	}
}
