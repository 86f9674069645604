package shm

import "errors"

// Sentinel errors. Compare with errors.Is: returned errors often wrap these
// with detail (which setting, which offset).
var (
	// ErrClosed is returned by every operation on a session that has closed,
	// for whatever reason. Session.Err tells the reason.
	ErrClosed = errors.New("shm: session closed")
	// ErrPeerClosed is the reason recorded when the peer closed the session
	// or its process went away.
	ErrPeerClosed = errors.New("shm: peer closed the session")
	// ErrNoMemory means the arena has no free block large enough right now.
	// Callers fall back or retry after the peer releases buffers.
	ErrNoMemory = errors.New("shm: shared memory exhausted")
	// ErrQuota means this session already has the maximum number of buffers
	// in flight (Config.MaxBuffers).
	ErrQuota = errors.New("shm: buffer quota of the session reached")
	// ErrTooLarge means a message is larger than Config.MaxMessageSize.
	ErrTooLarge = errors.New("shm: message larger than the maximum message size")
	// ErrCorrupt is the reason recorded when the peer's memory or frames
	// hold a value that fails validation. The session is closed.
	ErrCorrupt = errors.New("shm: corrupt data from peer")
	// ErrHandshake wraps every failure of the session handshake.
	ErrHandshake = errors.New("shm: handshake failed")
	// ErrPeerNotAllowed means the peer's uid is not in Config.AllowedUIDs.
	ErrPeerNotAllowed = errors.New("shm: peer uid not allowed")
	// ErrInsufficientMemory means a region could not be reserved because the
	// machine or the memory cgroup does not have that much memory available.
	ErrInsufficientMemory = errors.New("shm: not enough memory available for region")
	// ErrGrowLimit means the regions could not grow for a message: they
	// hold RegionSize bytes (or MaxRegions regions) already. It comes
	// wrapped in ErrNoMemory.
	ErrGrowLimit = errors.New("shm: regions at their configured maximum")
	// ErrGrowPeerLimit means the regions could not grow for a message: the
	// peer maps no more of ours (its MaxPeerRegionSize), or it did not
	// acknowledge a new region in time. It comes wrapped in ErrNoMemory.
	ErrGrowPeerLimit = errors.New("shm: regions at the peer's limit")
	// ErrRegionLimit is recorded (with ErrCorrupt) when the peer announces
	// more regions, or more bytes of them, than we map (MaxRegions,
	// MaxPeerRegionSize). The session is closed.
	ErrRegionLimit = errors.New("shm: peer's regions above our limits")
	// ErrBadConfig wraps every configuration validation failure.
	ErrBadConfig = errors.New("shm: invalid configuration")
	// ErrBufferSent means a Buffer was already sent (or is being sent by a
	// concurrent Send): it is the peer's, not the caller's.
	ErrBufferSent = errors.New("shm: buffer already sent")
	// ErrBufferFreed means a Buffer was already freed (its slot may since
	// hold another buffer).
	ErrBufferFreed = errors.New("shm: buffer already freed")
	// ErrDuplicateBuffer means one Buffer was named twice in one message.
	ErrDuplicateBuffer = errors.New("shm: buffer named twice in one message")
	// ErrForeignBuffer means a Buffer was not allocated by this session (or
	// is the zero Buffer).
	ErrForeignBuffer = errors.New("shm: buffer not allocated by this session")
	// ErrBusy means the server has its maximum of handshakes in progress.
	ErrBusy = errors.New("shm: too many handshakes in progress")
	// ErrTimeout is returned when a deadline passes. It satisfies net.Error
	// with Timeout() == true.
	ErrTimeout error = timeoutError{}
)

type timeoutError struct{}

func (timeoutError) Error() string   { return "shm: i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }
