package main

import (
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/shmkit/kshm/shm"
)

// headBytes is how much of each buffer dump shows without -all.
const headBytes = 32

// dump prints each region of pid: its layout, its indexes and every buffer
// in use, with the first bytes of each (all of them with all).
func dump(w io.Writer, pid int, all bool) error {
	rs, unmap, err := regions(pid)
	if err != nil {
		return err
	}
	defer unmap()
	now := time.Now()
	if len(rs) == 0 {
		fmt.Fprintf(w, "pid %d: no kshm regions (no memfd named kshm-* among its descriptors)\n", pid)
		return nil
	}
	fmt.Fprintf(w, "pid %d: %d kshm regions\n", pid, len(rs))
	for _, r := range rs {
		fmt.Fprintln(w)
		if r.err != nil {
			fmt.Fprintf(w, "region fd %d (%s): cannot read: %v\n", r.fd, r.path, r.err)
			continue
		}
		dumpRegion(w, now, &r, all)
	}
	return nil
}

func dumpRegion(w io.Writer, now time.Time, r *region, all bool) {
	i := &r.info
	if i.Index != 0 {
		fmt.Fprintf(w, "region fd %d (%s): grown region %d, %s side of a session with pid %d\n", r.fd, r.path, i.Index, i.Role, i.PeerPID)
		fmt.Fprintf(w, "  created     %s (%s ago)\n", i.Created.Format(time.RFC3339Nano), age(now, i.Created))
		fmt.Fprintf(w, "  layout      %s committed: header, arena %s (its buffers are listed in the base region's table)\n",
			size(i.Size), size(i.ArenaSize))
		return
	}
	state := "open"
	if i.Closing {
		state = "closing"
	}
	fmt.Fprintf(w, "region fd %d (%s): %s side of the session with pid %d, %s\n", r.fd, r.path, i.Role, i.PeerPID, state)
	fmt.Fprintf(w, "  created     %s (%s ago), %s, %d receivers asleep\n",
		i.Created.Format(time.RFC3339Nano), age(now, i.Created), heartbeat(now, i.Heartbeat), i.Sleepers)
	fmt.Fprintf(w, "  layout      %s: header, send ring %d x 64 B, release ring %d x 8 B, buffer table %d slots x 64 B, arena %s\n",
		size(i.Size), i.RingEntries, i.RelEntries, i.Slots, size(i.ArenaSize))
	fmt.Fprintf(w, "  limits      max message %s, buffer quota %d, regions at most %s together\n", size(i.MaxMessage), i.Slots, size(i.MaxTotal))
	g := &i.Growth
	fmt.Fprintf(w, "  regions     committed %s in %d, mapped of the peer's %s in %d; grew %d times, shrank %d; fallbacks %d/%d/%d (our maximum/peer's limit/no memory)\n",
		size(max(g.Committed, i.Size)), max(g.Regions, 1), size(g.PeerMapped), g.PeerRegions, g.Grows, g.Shrinks,
		g.FallbackLimit, g.FallbackPeer, g.FallbackMemory)
	fmt.Fprintf(w, "  send ring   %d messages published; peer's ring consumed up to %d\n", i.RingTail, i.PeerRingHead)
	fmt.Fprintf(w, "  releases    %d peer buffers released; %d of ours got back\n", i.RelTail, i.PeerRelHead)
	c := &i.Counters
	fmt.Fprintf(w, "  in use      %d buffers (%s), %d held by the peer\n", c.InUseBuffers, size(c.InUseBytes), c.PeerHeld)
	if len(i.Buffers) == 0 {
		fmt.Fprintf(w, "  no buffers in use\n")
		return
	}
	fmt.Fprintf(w, "  %d buffers in use:\n", len(i.Buffers))
	if all {
		for _, b := range i.Buffers {
			fmt.Fprintf(w, "  slot %d: %s, offset %#x, size %d, length %d, message id %d, aux %d, age %s\n",
				b.Slot, holder(i, b), b.Offset, b.Size, b.Len, b.ID, b.Aux, age(now, b.Since))
			if b.Region != 0 {
				fmt.Fprintf(w, "    (in grown region %d: not shown)\n", b.Region)
			} else if b.Data == nil {
				fmt.Fprintf(w, "    (offset and length outside the arena: not shown)\n")
				continue
			}
			fmt.Fprint(w, indent(hex.Dump(b.Data), "    "))
		}
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  SLOT\tHOLDER\tOFFSET\tSIZE\tLENGTH\tMSG ID\tAUX\tAGE\tFIRST BYTES")
	for _, b := range i.Buffers {
		fmt.Fprintf(tw, "  %d\t%s\t%#x\t%d\t%d\t%d\t%d\t%s\t%s\n",
			b.Slot, holder(i, b), b.Offset, b.Size, b.Len, b.ID, b.Aux, age(now, b.Since), head(b.Data))
	}
	tw.Flush()
}

// holder says who has the buffer: its owner (allocated, not sent) or the
// peer (sent, not yet released).
func holder(i *shm.RegionInfo, b shm.BufferInfo) string {
	switch b.State {
	case "local":
		return fmt.Sprintf("owner %d (not sent)", i.PID)
	case "peer":
		return fmt.Sprintf("peer %d (sent)", i.PeerPID)
	}
	return b.State
}

// head is the first headBytes of p in hex, in groups of four bytes, "..."
// when there are more.
func head(p []byte) string {
	if p == nil {
		return "(outside the arena)"
	}
	more := len(p) > headBytes
	if more {
		p = p[:headBytes]
	}
	var b strings.Builder
	for i := 0; i < len(p); i += 4 {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(hex.EncodeToString(p[i:min(i+4, len(p))]))
	}
	if more {
		b.WriteString(" ...")
	}
	return b.String()
}

func indent(s, prefix string) string {
	lines := strings.SplitAfter(s, "\n")
	var b strings.Builder
	for _, l := range lines {
		if l != "" {
			b.WriteString(prefix)
			b.WriteString(l)
		}
	}
	return b.String()
}
