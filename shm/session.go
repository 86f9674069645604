package shm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudwego/kitex/pkg/klog"
)

// State word of a region (regionHeader.State): the low 32 bits count the
// owner's goroutines sleeping in Recv; the high 32 bits are an epoch bumped
// by each one going to sleep, so a sender sends at most one wake-up per
// sleep.
const (
	stateSleeper   = 1
	stateEpochOne  = 1 << 32
	sleeperMask    = 1<<32 - 1
	housekeepEvery = 200 * time.Millisecond
	leakScanEvery  = 5 // housekeeping passes between leak scans
	inlineQueueLen = 256
)

// Session is one end of a shared-memory session: a unix-socket connection
// and two regions, ours (read-write) and the peer's (read-only).
//
// Alloc, Free, Send, SendInline, Release, Stats and Close are safe for
// concurrent use. Recv may be called concurrently; callers are served one at
// a time, in order.
type Session struct {
	cfg     Config
	conn    *net.UnixConn
	role    uint32
	local   *region // ours: written only by this process
	peer    *region // the peer's: read-only
	lh, ph  *regionHeader
	peerPID int32
	peerUID uint32
	// peerMaxMsg is the peer's maximum message, read once from its header
	// (validated at mapping): the peer cannot change it afterwards.
	peerMaxMsg uint64

	// allocMu guards the buddy allocator, the free slot stack, the consumer
	// index of the peer's release ring, leakLogged and dead.
	allocMu     sync.Mutex
	buddy       *buddy
	freeSlots   []uint32
	peerRelHead uint64
	leakLogged  []uint32 // generation of the slot last logged as a leak
	dead        bool     // session closed: counters already settled
	inUseBufs   atomic.Int64
	inUseBytes  atomic.Int64
	peerHeld    atomic.Int64

	// sendMu guards tail, the producer index of our send ring.
	sendMu   sync.Mutex
	tail     uint64
	lastWake atomic.Uint64 // epoch+1 of the peer's sleep we last woke

	// recvMu guards head, our consumer index of the peer's send ring.
	recvMu   sync.Mutex
	head     uint64
	spinHits int          // rate of waits within SpinTime, for the adaptive spin
	held     atomic.Int64 // peer buffers received and not yet released
	recvWake chan struct{}
	inlineQ  chan Message

	// relMu guards relTail, the producer index of our release ring.
	relMu   sync.Mutex
	relTail uint64

	wmu sync.Mutex // serialises writes to conn

	refs      atomic.Int64 // users of the mappings; unmapped at zero
	unmapOnce sync.Once
	closed    atomic.Bool
	closeOnce sync.Once
	done      chan struct{}
	errMu     sync.Mutex
	err       error // why the session closed; guarded by errMu
	readerEnd chan struct{}
}

func newSession(cfg Config, conn *net.UnixConn, role uint32, local, peer *region, peerPID int32, peerUID uint32) *Session {
	s := &Session{
		cfg: cfg, conn: conn, role: role, local: local, peer: peer,
		lh: local.hdr, ph: peer.hdr, peerPID: peerPID, peerUID: peerUID, peerMaxMsg: peer.hdr.MaxMessage,
		buddy:     newBuddy(local.geo.arenaSize),
		recvWake:  make(chan struct{}, 1),
		inlineQ:   make(chan Message, inlineQueueLen),
		done:      make(chan struct{}),
		readerEnd: make(chan struct{}),
	}
	n := uint32(local.geo.slotCount)
	s.freeSlots = make([]uint32, n)
	for i := range s.freeSlots {
		s.freeSlots[i] = n - 1 - uint32(i)
	}
	s.leakLogged = make([]uint32, n)
	s.spinHits = spinHitsOne
	s.refs.Store(1) // the session's own reference, dropped by close
	global.sessions.Add(1)
	go s.reader()
	return s
}

// Config returns the session's configuration (the server's WakeMode is the
// one its client asked for).
func (s *Session) Config() Config { return s.cfg }

// PeerPID is the peer's process id, PeerUID its user id (SO_PEERCRED).
func (s *Session) PeerPID() int    { return int(s.peerPID) }
func (s *Session) PeerUID() uint32 { return s.peerUID }

// Done is closed when the session closes.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns why the session closed, or nil while it is open.
func (s *Session) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

func (s *Session) closedErr() error {
	if err := s.Err(); err != nil && !errors.Is(err, ErrClosed) {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return ErrClosed
}

// acquire takes a reference on the mappings; false once the session closed.
func (s *Session) acquire() bool {
	s.refs.Add(1)
	if s.closed.Load() {
		s.releaseRef()
		return false
	}
	return true
}

func (s *Session) releaseRef() {
	if s.refs.Add(-1) == 0 {
		s.unmapOnce.Do(func() {
			s.local.unmap()
			s.peer.unmap()
		})
	}
}

// Alloc allocates a buffer of n bytes in our arena. It never blocks: it
// fails with ErrTooLarge, ErrQuota (MaxBuffers in flight), ErrNoMemory (no
// free block large enough) or ErrClosed.
func (s *Session) Alloc(n int) (Buffer, error) {
	if n < 0 || n > s.cfg.MaxMessageSize {
		s.countFailed()
		return Buffer{}, fmt.Errorf("%w: %d bytes, maximum %d", ErrTooLarge, n, s.cfg.MaxMessageSize)
	}
	if !s.acquire() {
		return Buffer{}, s.closedErr()
	}
	s.allocMu.Lock()
	if s.dead {
		s.allocMu.Unlock()
		s.releaseRef()
		return Buffer{}, s.closedErr()
	}
	if err := s.reclaimLocked(); err != nil {
		s.allocMu.Unlock()
		s.releaseRef()
		s.fail(err)
		return Buffer{}, s.closedErr()
	}
	if len(s.freeSlots) == 0 {
		s.allocMu.Unlock()
		s.releaseRef()
		s.countFailed()
		atomic.AddUint64(&s.lh.Counters.QuotaHits, 1)
		return Buffer{}, ErrQuota
	}
	off, k, ok := s.buddy.alloc(uint64(n))
	if !ok {
		s.allocMu.Unlock()
		s.releaseRef()
		s.countFailed()
		return Buffer{}, ErrNoMemory
	}
	slot := s.freeSlots[len(s.freeSlots)-1]
	s.freeSlots = s.freeSlots[:len(s.freeSlots)-1]
	m := &s.local.slots[slot]
	gen := m.Gen + 1
	size := uint64(MinBlockSize) << k
	m.Off, m.Size, m.Len, m.Gen, m.ID, m.Aux = off, uint32(size), uint32(n), gen, 0, 0
	atomic.StoreInt64(&m.Time, time.Now().UnixNano())
	atomic.StoreUint32(&m.State, slotLocal)
	// Counted under the lock, so that close (which settles the counters
	// after marking the session dead under it) never misses one.
	s.inUseBufs.Add(1)
	s.inUseBytes.Add(int64(size))
	global.allocs.Add(1)
	global.inUseBuffers.Add(1)
	global.inUseBytes.Add(int64(size))
	s.allocMu.Unlock()

	c := &s.lh.Counters
	atomic.AddUint64(&c.Allocs, 1)
	atomic.AddUint64(&c.InUseBuffers, 1)
	atomic.AddUint64(&c.InUseBytes, size)
	b, _ := span(s.local.arena, off, uint64(n))
	return Buffer{b: b, slot: slot, gen: gen}, nil
}

func (s *Session) countFailed() {
	global.failedAllocs.Add(1)
	if !s.closed.Load() {
		atomic.AddUint64(&s.lh.Counters.FailedAllocs, 1)
	}
}

// Free returns a buffer that was allocated and not sent. Freeing a buffer
// twice, or one that was sent, is a no-op.
func (s *Session) Free(b Buffer) {
	if b.b == nil {
		return
	}
	s.allocMu.Lock()
	if s.dead || b.slot >= uint32(len(s.local.slots)) {
		s.allocMu.Unlock()
		return
	}
	m := &s.local.slots[b.slot]
	if atomic.LoadUint32(&m.State) != slotLocal || m.Gen != b.gen {
		s.allocMu.Unlock()
		return
	}
	s.freeSlotLocked(b.slot, m)
	s.allocMu.Unlock()
	s.releaseRef()
}

// freeSlotLocked returns a slot's block to the allocator.
func (s *Session) freeSlotLocked(slot uint32, m *slotMeta) {
	size := uint64(m.Size)
	s.buddy.release(m.Off, orderFor(size))
	atomic.StoreUint32(&m.State, slotFree)
	s.freeSlots = append(s.freeSlots, slot)
	s.inUseBufs.Add(-1)
	s.inUseBytes.Add(-int64(size))
	global.frees.Add(1)
	global.inUseBuffers.Add(-1)
	global.inUseBytes.Add(-int64(size))
	c := &s.lh.Counters
	atomic.AddUint64(&c.Frees, 1)
	atomic.AddUint64(&c.InUseBuffers, ^uint64(0))
	atomic.AddUint64(&c.InUseBytes, -size)
}

// reclaimLocked frees the buffers the peer has released. A release entry
// that names a buffer the peer does not hold is corrupt input.
func (s *Session) reclaimLocked() error {
	if s.dead {
		return nil
	}
	tail := atomic.LoadUint64(&s.ph.RelTail)
	head := s.peerRelHead
	if tail == head {
		return nil
	}
	if tail-head > s.peer.geo.relEntries {
		return fmt.Errorf("%w: release ring has %d entries pending, capacity %d", ErrCorrupt, tail-head, s.peer.geo.relEntries)
	}
	mask := s.peer.geo.relEntries - 1
	var freed int64
	for ; head != tail; head++ {
		tok := atomic.LoadUint64(&s.peer.rel[head&mask])
		slot, gen := uint32(tok>>32), uint32(tok)
		if slot >= uint32(len(s.local.slots)) {
			return fmt.Errorf("%w: release of slot %d, only %d slots", ErrCorrupt, slot, len(s.local.slots))
		}
		m := &s.local.slots[slot]
		if atomic.LoadUint32(&m.State) != slotSent || m.Gen != gen {
			return fmt.Errorf("%w: release of slot %d generation %d, which the peer does not hold", ErrCorrupt, slot, gen)
		}
		s.freeSlotLocked(slot, m)
		freed++
	}
	s.peerRelHead = head
	atomic.StoreUint64(&s.lh.PeerRelHead, head)
	s.peerHeld.Add(-freed)
	atomic.AddUint64(&s.lh.Counters.PeerHeld, uint64(-freed))
	return nil
}

// Send sends one message made of bufs (at most MaxSegments; none sends an
// empty message). On success the buffers belong to the peer until it
// releases them. On error they stay the caller's: Free them. Send blocks
// only while our ring is full, until there is room, ctx is done or the
// session closes.
func (s *Session) Send(ctx context.Context, id, aux uint64, kind uint16, bufs ...Buffer) error {
	if len(bufs) > MaxSegments {
		return fmt.Errorf("%w: %d segments, at most %d", ErrTooLarge, len(bufs), MaxSegments)
	}
	if !s.acquire() {
		return s.closedErr()
	}
	defer s.releaseRef()
	nslots := uint32(len(s.local.slots))
	var total uint64
	for _, b := range bufs {
		if b.slot >= nslots {
			return fmt.Errorf("shm: Send of a buffer not allocated by this session")
		}
		m := &s.local.slots[b.slot]
		if atomic.LoadUint32(&m.State) != slotLocal || m.Gen != b.gen || uint64(len(b.b)) > uint64(m.Len) {
			return fmt.Errorf("shm: Send of a buffer that was already sent or freed")
		}
		total += uint64(len(b.b))
	}
	nd := uint64(len(bufs))
	if nd == 0 {
		nd = 1
	}
	entries := s.local.geo.ringEntries
	s.sendMu.Lock()
	for {
		head := atomic.LoadUint64(&s.ph.PeerRingHead)
		used := s.tail - head
		if used > entries {
			s.sendMu.Unlock()
			s.fail(fmt.Errorf("%w: peer's consumer index %d is ahead of our producer index %d", ErrCorrupt, head, s.tail))
			return s.closedErr()
		}
		if used+nd <= entries {
			break
		}
		s.sendMu.Unlock()
		if err := s.backoff(ctx, func() bool {
			return s.tail-atomic.LoadUint64(&s.ph.PeerRingHead)+nd <= entries
		}); err != nil {
			return err
		}
		s.sendMu.Lock()
	}
	now := time.Now().UnixNano()
	mask := entries - 1
	t := s.tail
	if len(bufs) == 0 {
		s.local.ring[t&mask] = desc{ID: id, Aux: aux, Slot: noSlot, Seq: uint32(t), Kind: kind}
	}
	for i, b := range bufs {
		m := &s.local.slots[b.slot]
		m.ID, m.Aux = id, aux
		atomic.StoreInt64(&m.Time, now)
		atomic.StoreUint32(&m.State, slotSent)
		var flags uint16
		if i < len(bufs)-1 {
			flags = descMore
		}
		s.local.ring[(t+uint64(i))&mask] = desc{
			ID: id, Aux: aux, Off: m.Off, Len: uint32(len(b.b)), Slot: b.slot, Gen: b.gen,
			Seq: uint32(t + uint64(i)), Kind: kind, Flags: flags,
		}
	}
	s.tail = t + nd
	atomic.StoreUint64(&s.lh.RingTail, s.tail)
	s.sendMu.Unlock()

	// The buffers' references pass with them: the peer now reads them.
	for range bufs {
		s.releaseRef()
	}
	s.peerHeld.Add(int64(len(bufs)))
	c := &s.lh.Counters
	atomic.AddUint64(&c.PeerHeld, uint64(len(bufs)))
	atomic.AddUint64(&c.MsgsSent, 1)
	atomic.AddUint64(&c.BytesSent, total)
	global.msgsSent.Add(1)
	global.bytesSent.Add(total)
	s.wakePeer()
	return nil
}

// wakePeer writes a wake-up to the socket if the peer's receiver sleeps and
// has not been woken for this sleep yet.
func (s *Session) wakePeer() {
	st := atomic.LoadUint64(&s.ph.State)
	if st&sleeperMask == 0 {
		atomic.AddUint64(&s.lh.Counters.WakeupsSaved, 1)
		global.wakeupsSaved.Add(1)
		return
	}
	ep := st>>32 + 1
	if old := s.lastWake.Load(); old == ep || !s.lastWake.CompareAndSwap(old, ep) {
		return // another sender woke this sleep
	}
	var f [frameHeaderSize]byte
	putFrameHeader(f[:], frameWake, 0)
	s.wmu.Lock()
	_, err := s.conn.Write(f[:])
	s.wmu.Unlock()
	if err != nil {
		s.fail(fmt.Errorf("%w: wake-up write: %v", ErrPeerClosed, err))
		return
	}
	atomic.AddUint64(&s.lh.Counters.WakeupsSent, 1)
	global.wakeupsSent.Add(1)
}

// backoff waits until ready() holds, polling with a growing sleep; used on
// the rare paths that wait for the peer to consume (a full ring).
func (s *Session) backoff(ctx context.Context, ready func() bool) error {
	d := time.Microsecond
	for !ready() {
		select {
		case <-s.done:
			return s.closedErr()
		case <-ctx.Done():
			return ctxErr(ctx)
		default:
		}
		time.Sleep(d)
		if d < time.Millisecond {
			d *= 2
		}
	}
	return nil
}

func ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return ErrTimeout
	}
	return ctx.Err()
}

// SendInline sends a message over the session socket instead of shared
// memory: the fallback for a message that cannot get a buffer. It is
// received like any other message (Message.Inline reports it), but is not
// ordered with respect to messages sent through the ring.
func (s *Session) SendInline(ctx context.Context, id, aux uint64, kind uint16, data []byte) error {
	if len(data) > MaxInlineSize {
		return fmt.Errorf("%w: inline message of %d bytes, maximum %d", ErrTooLarge, len(data), MaxInlineSize)
	}
	if s.closed.Load() {
		return s.closedErr()
	}
	var hdr [frameHeaderSize + inlineMetaSize]byte
	putFrameHeader(hdr[:], frameInline, uint32(inlineMetaSize+len(data)))
	putInlineMeta(hdr[frameHeaderSize:], id, aux, kind)
	bufs := net.Buffers{hdr[:], data}
	s.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		s.conn.SetWriteDeadline(dl)
	}
	_, err := bufs.WriteTo(s.conn)
	if _, ok := ctx.Deadline(); ok {
		s.conn.SetWriteDeadline(time.Time{})
	}
	s.wmu.Unlock()
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			// A partial frame may have been written: the stream is lost.
			s.fail(fmt.Errorf("shm: inline write timed out: %w", err))
			return ErrTimeout
		}
		s.fail(fmt.Errorf("%w: inline write: %v", ErrPeerClosed, err))
		return s.closedErr()
	}
	if !s.closed.Load() {
		atomic.AddUint64(&s.lh.Counters.InlineSent, 1)
	}
	global.inlineSent.Add(1)
	return nil
}

// Recv returns the next message from the peer, waiting as the session's wake
// mode says until one arrives, ctx is done (ErrTimeout at its deadline) or
// the session closes (ErrClosed). The message's segments are valid until
// Release.
func (s *Session) Recv(ctx context.Context) (Message, error) {
	var m Message
	if !s.acquire() {
		return m, s.closedErr()
	}
	defer s.releaseRef()
	s.recvMu.Lock()
	defer s.recvMu.Unlock()
	var start, spinStart time.Time
	var budget time.Duration
	for i := 0; ; i++ {
		ok, err := s.tryRecv(&m)
		if ok || err != nil {
			if i > 0 && ok {
				s.observeWait(time.Since(start))
			}
			return m, err
		}
		if s.closed.Load() {
			return m, s.closedErr()
		}
		if i == 0 {
			start = time.Now()
			spinStart, budget = start, s.spinBudget()
			continue
		}
		if i&63 == 63 {
			select {
			case <-ctx.Done():
				return m, ctxErr(ctx)
			default:
			}
		}
		switch s.cfg.WakeMode {
		case WakePoll:
			s.pause(i)
		case WakeTimed:
			s.reclaim()
			time.Sleep(s.cfg.PollInterval)
		default:
			if i&15 != 0 {
				continue
			}
			if time.Since(spinStart) < budget {
				s.pause(i)
				continue
			}
			if err := s.sleep(ctx); err != nil {
				return m, err
			}
			// Woken: the message is normally there; poll briefly only.
			spinStart, budget = time.Now(), minSpin
		}
	}
}

// pause lets others run between polls: other goroutines of this process
// every time, and other threads of the machine (the peer, when it shares
// our core) every 256th time, so that a poller never starves the process it
// waits for.
func (s *Session) pause(i int) {
	if i&255 == 0 {
		osYield()
		return
	}
	runtime.Gosched()
}

// minSpin is how long a receiver polls before sleeping when its waits are
// long anyway (an idle session costs almost no CPU).
const minSpin = 2 * time.Microsecond

// spinBudget is how long Recv polls before it sleeps (notify mode). It adapts
// to the waits the receiver has seen: while most messages arrive within
// Config.SpinTime of the receiver starting to wait, it polls up to SpinTime,
// so that a busy session makes no syscalls at all; when most take longer,
// it polls for minSpin only and sleeps, so an idle session costs almost no
// CPU. A robust hit rate rather than a mean: one preempted wait must not
// switch polling off. recvMu held.
func (s *Session) spinBudget() time.Duration {
	if s.spinHits >= spinHitsHalf {
		return s.cfg.SpinTime
	}
	return minSpin
}

// spinHits is an exponentially weighted rate (weight 1/16, fixed point,
// spinHitsOne = 100%) of waits that ended within SpinTime.
const (
	spinHitsOne  = 1 << 16
	spinHitsHalf = spinHitsOne / 2
)

// observeWait folds one wait into the hit rate. recvMu held.
func (s *Session) observeWait(d time.Duration) {
	hit := 0
	if d <= s.cfg.SpinTime {
		hit = spinHitsOne
	}
	s.spinHits += (hit - s.spinHits) / 16
}

// sleep marks our receiver sleeping, rechecks the ring (so a message
// published before the mark is not missed), and blocks until a wake-up, an
// inline message, ctx or close.
func (s *Session) sleep(ctx context.Context) error {
	s.reclaim()
	select { // drop a stale wake-up
	case <-s.recvWake:
	default:
	}
	atomic.AddUint64(&s.lh.State, stateEpochOne|stateSleeper)
	defer atomic.AddUint64(&s.lh.State, ^uint64(stateSleeper-1))
	if atomic.LoadUint64(&s.ph.RingTail) != s.head || len(s.inlineQ) > 0 {
		return nil
	}
	atomic.AddUint64(&s.lh.Counters.Sleeps, 1)
	var timeout <-chan time.Time
	if dl, ok := ctx.Deadline(); ok {
		t := time.NewTimer(time.Until(dl))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-s.recvWake:
	case <-s.done:
	case <-ctx.Done():
		return ctxErr(ctx)
	case <-timeout:
		return ErrTimeout
	}
	return nil
}

// tryRecv takes the next message if there is one. Every value read from
// the peer's region is copied, then checked; a bad one closes the session.
func (s *Session) tryRecv(m *Message) (bool, error) {
	if len(s.inlineQ) > 0 {
		select {
		case *m = <-s.inlineQ:
			return true, nil
		default:
		}
	}
	tail := atomic.LoadUint64(&s.ph.RingTail)
	head := s.head
	if tail == head {
		return false, nil
	}
	pg := &s.peer.geo
	if tail-head > pg.ringEntries {
		return false, s.corrupt("peer ring holds %d entries, capacity %d", tail-head, pg.ringEntries)
	}
	mask := pg.ringEntries - 1
	var n uint64
	for {
		if n == MaxSegments {
			return false, s.corrupt("message of more than %d segments", MaxSegments)
		}
		if head+n == tail {
			return false, s.corrupt("message's last segment missing at index %d", head+n)
		}
		d := s.peer.ring[(head+n)&mask] // a copy: the peer cannot change it under us
		if d.Seq != uint32(head+n) {
			return false, s.corrupt("descriptor %d has sequence %d", head+n, d.Seq)
		}
		if d.Flags&^descMore != 0 {
			return false, s.corrupt("descriptor %d has unknown flags %#x", head+n, d.Flags)
		}
		if n == 0 {
			m.ID, m.Aux, m.Kind = d.ID, d.Aux, d.Kind
		} else if d.ID != m.ID {
			return false, s.corrupt("segment %d of message %d has id %d", n, m.ID, d.ID)
		}
		if d.Slot == noSlot {
			if d.Len != 0 || d.Flags != 0 || n != 0 {
				return false, s.corrupt("descriptor %d without a buffer has length %d", head+n, d.Len)
			}
			m.segs[0], m.tokens[0] = nil, 0
			n = 1
			m.n = 0
			break
		}
		if uint64(d.Slot) >= pg.slotCount {
			return false, s.corrupt("descriptor %d names slot %d of %d", head+n, d.Slot, pg.slotCount)
		}
		if uint64(d.Len) > s.peerMaxMsg {
			return false, s.corrupt("descriptor %d: segment of %d bytes, larger than the peer's maximum message (%d)", head+n, d.Len, s.peerMaxMsg)
		}
		seg, ok := span(s.peer.arena, d.Off, uint64(d.Len))
		if !ok {
			return false, s.corrupt("descriptor %d: segment %d+%d outside the peer's arena of %d bytes", head+n, d.Off, d.Len, pg.arenaSize)
		}
		m.segs[n] = seg
		m.tokens[n] = uint64(d.Slot)<<32 | uint64(d.Gen)
		n++
		m.n = uint8(n)
		if d.Flags&descMore == 0 {
			break
		}
	}
	m.inline = false
	s.head = head + n
	atomic.StoreUint64(&s.lh.PeerRingHead, s.head)
	if m.n > 0 {
		s.refs.Add(1) // dropped by Release
		s.held.Add(int64(m.n))
	}
	bytes := uint64(m.Len())
	c := &s.lh.Counters
	atomic.AddUint64(&c.MsgsRecv, 1)
	atomic.AddUint64(&c.BytesRecv, bytes)
	global.msgsRecv.Add(1)
	global.bytesRecv.Add(bytes)
	return true, nil
}

func (s *Session) corrupt(format string, a ...any) error {
	err := fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, a...)...)
	s.fail(err)
	return fmt.Errorf("%w: %w", ErrClosed, err)
}

// Release hands the message's buffers back to the peer. Its segments must
// not be used after. Releasing a message twice is a no-op.
func (s *Session) Release(m *Message) {
	if m.inline {
		*m = Message{}
		return
	}
	n := int(m.n)
	if n == 0 {
		return
	}
	m.n = 0
	for i := range n {
		m.segs[i] = nil
	}
	s.held.Add(-int64(n))
	defer s.releaseRef()
	if s.closed.Load() {
		return
	}
	entries := s.local.geo.relEntries
	s.relMu.Lock()
	if s.relTail+uint64(n)-atomic.LoadUint64(&s.ph.PeerRelHead) > entries {
		s.relMu.Unlock()
		s.fail(fmt.Errorf("%w: peer holds back more released buffers than its quota (%d)", ErrCorrupt, entries))
		return
	}
	for i := range n {
		atomic.StoreUint64(&s.local.rel[s.relTail&(entries-1)], m.tokens[i])
		s.relTail++
	}
	atomic.StoreUint64(&s.lh.RelTail, s.relTail)
	s.relMu.Unlock()
}

// reclaim frees what the peer has released, closing the session on corrupt
// release entries.
func (s *Session) reclaim() {
	if !s.acquire() {
		return
	}
	s.allocMu.Lock()
	err := s.reclaimLocked()
	s.allocMu.Unlock()
	s.releaseRef()
	if err != nil {
		s.fail(err)
	}
}

// Stats returns the session's counters, after reclaiming what the peer has
// released.
func (s *Session) Stats() SessionStats {
	s.reclaim()
	st := SessionStats{
		InUseBuffers: s.inUseBufs.Load(),
		InUseBytes:   s.inUseBytes.Load(),
		PeerHeld:     s.peerHeld.Load(),
		HeldFromPeer: s.held.Load(),
	}
	if !s.acquire() {
		st.PeerHeld = 0 // the peer's hold ended with the session
		return st
	}
	defer s.releaseRef()
	c := &s.lh.Counters
	st.Allocs = atomic.LoadUint64(&c.Allocs)
	st.Frees = atomic.LoadUint64(&c.Frees)
	st.FailedAllocs = atomic.LoadUint64(&c.FailedAllocs)
	st.MsgsSent = atomic.LoadUint64(&c.MsgsSent)
	st.MsgsRecv = atomic.LoadUint64(&c.MsgsRecv)
	st.BytesSent = atomic.LoadUint64(&c.BytesSent)
	st.BytesRecv = atomic.LoadUint64(&c.BytesRecv)
	st.WakeupsSent = atomic.LoadUint64(&c.WakeupsSent)
	st.WakeupsSaved = atomic.LoadUint64(&c.WakeupsSaved)
	st.Sleeps = atomic.LoadUint64(&c.Sleeps)
	st.InlineSent = atomic.LoadUint64(&c.InlineSent)
	st.InlineRecv = atomic.LoadUint64(&c.InlineRecv)
	st.QuotaHits = atomic.LoadUint64(&c.QuotaHits)
	st.ArenaSize = s.local.geo.arenaSize
	s.allocMu.Lock()
	st.ArenaFree = s.buddy.freeLen
	s.allocMu.Unlock()
	return st
}

// Close closes the session: the peer learns at once, operations in flight
// fail with ErrClosed, and every buffer returns to its owner. Idempotent.
func (s *Session) Close() error {
	s.closeWith(ErrClosed, true)
	<-s.readerEnd
	return nil
}

// fail closes the session because of err (recorded as Err).
func (s *Session) fail(err error) {
	s.closeWith(err, !errors.Is(err, ErrPeerClosed))
}

func (s *Session) closeWith(reason error, tellPeer bool) {
	s.closeOnce.Do(func() {
		s.errMu.Lock()
		s.err = reason
		s.errMu.Unlock()
		if errors.Is(reason, ErrCorrupt) {
			global.corrupted.Add(1)
			klog.Warnf("kshm: closing session with pid %d: %v", s.peerPID, reason)
		}
		s.closed.Store(true)
		atomic.StoreUint32(&s.lh.Closing, 1)
		// Every buffer of ours returns with the region: settle the counters
		// before anyone sees Done, so that what they read is final.
		s.allocMu.Lock()
		s.dead = true
		s.allocMu.Unlock()
		if n := s.held.Load(); n > 0 {
			klog.Warnf("kshm: session with pid %d closed while this process still holds %d of its buffers unreleased; "+
				"both regions stay mapped until every received message is released", s.peerPID, n)
		}
		global.sessions.Add(-1)
		global.inUseBuffers.Add(-s.inUseBufs.Swap(0))
		global.inUseBytes.Add(-s.inUseBytes.Swap(0))
		s.peerHeld.Store(0)
		close(s.done)
		if tellPeer {
			msg := reason.Error()
			if len(msg) > maxCloseReason {
				msg = msg[:maxCloseReason]
			}
			f := make([]byte, frameHeaderSize+len(msg))
			putFrameHeader(f, frameClose, uint32(len(msg)))
			copy(f[frameHeaderSize:], msg)
			s.wmu.Lock()
			s.conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			s.conn.Write(f) // best effort: the peer also sees the socket close
			s.wmu.Unlock()
		}
		s.conn.Close()
		s.releaseRef()
	})
}

// reader owns the socket after the handshake: wake-ups, inline messages,
// close, and a housekeeping pass every housekeepEvery, busy socket or quiet.
func (s *Session) reader() {
	defer close(s.readerEnd)
	var hdr [frameHeaderSize]byte
	passes := 0
	next := time.Now().Add(housekeepEvery)
	var wakes uint32
	for {
		// Housekeeping runs every housekeepEvery, busy socket or not.
		if now := time.Now(); !now.Before(next) && !s.closed.Load() {
			passes++
			s.housekeep(passes%leakScanEvery == 0)
			next = now.Add(housekeepEvery)
		}
		s.conn.SetReadDeadline(next)
		got, err := readFull(s.conn, hdr[:])
		for err != nil && got > 0 && got < frameHeaderSize && isTimeout(err) {
			// Never lose a frame's alignment to a deadline.
			s.conn.SetReadDeadline(time.Now().Add(time.Second))
			var k int
			k, err = readFull(s.conn, hdr[got:])
			got += k
		}
		if err != nil {
			if isTimeout(err) && got == 0 && !s.closed.Load() {
				continue
			}
			s.closeWith(fmt.Errorf("%w: %v", ErrPeerClosed, err), false)
			return
		}
		s.conn.SetReadDeadline(time.Time{})
		fh, err := parseFrameHeader(hdr[:])
		if err != nil {
			s.fail(err)
			return
		}
		switch fh.Type {
		case frameWake:
			// An honest peer wakes each of our sleeps at most once.
			wakes++
			if sleeps := uint32(atomic.LoadUint64(&s.lh.State) >> 32); int32(wakes-sleeps) > wakeSlack {
				s.fail(fmt.Errorf("%w: wake-up flood: %d wake-ups for %d sleeps", ErrCorrupt, wakes, sleeps))
				return
			}
			select {
			case s.recvWake <- struct{}{}:
			default:
			}
		case frameClose:
			reason := make([]byte, fh.Len)
			readFull(s.conn, reason)
			s.closeWith(fmt.Errorf("%w: %s", ErrPeerClosed, sanitize(reason)), false)
			return
		case frameInline:
			buf := make([]byte, fh.Len)
			if _, err := readFull(s.conn, buf); err != nil {
				s.closeWith(fmt.Errorf("%w: %v", ErrPeerClosed, err), false)
				return
			}
			id, aux, kind, err := parseInlineMeta(buf)
			if err != nil {
				s.fail(err)
				return
			}
			m := Message{ID: id, Aux: aux, Kind: kind, inline: true, n: 1}
			m.segs[0] = buf[inlineMetaSize:]
			select {
			case s.inlineQ <- m:
			case <-s.done:
				return
			}
			global.inlineRecv.Add(1)
			if !s.closed.Load() {
				atomic.AddUint64(&s.lh.Counters.InlineRecv, 1)
			}
			select {
			case s.recvWake <- struct{}{}:
			default:
			}
		default:
			s.fail(fmt.Errorf("%w: unexpected frame type %d", ErrCorrupt, fh.Type))
			return
		}
	}
}

// wakeSlack is how many wake-ups beyond our sleeps a peer may send before
// the session is closed as a flood.
const wakeSlack = 1024

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// housekeep reclaims released buffers, beats the heartbeat and, when asked,
// logs buffers the peer has held longer than LeakThreshold.
func (s *Session) housekeep(scan bool) {
	if !s.acquire() {
		return
	}
	defer s.releaseRef()
	s.reclaim()
	now := time.Now().UnixNano()
	atomic.StoreInt64(&s.lh.Heartbeat, now)
	if !scan || s.cfg.LeakThreshold <= 0 {
		return
	}
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	for i := range s.local.slots {
		m := &s.local.slots[i]
		if atomic.LoadUint32(&m.State) != slotSent || s.leakLogged[i] == m.Gen {
			continue
		}
		if age := time.Duration(now - atomic.LoadInt64(&m.Time)); age > s.cfg.LeakThreshold {
			s.leakLogged[i] = m.Gen
			klog.Warnf("kshm: probable leak: peer pid %d has held buffer slot %d (message id %d, %d bytes) for %v",
				s.peerPID, i, m.ID, m.Len, age.Round(time.Millisecond))
		}
	}
}
