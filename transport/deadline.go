package transport

import (
	"context"
	"sync"
	"time"
)

// deadlineCtx is the context a virtual connection's receiver passes to
// shm.Session.Recv: it ends at the connection's read deadline. It is armed
// again for every call without allocating (one timer per connection, and a
// new done channel only after one has fired), where context.WithDeadline
// would cost three allocations and a timer per call. Only the goroutine
// that arms it calls Done; the timer's goroutine closes the channel.
type deadlineCtx struct {
	done chan struct{} // replaced by arm only after it was closed

	mu       sync.Mutex
	deadline time.Time
	armed    bool
	err      error
	timer    *time.Timer
}

var _ context.Context = (*deadlineCtx)(nil)

// arm starts a wait that ends at t (t not zero).
func (d *deadlineCtx) arm(t time.Time) {
	d.mu.Lock()
	if d.done == nil || d.err != nil {
		d.done = make(chan struct{})
		d.err = nil
	}
	d.deadline, d.armed = t, true
	wait := time.Until(t)
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
	} else {
		d.timer.Reset(wait)
	}
	d.mu.Unlock()
}

// disarm ends the wait.
func (d *deadlineCtx) disarm() {
	d.mu.Lock()
	d.armed = false
	d.mu.Unlock()
	d.timer.Stop()
}

// fire closes the channel if the armed deadline has passed; a timer of an
// earlier wait that fires late finds it not armed, or not yet due.
func (d *deadlineCtx) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.armed || d.err != nil {
		return
	}
	if wait := time.Until(d.deadline); wait > 0 {
		d.timer.Reset(wait)
		return
	}
	d.err = context.DeadlineExceeded
	close(d.done)
}

func (d *deadlineCtx) Deadline() (time.Time, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.deadline, d.armed
}

func (d *deadlineCtx) Done() <-chan struct{} { return d.done }

func (d *deadlineCtx) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (d *deadlineCtx) Value(any) any { return nil }
