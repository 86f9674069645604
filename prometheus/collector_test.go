package kshmprom

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/shm"
)

func TestCollector_Lint(t *testing.T) {
	problems, err := testutil.CollectAndLint(NewCollector())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

// TestCollector_Values checks the mapping of every field it exports, from
// fixed counters.
func TestCollector_Values(t *testing.T) {
	st := kshm.Stats{
		Sessions: 3, CallsSent: 10, CallsServed: 20, FallbackCalls: 4, InlineRequests: 5, InlineResponses: 6,
		InlineNoMemory: 7, InlineQuota: 1, InlineTooLarge: 3, InUseBuffers: 8, InUseBytes: 4096,
		ClientConns: 2, ServerConns: 9,
		Engine: shm.Stats{Allocs: 100, FailedAllocs: 11, MsgsSent: 50, MsgsRecv: 49, WakeupsSent: 12, WakeupsSaved: 88, Corrupt: 1,
			CommittedBytes: 6 << 20, PeerMappedBytes: 5 << 20, Regions: 3, PeerRegions: 2, Grows: 7, Shrinks: 4,
			GrowFallbacks: shm.GrowFallbacks{Limit: 13, PeerLimit: 2, Memory: 1}},
	}
	c := &Collector{read: func() kshm.Stats { return st }}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP kshm_sessions Open kshm sessions, client and server side.
# TYPE kshm_sessions gauge
kshm_sessions 3
# HELP kshm_calls_total Calls carried over kshm sessions: requests sent by clients, requests served by servers.
# TYPE kshm_calls_total counter
kshm_calls_total{role="client"} 10
kshm_calls_total{role="server"} 20
# HELP kshm_inline_reasons_total Why messages went over the session socket.
# TYPE kshm_inline_reasons_total counter
kshm_inline_reasons_total{reason="no_memory"} 7
kshm_inline_reasons_total{reason="quota"} 1
kshm_inline_reasons_total{reason="too_large"} 3
# HELP kshm_buffers_in_use Shared-memory buffers this process allocated and has not got back.
# TYPE kshm_buffers_in_use gauge
kshm_buffers_in_use 8
# HELP kshm_allocations_total Shared-memory buffer allocations.
# TYPE kshm_allocations_total counter
kshm_allocations_total{result="failed"} 11
kshm_allocations_total{result="ok"} 100
# HELP kshm_wakeups_total Sends that woke the peer through the socket (sent) or found it awake (saved).
# TYPE kshm_wakeups_total counter
kshm_wakeups_total{result="saved"} 88
kshm_wakeups_total{result="sent"} 12
# HELP kshm_virtual_connections Virtual connections open over kshm sessions.
# TYPE kshm_virtual_connections gauge
kshm_virtual_connections{role="client"} 2
kshm_virtual_connections{role="server"} 9
# HELP kshm_corrupt_sessions_total Sessions closed because the peer sent corrupt data.
# TYPE kshm_corrupt_sessions_total counter
kshm_corrupt_sessions_total 1
# HELP kshm_region_grows_total Regions added to sessions because messages needed room.
# TYPE kshm_region_grows_total counter
kshm_region_grows_total 7
# HELP kshm_region_shrinks_total Grown regions released once idle.
# TYPE kshm_region_shrinks_total counter
kshm_region_shrinks_total 4
# HELP kshm_grow_fallbacks_total Allocations refused because the regions could not grow: this side's maximum reached (limit), the peer's cap reached or no acknowledgement (peer_limit), no memory to back a region (memory).
# TYPE kshm_grow_fallbacks_total counter
kshm_grow_fallbacks_total{reason="limit"} 13
kshm_grow_fallbacks_total{reason="memory"} 1
kshm_grow_fallbacks_total{reason="peer_limit"} 2
# HELP kshm_regions Regions of open sessions: this process's own (own) and the peers' it maps (peer).
# TYPE kshm_regions gauge
kshm_regions{owner="own"} 3
kshm_regions{owner="peer"} 2
# HELP kshm_region_committed_bytes Bytes of this process's own regions over open sessions (committed: every page reserved).
# TYPE kshm_region_committed_bytes gauge
kshm_region_committed_bytes 6.291456e+06
# HELP kshm_peer_region_mapped_bytes Bytes of the peers' regions this process maps over open sessions.
# TYPE kshm_peer_region_mapped_bytes gauge
kshm_peer_region_mapped_bytes 5.24288e+06
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kshm_sessions", "kshm_calls_total",
		"kshm_inline_reasons_total", "kshm_buffers_in_use", "kshm_allocations_total", "kshm_wakeups_total",
		"kshm_virtual_connections", "kshm_corrupt_sessions_total", "kshm_region_grows_total", "kshm_region_shrinks_total",
		"kshm_grow_fallbacks_total", "kshm_regions", "kshm_region_committed_bytes", "kshm_peer_region_mapped_bytes"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(c); n != 37 {
		t.Errorf("%d series, want 37", n)
	}
}

// TestCollector_LiveSession reads the real counters while a message is held.
func TestCollector_LiveSession(t *testing.T) {
	cfg := shm.DefaultConfig()
	cfg.RegionSize, cfg.MaxMessageSize, cfg.RingEntries = 2<<20, 64<<10, 64
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := shm.Listen(sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli, err := shm.Dial(ctx, sock, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	b, err := cli.Alloc(1000)
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Send(ctx, 1, 0, 0, b); err != nil {
		t.Fatal(err)
	}
	m, err := srv.Recv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Release(&m)

	c := NewCollector()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	vals := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, lp := range m.GetLabel() {
				key += "/" + lp.GetValue()
			}
			if m.GetGauge() != nil {
				vals[key] = m.GetGauge().GetValue()
			} else {
				vals[key] = m.GetCounter().GetValue()
			}
		}
	}
	if vals["kshm_sessions"] < 2 || vals["kshm_buffers_in_use"] < 1 || vals["kshm_messages_total/sent"] < 1 ||
		vals["kshm_messages_total/received"] < 1 || vals["kshm_message_bytes_total/sent"] < 1000 {
		t.Fatalf("live counters not exported: %v", vals)
	}
}

// gather scrapes c through a registry: each series by name and label
// values ("kshm_regions/own").
func gather(t testing.TB, c prometheus.Collector) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	vals := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, lp := range m.GetLabel() {
				key += "/" + lp.GetValue()
			}
			if m.GetGauge() != nil {
				vals[key] = m.GetGauge().GetValue()
			} else {
				vals[key] = m.GetCounter().GetValue()
			}
		}
	}
	return vals
}
