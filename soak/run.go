package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/shmkit/kshm/shm"
)

// Config is one soak run.
type Config struct {
	Duration   time.Duration
	Clients    int // client processes alive at any time
	Goroutines int // calling goroutines per client
	// Regions grow: a session side starts with InitialRegionSize and
	// grows up to RegionSize when the calls in flight need room; a grown
	// region idle for ShrinkAfter is released. The clients' traffic comes
	// in bursts and calms (child.go), so that they grow and shrink again
	// and again.
	RegionSize        int
	InitialRegionSize int
	ShrinkAfter       time.Duration
	MaxMessage        int // largest message in shared memory
	MaxPayload        int // largest payload (above MaxMessage: fallback)
	CallTimeout       time.Duration
	ClientKillEvery   time.Duration // mean interval between client kills; 0: none
	ServerKillEvery   time.Duration // mean interval between server kills; 0: none
	// Mean interval between server replacements (0: none): a new server
	// with the same options takes over while the old one is SIGTERMed,
	// the README's upgrade procedure. The first comes a quarter into the
	// chaos part of the run, before any server kill.
	ServerReplaceEvery time.Duration
	Seed               int64
	Dir                string           // where the socket lives
	Command            func() *exec.Cmd // runs this program (the role is added to its environment)
	// Stderr receives the children's stderr, prefixed (default os.Stderr).
	Stderr io.Writer
}

// DefaultConfig is the configuration of `make soak` without -duration.
func DefaultConfig() Config {
	return Config{
		Duration:          10 * time.Minute,
		Clients:           4,
		Goroutines:        16,
		RegionSize:        4 << 20,
		InitialRegionSize: shm.MinRegionSize, // 1 MiB
		ShrinkAfter:       time.Second,
		MaxMessage:        256 << 10,
		MaxPayload:        512 << 10,
		CallTimeout:       5 * time.Second,
		ClientKillEvery:   3 * time.Second,
		ServerKillEvery:   20 * time.Second,
		Seed:              1,

		ServerReplaceEvery: 30 * time.Second,
	}
}

// stableShare is the part of the run at its end without server kills, and
// settle how long after the last server restart calls may still fail.
const (
	stableShare = 0.3
	settle      = 5 * time.Second
)

// Report is what a run did and found.
type Report struct {
	Elapsed                      time.Duration
	Calls, OK, Errors            int64
	StableErrors                 int64 // errors after the last server restart had settled
	Mismatches, Hung             int64
	Bytes                        int64
	ShmCalls, FallbackCalls      uint64 // client calls over kshm sessions / over plain Kitex
	InlineRequests, InlineRecv   uint64 // messages over a session socket (no shared memory)
	ClientKills, ServerKills     int
	ClientsStarted, ServerStarts int
	// Server replacements carried through (the old server SIGTERMed), and
	// those aborted by SIGKILLing the new server mid-handover (counted
	// among ServerKills too). ReplacementErrors are the calls that failed
	// during the carried-through ones: any is a failure.
	ServerReplacements, AbortedReplacements int
	ReplacementErrors                       int64
	// What the regions did: the clients' (all of them, killed ones up to
	// their last progress line) and the servers' (every server of the run).
	ClientGrowth, ServerGrowth Growth
	Failures                   []string
	HangDumps                  []string // goroutine dumps written when a call hung
}

// Passed reports whether the run found nothing wrong.
func (r *Report) Passed() bool { return len(r.Failures) == 0 }

func (r *Report) fail(format string, a ...any) {
	r.Failures = append(r.Failures, fmt.Sprintf(format, a...))
}

type proc struct {
	name  string
	cmd   *exec.Cmd
	lines chan string   // stats, quiet and final lines
	ready chan struct{} // closed at the child's "ready": it handles signals
	done  chan struct{}
	// exitErr is cmd.Wait's error: read it after done is closed.
	exitErr error

	mu   sync.Mutex // guards last
	last Progress

	// Errors before the stable phase: the client's errors since count as
	// stable-phase errors. Set when the stable phase starts, or at start
	// for a client started in it.
	stable  bool
	errBase int64
}

type runner struct {
	cfg Config
	out io.Writer
	rng *rand.Rand

	mu          sync.Mutex // guards rep, stableSince, retired, serverGrowth, failLines, server, retiring, replacing
	rep         Report
	stableSince time.Time // errors after this count as stable-phase errors
	retired     Progress  // progress of clients that are gone
	// serverGrowth: the growth of the servers that are gone, up to their
	// last progress line.
	serverGrowth Growth
	failLines    int

	errOut   *prefixWriter
	sock     string
	addr     string // the servers' TCP address (SO_REUSEPORT)
	server   *proc
	retiring *proc // the old server during a replacement
	// replacing: a replacement is under way; its clients' error lines are
	// printed.
	replacing bool
	clients   []*proc
	nextID    int
	// lastServerKill is when a server was last SIGKILLed: its failed
	// calls are over settle later.
	lastServerKill time.Time
}

// Run runs the soak and reports. The error is for a run that could not be
// carried out at all (the server never started); a run that found problems
// returns a Report whose Failures say what.
func Run(cfg Config, out io.Writer) (*Report, error) {
	if cfg.Stderr == nil {
		cfg.Stderr = os.Stderr
	}
	r := &runner{cfg: cfg, out: out, rng: rand.New(rand.NewPCG(uint64(cfg.Seed), 0x50a4)),
		sock: filepath.Join(cfg.Dir, "soak.sock"), errOut: &prefixWriter{w: cfg.Stderr, max: 200}}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	r.addr = addr
	start := time.Now()
	fmt.Fprintf(out, "soak: %v, %d clients x %d goroutines, regions from %d KiB growing to %d KiB (shrink after %v idle), max message %d KiB, payloads up to %d KiB, timeout %v, seed %d\n",
		cfg.Duration, cfg.Clients, cfg.Goroutines, cfg.InitialRegionSize>>10, cfg.RegionSize>>10, cfg.ShrinkAfter, cfg.MaxMessage>>10,
		cfg.MaxPayload>>10, cfg.CallTimeout, cfg.Seed)
	if err := r.startServer(); err != nil {
		return nil, err
	}
	defer r.killAll()
	for range cfg.Clients {
		r.startClient()
	}
	r.chaos(start)
	r.finish()
	r.rep.Elapsed = time.Since(start)
	r.print()
	return &r.rep, nil
}

// chaos kills and restarts clients and the server until the end of the run;
// the last stableShare of it kills no server.
func (r *runner) chaos(start time.Time) {
	cfg := r.cfg
	end := start.Add(cfg.Duration)
	chaosEnd := start.Add(time.Duration(float64(cfg.Duration) * (1 - stableShare)))
	next := func(mean time.Duration) time.Time {
		if mean <= 0 {
			return end.Add(time.Hour)
		}
		return time.Now().Add(time.Duration(r.rng.ExpFloat64() * float64(mean)))
	}
	nextClientKill, nextServerKill := next(cfg.ClientKillEvery), next(cfg.ServerKillEvery)
	nextReplace := end.Add(time.Hour)
	if cfg.ServerReplaceEvery > 0 {
		nextReplace = start.Add(chaosEnd.Sub(start) / 4)
	}
	nextStatus := time.Now().Add(10 * time.Second)
	var baseline map[string]Sample
	r.mu.Lock()
	r.stableSince = chaosEnd.Add(settle)
	r.mu.Unlock()
	for now := time.Now(); now.Before(end); now = time.Now() {
		time.Sleep(50 * time.Millisecond)
		if now.After(nextClientKill) {
			r.killClient()
			nextClientKill = next(cfg.ClientKillEvery)
		}
		// A server kill waits while a replacement is due within settle (the
		// replacement must not see the kill's failed calls), and until the
		// first replacement: that one replaces the server the run started
		// with, before any kill.
		firstDone := cfg.ServerReplaceEvery <= 0 || r.rep.ServerReplacements+r.rep.AbortedReplacements > 0
		if now.Before(chaosEnd) && now.After(nextServerKill) && nextReplace.Sub(now) > settle && firstDone {
			r.killServer()
			nextServerKill = next(cfg.ServerKillEvery)
			r.mu.Lock()
			if t := time.Now().Add(settle); t.After(r.stableSince) {
				r.stableSince = t
			}
			r.mu.Unlock()
		}
		if now.Before(chaosEnd) && now.After(nextReplace) {
			if wait := time.Until(r.lastServerKill.Add(settle)); wait > 0 {
				nextReplace = now.Add(wait)
			} else {
				r.replaceServer(start)
				nextReplace = next(cfg.ServerReplaceEvery)
			}
		}
		r.mu.Lock()
		stable := now.After(r.stableSince)
		r.mu.Unlock()
		if baseline == nil && stable {
			for _, c := range r.clients {
				c.mu.Lock()
				c.stable, c.errBase = true, c.last.Errors
				c.mu.Unlock()
			}
			baseline = r.sampleAll()
			fmt.Fprintf(r.out, "soak: %v: stable phase: no more server kills; baseline %s\n",
				time.Since(start).Round(time.Second), describe(baseline))
		}
		if now.After(nextStatus) {
			t := r.totals()
			fmt.Fprintf(r.out, "soak: %v (%s): %d calls, %d ok, %d errors, %d mismatches; %d clients and %d servers killed\n",
				time.Since(start).Round(time.Second), now.UTC().Format("15:04:05"), t.Calls, t.OK, t.Errors, t.Mismatches, r.rep.ClientKills, r.rep.ServerKills)
			nextStatus = now.Add(10 * time.Second)
		}
	}
	if baseline == nil {
		r.rep.fail("the run was too short to reach a stable phase (no leak check of descriptors and memory)")
		return
	}
	final := r.sampleAll()
	fmt.Fprintf(r.out, "soak: end of load: %s\n", describe(final))
	r.checkGrowth(baseline, final)
}

// checkGrowth compares descriptors and resident memory of the processes
// sampled at the start of the stable phase and at its end (under the same
// load): they must not grow with the client churn. The regions open at
// each sample come and go with the bursts, so they are left out: the
// memfds of our own regions (one descriptor each), and the shared memory
// of ours and the peers' mapped regions (resident once touched). A region
// leaked (not released, or not unmapped) is in neither count and shows.
func (r *runner) checkGrowth(before, after map[string]Sample) {
	for name, a := range after {
		b, ok := before[name]
		if !ok {
			continue // a client started since
		}
		fdSlack := 16
		if name == "server" {
			fdSlack += 3 * r.cfg.Clients
		}
		if a.otherFDs() > b.otherFDs()+fdSlack {
			r.rep.fail("%s: descriptors besides its regions' grew from %d to %d during the stable phase", name, b.otherFDs(), a.otherFDs())
		}
		if a.otherRSS() > b.otherRSS()+b.otherRSS()/2+64<<20 {
			r.rep.fail("%s: resident memory besides its regions grew from %d MiB to %d MiB during the stable phase",
				name, b.otherRSS()>>20, a.otherRSS()>>20)
		}
	}
}

// otherFDs are the descriptors besides the memfds of our regions.
func (s Sample) otherFDs() int { return s.FDs - int(s.Kshm.Engine.Regions) }

// otherRSS is resident memory besides the regions mapped (ours and the
// peers'), at least 0.
func (s Sample) otherRSS() int64 {
	return max(0, s.RSS-int64(s.Kshm.Engine.CommittedBytes+s.Kshm.Engine.PeerMappedBytes))
}

func describe(s map[string]Sample) string {
	var names []string
	for n := range s {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		e := s[n].Kshm.Engine
		fmt.Fprintf(&b, "%s %d fds %d MiB (%d+%d regions, %d+%d MiB); ", n, s[n].FDs, s[n].RSS>>20,
			e.Regions, e.PeerRegions, e.CommittedBytes>>20, e.PeerMappedBytes>>20)
	}
	return strings.TrimSuffix(b.String(), "; ")
}

// finish quiesces every client (no more calls; each must get all its
// buffers back while its sessions stay open), then checks that the server
// has all its buffers back, and stops everyone.
func (r *runner) finish() {
	for _, c := range r.clients {
		if !c.signal(syscall.SIGUSR2, 30*time.Second) {
			r.rep.fail("%s never got ready", c.name)
		}
	}
	for _, c := range r.clients {
		line, ok := c.expect("quiet ", r.cfg.CallTimeout+30*time.Second)
		if !ok {
			r.rep.fail("%s never became quiet", c.name)
			continue
		}
		var s Sample
		if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "quiet ")), &s); err != nil {
			r.rep.fail("%s: bad quiet line %q", c.name, line)
			continue
		}
		if s.Kshm.InUseBuffers != 0 {
			r.rep.fail("%s: %d shm buffers (%d bytes) still in use after quiescence", c.name, s.Kshm.InUseBuffers, s.Kshm.InUseBytes)
		}
	}
	var s Sample
	deadline := time.Now().Add(20 * time.Second)
	for {
		var ok bool
		s, ok = r.sample(r.server)
		if ok && s.Kshm.InUseBuffers == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(r.out, "soak: quiet: server has %d sessions, %d shm buffers in use, %d fds, %d MiB resident\n",
		s.Kshm.Sessions, s.Kshm.InUseBuffers, s.FDs, s.RSS>>20)
	if s.Kshm.InUseBuffers != 0 {
		r.rep.fail("server: %d shm buffers (%d bytes) still in use after every client went quiet", s.Kshm.InUseBuffers, s.Kshm.InUseBytes)
	}
	if int(s.Kshm.Sessions) > len(r.clients) {
		r.rep.fail("server: %d sessions open for %d live clients: sessions of killed clients were not closed", s.Kshm.Sessions, len(r.clients))
	}
	r.checkShrunk()
	for _, c := range r.clients {
		c.cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, c := range r.clients {
		if !c.wait(30 * time.Second) {
			r.rep.fail("%s did not exit after SIGTERM", c.name)
		}
		r.retire(c)
	}
	r.clients = nil
	r.server.cmd.Process.Signal(syscall.SIGTERM)
	if !r.server.wait(30 * time.Second) {
		r.rep.fail("server did not exit after SIGTERM")
	}
	r.retireServer(r.server)
	t := r.totals()
	r.rep.ClientGrowth = t.Growth
	r.mu.Lock()
	r.rep.ServerGrowth = r.serverGrowth
	r.mu.Unlock()
	if r.cfg.InitialRegionSize < r.cfg.RegionSize {
		if g := r.rep.ClientGrowth.Grows + r.rep.ServerGrowth.Grows; g == 0 {
			r.rep.fail("no region grew: the run did not exercise growth")
		}
		if s := r.rep.ClientGrowth.Shrinks + r.rep.ServerGrowth.Shrinks; s == 0 {
			r.rep.fail("no grown region was released: the run did not exercise shrinking")
		}
	}
	r.rep.Calls, r.rep.OK, r.rep.Errors, r.rep.Mismatches, r.rep.Hung, r.rep.Bytes =
		t.Calls, t.OK, t.Errors, t.Mismatches, t.Hung, t.Bytes
	r.rep.ShmCalls, r.rep.FallbackCalls, r.rep.InlineRequests, r.rep.InlineRecv = t.ShmCalls, t.FallbackCalls, t.InlineRequests, t.InlineRecv
	if t.Mismatches > 0 {
		r.rep.fail("%d responses did not match their requests", t.Mismatches)
	}
	if t.Hung > 0 {
		r.rep.fail("%d calls hung past their timeout", t.Hung)
	}
	if r.rep.StableErrors > 0 {
		r.rep.fail("%d calls failed in the stable phase (no server kill since %v)", r.rep.StableErrors, settle)
	}
	if t.OK == 0 {
		r.rep.fail("no call succeeded")
	}
	if t.ShmCalls == 0 || t.FallbackCalls+t.InlineRequests+t.InlineRecv == 0 {
		r.rep.fail("shared memory calls %d, fallbacks %d: the run did not exercise both paths",
			t.ShmCalls, t.FallbackCalls+t.InlineRequests+t.InlineRecv)
	}
}

func (r *runner) print() {
	rep := &r.rep
	w := r.out
	fmt.Fprintf(w, "soak: ran %v: %d client processes started (%d killed with SIGKILL), server started %d times (%d killed with SIGKILL)\n",
		rep.Elapsed.Round(time.Second), rep.ClientsStarted, rep.ClientKills, rep.ServerStarts, rep.ServerKills)
	fmt.Fprintf(w, "soak: server replaced %d times (new server with the same options, old one SIGTERMed; %d calls failed during them), %d replacements aborted (new server SIGKILLed mid-handover)\n",
		rep.ServerReplacements, rep.ReplacementErrors, rep.AbortedReplacements)
	fmt.Fprintf(w, "soak: %d calls: %d verified byte for byte (%.1f MiB of payload), %d failed with an error (%d in the stable phase), %d mismatched, %d hung\n",
		rep.Calls, rep.OK, float64(rep.Bytes)/(1<<20), rep.Errors, rep.StableErrors, rep.Mismatches, rep.Hung)
	fmt.Fprintf(w, "soak: paths: %d requests through kshm sessions, %d calls over plain Kitex (no session), %d requests and %d responses over a session socket (no shared memory)\n",
		rep.ShmCalls, rep.FallbackCalls, rep.InlineRequests, rep.InlineRecv)
	for _, g := range []struct {
		who string
		g   Growth
	}{{"clients'", rep.ClientGrowth}, {"servers'", rep.ServerGrowth}} {
		fmt.Fprintf(w, "soak: regions: the %s grew %d times and shrank %d times; allocations that could not grow: %d at the maximum, %d at the peer's cap, %d for lack of memory\n",
			g.who, g.g.Grows, g.g.Shrinks, g.g.FallbackLimit, g.g.FallbackPeerLimit, g.g.FallbackMemory)
	}
	for _, f := range rep.Failures {
		fmt.Fprintf(w, "soak: FAIL: %s\n", f)
	}
	for _, d := range rep.HangDumps {
		fmt.Fprintf(w, "soak: goroutine dump: %s\n", d)
	}
}

// totals adds up the progress of every client, gone or alive.
func (r *runner) totals() Progress {
	r.mu.Lock()
	t := r.retired
	r.mu.Unlock()
	for _, c := range r.clients {
		c.mu.Lock()
		add(&t, &c.last)
		c.mu.Unlock()
	}
	return t
}

func add(t, p *Progress) {
	t.Calls += p.Calls
	t.OK += p.OK
	t.Errors += p.Errors
	t.Mismatches += p.Mismatches
	t.Hung += p.Hung
	t.Bytes += p.Bytes
	t.ShmCalls += p.ShmCalls
	t.FallbackCalls += p.FallbackCalls
	t.InlineRequests += p.InlineRequests
	t.InlineRecv += p.InlineRecv
	t.Growth.add(p.Growth)
}

// retireServer adds a gone server's growth, as of its last progress line,
// to the servers' (once: the last line's growth is cleared).
func (r *runner) retireServer(p *proc) {
	p.mu.Lock()
	g := p.last.Growth
	p.last.Growth = Growth{}
	p.mu.Unlock()
	r.mu.Lock()
	r.serverGrowth.add(g)
	r.mu.Unlock()
}

// retire adds a gone client's last progress to the totals.
func (r *runner) retire(c *proc) {
	c.mu.Lock()
	p, stable, base := c.last, c.stable, c.errBase
	c.mu.Unlock()
	r.mu.Lock()
	add(&r.retired, &p)
	if stable {
		r.rep.StableErrors += p.Errors - base
	}
	r.mu.Unlock()
}

func (r *runner) env(role string) []string {
	cfg := r.cfg
	return append(os.Environ(),
		envRole+"="+role,
		envSock+"="+r.sock,
		envAddr+"="+r.addr,
		envG+"="+strconv.Itoa(cfg.Goroutines),
		envRegion+"="+strconv.Itoa(cfg.RegionSize),
		envInitial+"="+strconv.Itoa(cfg.InitialRegionSize),
		envShrink+"="+strconv.Itoa(int(cfg.ShrinkAfter/time.Millisecond)),
		envMaxMsg+"="+strconv.Itoa(cfg.MaxMessage),
		envMaxPay+"="+strconv.Itoa(cfg.MaxPayload),
		envTimeout+"="+strconv.Itoa(int(cfg.CallTimeout/time.Millisecond)),
		envDir+"="+cfg.Dir,
	)
}

func (r *runner) start(name, role string, extra ...string) (*proc, error) {
	cmd := r.cfg.Command()
	cmd.Env = append(r.env(role), extra...)
	cmd.Stderr = r.errOut.prefixed(name)
	// Children die with the soak, however it ends (Ctrl-C included).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{name: name, cmd: cmd, lines: make(chan string, 64), ready: make(chan struct{}), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		readLines(sc, func(l string) { r.handle(p, l) })
		io.Copy(io.Discard, stdout)
		p.exitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// handle takes one line of a child's stdout.
func (r *runner) handle(p *proc, l string) {
	switch {
	case l == "ready":
		close(p.ready)
	case strings.HasPrefix(l, "progress "):
		var pr Progress
		if json.Unmarshal([]byte(strings.TrimPrefix(l, "progress ")), &pr) == nil {
			p.mu.Lock()
			p.last = pr
			p.mu.Unlock()
		}
	case strings.HasPrefix(l, "mismatch ") || strings.HasPrefix(l, "hung "):
		r.mu.Lock()
		if r.failLines < 20 {
			fmt.Fprintf(r.out, "soak: %s: %s\n", p.name, l)
		}
		r.failLines++
		if strings.HasPrefix(l, "hung calls still in flight") {
			r.rep.fail("%s: %s", p.name, l)
		}
		r.mu.Unlock()
	case strings.HasPrefix(l, "hangdump "):
		r.mu.Lock()
		r.rep.HangDumps = append(r.rep.HangDumps, strings.TrimPrefix(l, "hangdump "))
		fmt.Fprintf(r.out, "soak: %s: a call is hung: goroutines dumped to %s\n", p.name, strings.TrimPrefix(l, "hangdump "))
		srv := r.server
		r.mu.Unlock()
		if p != srv && srv != nil {
			srv.cmd.Process.Signal(syscall.SIGHUP) // the server dumps its goroutines too
		}
	case strings.HasPrefix(l, "error "):
		r.mu.Lock()
		switch {
		case r.failLines >= 40:
		case r.replacing:
			r.failLines++
			fmt.Fprintf(r.out, "soak: %s: during a replacement: %s\n", p.name, l)
		case !r.stableSince.IsZero() && time.Now().After(r.stableSince):
			r.failLines++
			fmt.Fprintf(r.out, "soak: %s: stable phase: %s\n", p.name, l)
		}
		r.mu.Unlock()
	default:
		select {
		case p.lines <- l:
		default:
		}
	}
}

// signal sends sig once the child handles signals (a signal before that
// would kill it), waiting at most timeout; false if it never got ready.
func (p *proc) signal(sig os.Signal, timeout time.Duration) bool {
	select {
	case <-p.ready:
	case <-p.done:
		return false
	case <-time.After(timeout):
		return false
	}
	return p.cmd.Process.Signal(sig) == nil
}

// expect waits for a line with prefix from p.
func (p *proc) expect(prefix string, timeout time.Duration) (string, bool) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case l := <-p.lines:
			if strings.HasPrefix(l, prefix) {
				return l, true
			}
		case <-p.done:
			// Lines already queued may still hold it.
			for {
				select {
				case l := <-p.lines:
					if strings.HasPrefix(l, prefix) {
						return l, true
					}
				default:
					return "", false
				}
			}
		case <-t.C:
			return "", false
		}
	}
}

func (p *proc) waitReady(timeout time.Duration) bool {
	select {
	case <-p.ready:
		return true
	case <-p.done:
	case <-time.After(timeout):
	}
	return false
}

func (p *proc) wait(timeout time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		<-p.done
		return false
	}
}

func (r *runner) sample(p *proc) (Sample, bool) {
	var s Sample
	if !p.signal(syscall.SIGUSR1, 30*time.Second) {
		return s, false
	}
	line, ok := p.expect("stats ", 10*time.Second)
	if !ok {
		return s, false
	}
	return s, json.Unmarshal([]byte(strings.TrimPrefix(line, "stats ")), &s) == nil
}

func (r *runner) sampleAll() map[string]Sample {
	m := map[string]Sample{}
	if s, ok := r.sample(r.server); ok {
		m["server"] = s
	}
	for _, c := range r.clients {
		if s, ok := r.sample(c); ok {
			m[c.name] = s
		}
	}
	return m
}

var errNoServer = errors.New("soak: the server did not start")

func (r *runner) startServer() error {
	p, err := r.newServer()
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.server = p
	r.mu.Unlock()
	return nil
}

// newServer starts a server and waits until it is ready: its socket is in
// place at the path (the one before it replaced).
func (r *runner) newServer() (*proc, error) {
	var last error
	for attempt := 0; attempt < 3; attempt++ {
		p, err := r.start("server", "server")
		if err != nil {
			return nil, err
		}
		if p.waitReady(60 * time.Second) {
			r.rep.ServerStarts++
			return p, nil
		}
		p.cmd.Process.Kill()
		<-p.done
		last = fmt.Errorf("%w (attempt %d)", errNoServer, attempt+1)
	}
	return nil, last
}

// freeAddr is a TCP address of 127.0.0.1 with a port free now: the kernel
// picks it for a listener opened and closed at once.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

func (r *runner) startClient() {
	r.nextID++
	name := fmt.Sprintf("client-%d", r.nextID)
	p, err := r.start(name, "client", envID+"="+strconv.Itoa(r.nextID))
	if err != nil {
		r.rep.fail("start %s: %v", name, err)
		return
	}
	r.mu.Lock()
	p.stable = !r.stableSince.IsZero() && time.Now().After(r.stableSince)
	r.mu.Unlock()
	r.clients = append(r.clients, p)
	r.rep.ClientsStarted++
}

func (r *runner) killClient() {
	if len(r.clients) == 0 {
		return
	}
	i := r.rng.IntN(len(r.clients))
	c := r.clients[i]
	c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
	r.retire(c)
	r.clients = append(r.clients[:i], r.clients[i+1:]...)
	r.rep.ClientKills++
	r.startClient()
}

func (r *runner) killServer() {
	r.server.cmd.Process.Signal(syscall.SIGKILL)
	<-r.server.done
	r.retireServer(r.server)
	r.rep.ServerKills++
	r.lastServerKill = time.Now()
	time.Sleep(time.Duration(r.rng.IntN(300)) * time.Millisecond)
	if err := r.startServer(); err != nil {
		r.rep.fail("server restart: %v", err)
	}
}

// killAll kills whatever is still running (after a failure).
func (r *runner) killAll() {
	for _, c := range r.clients {
		c.cmd.Process.Kill()
		<-c.done
	}
	for _, p := range []*proc{r.server, r.retiring} {
		if p != nil {
			p.cmd.Process.Kill()
			<-p.done
		}
	}
}

// replaceServer replaces the server as the README's upgrade procedure
// says: a new server with the same options takes the socket over while the
// old one serves on; a client restarted meanwhile dials the new one; then
// the old server gets SIGTERM and must exit, its clients moving to the new
// one, with no call failing. Now and then (never the first time) the new
// server is SIGKILLed mid-handover instead: the old one serves on and takes
// its socket back, and the failed calls count as a server kill's.
func (r *runner) replaceServer(start time.Time) {
	abort := r.rep.ServerReplacements+r.rep.AbortedReplacements > 0 && r.rng.IntN(4) == 0
	old := r.server
	// Progress lines come every progressEvery: the errors counted before
	// the replacement are all that happened before it.
	time.Sleep(2*progressEvery + 100*time.Millisecond)
	before := r.totals().Errors
	r.mu.Lock()
	r.replacing = true
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.replacing = false
		r.mu.Unlock()
	}()
	p, err := r.newServer()
	if err != nil {
		r.rep.fail("replacement: new server: %v", err)
		return
	}
	r.mu.Lock()
	r.server, r.retiring = p, old
	r.mu.Unlock()
	r.killClient() // its successor dials the path: the new server
	if len(r.clients) > 0 && !r.clients[len(r.clients)-1].waitReady(30*time.Second) {
		r.rep.fail("replacement: a client started during it never got ready")
	}
	time.Sleep(time.Duration(200+r.rng.IntN(500)) * time.Millisecond)

	if abort {
		r.mu.Lock()
		r.replacing = false // the kill's failed calls are expected
		r.mu.Unlock()
		p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		r.retireServer(p)
		r.mu.Lock()
		r.server, r.retiring = old, nil
		if t := time.Now().Add(settle); t.After(r.stableSince) {
			r.stableSince = t
		}
		r.mu.Unlock()
		r.rep.ServerKills++
		r.rep.AbortedReplacements++
		r.lastServerKill = time.Now()
		fmt.Fprintf(r.out, "soak: %v: replacement aborted: the new server SIGKILLed mid-handover, the old one serves on\n",
			time.Since(start).Round(time.Second))
		return
	}

	stopStart := time.Now()
	old.cmd.Process.Signal(syscall.SIGTERM)
	exited := old.wait(30 * time.Second)
	took := time.Since(stopStart)
	r.retireServer(old)
	r.mu.Lock()
	r.retiring = nil
	r.mu.Unlock()
	switch {
	case !exited:
		r.rep.fail("replacement: the old server did not exit within 30s of SIGTERM (killed)")
	case old.exitErr != nil:
		r.rep.fail("replacement: the old server exited with %v after SIGTERM", old.exitErr)
	}
	time.Sleep(2*progressEvery + 200*time.Millisecond)
	failed := r.totals().Errors - before
	r.rep.ReplacementErrors += failed
	if failed > 0 {
		r.rep.fail("replacement %d: %d calls failed", r.rep.ServerReplacements+1, failed)
	}
	// The clients moved to the new server: it serves over kshm sessions.
	var served uint64
	for deadline := time.Now().Add(10 * time.Second); ; {
		if s, ok := r.sample(p); ok {
			served = s.Kshm.CallsServed
		}
		if served > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if served == 0 {
		r.rep.fail("replacement %d: the new server served no call over a kshm session", r.rep.ServerReplacements+1)
	}
	r.rep.ServerReplacements++
	fmt.Fprintf(r.out, "soak: %v: server replaced: the old one exited %v after SIGTERM, %d calls failed during the replacement, the new one has served %d over kshm sessions\n",
		time.Since(start).Round(time.Second), took.Round(time.Millisecond), failed, served)
}

// prefixWriter passes the children's stderr on, each line prefixed with the
// child's name, at most max lines in all.
type prefixWriter struct {
	mu    sync.Mutex // guards lines and w
	w     io.Writer
	max   int
	lines int
}

type prefixed struct {
	pw   *prefixWriter
	name string
	buf  []byte
}

func (pw *prefixWriter) prefixed(name string) io.Writer { return &prefixed{pw: pw, name: name} }

func (p *prefixed) Write(b []byte) (int, error) {
	p.buf = append(p.buf, b...)
	for {
		i := strings.IndexByte(string(p.buf), '\n')
		if i < 0 {
			break
		}
		line := string(p.buf[:i])
		p.buf = p.buf[i+1:]
		p.pw.mu.Lock()
		if p.pw.lines < p.pw.max {
			fmt.Fprintf(p.pw.w, "[%s] %s\n", p.name, line)
		} else if p.pw.lines == p.pw.max {
			fmt.Fprintf(p.pw.w, "[soak] more output from children suppressed\n")
		}
		p.pw.lines++
		p.pw.mu.Unlock()
	}
	return len(b), nil
}

// checkShrunk waits, every process quiet, until each has only its
// sessions' base regions left, ours and the peers' (every grown region
// released once idle for ShrinkAfter, and unmapped on both sides), for at
// most ShrinkAfter plus 10 s; each process with more fails the run.
func (r *runner) checkShrunk() {
	if r.cfg.InitialRegionSize >= r.cfg.RegionSize {
		return
	}
	procs := append([]*proc{r.server}, r.clients...)
	deadline := time.Now().Add(r.cfg.ShrinkAfter + 10*time.Second)
	for _, p := range procs {
		var s Sample
		var ok bool
		for {
			s, ok = r.sample(p)
			if ok && grownLeft(s) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		e := s.Kshm.Engine
		switch {
		case !ok:
			r.rep.fail("%s: no stats after quiescence", p.name)
		case grownLeft(s) != 0:
			r.rep.fail("%s: %d regions and %d of the peers' mapped for %d sessions, %v after every client went quiet: grown regions not released",
				p.name, e.Regions, e.PeerRegions, e.Sessions, r.cfg.ShrinkAfter+10*time.Second)
		}
		if p == r.server {
			fmt.Fprintf(r.out, "soak: quiet: server has %d sessions, %d regions of its own (%d MiB committed), %d of its clients' mapped (%d MiB), %d fds\n",
				e.Sessions, e.Regions, e.CommittedBytes>>20, e.PeerRegions, e.PeerMappedBytes>>20, s.FDs)
		}
	}
}

// grownLeft is how many regions a quiet process has beyond one base
// region of its own and one of the peer's per session.
func grownLeft(s Sample) int64 {
	e := s.Kshm.Engine
	return e.Regions + e.PeerRegions - 2*e.Sessions
}
