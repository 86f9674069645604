package misbehave

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The wire format and region layout as a hostile peer sees them: written
// here from the protocol, not imported, because a forger must be able to
// write what the engine never would. TestForge_RegionValidates checks that
// an honest forged region passes the engine's validation, so a change of
// the layout fails loudly here.
const (
	prefaceSize  = 8
	helloSize    = 128
	headerSize   = 4096
	descSize     = 64
	blockSize    = 512
	pageSize     = 4096
	regionMagic  = 0x314745524d48534b // "KSHMREG1"
	layoutVer    = 2
	roleClient   = 1
	frameHdrSize = 8

	// Frame types.
	FrameWake   = 1
	FrameClose  = 2
	FrameInline = 3
	FrameReady  = 4

	// Header offsets.
	offState        = 128
	offRingTail     = 256
	offPeerRingHead = 384
	offRelTail      = 512
)

var preface = [prefaceSize]byte{0xff, 'K', 'S', 'H', 'M', 0x00, 0x00, 0x01}

// Desc is one descriptor of the forger's send ring, written as is.
type Desc struct {
	ID, Aux, Off   uint64
	Len, Slot, Gen uint32
	Seq            uint32
	Kind, Flags    uint16
}

// DescMore is the flag of a segment followed by another of the same message.
const DescMore = 1

// NoSlot is the slot of a descriptor without a buffer.
const NoSlot = ^uint32(0)

// ForgeOptions shape the forger's region and hello.
type ForgeOptions struct {
	RegionSize  int // default 2 MiB
	RingEntries int // default 64
	SlotCount   int // default 64
	MaxMessage  int // default 64 KiB
	// CorruptHeader, if set, is applied to the region header (raw bytes)
	// before the region is sent.
	CorruptHeader func(hdr []byte)
	// HandshakeTimeout bounds the handshake; default 5 s.
	HandshakeTimeout time.Duration
	// Sparse leaves the region's pages unreserved (no fallocate), as a
	// peer that wants us to fault its pages in and pay for them would.
	Sparse bool
	// Probe, if set, is filled with what the forger could do to the
	// server's region through the descriptor it received.
	Probe *Probe
}

// Probe records attempts on the server's region through its memfd: each
// error is nil if the attempt succeeded (a breach).
type Probe struct {
	MapWritable, Write, Grow, Shrink, Unseal error
	Seals                                    int
}

func probe(fd int, p *Probe) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		p.MapWritable, p.Write, p.Grow, p.Shrink, p.Unseal = err, err, err, err, err
		return
	}
	if m, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
		unix.Munmap(m)
	} else {
		p.MapWritable = err
	}
	if _, err := unix.Pwrite(fd, []byte{0xee}, 0); err != nil {
		p.Write = err
	}
	if err := unix.Ftruncate(fd, st.Size*2); err != nil {
		p.Grow = err
	}
	if err := unix.Ftruncate(fd, st.Size/2); err != nil {
		p.Shrink = err
	}
	// Adding a seal is all fcntl allows; once F_SEAL_SEAL is set even that fails.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_WRITE); err != nil {
		p.Unseal = err
	}
	p.Seals, _ = unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
}

func (o *ForgeOptions) defaults() {
	if o.RegionSize == 0 {
		o.RegionSize = 2 << 20
	}
	if o.RingEntries == 0 {
		o.RingEntries = 64
	}
	if o.SlotCount == 0 {
		o.SlotCount = 64
	}
	if o.MaxMessage == 0 {
		o.MaxMessage = 64 << 10
	}
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = 5 * time.Second
	}
}

// Forger is a client session made by hand. Its region is writable at will.
type Forger struct {
	Conn *net.UnixConn
	mem  []byte // our region, read-write (we do not seal against writes)
	fd   int
	geo  geometry
	tail uint64
	rel  uint64
}

type geometry struct {
	size, ringOff, ringEntries, relOff, relEntries, slotOff, slotCount, arenaOff, arenaSize uint64
}

func roundUp(x, to uint64) uint64 { return (x + to - 1) / to * to }

func nextPow2(x uint64) uint64 {
	p := uint64(1)
	for p < x {
		p <<= 1
	}
	return p
}

func computeGeometry(size, ringEntries, relEntries, slotCount uint64) geometry {
	g := geometry{size: size, ringEntries: ringEntries, relEntries: relEntries, slotCount: slotCount}
	g.ringOff = headerSize
	g.relOff = g.ringOff + ringEntries*descSize
	g.slotOff = roundUp(g.relOff+relEntries*8, 64)
	g.arenaOff = roundUp(g.slotOff+slotCount*64, pageSize)
	if g.arenaOff < size {
		g.arenaSize = (size - g.arenaOff) / blockSize * blockSize
	}
	return g
}

type hello struct {
	MinVersion, MaxVersion, Version uint16
	WakeMode, Status                uint8
	RegionSize                      uint64
	RingEntries, SlotCount          uint32
	MaxMessage                      uint64
	PID                             uint32
	Reason                          string
}

func (h *hello) encode() []byte {
	b := make([]byte, helloSize)
	le := binary.LittleEndian
	le.PutUint16(b[0:], h.MinVersion)
	le.PutUint16(b[2:], h.MaxVersion)
	le.PutUint16(b[4:], h.Version)
	b[6], b[7] = h.WakeMode, h.Status
	le.PutUint64(b[8:], h.RegionSize)
	le.PutUint32(b[16:], h.RingEntries)
	le.PutUint32(b[20:], h.SlotCount)
	le.PutUint64(b[24:], h.MaxMessage)
	le.PutUint32(b[32:], h.PID)
	b[36] = byte(len(h.Reason))
	copy(b[40:], h.Reason)
	return b
}

func decodeHello(b []byte) hello {
	le := binary.LittleEndian
	h := hello{
		MinVersion: le.Uint16(b[0:]), MaxVersion: le.Uint16(b[2:]), Version: le.Uint16(b[4:]),
		WakeMode: b[6], Status: b[7], RegionSize: le.Uint64(b[8:]),
		RingEntries: le.Uint32(b[16:]), SlotCount: le.Uint32(b[20:]), MaxMessage: le.Uint64(b[24:]), PID: le.Uint32(b[32:]),
	}
	if n := int(b[36]); n <= 64 {
		h.Reason = string(b[40 : 40+n])
	}
	return h
}

// ErrRefused is returned by Forge when the server refuses the handshake.
var ErrRefused = errors.New("misbehave: server refused the handshake")

// Forge connects to a kshm listener at path and performs the client
// handshake by hand with a region it builds itself.
func Forge(ctx context.Context, path string, o ForgeOptions) (*Forger, error) {
	o.defaults()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	conn := c.(*net.UnixConn)
	f, err := forge(conn, o)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return f, nil
}

func forge(conn *net.UnixConn, o ForgeOptions) (*Forger, error) {
	conn.SetDeadline(time.Now().Add(o.HandshakeTimeout))
	mine := hello{MinVersion: 1, MaxVersion: 1, RegionSize: uint64(o.RegionSize), RingEntries: uint32(o.RingEntries),
		SlotCount: uint32(o.SlotCount), MaxMessage: uint64(o.MaxMessage), PID: uint32(os.Getpid())}
	if _, err := conn.Write(append(preface[:], mine.encode()...)); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	b := make([]byte, helloSize)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(b, oob)
	if err != nil {
		return nil, fmt.Errorf("read server hello: %w", err)
	}
	srvFD := -1
	if oobn > 0 {
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if fds, err := unix.ParseUnixRights(&m); err == nil {
					for _, fd := range fds {
						if srvFD < 0 {
							srvFD = fd
						} else {
							unix.Close(fd)
						}
					}
				}
			}
		}
	}
	if srvFD >= 0 {
		if o.Probe != nil {
			probe(srvFD, o.Probe)
		}
		// We never read the server's region: a forger only writes.
		unix.Close(srvFD)
	}
	if _, err := io.ReadFull(conn, b[n:]); err != nil {
		return nil, fmt.Errorf("read server hello: %w", err)
	}
	srv := decodeHello(b)
	if srv.Status != 0 {
		return nil, fmt.Errorf("%w: %s", ErrRefused, srv.Reason)
	}
	g := computeGeometry(uint64(o.RegionSize), uint64(o.RingEntries), nextPow2(uint64(srv.SlotCount)), uint64(o.SlotCount))
	fd, err := unix.MemfdCreate("kshm-forged", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, err
	}
	f := &Forger{Conn: conn, fd: fd, geo: g}
	if err := unix.Ftruncate(fd, int64(g.size)); err != nil {
		f.unmap()
		return nil, err
	}
	if !o.Sparse {
		if err := unix.Fallocate(fd, 0, 0, int64(g.size)); err != nil {
			f.unmap()
			return nil, err
		}
	}
	f.mem, err = unix.Mmap(fd, 0, int(g.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.unmap()
		return nil, err
	}
	f.writeHeader(uint64(o.MaxMessage), srv.PID)
	if o.CorruptHeader != nil {
		o.CorruptHeader(f.mem[:headerSize])
	}
	// The engine requires the region sealed against resizing; a forger
	// keeps write access (no F_SEAL_FUTURE_WRITE).
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
		f.unmap()
		return nil, err
	}
	mine.Version = srv.Version
	if _, _, err := conn.WriteMsgUnix(mine.encode(), unix.UnixRights(fd), nil); err != nil {
		f.unmap()
		return nil, fmt.Errorf("send region: %w", err)
	}
	var rf [frameHdrSize]byte
	if _, err := io.ReadFull(conn, rf[:]); err != nil {
		f.unmap()
		return nil, fmt.Errorf("%w: no ready frame: %v", ErrRefused, err)
	}
	if rf[0] != FrameReady {
		f.unmap()
		return nil, fmt.Errorf("%w: expected ready frame, got % x", ErrRefused, rf)
	}
	conn.SetDeadline(time.Time{})
	return f, nil
}

func (f *Forger) writeHeader(maxMessage uint64, peerPID uint32) {
	le := binary.LittleEndian
	h := f.mem
	g := f.geo
	le.PutUint64(h[0:], regionMagic)
	le.PutUint32(h[8:], layoutVer)
	le.PutUint32(h[12:], headerSize)
	le.PutUint64(h[16:], g.size)
	le.PutUint64(h[24:], g.ringOff)
	le.PutUint32(h[32:], uint32(g.ringEntries))
	le.PutUint32(h[36:], descSize)
	le.PutUint64(h[40:], g.relOff)
	le.PutUint32(h[48:], uint32(g.relEntries))
	le.PutUint32(h[52:], uint32(g.slotCount))
	le.PutUint64(h[56:], g.slotOff)
	le.PutUint64(h[64:], g.arenaOff)
	le.PutUint64(h[72:], g.arenaSize)
	le.PutUint64(h[80:], maxMessage)
	le.PutUint32(h[88:], blockSize)
	le.PutUint32(h[92:], uint32(os.Getpid()))
	le.PutUint64(h[96:], uint64(time.Now().UnixNano()))
	le.PutUint32(h[104:], roleClient)
	le.PutUint32(h[108:], peerPID)
	le.PutUint64(h[120:], g.size) // MaxTotal: the forger's regions never grow on their own
}

// FrameGrow announces a grown region (index u32, 0 u32, size u64) with its
// memfd.
const FrameGrow = 5

// AnnounceRegion makes a grown region of size bytes with the given index, as
// the engine would (reserved, sealed against resizing, a valid grown header
// claiming maxTotal bytes of regions at most), and announces it with a
// frameGrow carrying its memfd. The forger keeps no mapping of it.
func (f *Forger) AnnounceRegion(index uint32, size, maxTotal uint64) error {
	fd, err := unix.MemfdCreate("kshm-forged", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return err
	}
	if err := unix.Fallocate(fd, 0, 0, int64(size)); err != nil {
		return err
	}
	h := make([]byte, headerSize)
	le := binary.LittleEndian
	le.PutUint64(h[0:], regionMagic)
	le.PutUint32(h[8:], layoutVer)
	le.PutUint32(h[12:], headerSize)
	le.PutUint64(h[16:], size)
	le.PutUint32(h[36:], descSize)
	le.PutUint64(h[64:], headerSize)
	le.PutUint64(h[72:], (size-headerSize)/blockSize*blockSize)
	le.PutUint64(h[80:], 64<<10)
	le.PutUint32(h[88:], blockSize)
	le.PutUint32(h[92:], uint32(os.Getpid()))
	le.PutUint32(h[104:], roleClient)
	le.PutUint32(h[112:], index)
	le.PutUint64(h[120:], maxTotal)
	if _, err := unix.Pwrite(fd, h, 0); err != nil {
		return err
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
		return err
	}
	b := make([]byte, frameHdrSize+16)
	b[0] = FrameGrow
	le.PutUint32(b[4:], 16)
	le.PutUint32(b[frameHdrSize:], index)
	le.PutUint64(b[frameHdrSize+8:], size)
	_, _, err = f.Conn.WriteMsgUnix(b, unix.UnixRights(fd), nil)
	return err
}

// Header returns the raw bytes of the forger's region header, writable.
func (f *Forger) Header() []byte { return f.mem[:headerSize] }

// Arena returns the forger's payload arena, writable.
func (f *Forger) Arena() []byte { return f.mem[f.geo.arenaOff : f.geo.arenaOff+f.geo.arenaSize] }

// ArenaSize is len(Arena()).
func (f *Forger) ArenaSize() uint64 { return f.geo.arenaSize }

// RingEntries is the size of the forger's send ring.
func (f *Forger) RingEntries() uint64 { return f.geo.ringEntries }

// Tail is the next sequence number of the forger's send ring.
func (f *Forger) Tail() uint64 { return f.tail }

func (f *Forger) word(off uint64) *uint64 { return (*uint64)(unsafe.Pointer(&f.mem[off])) }

// Publish writes the descriptors into the send ring at its tail, exactly as
// given (Seq included), publishes them and sends a wake-up frame.
func (f *Forger) Publish(ds ...Desc) error {
	le := binary.LittleEndian
	for _, d := range ds {
		off := f.geo.ringOff + (f.tail&(f.geo.ringEntries-1))*descSize
		e := f.mem[off : off+descSize]
		clear(e)
		le.PutUint64(e[0:], d.ID)
		le.PutUint64(e[8:], d.Aux)
		le.PutUint64(e[16:], d.Off)
		le.PutUint32(e[24:], d.Len)
		le.PutUint32(e[28:], d.Slot)
		le.PutUint32(e[32:], d.Gen)
		le.PutUint32(e[36:], d.Seq)
		le.PutUint16(e[40:], d.Kind)
		le.PutUint16(e[42:], d.Flags)
		f.tail++
	}
	atomic.StoreUint64(f.word(offRingTail), f.tail)
	return f.WriteFrame(FrameWake, nil)
}

// SendValid sends payload as a well-formed one-segment message in arena
// slot slot (generation 1): the forger can also behave. The forger never
// reads the server's release ring, so it can do this at most SlotCount
// times per session before the server finds its release ring full.
func (f *Forger) SendValid(id uint64, slot uint32, payload []byte) error {
	off := (uint64(slot) * (64 << 10)) % (f.geo.arenaSize - uint64(len(payload)))
	copy(f.Arena()[off:], payload)
	return f.Publish(Desc{ID: id, Off: off, Len: uint32(len(payload)), Slot: slot, Gen: 1, Seq: uint32(f.tail)})
}

// SetRingTail stores v as the producer index of the send ring (a runaway
// index when v is far ahead) and sends a wake-up.
func (f *Forger) SetRingTail(v uint64) error {
	f.tail = v
	atomic.StoreUint64(f.word(offRingTail), v)
	return f.WriteFrame(FrameWake, nil)
}

// SetState stores v as the state word of the forger's receiver (sleepers in
// the low 32 bits, the sleep epoch in the high 32), as if it slept.
func (f *Forger) SetState(v uint64) {
	atomic.StoreUint64(f.word(offState), v)
}

// SetPeerRingHead stores v as our consumer index of the server's ring.
func (f *Forger) SetPeerRingHead(v uint64) {
	atomic.StoreUint64(f.word(offPeerRingHead), v)
}

// Release pushes raw release entries (slot<<32 | generation) to the release
// ring and publishes them: releases of buffers the forger never held are
// corrupt input for the server.
func (f *Forger) Release(tokens ...uint64) error {
	for _, t := range tokens {
		off := f.geo.relOff + (f.rel&(f.geo.relEntries-1))*8
		atomic.StoreUint64(f.word(off), t)
		f.rel++
	}
	atomic.StoreUint64(f.word(offRelTail), f.rel)
	return f.WriteFrame(FrameWake, nil)
}

// WriteFrame writes one frame (8-byte header, then payload) on the socket.
func (f *Forger) WriteFrame(typ byte, payload []byte) error {
	return writeFrame(f.Conn, typ, payload)
}

func writeFrame(w io.Writer, typ byte, payload []byte) error {
	b := make([]byte, frameHdrSize+len(payload))
	b[0] = typ
	binary.LittleEndian.PutUint32(b[4:], uint32(len(payload)))
	copy(b[frameHdrSize:], payload)
	_, err := w.Write(b)
	return err
}

// WaitClosed reads the socket until the server closes it, and returns the
// reason of the server's close frame ("" if it sent none), or an error if
// the deadline passes first.
func (f *Forger) WaitClosed(timeout time.Duration) (string, error) {
	return waitClosed(f.Conn, timeout)
}

func waitClosed(c net.Conn, timeout time.Duration) (string, error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	reason := ""
	var hdr [frameHdrSize]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return reason, fmt.Errorf("server did not close within %v", timeout)
			}
			return reason, nil // EOF or reset: closed
		}
		n := binary.LittleEndian.Uint32(hdr[4:])
		if n > 64<<20+24 {
			return reason, fmt.Errorf("frame of %d bytes from the server", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(c, body); err != nil {
			return reason, nil
		}
		if hdr[0] == FrameClose {
			reason = string(body)
		}
	}
}

// Close closes the socket and unmaps the region.
func (f *Forger) Close() error {
	err := f.Conn.Close()
	f.unmap()
	return err
}

func (f *Forger) unmap() {
	if f.mem != nil {
		unix.Munmap(f.mem)
		f.mem = nil
	}
	if f.fd >= 0 {
		unix.Close(f.fd)
		f.fd = -1
	}
}
