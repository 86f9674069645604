package codec

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/cloudwego/kitex/pkg/remote"

	"github.com/shmkit/kshm/shm"
)

var (
	errReadOnly  = errors.New("kshm codec: read buffer does not support writing")
	errShortRead = errors.New("kshm codec: message shorter than requested")
	errReleased  = errors.New("kshm codec: read buffer used after Release")
)

// Source supplies the message of a ReadBuffer when it is first read. The
// client transport uses it to wait for a response only when Kitex starts
// decoding (NewReadByteBuffer cannot return an error; the first read can).
// The returned message stays owned by the source's storage; the ReadBuffer
// releases it with s.Release(m) (idempotent) when it is itself released.
type Source interface {
	Wait() (s *shm.Session, m *shm.Message, err error)
}

// ReadBuffer is a remote.ByteBuffer over one received message. Slices from
// Next and Peek are valid until Release. Not safe for concurrent use.
type ReadBuffer struct {
	src    Source
	s      *shm.Session
	m      *shm.Message
	err    error // from src.Wait, returned by every read
	loaded bool

	seg     int // current segment
	off     int // offset in it
	readLen int
	total   int
}

var readPool = sync.Pool{New: func() any { return new(ReadBuffer) }}

// NewReadBuffer returns a pooled buffer reading m, received on s. Release
// releases m.
func NewReadBuffer(s *shm.Session, m *shm.Message) *ReadBuffer {
	r := readPool.Get().(*ReadBuffer)
	r.load(s, m)
	return r
}

// NewLazyReadBuffer returns a pooled buffer whose message comes from src on
// first use.
func NewLazyReadBuffer(src Source) *ReadBuffer {
	r := readPool.Get().(*ReadBuffer)
	r.src = src
	return r
}

func (r *ReadBuffer) load(s *shm.Session, m *shm.Message) {
	r.s, r.m, r.loaded = s, m, true
	r.total = m.Len()
}

func (r *ReadBuffer) ensure() error {
	if r.loaded {
		return r.err
	}
	if r.src == nil {
		return errReleased
	}
	s, m, err := r.src.Wait()
	if err != nil {
		r.err, r.loaded = err, true
		return err
	}
	r.load(s, m)
	return nil
}

// current returns the unread part of the current segment, skipping empty
// segments.
func (r *ReadBuffer) current() []byte {
	for r.seg < r.m.NumSegments() {
		b := r.m.Segment(r.seg)
		if r.off < len(b) {
			return b[r.off:]
		}
		r.seg++
		r.off = 0
	}
	return nil
}

func (r *ReadBuffer) advance(n int) {
	r.readLen += n
	for n > 0 {
		b := r.m.Segment(r.seg)
		k := len(b) - r.off
		if n < k {
			r.off += n
			return
		}
		n -= k
		r.seg++
		r.off = 0
	}
}

func (r *ReadBuffer) check(n int) error {
	if err := r.ensure(); err != nil {
		return err
	}
	if n < 0 {
		return errNegative
	}
	if n > r.total-r.readLen {
		return fmt.Errorf("%w: want %d bytes, %d left", errShortRead, n, r.total-r.readLen)
	}
	return nil
}

// Next returns the next n bytes and advances. Within one segment the slice is
// the peer's shared memory (zero copy), valid until Release; across segments
// it is a copy.
func (r *ReadBuffer) Next(n int) ([]byte, error) {
	p, err := r.Peek(n)
	if err != nil {
		return nil, err
	}
	r.advance(n)
	return p, nil
}

// Peek returns the next n bytes without advancing.
func (r *ReadBuffer) Peek(n int) ([]byte, error) {
	if err := r.check(n); err != nil {
		return nil, err
	}
	if n == 0 {
		return []byte{}, nil
	}
	if cur := r.current(); len(cur) >= n {
		return cur[:n:n], nil
	}
	p := make([]byte, n)
	r.copyOut(p)
	return p, nil
}

// copyOut copies len(p) bytes from the read position without advancing.
func (r *ReadBuffer) copyOut(p []byte) {
	seg, off := r.seg, r.off
	for k := 0; k < len(p); {
		b := r.m.Segment(seg)[off:]
		c := copy(p[k:], b)
		k += c
		seg++
		off = 0
	}
}

// Skip advances n bytes.
func (r *ReadBuffer) Skip(n int) error {
	if err := r.check(n); err != nil {
		return err
	}
	r.current()
	r.advance(n)
	return nil
}

// ReadBinary copies the next len(p) bytes into p.
func (r *ReadBuffer) ReadBinary(p []byte) (int, error) {
	if err := r.check(len(p)); err != nil {
		return 0, err
	}
	r.current()
	r.copyOut(p)
	r.advance(len(p))
	return len(p), nil
}

// ReadString returns the next n bytes as a string (a copy).
func (r *ReadBuffer) ReadString(n int) (string, error) {
	if err := r.check(n); err != nil {
		return "", err
	}
	p := make([]byte, n)
	r.current()
	r.copyOut(p)
	r.advance(n)
	return string(p), nil
}

// Read implements io.Reader.
func (r *ReadBuffer) Read(p []byte) (int, error) {
	if err := r.ensure(); err != nil {
		return 0, err
	}
	left := r.total - r.readLen
	if left == 0 {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	if len(p) > left {
		p = p[:left]
	}
	return r.ReadBinary(p)
}

// ReadableLen is the number of unread bytes (-1 if the message could not be
// had).
func (r *ReadBuffer) ReadableLen() int {
	if r.ensure() != nil {
		return -1
	}
	return r.total - r.readLen
}

// ReadLen is the number of bytes read so far.
func (r *ReadBuffer) ReadLen() int { return r.readLen }

// Message returns the underlying message, loading it if needed.
func (r *ReadBuffer) Message() (*shm.Message, error) {
	if err := r.ensure(); err != nil {
		return nil, err
	}
	return r.m, nil
}

// Release hands the message's buffers back to the peer and returns the
// buffer to its pool. Slices read from it are invalid afterwards.
func (r *ReadBuffer) Release(error) error {
	if r.s != nil && r.m != nil {
		r.s.Release(r.m)
	}
	*r = ReadBuffer{}
	readPool.Put(r)
	return nil
}

// Write-side methods: a read buffer cannot be written.

func (r *ReadBuffer) Write([]byte) (int, error)            { return 0, errReadOnly }
func (r *ReadBuffer) Malloc(int) ([]byte, error)           { return nil, errReadOnly }
func (r *ReadBuffer) WrittenLen() int                      { return -1 }
func (r *ReadBuffer) WriteString(string) (int, error)      { return 0, errReadOnly }
func (r *ReadBuffer) WriteBinary([]byte) (int, error)      { return 0, errReadOnly }
func (r *ReadBuffer) Flush() error                         { return errReadOnly }
func (r *ReadBuffer) NewBuffer() remote.ByteBuffer         { return remote.NewWriterBuffer(256) }
func (r *ReadBuffer) AppendBuffer(remote.ByteBuffer) error { return errNotSupported }
func (r *ReadBuffer) Bytes() ([]byte, error)               { return nil, errNotSupported }

var _ remote.ByteBuffer = (*ReadBuffer)(nil)
