package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shmkit/kshm/transport"
)

// upgradeConfig is one -upgrade run.
type upgradeConfig struct {
	race         bool          // build with the race detector
	concurrency  int           // calling goroutines in the client
	size         int           // payload bytes of each call
	phase        time.Duration // how long each phase lasts
	replacements int           // how many times the server is replaced
	readyWait    time.Duration // for a server to be ready, and the client to call
	stopWait     time.Duration // for a server to exit after SIGTERM
	shared       []string      // kshm flags for the server and the client
	// zeroConfig: no socket path on either side; the server publishes its
	// socket in kshm's per-host directory (under a temporary TMPDIR).
	zeroConfig bool
	// binDir holds server and client already built (empty: build them).
	binDir string
}

// phase is one phase of the run: what the client's calls did in it.
type phase struct {
	Name string
	Phase
}

// Phase is a phase as the client prints it (example/client's Phase).
type Phase struct {
	Calls, Failed, Mismatched int64
	Servers                   map[string]map[string]int64 // pid -> transport -> verified calls
	Last                      []struct{ Pid, Transport string }
	FirstError                string
}

// replacement is one server replacement and what followed it.
type replacement struct {
	OldPid, NewPid int
	StopTook       time.Duration // from SIGTERM to the old server's exit
	After          Phase         // the phase with the new server alone
}

// upgradeReport is what a -upgrade run did and found.
type upgradeReport struct {
	Phases       []phase
	Total        Phase
	Replacements []replacement
	Problems     []string
}

func (r *upgradeReport) problem(format string, a ...any) {
	r.Problems = append(r.Problems, fmt.Sprintf(format, a...))
}

// shmTo is how many of the phase's calls the server pid answered over
// shared memory.
func (p Phase) shmTo(pid int) int64 { return p.Servers[strconv.Itoa(pid)][transport.TransportShm] }

// allLastShmTo reports whether every goroutine's last call of the phase
// went over shared memory to pid.
func (p Phase) allLastShmTo(pid int) bool {
	for _, l := range p.Last {
		if l.Pid != strconv.Itoa(pid) || l.Transport != transport.TransportShm {
			return false
		}
	}
	return len(p.Last) > 0
}

// answeredBy describes who answered the phase's calls: "pid shm/inline/fallback, ...".
func (p Phase) answeredBy() string {
	var pids []string
	for pid := range p.Servers {
		pids = append(pids, pid)
	}
	sort.Strings(pids)
	var parts []string
	for _, pid := range pids {
		m := p.Servers[pid]
		name := pid
		if name == "" {
			name = "?"
		}
		parts = append(parts, fmt.Sprintf("%s %d/%d/%d", name, m[transport.TransportShm], m[transport.TransportInline], m[transport.TransportFallback]))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// serverProc is a running example server.
type serverProc struct {
	cmd    *exec.Cmd
	pid    int
	addr   string     // its TCP address, from its ready line
	sock   string     // its kshm socket path, from its ready line
	done   chan error // its exit status, once
	exited bool
}

// startServer starts the server binary with args and waits until it is
// ready (its kshm socket is its own, in place at the path).
func startServer(ctx context.Context, bin string, args, env []string, stderr io.Writer, readyWait time.Duration) (*serverProc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = prefixWriter("server| ", stderr)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start server: %w", err)
	}
	s := &serverProc{cmd: cmd, pid: cmd.Process.Pid, done: make(chan error, 1)}
	ready := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			if f := strings.Fields(line); len(f) == 3 && f[0] == "ready" {
				select {
				case ready <- f[1:]:
				default:
				}
			}
			fmt.Fprintf(stderr, "server %d| %s\n", s.pid, line)
		}
		s.done <- cmd.Wait()
	}()
	select {
	case a := <-ready:
		s.addr, s.sock = a[0], a[1]
		return s, nil
	case err := <-s.done:
		s.exited = true
		return nil, fmt.Errorf("server exited before it was ready: %v", err)
	case <-time.After(readyWait):
		err = fmt.Errorf("server not ready after %v", readyWait)
	case <-ctx.Done():
		err = errors.New("interrupted")
	}
	s.kill()
	return nil, err
}

// stop sends SIGTERM (the server's exit signal: Kitex's graceful stop) and
// waits for the exit; it returns how long that took.
func (s *serverProc) stop(timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return 0, fmt.Errorf("signal server %d: %w", s.pid, err)
	}
	select {
	case err := <-s.done:
		s.exited = true
		if err != nil {
			return time.Since(start), fmt.Errorf("server %d: %w", s.pid, err)
		}
		return time.Since(start), nil
	case <-time.After(timeout):
		return timeout, fmt.Errorf("server %d still running %v after SIGTERM", s.pid, timeout)
	}
}

// kill kills the server if it has not exited, and waits for it.
func (s *serverProc) kill() {
	if s == nil || s.exited {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	s.exited = true
}

// loadClient is the example client in -load mode.
type loadClient struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // "calling", "mark ..." and "total ..." lines
	done  chan error
}

func startLoadClient(bin string, args, env []string, stderr io.Writer) (*loadClient, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = prefixWriter("client| ", stderr)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start client: %w", err)
	}
	c := &loadClient{cmd: cmd, stdin: stdin, lines: make(chan string, 16), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if line == "calling" || strings.HasPrefix(line, "mark ") || strings.HasPrefix(line, "total ") {
				c.lines <- line
			}
			fmt.Fprintln(stderr, "client| "+line)
		}
		close(c.lines)
		c.done <- cmd.Wait()
	}()
	return c, nil
}

// expect waits for the client's next line with prefix.
func (c *loadClient) expect(prefix string, timeout time.Duration) (string, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				return "", fmt.Errorf("the client exited before printing %q", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return strings.TrimPrefix(l, prefix), nil
			}
		case <-t.C:
			return "", fmt.Errorf("no %q from the client within %v", prefix, timeout)
		}
	}
}

// mark ends the client's current phase and returns it.
func (c *loadClient) mark(name string, timeout time.Duration) (phase, error) {
	if _, err := fmt.Fprintf(c.stdin, "mark p\n"); err != nil {
		return phase{}, fmt.Errorf("client: %w", err)
	}
	js, err := c.expect("mark p ", timeout)
	if err != nil {
		return phase{}, err
	}
	p := phase{Name: name}
	return p, json.Unmarshal([]byte(js), &p.Phase)
}

// buildExample builds the example server and client into dir.
func buildExample(dir string, race bool, stderr io.Writer) error {
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if race {
		args = append(args, "-race")
	}
	build := exec.Command(goCommand(), append(args, serverPkg, clientPkg)...)
	build.Stdout, build.Stderr = stderr, stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	return nil
}

// upgrade runs the upgrade demonstration: a server, a client calling it
// from several goroutines with verified responses, and the server replaced
// cfg.replacements times the way the README's "Upgrading a server" says (a
// new server with the same flags, then SIGTERM to the old one). It prints
// each phase's calls and who answered them, and returns the report; the
// error says what failed (a call, a mismatch, a step of the procedure).
func upgrade(ctx context.Context, cfg upgradeConfig, stdout, stderr io.Writer) (*upgradeReport, error) {
	rep := &upgradeReport{}
	dir, err := os.MkdirTemp("", "kshm-upgrade-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	binDir := cfg.binDir
	if binDir == "" {
		fmt.Fprintln(stdout, "upgrade: building server and client")
		if err := buildExample(dir, cfg.race, stderr); err != nil {
			return nil, err
		}
		binDir = dir
	}
	serverBin, clientBin := filepath.Join(binDir, "server"), filepath.Join(binDir, "client")

	sockFlag, env := "-socket="+filepath.Join(dir, "kshm.sock"), os.Environ()
	if cfg.zeroConfig {
		// kshm's per-host directory is under os.TempDir: this run's own.
		sockFlag, env = "-socket=", append(env, "TMPDIR="+dir)
	}
	srv, err := startServer(ctx, serverBin, append([]string{"-addr", "127.0.0.1:0", sockFlag, "-reuse-port", "-exit-wait", "10s"}, cfg.shared...), env, stderr, cfg.readyWait)
	if err != nil {
		return nil, err
	}
	servers := []*serverProc{srv}
	defer func() { // whatever happens, no process is left behind
		for _, s := range servers {
			s.kill()
		}
	}()
	// Every server after the first: the same flags, its TCP port included.
	serverArgs := append([]string{"-addr", srv.addr, sockFlag, "-reuse-port", "-exit-wait", "10s"}, cfg.shared...)
	how := "-socket"
	if cfg.zeroConfig {
		how = "zero-config: no -socket on either side"
	}
	fmt.Fprintf(stdout, "upgrade: server %d ready: tcp %s (SO_REUSEPORT), kshm %s (%s)\n", srv.pid, srv.addr, srv.sock, how)

	cli, err := startLoadClient(clientBin, append([]string{"-load", "-addr", srv.addr, sockFlag,
		"-concurrency", strconv.Itoa(cfg.concurrency), "-sizes", strconv.Itoa(cfg.size)}, cfg.shared...), env, stderr)
	if err != nil {
		return nil, err
	}
	clientExited := false
	defer func() {
		if !clientExited {
			_ = cli.cmd.Process.Kill()
			<-cli.done
		}
	}()
	if _, err := cli.expect("calling", cfg.readyWait); err != nil {
		return nil, err
	}
	fmt.Fprintf(stdout, "upgrade: client calling Echo from %d goroutines with %d-byte payloads, every response verified byte for byte\n",
		cfg.concurrency, cfg.size)

	pause := func() error {
		select {
		case <-time.After(cfg.phase):
			return nil
		case <-ctx.Done():
			return errors.New("interrupted")
		}
	}
	markWait := 30 * time.Second
	mark := func(name string) (Phase, error) {
		p, err := cli.mark(name, markWait)
		if err != nil {
			return Phase{}, err
		}
		rep.Phases = append(rep.Phases, p)
		return p.Phase, nil
	}

	if err := pause(); err != nil {
		return nil, err
	}
	if _, err := mark(fmt.Sprintf("server %d alone", srv.pid)); err != nil {
		return nil, err
	}
	for i := 1; i <= cfg.replacements; i++ {
		old := srv
		nw, err := startServer(ctx, serverBin, serverArgs, env, stderr, cfg.readyWait)
		if err != nil {
			return nil, fmt.Errorf("replacement %d: %w", i, err)
		}
		servers = append(servers, nw)
		fmt.Fprintf(stdout, "upgrade: replacement %d: server %d started with the same flags and took the socket over; %d still serving\n", i, nw.pid, old.pid)
		if err := pause(); err != nil {
			return nil, err
		}
		if _, err := mark(fmt.Sprintf("%d started beside %d", nw.pid, old.pid)); err != nil {
			return nil, err
		}
		took, err := old.stop(cfg.stopWait)
		if err != nil {
			rep.problem("replacement %d: %v", i, err)
			old.kill()
			fmt.Fprintf(stdout, "upgrade: replacement %d: SIGTERM to server %d: %v\n", i, old.pid, err)
		} else {
			fmt.Fprintf(stdout, "upgrade: replacement %d: server %d exited %v after SIGTERM\n", i, old.pid, took.Round(time.Millisecond))
		}
		if _, err := mark(fmt.Sprintf("%d SIGTERMed until it exited", old.pid)); err != nil {
			return nil, err
		}
		if err := pause(); err != nil {
			return nil, err
		}
		after, err := mark(fmt.Sprintf("server %d alone", nw.pid))
		if err != nil {
			return nil, err
		}
		rep.Replacements = append(rep.Replacements, replacement{OldPid: old.pid, NewPid: nw.pid, StopTook: took, After: after})
		if after.shmTo(nw.pid) == 0 {
			rep.problem("replacement %d: no call went over shared memory to the new server %d after %d exited (answered: %s)",
				i, nw.pid, old.pid, after.answeredBy())
		}
		if !after.allLastShmTo(nw.pid) {
			rep.problem("replacement %d: not every caller's last call went over shared memory to the new server %d: %+v", i, nw.pid, after.Last)
		}
		srv = nw
	}

	// Stop the client, then the last server.
	if _, err := fmt.Fprintln(cli.stdin, "stop"); err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	cli.stdin.Close()
	js, err := cli.expect("mark final ", markWait)
	if err != nil {
		return nil, err
	}
	final := phase{Name: fmt.Sprintf("server %d, until the client stopped", srv.pid)}
	if err := json.Unmarshal([]byte(js), &final.Phase); err != nil {
		return nil, err
	}
	rep.Phases = append(rep.Phases, final)
	if js, err = cli.expect("total ", markWait); err != nil {
		return nil, err
	}
	if err := json.Unmarshal([]byte(js), &rep.Total); err != nil {
		return nil, err
	}
	select {
	case err := <-cli.done:
		clientExited = true
		if err != nil {
			rep.problem("client: %v (its log says why)", err)
		}
	case <-time.After(markWait):
		rep.problem("the client did not exit after stop")
	}
	if _, err := srv.stop(cfg.stopWait); err != nil {
		rep.problem("last server: %v", err)
	}

	var sum int64
	for _, p := range rep.Phases {
		sum += p.Calls
	}
	if sum != rep.Total.Calls {
		rep.problem("the phases add up to %d calls, the client's total is %d", sum, rep.Total.Calls)
	}
	if rep.Total.Failed+rep.Total.Mismatched > 0 {
		rep.problem("%d calls failed and %d responses mismatched; first: %s", rep.Total.Failed, rep.Total.Mismatched, rep.Total.FirstError)
	}
	if len(rep.Replacements) != cfg.replacements {
		rep.problem("%d replacements done, %d asked", len(rep.Replacements), cfg.replacements)
	}
	printUpgrade(stdout, cfg, rep)
	if len(rep.Problems) > 0 {
		return rep, errors.New(strings.Join(rep.Problems, "; "))
	}
	return rep, nil
}

func printUpgrade(w io.Writer, cfg upgradeConfig, rep *upgradeReport) {
	fmt.Fprintf(w, "upgrade: %d replacements under load (%d goroutines, %d-byte payloads, every response verified):\n",
		cfg.replacements, cfg.concurrency, cfg.size)
	fmt.Fprintf(w, "  %-42s %8s %7s %11s  %s\n", "phase", "calls", "failed", "mismatched", "answered by: server pid shm/inline/fallback")
	for _, p := range rep.Phases {
		fmt.Fprintf(w, "  %-42s %8d %7d %11d  %s\n", p.Name, p.Calls, p.Failed, p.Mismatched, p.answeredBy())
	}
	t := rep.Total
	fmt.Fprintf(w, "  %-42s %8d %7d %11d  %s\n", "total", t.Calls, t.Failed, t.Mismatched, t.answeredBy())
	for i, r := range rep.Replacements {
		last := "not every caller's last call"
		if r.After.allLastShmTo(r.NewPid) {
			last = "every caller's last call"
		}
		fmt.Fprintf(w, "upgrade: replacement %d: %d -> %d; %d exited %v after SIGTERM; then %d calls over shared memory to %d, %s over shared memory to %d\n",
			i+1, r.OldPid, r.NewPid, r.OldPid, r.StopTook.Round(time.Millisecond), r.After.shmTo(r.NewPid), r.NewPid, last, r.NewPid)
	}
	if len(rep.Problems) == 0 {
		fmt.Fprintf(w, "upgrade: PASS: %d calls, 0 failed, 0 mismatched; after each replacement the calls went over shared memory to the new server\n", t.Calls)
		return
	}
	for _, p := range rep.Problems {
		fmt.Fprintf(w, "upgrade: FAIL: %s\n", p)
	}
}
