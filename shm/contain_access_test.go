package shm_test

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shmkit/kshm/internal/misbehave"
	"github.com/shmkit/kshm/internal/shmtest"
)

// TestContain_PeerCannotTouchOurRegion: a peer in another process holds the
// server's memfd (received with SCM_RIGHTS) and tries to map it writable,
// write it, grow it, shrink it and add a seal. The seals refuse all of it.
func TestContain_PeerCannotTouchOurRegion(t *testing.T) {
	es := startEchoServer(t, containConfig())
	good := startGoodClient(t, es.sock)
	child := shmtest.Start(t, misbehave.RoleProbe, childEnv(es)...)
	line := child.Expect(t, "probe ", 30*time.Second)
	t.Log(line)
	if !strings.HasPrefix(line, "probe breaches=[] ") {
		t.Errorf("the peer could change our region: %s", line)
	}
	good.check(t)
}

// TestContain_OtherUser: a client running as another user (uid 65534) is
// kept out: by the socket file's mode 0600 (it cannot connect), and, when
// the socket is opened to everyone (0666), by the uid checks of the
// handshake: the client's (it accepts only its own uid as server by
// default) and, when the client accepts root, the server's, which is
// logged. Needs root (to run the child as another user).
func TestContain_OtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	log := misbehave.CaptureLog(t)
	// A directory the other user can reach, holding the sockets and a copy
	// of this test binary it can execute.
	dir, err := os.MkdirTemp("", "kshm-uid-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "shm.test")
	copyExecutable(t, os.Args[0], bin)

	cases := []struct {
		name  string
		mode  os.FileMode
		allow string // the client accepts this server uid
		want  string
	}{
		{"socket 0600", 0o600, "", "dial not-allowed=false: dial unix"},
		{"socket 0666 client refuses", 0o666, "", "dial not-allowed=true: shm: peer uid not allowed: server uid 0"},
		{"socket 0666 server refuses", 0o666, "0", "dial not-allowed=true: shm: peer uid not allowed: server refused our uid 65534"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := containConfig()
			cfg.SocketMode = c.mode
			sock := filepath.Join(dir, string(rune('a'+i)))
			startEchoServerAt(t, sock, cfg)
			good := startGoodClient(t, sock)

			cmd := exec.Command(bin, "-test.run=^$")
			cmd.Env = append(os.Environ(), "KSHM_TEST_CHILD_ROLE="+misbehave.RoleDial, misbehave.EnvSock+"="+sock,
				misbehave.EnvAllow+"="+c.allow)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("child as uid 65534: %v: %s", err, out)
			}
			t.Logf("uid 65534: %s", strings.TrimSpace(string(out)))
			if !strings.Contains(string(out), c.want) {
				t.Fatalf("child said %q, want %q", out, c.want)
			}
			if c.mode == 0o600 && !strings.Contains(string(out), "permission denied") {
				t.Errorf("connect to a 0600 socket as another user: %s, want permission denied", out)
			}
			if c.allow != "" && len(log.Lines(sock, "peer uid not allowed", "client uid 65534")) == 0 {
				t.Error("the server did not log the refused uid")
			}
			good.check(t)
		})
	}
}

func copyExecutable(t *testing.T, from, to string) {
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
