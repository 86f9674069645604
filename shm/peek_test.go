package shm

import (
	"context"
	"testing"
	"time"
)

// Waiting follows the ring and the inline queue: true from the peer's
// publish until Recv takes the message, false once the session is closed.
func TestSession_Waiting(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	if srv.Waiting() {
		t.Fatal("Waiting before anything was sent")
	}
	send(t, cli, 1, []byte("one"))
	send(t, cli, 2, []byte("two"))
	if !srv.Waiting() {
		t.Fatal("Waiting false with two messages published")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i := 0; i < 2; i++ {
		m, err := srv.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 && !srv.Waiting() {
			t.Fatal("Waiting false with the second message still in the ring")
		}
		srv.Release(&m)
	}
	if srv.Waiting() {
		t.Fatal("Waiting true after both messages were received")
	}

	// An inline message is waiting once the reader has queued it.
	if err := cli.SendInline(ctx, 3, 6, 7, []byte("inline")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !srv.Waiting() {
		if time.Now().After(deadline) {
			t.Fatal("an inline message never showed as waiting")
		}
		time.Sleep(time.Millisecond)
	}
	m, err := srv.Recv(ctx)
	if err != nil || m.ID != 3 {
		t.Fatalf("Recv = %+v, %v", m, err)
	}
	srv.Release(&m)
	if srv.Waiting() {
		t.Fatal("Waiting true after the inline message was received")
	}

	send(t, cli, 4, []byte("left behind"))
	srv.Close()
	if srv.Waiting() {
		t.Fatal("a closed session reports a message waiting")
	}
}
