package codec

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cloudwego/kitex/pkg/remote"

	"github.com/shmkit/kshm/shm"
)

const (
	// firstSegment is the size of the first buffer of a message: large enough
	// for Kitex's header pieces (TTHeader with metainfo) and small messages.
	firstSegment = 2 << 10
	// minSegment is the smallest later buffer; a larger Malloc gets exactly
	// what it asks for (the payload arrives in one Malloc).
	minSegment = 2 << 10
	// heapChunk is the smallest Go-heap chunk used after the arena ran out.
	heapChunk = 4 << 10
)

var (
	errNegative       = errors.New("kshm codec: negative size")
	errWriteOnly      = errors.New("kshm codec: write buffer does not support reading")
	errNotSupported   = errors.New("kshm codec: operation not supported by shared-memory buffers")
	errFlushed        = errors.New("kshm codec: write buffer already flushed")
	errTooManySegment = errors.New("kshm codec: message needs more than shm.MaxSegments buffers")
)

// Why messages went over the session socket, process-wide.
var fallbackReasons struct {
	noMemory, quota, tooLarge         atomic.Uint64
	growLimit, growPeer, growNoMemory atomic.Uint64
}

// FallbackReasons are the counts of messages sent over the session socket,
// by the reason shared memory could not take them.
type FallbackReasons struct {
	NoMemory uint64 // the arena had no free block large enough (shm.ErrNoMemory)
	Quota    uint64 // the session had its maximum of buffers in flight (shm.ErrQuota)
	TooLarge uint64 // the message exceeded the maximum message size (shm.ErrTooLarge)
	// Of NoMemory, those for which the regions could not grow: at our
	// maximum (shm.ErrGrowLimit), at the peer's (shm.ErrGrowPeerLimit), or
	// no memory for a new region (shm.ErrInsufficientMemory).
	GrowLimit, GrowPeerLimit, GrowNoMemory uint64
}

// ReadFallbackReasons returns the process-wide counts.
func ReadFallbackReasons() FallbackReasons {
	return FallbackReasons{
		NoMemory: fallbackReasons.noMemory.Load(),
		Quota:    fallbackReasons.quota.Load(),
		TooLarge: fallbackReasons.tooLarge.Load(),

		GrowLimit:     fallbackReasons.growLimit.Load(),
		GrowPeerLimit: fallbackReasons.growPeer.Load(),
		GrowNoMemory:  fallbackReasons.growNoMemory.Load(),
	}
}

func countReason(err error) {
	switch {
	case errors.Is(err, shm.ErrNoMemory):
		fallbackReasons.noMemory.Add(1)
		switch {
		case errors.Is(err, shm.ErrGrowLimit):
			fallbackReasons.growLimit.Add(1)
		case errors.Is(err, shm.ErrGrowPeerLimit):
			fallbackReasons.growPeer.Add(1)
		case errors.Is(err, shm.ErrInsufficientMemory):
			fallbackReasons.growNoMemory.Add(1)
		}
	case errors.Is(err, shm.ErrQuota):
		fallbackReasons.quota.Add(1)
	case errors.Is(err, shm.ErrTooLarge):
		fallbackReasons.tooLarge.Add(1)
	}
}

// IsFallbackReason reports whether err, from Session.Alloc, means "no shared
// memory for this message now" (the message then goes over the socket),
// rather than a dead session.
func IsFallbackReason(err error) bool {
	return errors.Is(err, shm.ErrNoMemory) || errors.Is(err, shm.ErrQuota) || errors.Is(err, shm.ErrTooLarge)
}

// WriteBuffer is a remote.ByteBuffer that encodes one message into shared
// memory. Get one with NewWriteBuffer; it is not safe for concurrent use.
type WriteBuffer struct {
	ctx  context.Context
	s    *shm.Session
	id   uint64
	aux  uint64
	kind uint16

	segs [shm.MaxSegments]shm.Buffer
	used [shm.MaxSegments]int // bytes handed out of segs[i]
	nseg int

	// heap holds the chunks written after the arena could not supply a
	// buffer; heapReason says why (nil while the message is all in shm).
	heap       [][]byte
	heapReason error

	written int
	flushed bool
	sentOK  bool  // Flush sent the message
	inline  bool  // ... over the session socket
	report  *bool // if set, Flush stores inline here
}

var writePool = sync.Pool{New: func() any { return new(WriteBuffer) }}

// NewWriteBuffer returns a pooled buffer that will send one message with the
// given id, aux and kind on s when flushed. ctx bounds Flush's wait for ring
// space.
func NewWriteBuffer(ctx context.Context, s *shm.Session, id, aux uint64, kind uint16) *WriteBuffer {
	w := writePool.Get().(*WriteBuffer)
	w.ctx, w.s, w.id, w.aux, w.kind = ctx, s, id, aux, kind
	return w
}

// Outcome reports, between Flush and Release, whether the message was sent
// and whether it went over the session socket (the fallback path).
func (w *WriteBuffer) Outcome() (sent, inline bool) { return w.sentOK, w.inline }

// Malloc returns the next n bytes of the message, contiguous. The slice stays
// valid and in place until Flush or Release.
func (w *WriteBuffer) Malloc(n int) ([]byte, error) {
	if n < 0 {
		return nil, errNegative
	}
	if w.flushed {
		return nil, errFlushed
	}
	if n == 0 {
		return []byte{}, nil
	}
	if w.heapReason == nil {
		if w.nseg > 0 {
			i := w.nseg - 1
			if seg := w.segs[i].Bytes(); len(seg)-w.used[i] >= n {
				p := seg[w.used[i] : w.used[i]+n : w.used[i]+n]
				w.used[i] += n
				w.written += n
				return p, nil
			}
		}
		if w.nseg < shm.MaxSegments {
			size := minSegment
			if w.nseg == 0 {
				size = firstSegment
			}
			if n > size {
				size = n
			}
			b, err := w.s.Alloc(size)
			if err == nil {
				w.segs[w.nseg] = b
				w.used[w.nseg] = n
				w.nseg++
				w.written += n
				return b.Bytes()[:n:n], nil
			}
			if !IsFallbackReason(err) {
				return nil, err
			}
			w.heapReason = err
		} else {
			w.heapReason = errTooManySegment
		}
	}
	return w.mallocHeap(n), nil
}

// mallocHeap hands out n bytes of Go heap; chunks are never moved.
func (w *WriteBuffer) mallocHeap(n int) []byte {
	if k := len(w.heap); k > 0 {
		last := w.heap[k-1]
		if cap(last)-len(last) >= n {
			l := len(last)
			w.heap[k-1] = last[:l+n]
			w.written += n
			return last[l : l+n : l+n]
		}
	}
	size := heapChunk
	if n > size {
		size = n
	}
	chunk := make([]byte, n, size)
	w.heap = append(w.heap, chunk)
	w.written += n
	return chunk[:n:n]
}

// WriteBinary copies b into the message.
func (w *WriteBuffer) WriteBinary(b []byte) (int, error) {
	p, err := w.Malloc(len(b))
	if err != nil {
		return 0, err
	}
	return copy(p, b), nil
}

// WriteString copies s into the message.
func (w *WriteBuffer) WriteString(s string) (int, error) {
	p, err := w.Malloc(len(s))
	if err != nil {
		return 0, err
	}
	return copy(p, s), nil
}

// Write implements io.Writer.
func (w *WriteBuffer) Write(b []byte) (int, error) { return w.WriteBinary(b) }

// WrittenLen is the number of bytes written so far.
func (w *WriteBuffer) WrittenLen() int { return w.written }

// Flush sends the message: through shared memory when every byte is there,
// otherwise over the session socket. After Flush the buffer's slices must no
// longer be used.
func (w *WriteBuffer) Flush() error {
	if w.flushed {
		return errFlushed
	}
	w.flushed = true
	if w.heapReason == nil {
		err := w.sendSegments()
		if err == nil {
			return nil
		}
		if !IsFallbackReason(err) {
			return err
		}
		// The engine refused the buffers (e.g. quota at send time): fall
		// through to the socket; the buffers are still ours.
		w.heapReason = err
	}
	if errors.Is(w.heapReason, errTooManySegment) {
		// Everything fitted in shared memory, just not in MaxSegments
		// buffers: try one buffer for the whole message.
		if b, err := w.s.Alloc(w.written); err == nil {
			w.gather(b.Bytes()[:0])
			w.freeSegments()
			if err := w.s.Send(w.ctx, w.id, w.aux, w.kind, b); err != nil {
				w.s.Free(b)
				return err
			}
			w.sent(false)
			return nil
		} else if !IsFallbackReason(err) {
			return err
		} else {
			w.heapReason = err
		}
	}
	data := w.gather(make([]byte, 0, w.written))
	w.freeSegments()
	if err := w.s.SendInline(w.ctx, w.id, w.aux, w.kind, data); err != nil {
		return err
	}
	countReason(w.heapReason)
	w.sent(true)
	return nil
}

func (w *WriteBuffer) sendSegments() error {
	// Truncate and compact in place (w.segs lives in the pooled buffer, so
	// passing it to Send allocates nothing).
	k := 0
	for i := 0; i < w.nseg; i++ {
		if w.used[i] == 0 {
			w.s.Free(w.segs[i])
			continue
		}
		w.segs[k] = w.segs[i].Truncate(w.used[i])
		w.used[k] = w.used[i]
		k++
	}
	for i := k; i < w.nseg; i++ {
		w.segs[i], w.used[i] = shm.Buffer{}, 0
	}
	w.nseg = k
	if err := w.s.Send(w.ctx, w.id, w.aux, w.kind, w.segs[:k]...); err != nil {
		// On error the buffers stay ours, still in w.segs: the caller's
		// fallback or Release frees them.
		return err
	}
	for i := 0; i < k; i++ {
		w.segs[i], w.used[i] = shm.Buffer{}, 0
	}
	w.nseg = 0
	w.sent(false)
	return nil
}

func (w *WriteBuffer) sent(inline bool) {
	w.sentOK, w.inline = true, inline
	if w.report != nil {
		*w.report = inline
	}
}

// ReportInline makes a successful Flush store in *p whether the message went
// over the session socket. Inline messages are not ordered with ring
// messages, so a sender that follows up with a control message (closing a
// virtual connection) sends it the same way as the last message.
func (w *WriteBuffer) ReportInline(p *bool) { w.report = p }

// gather appends the whole message (segments, then heap chunks) to dst.
func (w *WriteBuffer) gather(dst []byte) []byte {
	for i := 0; i < w.nseg; i++ {
		dst = append(dst, w.segs[i].Bytes()[:w.used[i]]...)
	}
	for _, c := range w.heap {
		dst = append(dst, c...)
	}
	return dst
}

func (w *WriteBuffer) freeSegments() {
	for i := 0; i < w.nseg; i++ {
		w.s.Free(w.segs[i])
		w.segs[i] = shm.Buffer{}
		w.used[i] = 0
	}
	w.nseg = 0
}

// Release frees whatever was not sent and returns the buffer to its pool.
func (w *WriteBuffer) Release(error) error {
	if w.s != nil {
		w.freeSegments()
	}
	for i := range w.heap {
		w.heap[i] = nil
	}
	*w = WriteBuffer{heap: w.heap[:0]}
	writePool.Put(w)
	return nil
}

// Read-side methods: a write buffer cannot be read.

func (w *WriteBuffer) Read([]byte) (int, error)             { return 0, errWriteOnly }
func (w *WriteBuffer) Next(int) ([]byte, error)             { return nil, errWriteOnly }
func (w *WriteBuffer) Peek(int) ([]byte, error)             { return nil, errWriteOnly }
func (w *WriteBuffer) Skip(int) error                       { return errWriteOnly }
func (w *WriteBuffer) ReadableLen() int                     { return -1 }
func (w *WriteBuffer) ReadLen() int                         { return 0 }
func (w *WriteBuffer) ReadString(int) (string, error)       { return "", errWriteOnly }
func (w *WriteBuffer) ReadBinary([]byte) (int, error)       { return 0, errWriteOnly }
func (w *WriteBuffer) NewBuffer() remote.ByteBuffer         { return remote.NewWriterBuffer(256) }
func (w *WriteBuffer) AppendBuffer(remote.ByteBuffer) error { return errNotSupported }
func (w *WriteBuffer) Bytes() ([]byte, error)               { return nil, errNotSupported }

// String describes the buffer for logs.
func (w *WriteBuffer) String() string {
	return fmt.Sprintf("kshm.WriteBuffer{id=%d aux=%d kind=%d written=%d segments=%d heap=%v}",
		w.id, w.aux, w.kind, w.written, w.nseg, w.heapReason != nil)
}

var _ remote.ByteBuffer = (*WriteBuffer)(nil)
