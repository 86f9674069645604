package transport

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDeadlineCtx_FiresAndRearms(t *testing.T) {
	var d deadlineCtx
	d.arm(time.Now().Add(20 * time.Millisecond))
	select {
	case <-d.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("deadline did not fire")
	}
	if !errors.Is(d.Err(), context.DeadlineExceeded) {
		t.Fatalf("Err = %v, want DeadlineExceeded", d.Err())
	}
	d.disarm()

	// Armed again after firing: a fresh channel, not yet done.
	d.arm(time.Now().Add(time.Hour))
	select {
	case <-d.Done():
		t.Fatal("re-armed context is done at once")
	default:
	}
	if d.Err() != nil {
		t.Fatalf("Err = %v after re-arming", d.Err())
	}
	if dl, ok := d.Deadline(); !ok || time.Until(dl) < 59*time.Minute {
		t.Fatalf("Deadline = %v, %v", dl, ok)
	}
	d.disarm()
	if _, ok := d.Deadline(); ok {
		t.Fatal("disarmed context still has a deadline")
	}
}

// A disarmed wait never fires, even when its timer was already due, and an
// earlier wait's timer does not end a later, longer one.
func TestDeadlineCtx_DisarmedAndStaleTimersDoNotFire(t *testing.T) {
	var d deadlineCtx
	for i := 0; i < 200; i++ {
		d.arm(time.Now().Add(time.Duration(i%3) * time.Microsecond))
		d.disarm()
	}
	d.arm(time.Now().Add(time.Hour))
	time.Sleep(20 * time.Millisecond) // let any stale timer run
	select {
	case <-d.Done():
		t.Fatal("a stale timer ended a wait an hour long")
	default:
	}
	d.disarm()
}

func TestDeadlineCtx_NoAllocationsPerCall(t *testing.T) {
	var d deadlineCtx
	d.arm(time.Now().Add(time.Hour))
	d.disarm()
	allocs := testing.AllocsPerRun(100, func() {
		d.arm(time.Now().Add(time.Hour))
		select {
		case <-d.Done():
		default:
		}
		d.disarm()
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per arm/disarm, want 0", allocs)
	}
}
