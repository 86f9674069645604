package main

import (
	"fmt"
	"io"
	"time"

	"github.com/shmkit/kshm/shm"
)

// stats prints the counters of every kshm session of pid: one block per
// region (each session has one region on each side; this process's region
// holds this process's counters), then the totals.
func stats(w io.Writer, pid int) error {
	rs, unmap, err := regions(pid)
	if err != nil {
		return err
	}
	defer unmap()
	now := time.Now()
	if len(rs) == 0 {
		fmt.Fprintf(w, "pid %d: no kshm sessions (no memfd named kshm-* among its descriptors)\n", pid)
		return nil
	}
	var total shm.RegionCounters
	open, closing, clients, servers, bad := 0, 0, 0, 0, 0
	for _, r := range rs {
		if r.err != nil {
			bad++
			continue
		}
		switch r.info.Role {
		case "client":
			clients++
		case "server":
			servers++
		}
		if r.info.Closing {
			closing++
		} else {
			open++
		}
		add(&total, &r.info.Counters)
	}
	fmt.Fprintf(w, "pid %d: %d kshm sessions (%d client side, %d server side)", pid, len(rs)-bad, clients, servers)
	if closing > 0 {
		fmt.Fprintf(w, ", %d closing", closing)
	}
	if bad > 0 {
		fmt.Fprintf(w, ", %d unreadable", bad)
	}
	fmt.Fprintln(w)
	for _, r := range rs {
		fmt.Fprintln(w)
		if r.err != nil {
			fmt.Fprintf(w, "region fd %d: cannot read: %v\n", r.fd, r.err)
			continue
		}
		i := &r.info
		state := "open"
		if i.Closing {
			state = "closing"
		}
		fmt.Fprintf(w, "session fd %d: %s side, peer pid %d, %s, up %s, %s\n",
			r.fd, i.Role, i.PeerPID, state, age(now, i.Created), heartbeat(now, i.Heartbeat))
		writeCounters(w, &i.Counters, i.ArenaSize)
	}
	if len(rs)-bad > 1 {
		fmt.Fprintf(w, "\ntotal of %d sessions:\n", len(rs)-bad)
		writeCounters(w, &total, 0)
	}
	return nil
}

func writeCounters(w io.Writer, c *shm.RegionCounters, arena uint64) {
	fmt.Fprintf(w, "  messages   sent %d (%s), received %d (%s)\n", c.MsgsSent, size(c.BytesSent), c.MsgsRecv, size(c.BytesRecv))
	fmt.Fprintf(w, "  inline     sent %d, received %d (fallback over the session socket)\n", c.InlineSent, c.InlineRecv)
	arenaNote := ""
	if arena > 0 {
		arenaNote = fmt.Sprintf(" of a %s arena", size(arena))
	}
	fmt.Fprintf(w, "  buffers    in use %d (%s%s), held by the peer %d\n", c.InUseBuffers, size(c.InUseBytes), arenaNote, c.PeerHeld)
	fmt.Fprintf(w, "  allocs     %d, frees %d, failed %d (quota reached %d)\n", c.Allocs, c.Frees, c.FailedAllocs, c.QuotaHits)
	sends := c.WakeupsSent + c.WakeupsSaved
	pct := 0.0
	if sends > 0 {
		pct = 100 * float64(c.WakeupsSaved) / float64(sends)
	}
	fmt.Fprintf(w, "  wake-ups   sent %d, saved %d (%.1f%% of sends needed no syscall), receiver slept %d times\n",
		c.WakeupsSent, c.WakeupsSaved, pct, c.Sleeps)
}

func add(t, c *shm.RegionCounters) {
	t.Allocs += c.Allocs
	t.Frees += c.Frees
	t.FailedAllocs += c.FailedAllocs
	t.InUseBuffers += c.InUseBuffers
	t.InUseBytes += c.InUseBytes
	t.MsgsSent += c.MsgsSent
	t.MsgsRecv += c.MsgsRecv
	t.BytesSent += c.BytesSent
	t.BytesRecv += c.BytesRecv
	t.WakeupsSent += c.WakeupsSent
	t.WakeupsSaved += c.WakeupsSaved
	t.Sleeps += c.Sleeps
	t.InlineSent += c.InlineSent
	t.InlineRecv += c.InlineRecv
	t.QuotaHits += c.QuotaHits
	t.PeerHeld += c.PeerHeld
}

// size formats a byte count: exact below 10 KiB, else in the largest binary unit that keeps it at 1 or more.
func size(n uint64) string {
	switch {
	case n < 10<<10:
		return fmt.Sprintf("%d B", n)
	case n < 1<<20:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	case n < 1<<30:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
}

// heartbeat says when the owner's housekeeper last ran.
func heartbeat(now, t time.Time) string {
	if t.UnixNano() <= 0 {
		return "no heartbeat yet"
	}
	return "heartbeat " + age(now, t) + " ago"
}

// age formats now-t; "never" for a zero time.
func age(now, t time.Time) string {
	if t.UnixNano() <= 0 {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < 0:
		return "0s"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}
