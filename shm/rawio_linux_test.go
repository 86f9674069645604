package shm

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The raw send and receive keep what the session relies on: bytes and a
// descriptor arrive together, an empty socket reports EAGAIN rather than
// blocking, a closed peer reads as io.EOF, and recvmsg waits for readiness
// and honours the read deadline.
func TestRawSocketIO(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	fa, fb := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	ca, err := net.FileConn(fa)
	fa.Close()
	if err != nil {
		t.Fatal(err)
	}
	cb, err := net.FileConn(fb)
	fb.Close()
	if err != nil {
		t.Fatal(err)
	}
	a, b := ca.(*net.UnixConn), cb.(*net.UnixConn)
	defer a.Close()
	ra, rb := rawConnOf(a), rawConnOf(b)

	buf := make([]byte, 16)
	oob := make([]byte, unix.CmsgSpace(4))
	var rerr error
	if err := rb.Read(func(fd uintptr) bool {
		_, _, _, rerr = rawRecvmsg(int(fd), buf, oob)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(rerr, unix.EAGAIN) {
		t.Fatalf("empty socket: %v, want EAGAIN", rerr)
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	var n int
	var werr error
	if err := ra.Write(func(fd uintptr) bool {
		n, werr = rawSendmsg(int(fd), []byte("hello"), unix.UnixRights(int(w.Fd())))
		return true
	}); err != nil || werr != nil || n != 5 {
		t.Fatalf("send: %d, %v, %v", n, err, werr)
	}
	k, oobn, flags, err := recvmsg(rb, buf, oob)
	if err != nil || string(buf[:k]) != "hello" || flags&unix.MSG_CTRUNC != 0 {
		t.Fatalf("recv: %q, flags %#x, %v", buf[:k], flags, err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages: %d, %v", len(msgs), err)
	}
	got, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(got) != 1 {
		t.Fatalf("rights: %v, %v", got, err)
	}
	// The received descriptor is the pipe's write end, close-on-exec.
	if fl, err := unix.FcntlInt(uintptr(got[0]), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("received descriptor flags %#x, %v: want FD_CLOEXEC", fl, err)
	}
	if _, err := unix.Write(got[0], []byte("x")); err != nil {
		t.Fatal(err)
	}
	unix.Close(got[0])
	one := make([]byte, 1)
	if _, err := r.Read(one); err != nil || one[0] != 'x' {
		t.Fatalf("pipe read %q, %v", one, err)
	}

	// recvmsg waits for readiness, up to the deadline.
	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, _, _, err := recvmsg(rb, buf, oob); !isTimeout(err) {
		t.Fatalf("recv past deadline: %v, want a timeout", err)
	}
	b.SetReadDeadline(time.Time{})
	go func() {
		time.Sleep(10 * time.Millisecond)
		a.Close()
	}()
	if _, _, _, err := recvmsg(rb, buf, oob); err != io.EOF {
		t.Fatalf("recv after the peer closed: %v, want io.EOF", err)
	}
	b.Close()
	if _, _, _, err := recvmsg(rb, buf, oob); err == nil {
		t.Fatal("recv on a closed conn succeeded")
	}
	if err := rawConnOf(nil).Write(func(uintptr) bool { return true }); err == nil {
		t.Fatal("a broken conn accepted a write")
	}
}
