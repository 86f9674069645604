package shm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

func FuzzDecodeHello(f *testing.F) {
	good := hello{MinVersion: 1, MaxVersion: 1, RegionSize: 8 << 20, RingEntries: 256, SlotCount: 256, MaxMessage: 1 << 20, PID: 1}
	f.Add(good.encode())
	refused := hello{Status: statusRefused, Reason: "no"}
	f.Add(refused.encode())
	f.Add(make([]byte, helloSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHello(b)
		if err != nil {
			if !errors.Is(err, ErrHandshake) {
				t.Fatalf("error %v does not wrap ErrHandshake", err)
			}
			return
		}
		if h.Status == statusOK {
			// Accepted values must round-trip and be in range.
			if _, err := negotiate(h); err == nil && h.MaxVersion < protoMinVersion {
				t.Fatal("negotiated with a peer below our minimum")
			}
			// A message may be larger than the first region (the session
			// grows for it), never than the regions' maximum total.
			if h.RingEntries&(h.RingEntries-1) != 0 || h.MaxMessage > h.MaxTotal || h.RegionSize > h.MaxTotal {
				t.Fatalf("accepted out-of-range hello %+v", h)
			}
			h2, err := decodeHello(h.encode())
			if err != nil || h2 != h {
				t.Fatalf("round trip: %+v -> %+v, %v", h, h2, err)
			}
		}
	})
}

func FuzzParseFrame(f *testing.F) {
	var b [frameHeaderSize + inlineMetaSize]byte
	putFrameHeader(b[:], frameInline, inlineMetaSize+5)
	putInlineMeta(b[frameHeaderSize:], 1, 2, 3)
	f.Add(b[:])
	putFrameHeader(b[:], frameWake, 0)
	f.Add(b[:frameHeaderSize])
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseFrameHeader(b)
		if err != nil {
			return
		}
		switch h.Type {
		case frameInline:
			if h.Len > inlineMetaSize+MaxInlineSize {
				t.Fatalf("accepted inline frame of %d bytes", h.Len)
			}
			if len(b) >= frameHeaderSize+inlineMetaSize {
				parseInlineMeta(b[frameHeaderSize:])
			}
		case frameClose:
			if h.Len > maxCloseReason {
				t.Fatalf("accepted close frame of %d bytes", h.Len)
			}
		}
	})
}

func FuzzValidateHeader(f *testing.F) {
	r, err := createRegion(2<<20, 64, 64, 64, 64<<10, 2<<20, roleServer, 0)
	if err != nil {
		f.Fatal(err)
	}
	defer r.unmap()
	f.Add(bytes.Clone(r.mem[:headerSize]), uint64(2<<20))
	f.Fuzz(func(t *testing.T, b []byte, mapped uint64) {
		if len(b) < int(unsafe.Sizeof(regionHeader{})) {
			return
		}
		h := (*regionHeader)(unsafe.Pointer(&b[0]))
		g, err := validateHeader(h, mapped)
		if err != nil {
			return
		}
		// Whatever passes must describe parts inside the mapping.
		if g.arenaOff+g.arenaSize > mapped || g.slotOff+g.slotCount*slotSize > g.arenaOff ||
			g.ringOff+g.ringEntries*descSize > g.relOff {
			t.Fatalf("accepted geometry outside the mapping: %+v (mapped %d)", g, mapped)
		}
	})
}

// FuzzRecvDescriptors writes arbitrary descriptors into a live session's ring
// (through the real mapping) and checks that the receiver either delivers a
// message inside the peer's arena or closes the session with ErrCorrupt;
// never a panic or a read outside the mapping.
func FuzzRecvDescriptors(f *testing.F) {
	f.Add([]byte{}, uint8(1))
	seed := make([]byte, descSize)
	binary.LittleEndian.PutUint32(seed[24:], 100)
	f.Add(seed, uint8(1))
	f.Fuzz(func(t *testing.T, raw []byte, count uint8) {
		cli, srv := pair(t, testConfig(), testConfig())
		n := int(count%(MaxSegments+2)) + 1
		ds := make([]desc, n)
		for i := range ds {
			var d desc
			db := unsafe.Slice((*byte)(unsafe.Pointer(&d)), descSize)
			if len(raw) > 0 {
				copy(db, raw[(i*descSize)%len(raw):])
			}
			// Keep sequence numbers right half the time so deeper checks run.
			if len(raw) == 0 || raw[0]&1 == 0 {
				d.Seq = uint32(cli.localTail) + uint32(i)
			}
			ds[i] = d
		}
		publish(cli, ds...)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		m, err := srv.Recv(ctx)
		if err != nil {
			// Every input publishes at least one descriptor: the receiver
			// must deliver it or close the session; a timeout is a hang.
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Recv = %v", err)
			}
			return
		}
		for i := 0; i < m.NumSegments(); i++ {
			seg := m.Segment(i)
			_ = bytes.Count(seg, []byte{0}) // read every byte
		}
		// Release it: the bogus slots then close the session from the
		// client's side, and the mappings can be unmapped.
		srv.Release(&m)
	})
}

// FuzzReleaseEntries writes arbitrary release entries into the client's
// release ring (the real mapping); the server's allocator must either take
// back exactly the buffers the client holds or close the session with
// ErrCorrupt.
func FuzzReleaseEntries(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0}, uint8(1))
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0}, uint8(3))
	f.Fuzz(func(t *testing.T, raw []byte, count uint8) {
		cli, srv := pair(t, testConfig(), testConfig())
		// The client holds three real server buffers.
		var held []Message
		for i := uint64(0); i < 3; i++ {
			send(t, srv, i, []byte{byte(i)})
			m, err := cli.Recv(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, m)
		}
		n := int(count % 8)
		for i := 0; i < n; i++ {
			var tok uint64
			if len(raw) > 0 {
				var b [8]byte
				copy(b[:], raw[(i*8)%len(raw):])
				tok = binary.LittleEndian.Uint64(b[:])
			}
			if len(raw) > 0 && raw[0]&1 == 1 && i < len(held) {
				tok = held[i].tokens[0] // a real one, so the valid path runs too
			}
			atomic.StoreUint64(&cli.local.rel[cli.relTail&(cli.local.geo.relEntries-1)], tok)
			cli.relTail++
		}
		atomic.StoreUint64(&cli.localHdr.RelTail, cli.relTail)
		srv.reclaim()
		for i := range held {
			cli.Release(&held[i])
		}
		if err := srv.Err(); err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("session closed with %v", err)
		}
		if srv.Err() == nil {
			st := srv.Stats()
			if st.InUseBuffers < 0 || st.InUseBuffers > 3 {
				t.Fatalf("in use %d after releases", st.InUseBuffers)
			}
		}
	})
}
