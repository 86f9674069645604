package shm

import (
	"encoding/binary"
	"fmt"
)

// The session socket carries, in order: the client's preface and hello; the
// server's hello with its memfd; the client's hello (ack) with its memfd; the
// server's ready frame. After that, frames (see frame.go).

// PrefaceSize is the number of bytes a kshm client sends first. The first
// four, read as a big-endian length, are larger than any Kitex frame, and
// the first byte is no HTTP/2 or TTHeader/Thrift magic, so a server can tell
// a kshm client from a plain Kitex client on the same socket.
const PrefaceSize = 8

var preface = [PrefaceSize]byte{0xff, 'K', 'S', 'H', 'M', 0x00, 0x00, 0x01}

// IsPreface reports whether b begins with the kshm preface.
func IsPreface(b []byte) bool {
	return len(b) >= PrefaceSize && [PrefaceSize]byte(b[:PrefaceSize]) == preface
}

const (
	protoMinVersion = 1
	protoMaxVersion = 1
	helloSize       = 128
	reasonSize      = 64
)

// hello is what each side tells the other about itself.
type hello struct {
	MinVersion  uint16
	MaxVersion  uint16
	Version     uint16 // chosen version (server's hello and the client's ack)
	WakeMode    uint8
	Status      uint8 // 0 ok; otherwise the sender refuses, Reason says why
	RegionSize  uint64
	RingEntries uint32
	SlotCount   uint32 // the sender's MaxBuffers
	MaxMessage  uint64
	PID         uint32
	Reason      string // at most reasonSize bytes on the wire
	// MaxInline is the largest inline message the sender accepts (offset
	// 104). 0, from a peer that predates it, means MaxInlineSize.
	MaxInline uint64
	// MaxTotal is the most bytes of all the sender's regions together
	// (offset 112): the base region may grow up to it. 0 means RegionSize.
	MaxTotal uint64
	// PeerCap is the most bytes of the receiver's regions the sender maps
	// (offset 120), the limit of the receiver's growth. 0 means no growth.
	PeerCap uint64
}

const (
	statusOK      = 0
	statusRefused = 1
)

func (h *hello) encode() []byte {
	b := make([]byte, helloSize)
	le := binary.LittleEndian
	le.PutUint16(b[0:], h.MinVersion)
	le.PutUint16(b[2:], h.MaxVersion)
	le.PutUint16(b[4:], h.Version)
	b[6] = h.WakeMode
	b[7] = h.Status
	le.PutUint64(b[8:], h.RegionSize)
	le.PutUint32(b[16:], h.RingEntries)
	le.PutUint32(b[20:], h.SlotCount)
	le.PutUint64(b[24:], h.MaxMessage)
	le.PutUint32(b[32:], h.PID)
	r := h.Reason
	if len(r) > reasonSize {
		r = r[:reasonSize]
	}
	b[36] = byte(len(r))
	copy(b[40:40+reasonSize], r)
	le.PutUint64(b[104:], h.MaxInline)
	le.PutUint64(b[112:], h.MaxTotal)
	le.PutUint64(b[120:], h.PeerCap)
	return b
}

// decodeHello parses and checks a hello from the peer. Every field is range
// checked; the peer's bytes are untrusted.
func decodeHello(b []byte) (hello, error) {
	if len(b) != helloSize {
		return hello{}, fmt.Errorf("%w: hello of %d bytes, want %d", ErrHandshake, len(b), helloSize)
	}
	le := binary.LittleEndian
	h := hello{
		MinVersion:  le.Uint16(b[0:]),
		MaxVersion:  le.Uint16(b[2:]),
		Version:     le.Uint16(b[4:]),
		WakeMode:    b[6],
		Status:      b[7],
		RegionSize:  le.Uint64(b[8:]),
		RingEntries: le.Uint32(b[16:]),
		SlotCount:   le.Uint32(b[20:]),
		MaxMessage:  le.Uint64(b[24:]),
		PID:         le.Uint32(b[32:]),
		MaxInline:   le.Uint64(b[104:]),
		MaxTotal:    le.Uint64(b[112:]),
		PeerCap:     le.Uint64(b[120:]),
	}
	n := int(b[36])
	if n > reasonSize {
		return hello{}, fmt.Errorf("%w: hello reason length %d", ErrHandshake, n)
	}
	h.Reason = sanitize(b[40 : 40+n])
	if h.Status != statusOK {
		if h.Status != statusRefused {
			return hello{}, fmt.Errorf("%w: unknown hello status %d", ErrHandshake, h.Status)
		}
		return h, nil
	}
	if h.MinVersion == 0 || h.MinVersion > h.MaxVersion {
		return hello{}, fmt.Errorf("%w: version range [%d, %d]", ErrHandshake, h.MinVersion, h.MaxVersion)
	}
	if h.WakeMode > uint8(WakeTimed) {
		return hello{}, fmt.Errorf("%w: wake mode %d", ErrHandshake, h.WakeMode)
	}
	if h.RegionSize < MinRegionSize || h.RegionSize > MaxRegionSize {
		return hello{}, fmt.Errorf("%w: region size %d", ErrHandshake, h.RegionSize)
	}
	if h.RingEntries < MinRingEntries || h.RingEntries > MaxRingEntries || h.RingEntries&(h.RingEntries-1) != 0 {
		return hello{}, fmt.Errorf("%w: ring entries %d", ErrHandshake, h.RingEntries)
	}
	if h.SlotCount == 0 || h.SlotCount > h.RingEntries {
		return hello{}, fmt.Errorf("%w: slot count %d", ErrHandshake, h.SlotCount)
	}
	if h.MaxTotal == 0 {
		h.MaxTotal = h.RegionSize
	}
	if h.MaxTotal < h.RegionSize || h.MaxTotal > MaxRegionSize {
		return hello{}, fmt.Errorf("%w: maximum total %d for a region of %d", ErrHandshake, h.MaxTotal, h.RegionSize)
	}
	if h.PeerCap > MaxRegionSize {
		return hello{}, fmt.Errorf("%w: peer region cap %d", ErrHandshake, h.PeerCap)
	}
	if h.MaxMessage < MinMaxMessageSize || h.MaxMessage > h.MaxTotal {
		return hello{}, fmt.Errorf("%w: max message %d", ErrHandshake, h.MaxMessage)
	}
	if h.MaxInline == 0 {
		h.MaxInline = MaxInlineSize
	}
	if h.MaxInline < MinMaxMessageSize || h.MaxInline > MaxInlineSize {
		return hello{}, fmt.Errorf("%w: max inline message %d", ErrHandshake, h.MaxInline)
	}
	return h, nil
}

// negotiate picks the highest version both sides speak.
func negotiate(peer hello) (uint16, error) {
	v := uint16(protoMaxVersion)
	if peer.MaxVersion < v {
		v = peer.MaxVersion
	}
	if v < protoMinVersion || v < peer.MinVersion {
		return 0, fmt.Errorf("%w: no common version: ours [%d, %d], peer's [%d, %d]",
			ErrHandshake, protoMinVersion, protoMaxVersion, peer.MinVersion, peer.MaxVersion)
	}
	return v, nil
}

func sanitize(b []byte) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c >= 0x20 && c < 0x7f {
			out = append(out, c)
		} else {
			out = append(out, '?')
		}
	}
	return string(out)
}
