package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/shmkit/kshm/shm"
)

// A process's sample counts the wake-ups its kshm sessions send: a message
// sent to a receiver that has gone to sleep is one.
func TestTakeSample_CountsWakeups(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	cfg := shm.DefaultConfig()
	cfg.SpinTime = 10 * time.Microsecond // the receiver sleeps almost at once
	ln, err := shm.Listen(sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	accepted := make(chan *shm.Session, 1)
	go func() {
		s, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- s
	}()
	cli, err := shm.Dial(ctx, sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	srv := <-accepted
	if srv == nil {
		t.FailNow()
	}
	defer srv.Close()

	before := takeSample(nil)
	got := make(chan error, 1)
	go func() {
		m, err := srv.Recv(ctx)
		if err == nil {
			srv.Release(&m)
		}
		got <- err
	}()
	// Until the receiver sleeps: its Sleeps counter says so.
	for srv.Stats().Sleeps == 0 {
		if ctx.Err() != nil {
			t.Fatal("the receiver never slept")
		}
		time.Sleep(time.Millisecond)
	}
	b, err := cli.Alloc(64)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Send(ctx, 1, 0, 0, b); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	d := takeSample(nil).sub(before)
	if d.Wakeups < 1 || d.FutexWakeups > d.Wakeups {
		t.Fatalf("sample counted %d wake-ups (%d through the futex), want at least 1", d.Wakeups, d.FutexWakeups)
	}
}
