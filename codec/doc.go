// Package codec adapts kshm's shared-memory messages to Kitex's
// remote.ByteBuffer, so that Kitex's codecs encode straight into the sender's
// shared-memory arena and decode straight out of the peer's region.
//
// A WriteBuffer collects one outgoing message. Malloc and WriteBinary hand out
// slices of shm buffers (a message may span up to shm.MaxSegments buffers);
// every slice stays valid and in place until Flush, because Kitex patches
// length fields after it has written the payload. Flush sends the message.
// When the arena cannot supply a buffer in the middle of an encode
// (shm.ErrNoMemory, shm.ErrQuota, shm.ErrTooLarge), the rest of the message is
// written to the Go heap and Flush carries the whole message over the session
// socket with Session.SendInline instead: the same message, the same id, so a
// fallback can never deliver a response to the wrong call.
//
// A ReadBuffer reads one received shm.Message. Next and Peek inside one
// segment return slices of the peer's region (zero copy) that are valid until
// Release; a read that crosses segments returns a copy. Release hands the
// message's buffers back to the peer.
//
// WriteBuffer deliberately does not implement remote.NocopyWrite: that
// interface links Go-heap slices into the message, which the peer cannot see.
//
// Both buffer types are pooled; Release returns them to their pool, after
// which they must not be used.
//
//	wb := codec.NewWriteBuffer(ctx, sess, callID, vconnID, codec.KindRequest)
//	err := kitexCodec.Encode(ctx, msg, wb) // Malloc / WriteBinary into shm
//	err = wb.Flush()                       // one shm.Send (or SendInline)
//	wb.Release(err)
package codec
