package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/shmtest"
	"github.com/shmkit/kshm/shm"
)

// Child roles.
const (
	roleHolder = "kshm-holder" // holds a live session with buffers in flight
	roleCLI    = "kshm-cli"    // runs the command with $KSHM_CLI_ARGS (the permission test)
)

func TestMain(m *testing.M) {
	switch shmtest.Role() {
	case "":
		os.Exit(m.Run())
	case roleHolder:
		os.Exit(childHolder())
	case roleCLI:
		os.Exit(run(strings.Fields(os.Getenv("KSHM_CLI_ARGS")), os.Stdout, os.Stdout))
	default:
		fmt.Fprintln(os.Stderr, "unknown child role", shmtest.Role())
		os.Exit(2)
	}
}

// Payloads the holder leaves in flight, and their message ids.
var (
	toServer    = []byte("request held by the server, never released: 0123456789abcdef")
	toClient    = []byte("response held by the client")
	notSent     = []byte("allocated by the server, not sent")
	idToServer  = uint64(4242)
	idToClient  = uint64(777)
	holderSleep = 2 * time.Minute // bounded, in case the parent dies without killing us
)

// childHolder opens a session with itself (a client and a server session in
// this process, so this process owns both regions), leaves one message with
// each side unreleased and one buffer allocated and unsent, then waits.
func childHolder() int {
	cfg := shm.DefaultConfig()
	cfg.RegionSize, cfg.MaxMessageSize, cfg.RingEntries = 2<<20, 64<<10, 64
	ln, err := shm.Listen(os.Getenv("KSHM_SOCK"), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx := context.Background()
	cli, err := shm.Dial(ctx, os.Getenv("KSHM_SOCK"), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	srv, err := ln.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln.Close()
	send := func(s *shm.Session, id uint64, p []byte) error {
		b, err := s.Alloc(len(p))
		if err != nil {
			return err
		}
		copy(b.Bytes(), p)
		return s.Send(ctx, id, 9, 1, b)
	}
	// A round trip first, so the counters show traffic and releases.
	for i := uint64(1); i <= 3; i++ {
		if err := send(cli, i, []byte("ping")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		m, err := srv.Recv(ctx)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		srv.Release(&m)
	}
	if err := send(cli, idToServer, toServer); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := send(srv, idToClient, toClient); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	held1, err := srv.Recv(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	held2, err := cli.Recv(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b, err := srv.Alloc(len(notSent))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	copy(b.Bytes(), notSent)
	// Let a housekeeping pass reclaim the released pings.
	time.Sleep(500 * time.Millisecond)
	shmtest.Printf("ready")
	time.Sleep(holderSleep)
	srv.Release(&held1)
	cli.Release(&held2)
	return 0
}

func startHolder(t *testing.T) int {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s")
	p := shmtest.Start(t, roleHolder, "KSHM_SOCK="+sock)
	p.Expect(t, "ready", 20*time.Second)
	return p.Cmd.Process.Pid
}

func runCmd(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return out.String(), errb.String(), code
}

func mustContain(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}

func TestStats_LiveProcess(t *testing.T) {
	pid := startHolder(t)
	out, errs, code := runCmd(t, "stats", strconv.Itoa(pid))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	t.Logf("kshm stats %d:\n%s", pid, out)
	mustContain(t, out,
		fmt.Sprintf("pid %d: 2 kshm sessions (1 client side, 1 server side)", pid),
		fmt.Sprintf("client side, peer pid %d, open", pid),
		fmt.Sprintf("server side, peer pid %d, open", pid),
		"messages   sent 4 (",    // the client: 3 pings and the held request
		"received 4 (",           // the server received them
		"messages   sent 1 (",    // the server's response
		"held by the peer 1",     // each side's unreleased message
		"buffers    in use 2 (",  // the server: one sent and held, one not sent
		"buffers    in use 1 (",  // the client: the held request
		"total of 2 sessions:",   // the sum
		"allocs     4, frees 3,", // the client's pings came back
	)
}

func TestDump_LiveProcess(t *testing.T) {
	pid := startHolder(t)
	out, errs, code := runCmd(t, "dump", strconv.Itoa(pid))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	t.Logf("kshm dump %d:\n%s", pid, out)
	mustContain(t, out,
		fmt.Sprintf("pid %d: 2 kshm regions", pid),
		"client side of the session with pid",
		"server side of the session with pid",
		"send ring 64 x 64 B",
		"max message 64.0 KiB",
		fmt.Sprintf("peer %d (sent)", pid),
		fmt.Sprintf("owner %d (not sent)", pid),
		"FIRST BYTES",
	)
	// Each buffer's row: message id, length and first bytes.
	for _, b := range []struct {
		id uint64
		p  []byte
	}{{idToServer, toServer}, {idToClient, toClient}, {0, notSent}} {
		found := false
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) > 8 && strings.Contains(l, head(b.p)) && strings.Contains(l, fmt.Sprintf(" %d ", len(b.p))) &&
				strings.Contains(l, fmt.Sprintf(" %d ", b.id)) {
				found = true
			}
		}
		if !found {
			t.Errorf("no row for message %d with first bytes %s", b.id, head(b.p))
		}
	}
	if strings.Contains(out, hex.EncodeToString(toServer[headBytes:headBytes+4])) {
		t.Errorf("dump without -all shows more than %d bytes", headBytes)
	}
}

func TestDump_AllPrintsWholeBuffers(t *testing.T) {
	pid := startHolder(t)
	out, errs, code := runCmd(t, "dump", "-all", strconv.Itoa(pid))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	mustContain(t, out,
		fmt.Sprintf("message id %d", idToServer),
		fmt.Sprintf("message id %d", idToClient),
		fmt.Sprintf("length %d", len(toServer)),
	)
	// hex.Dump's ASCII column shows the whole payload, 16 bytes a line.
	for _, p := range [][]byte{toServer, toClient, notSent} {
		for i := 0; i < len(p); i += 16 {
			chunk := string(p[i:min(i+16, len(p))])
			if !strings.Contains(out, "|"+chunk) {
				t.Errorf("whole buffer dump lacks %q:\n%s", chunk, out)
			}
		}
	}
}

func TestStats_NoSuchProcess(t *testing.T) {
	// A child that has exited and been reaped: its pid names no process
	// (unless reused at once, which a short test will not see).
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skip("no true(1):", err)
	}
	pid := cmd.Process.Pid
	_, errs, code := runCmd(t, "stats", strconv.Itoa(pid))
	if code != 1 || !strings.Contains(errs, fmt.Sprintf("no process with pid %d", pid)) {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	_, errs, code = runCmd(t, "dump", strconv.Itoa(pid))
	if code != 1 || !strings.Contains(errs, fmt.Sprintf("no process with pid %d", pid)) {
		t.Fatalf("dump: exit %d, stderr %q", code, errs)
	}
}

func TestStats_NoRegions(t *testing.T) {
	// This test process has no kshm session.
	pid := os.Getpid()
	out, errs, code := runCmd(t, "stats", strconv.Itoa(pid))
	if code != 0 || !strings.Contains(out, fmt.Sprintf("pid %d: no kshm sessions", pid)) {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errs)
	}
	out, _, code = runCmd(t, "dump", strconv.Itoa(pid))
	if code != 0 || !strings.Contains(out, fmt.Sprintf("pid %d: no kshm regions", pid)) {
		t.Fatalf("dump: exit %d, stdout %q", code, out)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"stats"}, {"stats", "abc"}, {"dump", "-x", "1"}, {"frob", "1"}} {
		_, errs, code := runCmd(t, args...)
		if code != 2 || !strings.Contains(errs, "usage:") && !strings.Contains(errs, "not a process id") {
			t.Errorf("%q: exit %d, stderr %q", args, code, errs)
		}
	}
}

// TestStats_PermissionDenied runs the command as an unprivileged user
// against a process of ours. As root the test drops to uid 65534 in a child;
// otherwise it reads pid 1, which belongs to another user on most systems.
func TestStats_PermissionDenied(t *testing.T) {
	if os.Geteuid() != 0 {
		fi, err := os.Stat("/proc/1")
		if err != nil || fi.Sys().(*syscall.Stat_t).Uid == uint32(os.Geteuid()) {
			t.Skip("pid 1 is ours or unreadable; cannot provoke a permission error")
		}
		_, errs, code := runCmd(t, "stats", "1")
		if code != 1 || !strings.Contains(errs, "permission denied reading the descriptors of pid 1") {
			t.Fatalf("exit %d, stderr %q", code, errs)
		}
		return
	}
	// The test binary must be executable by the unprivileged user: copy it
	// into a world-readable directory.
	dir, err := os.MkdirTemp("", "kshm-perm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "kshm.test")
	copyFile(t, os.Args[0], bin)
	pid := startHolder(t)
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "KSHM_TEST_CHILD_ROLE="+roleCLI, "KSHM_CLI_ARGS=stats "+strconv.Itoa(pid))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 1 {
		t.Fatalf("unprivileged kshm stats: %v, output %q", err, out)
	}
	want := fmt.Sprintf("permission denied reading the descriptors of pid %d (it runs as uid 0; we are uid 65534)", pid)
	if !strings.Contains(string(out), want) {
		t.Fatalf("output %q lacks %q", out, want)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
