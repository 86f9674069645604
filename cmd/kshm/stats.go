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
	grown := 0
	for _, r := range rs {
		if r.err != nil {
			bad++
			continue
		}
		if r.info.Index != 0 {
			grown++ // a grown region of a session, not a session
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
	fmt.Fprintf(w, "pid %d: %d kshm sessions (%d client side, %d server side)", pid, len(rs)-bad-grown, clients, servers)
	if grown > 0 {
		fmt.Fprintf(w, ", %d grown regions", grown)
	}
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
		if i.Index != 0 {
			fmt.Fprintf(w, "grown region fd %d: index %d of a %s-side session with peer pid %d, %s committed (%s arena), up %s\n",
				r.fd, i.Index, i.Role, i.PeerPID, size(i.Size), size(i.ArenaSize), age(now, i.Created))
			continue
		}
		state := "open"
		if i.Closing {
			state = "closing"
		}
		fmt.Fprintf(w, "session fd %d: %s side, peer pid %d, %s, up %s, %s\n",
			r.fd, i.Role, i.PeerPID, state, age(now, i.Created), heartbeat(now, i.Heartbeat))
		writeCounters(w, &i.Counters, i.ArenaSize)
		writeGrowth(w, i)
	}
	if len(rs)-bad-grown > 1 {
		fmt.Fprintf(w, "\ntotal of %d sessions:\n", len(rs)-bad-grown)
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
	fmt.Fprintf(w, "  wake-ups   sent %d (%d through the peer's futex), saved %d (%.1f%% of sends needed no syscall), receiver slept %d times\n",
		c.WakeupsSent, c.FutexWakeups, c.WakeupsSaved, pct, c.Sleeps)
}

// writeGrowth prints a session's regions: committed and mapped bytes, and
// its growth.
func writeGrowth(w io.Writer, i *shm.RegionInfo) {
	g := &i.Growth
	committed := g.Committed
	if committed == 0 {
		committed = i.Size // before the first housekeeping pass
	}
	fmt.Fprintf(w, "  regions    committed %s in %d (base %s, at most %s), mapped of the peer's %s in %d\n",
		size(committed), max(g.Regions, 1), size(i.Size), size(i.MaxTotal), size(g.PeerMapped), g.PeerRegions)
	fmt.Fprintf(w, "  growth     grew %d times, shrank %d; fallbacks: at our maximum %d, at the peer's limit %d, no memory %d\n",
		g.Grows, g.Shrinks, g.FallbackLimit, g.FallbackPeer, g.FallbackMemory)
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
	t.FutexWakeups += c.FutexWakeups
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
