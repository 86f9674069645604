package main

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the concurrent writes run makes.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestRun_EndToEnd builds the example server and client (with the race
// detector when the test has it), runs them as separate processes with a
// short measurement, and requires every step to succeed: every call verified,
// every buffer returned, the server stopped cleanly by SIGTERM.
func TestRun_EndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs two processes; skipped in -short mode")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var out syncBuffer
	args := []string{"-duration", "200ms", "-sizes", "64,16384,1048576", "-concurrency", "2"}
	if raceEnabled {
		args = append(args, "-race")
	}
	err := run(ctx, args, &out, &out)
	t.Log("output:\n" + out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
}

func TestRun_BadFlag(t *testing.T) {
	var out syncBuffer
	if err := run(context.Background(), []string{"-no-such-flag"}, &out, &out); err == nil {
		t.Fatal("run accepted an unknown flag")
	}
}
