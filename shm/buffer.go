package shm

// Buffer is a block of this side's arena, allocated by Session.Alloc. It is
// a small value; copying it does not copy the memory. Its bytes are valid
// until the buffer is sent (Session.Send succeeds) or freed (Session.Free),
// and must not be touched after.
type Buffer struct {
	b    []byte
	slot uint32
	gen  uint32
}

// Bytes returns the buffer's memory, as many bytes as were allocated or kept
// by Truncate.
func (b Buffer) Bytes() []byte { return b.b }

// Len is len(b.Bytes()).
func (b Buffer) Len() int { return len(b.b) }

// Truncate returns the buffer limited to its first n bytes, so that only
// those are sent. n must not exceed b.Len().
func (b Buffer) Truncate(n int) Buffer {
	b.b = b.b[:n:n]
	return b
}

// Message is a message received from the peer. Its segments are slices of
// the peer's read-only region (or of the Go heap for a message that came over
// the socket), valid until Session.Release(&m). Copying a Message does not
// copy the memory; release it exactly once.
type Message struct {
	ID   uint64 // the sender's message id
	Aux  uint64 // the sender's user word
	Kind uint16 // the sender's user kind

	n      uint8
	inline bool
	segs   [MaxSegments][]byte
	tokens [MaxSegments]uint64 // release entries: slot<<32 | generation
	regs   [MaxSegments]uint8  // the peer's region of each segment (0: base)
}

// NumSegments is the number of segments (buffers) of the message.
func (m *Message) NumSegments() int { return int(m.n) }

// Segment returns segment i. The slice is valid until Release.
func (m *Message) Segment(i int) []byte { return m.segs[i] }

// Len is the total length of the message.
func (m *Message) Len() int {
	t := 0
	for i := 0; i < int(m.n); i++ {
		t += len(m.segs[i])
	}
	return t
}

// Inline reports whether the message came over the session socket (the
// fallback path) rather than through shared memory.
func (m *Message) Inline() bool { return m.inline }

// AppendTo appends the whole message to dst and returns the result.
func (m *Message) AppendTo(dst []byte) []byte {
	for i := 0; i < int(m.n); i++ {
		dst = append(dst, m.segs[i]...)
	}
	return dst
}
