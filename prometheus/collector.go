// Package kshmprom exports kshm's process-wide counters (kshm.ReadStats) to
// Prometheus. It lives in its own module so that kshm itself does not
// depend on the Prometheus client.
//
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(kshmprom.NewCollector())
//	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//
// Every scrape reads the counters afresh; the collector keeps no state.
package kshmprom

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shmkit/kshm"
)

// Collector is a prometheus.Collector of kshm.ReadStats.
type Collector struct {
	read func() kshm.Stats
}

// NewCollector returns a collector of this process's kshm counters.
func NewCollector() *Collector { return &Collector{read: kshm.ReadStats} }

type metric struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	value func(s *kshm.Stats) []float64 // one value per label value, in order
}

// counter describes kshm_<name>, with one variable label unless label is "".
func counter(name, help, label string, v func(s *kshm.Stats) []float64) metric {
	var variable []string
	if label != "" {
		variable = []string{label}
	}
	return metric{prometheus.NewDesc("kshm_"+name, help, variable, nil), prometheus.CounterValue, v}
}

func gauge(name, help, label string, v func(s *kshm.Stats) []float64) metric {
	m := counter(name, help, label, v)
	m.kind = prometheus.GaugeValue
	return m
}

func f(xs ...uint64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(x)
	}
	return out
}

func g(xs ...int64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(x)
	}
	return out
}

// metrics are the exported metrics. A metric with a label lists the label's
// values, in the order its value function returns them.
var metrics = []struct {
	m      metric
	values []string
}{
	{gauge("sessions", "Open kshm sessions, client and server side.", "",
		func(s *kshm.Stats) []float64 { return g(s.Sessions) }), nil},
	{counter("calls_total", "Calls carried over kshm sessions: requests sent by clients, requests served by servers.",
		"role", func(s *kshm.Stats) []float64 { return f(s.CallsSent, s.CallsServed) }), []string{"client", "server"}},
	{counter("fallback_calls_total", "Client calls over Kitex's netpoll transport because no session could be had.", "",
		func(s *kshm.Stats) []float64 { return f(s.FallbackCalls) }), nil},
	{counter("inline_messages_total", "Kitex messages that found no shared memory and went over the session socket.",
		"kind", func(s *kshm.Stats) []float64 { return f(s.InlineRequests, s.InlineResponses) }), []string{"request", "response"}},
	{counter("inline_reasons_total", "Why messages went over the session socket.",
		"reason", func(s *kshm.Stats) []float64 { return f(s.InlineNoMemory, s.InlineQuota, s.InlineTooLarge) }),
		[]string{"no_memory", "quota", "too_large"}},
	{counter("late_responses_total", "Responses that arrived after their call had given up; dropped and released.", "",
		func(s *kshm.Stats) []float64 { return f(s.LateResponses) }), nil},
	{counter("sessions_lost_total", "Client sessions that died (peer gone, error).", "",
		func(s *kshm.Stats) []float64 { return f(s.SessionsLost) }), nil},
	{counter("plain_connections_total", "Plain Kitex connections served on the kshm unix socket.", "",
		func(s *kshm.Stats) []float64 { return f(s.PlainConns) }), nil},
	{gauge("virtual_connections", "Virtual connections open over kshm sessions.",
		"role", func(s *kshm.Stats) []float64 { return g(s.ClientConns, s.ServerConns) }), []string{"client", "server"}},
	{gauge("buffers_in_use", "Shared-memory buffers this process allocated and has not got back.", "",
		func(s *kshm.Stats) []float64 { return g(s.InUseBuffers) }), nil},
	{gauge("buffer_bytes_in_use", "Bytes of those buffers.", "",
		func(s *kshm.Stats) []float64 { return g(s.InUseBytes) }), nil},
	{counter("allocations_total", "Shared-memory buffer allocations.",
		"result", func(s *kshm.Stats) []float64 { return f(s.Engine.Allocs, s.Engine.FailedAllocs) }), []string{"ok", "failed"}},
	{counter("frees_total", "Shared-memory buffers returned to their allocator.", "",
		func(s *kshm.Stats) []float64 { return f(s.Engine.Frees) }), nil},
	{counter("messages_total", "Messages through shared memory.",
		"direction", func(s *kshm.Stats) []float64 { return f(s.Engine.MsgsSent, s.Engine.MsgsRecv) }), []string{"sent", "received"}},
	{counter("message_bytes_total", "Bytes of messages through shared memory.",
		"direction", func(s *kshm.Stats) []float64 { return f(s.Engine.BytesSent, s.Engine.BytesRecv) }), []string{"sent", "received"}},
	{counter("socket_messages_total", "Messages carried on session sockets (the engine's fallback).",
		"direction", func(s *kshm.Stats) []float64 { return f(s.Engine.InlineSent, s.Engine.InlineRecv) }), []string{"sent", "received"}},
	{counter("wakeups_total", "Sends that woke the peer through the socket (sent) or found it awake (saved).",
		"result", func(s *kshm.Stats) []float64 { return f(s.Engine.WakeupsSent, s.Engine.WakeupsSaved) }), []string{"sent", "saved"}},
	{counter("corrupt_sessions_total", "Sessions closed because the peer sent corrupt data.", "",
		func(s *kshm.Stats) []float64 { return f(s.Engine.Corrupt) }), nil},
	// Regions that grow and shrink (a session starts with a small region
	// and adds regions up to its maximum when messages need room).
	{counter("region_grows_total", "Regions added to sessions because messages needed room.", "",
		func(s *kshm.Stats) []float64 { return f(s.Engine.Grows) }), nil},
	{counter("region_shrinks_total", "Grown regions released once idle.", "",
		func(s *kshm.Stats) []float64 { return f(s.Engine.Shrinks) }), nil},
	{counter("grow_fallbacks_total", "Allocations refused because the regions could not grow: this side's maximum reached (limit), the peer's cap reached or no acknowledgement (peer_limit), no memory to back a region (memory).",
		"reason", func(s *kshm.Stats) []float64 {
			return f(s.Engine.GrowFallbacks.Limit, s.Engine.GrowFallbacks.PeerLimit, s.Engine.GrowFallbacks.Memory)
		}), []string{"limit", "peer_limit", "memory"}},
	{gauge("regions", "Regions of open sessions: this process's own (own) and the peers' it maps (peer).",
		"owner", func(s *kshm.Stats) []float64 { return g(s.Engine.Regions, s.Engine.PeerRegions) }), []string{"own", "peer"}},
	{gauge("region_committed_bytes", "Bytes of this process's own regions over open sessions (committed: every page reserved).", "",
		func(s *kshm.Stats) []float64 { return f(s.Engine.CommittedBytes) }), nil},
	{gauge("peer_region_mapped_bytes", "Bytes of the peers' regions this process maps over open sessions.", "",
		func(s *kshm.Stats) []float64 { return f(s.Engine.PeerMappedBytes) }), nil},
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range metrics {
		ch <- m.m.desc
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.read()
	for _, m := range metrics {
		vs := m.m.value(&s)
		if m.values == nil {
			ch <- prometheus.MustNewConstMetric(m.m.desc, m.m.kind, vs[0])
			continue
		}
		for i, lv := range m.values {
			ch <- prometheus.MustNewConstMetric(m.m.desc, m.m.kind, vs[i], lv)
		}
	}
}
