package codec

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/shmkit/kshm/shm"
)

func smallConfig() shm.Config {
	c := shm.DefaultConfig()
	c.RegionSize = 4 << 20
	c.MaxMessageSize = 1 << 20
	c.RingEntries = 256
	return c
}

// pair returns a connected sender and receiver session in this process (the
// codec does not depend on the peer being another process; the transport's
// tests cross processes).
func pair(t testing.TB, cfg shm.Config) (snd, rcv *shm.Session) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := shm.Listen(path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	snd, err = shm.Dial(ctx, path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rcv, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snd.Close(); rcv.Close() })
	return snd, rcv
}

func recv(t testing.TB, s *shm.Session) shm.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := s.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func pattern(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// waitFree waits until the sender has reclaimed every buffer the receiver
// released (reclaim happens on the next allocation or housekeeping).
func waitFree(t testing.TB, s *shm.Session) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := s.Stats()
		if st.InUseBuffers == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sender still has %d buffers (%d bytes) in use", st.InUseBuffers, st.InUseBytes)
		}
		if b, err := s.Alloc(512); err == nil { // an allocation reclaims
			s.Free(b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// write encodes pieces the way Kitex does: a length field Malloc'd first and
// patched after the rest is written.
func write(t testing.TB, w *WriteBuffer, pieces ...[]byte) []byte {
	t.Helper()
	lenField, err := w.Malloc(4)
	if err != nil {
		t.Fatal(err)
	}
	var want []byte
	want = append(want, 0, 0, 0, 0)
	for i, p := range pieces {
		if i%2 == 0 {
			buf, err := w.Malloc(len(p))
			if err != nil {
				t.Fatal(err)
			}
			copy(buf, p)
		} else if _, err := w.WriteBinary(p); err != nil {
			t.Fatal(err)
		}
		want = append(want, p...)
	}
	n := w.WrittenLen() - 4
	lenField[0], lenField[1], lenField[2], lenField[3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
	copy(want, lenField)
	if w.WrittenLen() != len(want) {
		t.Fatalf("WrittenLen %d, want %d", w.WrittenLen(), len(want))
	}
	return want
}

func readAll(t testing.TB, r *ReadBuffer) []byte {
	t.Helper()
	var got []byte
	for r.ReadableLen() > 0 {
		n := r.ReadableLen()
		if n > 1000 {
			n = 1000
		}
		p, err := r.Next(n)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, p...)
	}
	return got
}

func TestWriteBuffer_RoundTrip(t *testing.T) {
	snd, rcv := pair(t, smallConfig())
	sizes := [][]int{
		{0},
		{1, 2, 3},
		{100},
		{3000},                         // larger than the first segment
		{10, 20, 5000, 7, 70000, 1, 2}, // several segments
		{900 << 10},                    // near the maximum message size
	}
	for i, sz := range sizes {
		var pieces [][]byte
		for j, n := range sz {
			pieces = append(pieces, pattern(n, int64(i*100+j)))
		}
		w := NewWriteBuffer(context.Background(), snd, uint64(i+1), 42, KindRequest)
		want := write(t, w, pieces...)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if sent, inline := w.Outcome(); !sent || inline {
			t.Fatalf("case %d: sent=%v inline=%v, want shared memory", i, sent, inline)
		}
		w.Release(nil)

		m := recv(t, rcv)
		if m.ID != uint64(i+1) || m.Aux != 42 || m.Kind != KindRequest || m.Inline() {
			t.Fatalf("case %d: got id %d aux %d kind %d inline %v", i, m.ID, m.Aux, m.Kind, m.Inline())
		}
		r := NewReadBuffer(rcv, &m)
		got := readAll(t, r)
		if !bytes.Equal(got, want) {
			t.Fatalf("case %d: payload differs (got %d bytes, want %d)", i, len(got), len(want))
		}
		if r.ReadLen() != len(want) {
			t.Fatalf("ReadLen %d, want %d", r.ReadLen(), len(want))
		}
		r.Release(nil)
	}
	waitFree(t, snd)
}

// A Next inside one segment returns the peer's memory itself.
func TestReadBuffer_NextIsZeroCopyWithinSegment(t *testing.T) {
	snd, rcv := pair(t, smallConfig())
	payload := pattern(64<<10, 7)
	w := NewWriteBuffer(context.Background(), snd, 1, 0, KindRequest)
	hdr, _ := w.Malloc(8) // header piece in the first segment
	copy(hdr, "HEADER!!")
	p, _ := w.Malloc(len(payload)) // payload: its own segment
	copy(p, payload)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	w.Release(nil)

	m := recv(t, rcv)
	r := NewReadBuffer(rcv, &m)
	defer r.Release(nil)
	h, err := r.Next(8)
	if err != nil || string(h) != "HEADER!!" {
		t.Fatalf("header %q, %v", h, err)
	}
	got, err := r.Next(len(payload))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("payload differs")
	}
	inSegment := false
	for i := 0; i < m.NumSegments(); i++ {
		seg := m.Segment(i)
		if len(seg) > 0 && unsafe.SliceData(seg) == unsafe.SliceData(got) {
			inSegment = true
		}
	}
	if !inSegment {
		t.Fatal("Next within a segment copied instead of returning shared memory")
	}
	if _, err := r.Next(1); err == nil {
		t.Fatal("Next past the end succeeded")
	}
}

// Reads that cross segments return correct copies; Peek does not advance.
func TestReadBuffer_AcrossSegments(t *testing.T) {
	snd, rcv := pair(t, smallConfig())
	a, b := pattern(2048, 1), pattern(4000, 2) // a fills the first segment exactly
	w := NewWriteBuffer(context.Background(), snd, 1, 0, KindRequest)
	pa, _ := w.Malloc(len(a))
	copy(pa, a)
	pb, _ := w.Malloc(len(b))
	copy(pb, b)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	w.Release(nil)
	m := recv(t, rcv)
	if m.NumSegments() != 2 {
		t.Fatalf("%d segments, want 2", m.NumSegments())
	}
	want := append(append([]byte{}, a...), b...)
	r := NewReadBuffer(rcv, &m)
	defer r.Release(nil)
	if err := r.Skip(2040); err != nil {
		t.Fatal(err)
	}
	pk, err := r.Peek(16)
	if err != nil || !bytes.Equal(pk, want[2040:2056]) {
		t.Fatalf("Peek across segments: %v", err)
	}
	nx, err := r.Next(16)
	if err != nil || !bytes.Equal(nx, want[2040:2056]) {
		t.Fatalf("Next across segments: %v", err)
	}
	buf := make([]byte, 100)
	if _, err := r.ReadBinary(buf); err != nil || !bytes.Equal(buf, want[2056:2156]) {
		t.Fatalf("ReadBinary: %v", err)
	}
	s, err := r.ReadString(10)
	if err != nil || s != string(want[2156:2166]) {
		t.Fatalf("ReadString: %v", err)
	}
	rest, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(rest, want[2166:]) {
		t.Fatalf("Read rest: %v", err)
	}
}

// When the arena cannot supply a buffer mid-encode, the message still
// arrives whole, over the socket, and every shm buffer goes back.
func TestWriteBuffer_FallsBackInlineWhenArenaFull(t *testing.T) {
	cfg := smallConfig()
	cfg.RegionSize = shm.MinRegionSize
	cfg.MaxMessageSize = 64 << 10
	snd, rcv := pair(t, cfg)
	for i, sz := range []int{100 << 10, 2 << 20} { // larger than the maximum message
		head, body := pattern(100, int64(i)), pattern(sz, int64(i+10))
		w := NewWriteBuffer(context.Background(), snd, uint64(i+1), 9, KindResponse)
		want := write(t, w, head, body)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if sent, inline := w.Outcome(); !sent || !inline {
			t.Fatalf("sent=%v inline=%v, want inline", sent, inline)
		}
		w.Release(nil)
		m := recv(t, rcv)
		if !m.Inline() || m.ID != uint64(i+1) || m.Aux != 9 || m.Kind != KindResponse {
			t.Fatalf("got inline=%v id=%d aux=%d kind=%d", m.Inline(), m.ID, m.Aux, m.Kind)
		}
		r := NewReadBuffer(rcv, &m)
		if got := readAll(t, r); !bytes.Equal(got, want) {
			t.Fatalf("inline payload differs (%d vs %d bytes)", len(got), len(want))
		}
		r.Release(nil)
	}
	waitFree(t, snd)
}

// More than MaxSegments pieces that each need a buffer: the message is
// gathered into one buffer at Flush.
func TestWriteBuffer_MoreThanMaxSegments(t *testing.T) {
	snd, rcv := pair(t, smallConfig())
	var pieces [][]byte
	for i := 0; i < shm.MaxSegments+3; i++ {
		pieces = append(pieces, pattern(3000+i, int64(i)))
	}
	w := NewWriteBuffer(context.Background(), snd, 5, 0, KindRequest)
	want := write(t, w, pieces...)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, inline := w.Outcome(); inline {
		t.Fatal("went inline although shared memory had room")
	}
	w.Release(nil)
	m := recv(t, rcv)
	r := NewReadBuffer(rcv, &m)
	if got := readAll(t, r); !bytes.Equal(got, want) {
		t.Fatal("payload differs")
	}
	r.Release(nil)
	waitFree(t, snd)
}

// Released without Flush (an encode error): every buffer is freed.
func TestWriteBuffer_ReleaseWithoutFlushFrees(t *testing.T) {
	snd, _ := pair(t, smallConfig())
	w := NewWriteBuffer(context.Background(), snd, 1, 0, KindRequest)
	write(t, w, pattern(5000, 1), pattern(10, 2))
	w.Release(errors.New("encode failed"))
	if st := snd.Stats(); st.InUseBuffers != 0 {
		t.Fatalf("%d buffers in use after Release", st.InUseBuffers)
	}
}

type errSource struct{ err error }

func (e errSource) Wait() (*shm.Session, *shm.Message, error) { return nil, nil, e.err }

func TestReadBuffer_LazySourceError(t *testing.T) {
	r := NewLazyReadBuffer(errSource{shm.ErrTimeout})
	if _, err := r.Peek(4); !errors.Is(err, shm.ErrTimeout) {
		t.Fatalf("Peek: %v, want the source's error", err)
	}
	if _, err := r.Next(4); !errors.Is(err, shm.ErrTimeout) {
		t.Fatalf("Next: %v", err)
	}
	if r.ReadableLen() != -1 {
		t.Fatal("ReadableLen of a failed source should be -1")
	}
	r.Release(nil)
}

func BenchmarkWriteRead_1KiB(b *testing.B) {
	snd, rcv := pair(b, smallConfig())
	payload := pattern(1024, 1)
	ctx := context.Background()
	var m shm.Message
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		w := NewWriteBuffer(ctx, snd, uint64(i+1), 0, KindRequest)
		h, _ := w.Malloc(4)
		h[0] = 1
		p, _ := w.Malloc(len(payload))
		copy(p, payload)
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
		w.Release(nil)
		var err error
		if m, err = rcv.Recv(ctx); err != nil { // m lives outside the loop, as in the transport's conns
			b.Fatal(err)
		}
		r := NewReadBuffer(rcv, &m)
		if _, err := r.Next(4 + len(payload)); err != nil {
			b.Fatal(err)
		}
		r.Release(nil)
	}
}

// FuzzReadBuffer reads a message of random segments with a random sequence
// of Next/Peek/Skip/ReadBinary/ReadString and checks every result against a
// plain byte slice: reads never go out of bounds, never panic, and return
// exactly the message's bytes.
func FuzzReadBuffer(f *testing.F) {
	f.Add([]byte("hello, shared memory"), []byte{3, 0, 7}, []byte{1, 4, 2, 9, 0, 3, 3, 200})
	f.Add(make([]byte, 5000), []byte{255, 255, 10}, []byte{0, 100, 1, 100, 2, 50, 4, 255})
	snd, rcv := pair(f, smallConfig())
	var id uint64
	f.Fuzz(func(t *testing.T, data, splits, ops []byte) {
		id++
		readBufferCase(t, snd, rcv, id, data, splits, ops)
	})
}

func readBufferCase(t *testing.T, snd, rcv *shm.Session, id uint64, data, splits, ops []byte) {
	{
		if len(data) > 64<<10 || len(splits) > shm.MaxSegments-1 {
			return
		}
		// Cut data into up to MaxSegments pieces, each in its own buffer.
		var pieces [][]byte
		rest := data
		for _, s := range splits {
			n := int(s) * 37 % (len(rest) + 1)
			pieces = append(pieces, rest[:n])
			rest = rest[n:]
		}
		pieces = append(pieces, rest)
		var bufs []shm.Buffer
		for _, p := range pieces {
			if len(p) == 0 {
				continue
			}
			b, err := snd.Alloc(len(p))
			if err != nil {
				for _, b := range bufs {
					snd.Free(b)
				}
				t.Skip(err)
			}
			copy(b.Bytes(), p)
			bufs = append(bufs, b)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := snd.Send(ctx, id, 0, KindRequest, bufs...); err != nil {
			t.Fatalf("Send of %d buffers: %v (sender %+v)", len(bufs), err, snd.Stats())
		}
		m := recv(t, rcv)
		r := NewReadBuffer(rcv, &m)
		defer r.Release(nil)

		pos := 0
		for i := 0; i+1 < len(ops); i += 2 {
			n := int(ops[i+1]) * 13
			left := len(data) - pos
			switch ops[i] % 5 {
			case 0:
				p, err := r.Next(n)
				if n > left {
					if err == nil {
						t.Fatalf("Next(%d) with %d left succeeded", n, left)
					}
					continue
				}
				if err != nil || !bytes.Equal(p, data[pos:pos+n]) {
					t.Fatalf("Next(%d) at %d: %v", n, pos, err)
				}
				pos += n
			case 1:
				p, err := r.Peek(n)
				if n > left {
					if err == nil {
						t.Fatalf("Peek(%d) with %d left succeeded", n, left)
					}
					continue
				}
				if err != nil || !bytes.Equal(p, data[pos:pos+n]) {
					t.Fatalf("Peek(%d) at %d: %v", n, pos, err)
				}
			case 2:
				err := r.Skip(n)
				if n > left {
					if err == nil {
						t.Fatalf("Skip(%d) with %d left succeeded", n, left)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				pos += n
			case 3:
				p := make([]byte, n)
				_, err := r.ReadBinary(p)
				if n > left {
					if err == nil {
						t.Fatalf("ReadBinary(%d) with %d left succeeded", n, left)
					}
					continue
				}
				if err != nil || !bytes.Equal(p, data[pos:pos+n]) {
					t.Fatalf("ReadBinary(%d) at %d: %v", n, pos, err)
				}
				pos += n
			case 4:
				s, err := r.ReadString(n)
				if n > left {
					if err == nil {
						t.Fatalf("ReadString(%d) with %d left succeeded", n, left)
					}
					continue
				}
				if err != nil || s != string(data[pos:pos+n]) {
					t.Fatalf("ReadString(%d) at %d: %v", n, pos, err)
				}
				pos += n
			}
			if r.ReadLen() != pos || r.ReadableLen() != len(data)-pos {
				t.Fatalf("ReadLen %d ReadableLen %d, want %d and %d", r.ReadLen(), r.ReadableLen(), pos, len(data)-pos)
			}
		}
	}
}
