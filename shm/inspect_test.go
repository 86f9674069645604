package shm

import (
	"bytes"
	"os"
	"testing"
	"time"
)

func TestInspect_LiveProcessRegions(t *testing.T) {
	cli, srv := pair(t, testConfig(), testConfig())
	send(t, cli, 77, []byte("hello, operator"))
	// The header's counters are published by housekeeping.
	time.Sleep(2 * housekeepEvery)
	files, err := RegionFiles(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 2 {
		t.Fatalf("found %d region files, want both sessions' regions: %v", len(files), files)
	}
	var found bool
	for _, f := range files {
		mem, unmap, err := MapRegionFile(f)
		if err != nil {
			t.Fatal(err)
		}
		info, err := InspectRegion(mem)
		if err != nil {
			unmap()
			t.Fatal(err)
		}
		for _, b := range info.Buffers {
			if b.ID == 77 && b.State == "peer" && bytes.Equal(b.Data, []byte("hello, operator")) {
				found = true
				if info.Role != "client" || info.PID != os.Getpid() || info.PeerPID != os.Getpid() {
					t.Errorf("region info %+v", info)
				}
				if info.Counters.MsgsSent == 0 || info.Counters.InUseBuffers != 1 {
					t.Errorf("counters %+v", info.Counters)
				}
			}
		}
		unmap()
	}
	if !found {
		t.Fatal("the buffer held by the peer was not found in any region")
	}
	m, err := srv.Recv(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	srv.Release(&m)
}
