package shm

// Hooks for the external tests (package shm_test), which can import
// internal/misbehave (it imports shm).

// InlineQueued is the inline payload bytes queued for the receiver, and the
// session's budget for them.
func (s *Session) InlineQueued() (queued, budget int64, msgs int) {
	return s.inlineBytes.Load(), s.inlineBudget(), len(s.inlineQ)
}

// InlineFrame is a whole inline frame carrying n zero bytes.
func InlineFrame(n int) []byte {
	b := make([]byte, frameHeaderSize+inlineMetaSize+n)
	putFrameHeader(b, frameInline, uint32(inlineMetaSize+n))
	putInlineMeta(b[frameHeaderSize:], 1, 0, 0)
	return b
}

const FrameHeaderSize, InlineMetaSize = frameHeaderSize, inlineMetaSize
