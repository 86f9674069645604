package shm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
)

// A sidecar's fleet (issue 11): many client processes with light traffic
// and one with 4 MiB messages, against one server with default settings.
// Every light session stays at its initial 4 MiB per side; the heavy one
// grows and sends every message through shared memory, none inline.
func TestFleet_LightClientsStaySmallHeavyOneGrows(t *testing.T) {
	const light = 16
	sock := filepath.Join(t.TempDir(), "s")
	cfg := DefaultConfig()
	ln, err := Listen(sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	var (
		mu       sync.Mutex
		sessions = map[int]*Session{} // by the client's pid
		wg       sync.WaitGroup
	)
	defer func() { // close every session, then wait for its echo loop
		ln.Close()
		mu.Lock()
		for _, s := range sessions {
			s.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	go func() {
		for {
			s, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			sessions[s.PeerPID()] = s
			mu.Unlock()
			wg.Add(1)
			go func() { // echo every message back, through our own region
				defer wg.Done()
				defer s.Close()
				for {
					m, err := s.Recv(context.Background())
					if err != nil {
						return
					}
					b, err := allocWait(s, m.Len())
					if err != nil {
						s.Release(&m)
						return
					}
					m.AppendTo(b.Bytes()[:0])
					id := m.ID
					s.Release(&m)
					if err := s.Send(context.Background(), id, 0, 0, b); err != nil {
						s.Free(b)
						return
					}
				}
			}()
		}
	}()

	heavy := shmtest.Start(t, "fleet-client", "KSHM_SOCK="+sock, "KSHM_FLEET_SIZE="+strconv.Itoa(4<<20), "KSHM_FLEET_CALLS=12")
	var procs []*shmtest.Proc
	for i := 0; i < light; i++ {
		procs = append(procs, shmtest.Start(t, "fleet-client", "KSHM_SOCK="+sock, "KSHM_FLEET_SIZE=1024", "KSHM_FLEET_CALLS=200"))
	}
	for _, p := range append(procs, heavy) {
		line := p.Expect(t, "done ", 120*time.Second)
		if line != "done inline=0 mismatched=0" {
			t.Fatalf("client %d: %s", p.Cmd.Process.Pid, line)
		}
	}
	// Every client waits (still connected) until it is killed at cleanup:
	// the server's sessions are live now.
	mu.Lock()
	live := make(map[int]*Session, len(sessions))
	for pid, s := range sessions {
		live[pid] = s
	}
	mu.Unlock()
	if len(live) != light+1 {
		t.Fatalf("%d sessions, want %d", len(live), light+1)
	}
	for pid, s := range live {
		st := s.Stats()
		if pid == heavy.Cmd.Process.Pid {
			if st.Grows == 0 || st.CommittedBytes <= 4<<20 || st.GrowFallbacks != (GrowFallbacks{}) {
				t.Fatalf("heavy client's session: grows %d, committed %d, grow fallbacks %d: want grown with no fallback",
					st.Grows, st.CommittedBytes, st.GrowFallbacks)
			}
			continue
		}
		if st.CommittedBytes > 4<<20 || st.Regions != 1 {
			t.Fatalf("light client %d's session commits %d bytes in %d regions: want at most 4 MiB in one", pid, st.CommittedBytes, st.Regions)
		}
	}
}

// childFleetClient dials $KSHM_SOCK with default settings, makes
// $KSHM_FLEET_CALLS round trips of $KSHM_FLEET_SIZE bytes one at a time,
// each verified, prints "done inline=N mismatched=N", then stays connected
// until it is killed.
func childFleetClient() int {
	size, _ := strconv.Atoi(os.Getenv("KSHM_FLEET_SIZE"))
	calls, _ := strconv.Atoi(os.Getenv("KSHM_FLEET_CALLS"))
	s, err := Dial(context.Background(), os.Getenv("KSHM_SOCK"), DefaultConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	inline, mismatched := 0, 0
	want := make([]byte, size)
	for i := uint64(1); i <= uint64(calls); i++ {
		b, err := s.Alloc(size)
		if err != nil {
			if errors.Is(err, ErrNoMemory) {
				inline++ // would have gone inline
				continue
			}
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fill(b.Bytes(), i)
		if err := s.Send(context.Background(), i, 0, 0, b); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		m, err := s.Recv(context.Background())
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fill(want, i)
		if m.Inline() {
			inline++
		}
		if m.ID != i || !bytes.Equal(m.AppendTo(nil), want) {
			mismatched++
		}
		s.Release(&m)
	}
	shmtest.Printf("done inline=%d mismatched=%d", inline, mismatched)
	<-s.Done()
	return 0
}
