package shm

import (
	"encoding/binary"
	"fmt"
)

// After the handshake the session socket carries frames: an 8-byte header
// {type u8, 0 u8, 0 u16, length u32 little-endian} and length bytes.
const (
	frameHeaderSize = 8
	frameWake       = 1 // the peer made progress: recheck rings
	frameClose      = 2 // the peer is closing; payload: reason text
	frameInline     = 3 // a message carried on the socket (fallback)
	frameReady      = 4 // end of handshake
	frameGrow       = 5 // a new region of the sender: index, size; its memfd rides with the frame (grow.go)
	frameGrowAck    = 6 // the sender has mapped our region: index
	frameShrink     = 7 // the sender has released its region: index

	inlineMetaSize = 24 // id u64, aux u64, kind u16, 6 bytes zero
	maxCloseReason = 256
	// MaxInlineSize bounds a message carried on the socket, whatever the
	// configuration (Config.MaxInlineSize, at most this, is the limit in
	// force).
	MaxInlineSize = 64 << 20
)

type frameHeader struct {
	Type uint8
	Len  uint32
}

func putFrameHeader(b []byte, typ uint8, n uint32) {
	b[0], b[1], b[2], b[3] = typ, 0, 0, 0
	binary.LittleEndian.PutUint32(b[4:], n)
}

// parseFrameHeader checks a frame header from the peer.
func parseFrameHeader(b []byte) (frameHeader, error) {
	if len(b) < frameHeaderSize {
		return frameHeader{}, fmt.Errorf("%w: short frame header", ErrCorrupt)
	}
	h := frameHeader{Type: b[0], Len: binary.LittleEndian.Uint32(b[4:])}
	if b[1] != 0 || b[2] != 0 || b[3] != 0 {
		return h, fmt.Errorf("%w: frame header reserved bytes % x", ErrCorrupt, b[1:4])
	}
	switch h.Type {
	case frameWake, frameReady:
		if h.Len != 0 {
			return h, fmt.Errorf("%w: frame type %d with %d payload bytes", ErrCorrupt, h.Type, h.Len)
		}
	case frameClose:
		if h.Len > maxCloseReason {
			return h, fmt.Errorf("%w: close reason of %d bytes", ErrCorrupt, h.Len)
		}
	case frameGrow:
		if h.Len != growFrameSize {
			return h, fmt.Errorf("%w: grow frame of %d bytes", ErrCorrupt, h.Len)
		}
	case frameGrowAck, frameShrink:
		if h.Len != regionFrameSize {
			return h, fmt.Errorf("%w: frame type %d of %d bytes", ErrCorrupt, h.Type, h.Len)
		}
	case frameInline:
		if h.Len < inlineMetaSize || h.Len > inlineMetaSize+MaxInlineSize {
			return h, fmt.Errorf("%w: inline frame of %d bytes", ErrCorrupt, h.Len)
		}
	default:
		return h, fmt.Errorf("%w: unknown frame type %d", ErrCorrupt, h.Type)
	}
	return h, nil
}

func putInlineMeta(b []byte, id, aux uint64, kind uint16) {
	le := binary.LittleEndian
	le.PutUint64(b[0:], id)
	le.PutUint64(b[8:], aux)
	le.PutUint16(b[16:], kind)
	clear(b[18:inlineMetaSize])
}

func parseInlineMeta(b []byte) (id, aux uint64, kind uint16, err error) {
	if len(b) < inlineMetaSize {
		return 0, 0, 0, fmt.Errorf("%w: short inline header", ErrCorrupt)
	}
	le := binary.LittleEndian
	for _, c := range b[18:inlineMetaSize] {
		if c != 0 {
			return 0, 0, 0, fmt.Errorf("%w: inline header reserved bytes", ErrCorrupt)
		}
	}
	return le.Uint64(b[0:]), le.Uint64(b[8:]), le.Uint16(b[16:]), nil
}
