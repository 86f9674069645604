package shm

import (
	"io"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The session's socket I/O after the handshake (wake frames, control
// frames, inline messages) uses raw, non-blocking system calls, waiting
// for readiness through the runtime's poller (syscall.RawConn). The runtime
// wakes its sysmon thread from its deep sleep on every syscall.Syscall
// that enters while all processors were idle, and sysmon then polls every
// 20 µs for about a millisecond before it backs off again: in a process
// whose receiver sleeps and wakes now and then, but is otherwise busy
// polling, that was a third of all its context switches (Kitex 16 KiB,
// c=1). A non-blocking send or receive never blocks, so it needs no
// processor hand-off; the runtime's own osyield and netpoll calls are raw
// for the same reason.

// rawSendmsg sends b with the control message oob, without blocking.
func rawSendmsg(fd int, b, oob []byte) (int, error) {
	var msg unix.Msghdr
	var iov unix.Iovec
	if len(b) > 0 {
		iov.Base = &b[0]
		iov.SetLen(len(b))
		msg.Iov = &iov
		msg.SetIovlen(1)
	}
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	n, _, e := syscall.RawSyscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
	for e == unix.EINTR {
		n, _, e = syscall.RawSyscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
	}
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// rawRecvmsg receives into p and oob without blocking: unix.EAGAIN when
// nothing is there, io.EOF when the peer has closed.
func rawRecvmsg(fd int, p, oob []byte) (n, oobn, flags int, err error) {
	var msg unix.Msghdr
	var iov unix.Iovec
	if len(p) > 0 {
		iov.Base = &p[0]
		iov.SetLen(len(p))
		msg.Iov = &iov
		msg.SetIovlen(1)
	}
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	r, _, e := syscall.RawSyscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
	for e == unix.EINTR {
		r, _, e = syscall.RawSyscall(unix.SYS_RECVMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
	}
	if e != 0 {
		return 0, 0, 0, e
	}
	if r == 0 && len(p) > 0 {
		return 0, int(msg.Controllen), int(msg.Flags), io.EOF
	}
	return int(r), int(msg.Controllen), int(msg.Flags), nil
}

// recvmsg waits until the socket is readable (or its read deadline passes,
// or it is closed) and receives once.
func recvmsg(rc syscall.RawConn, p, oob []byte) (n, oobn, flags int, err error) {
	rerr := rc.Read(func(fd uintptr) bool {
		n, oobn, flags, err = rawRecvmsg(int(fd), p, oob)
		return err != unix.EAGAIN
	})
	if rerr != nil {
		return 0, 0, 0, rerr
	}
	return n, oobn, flags, err
}

// rawConnOf returns conn's syscall.RawConn. The handshake has already used
// it (SO_PEERCRED), so it cannot fail; if it did, every read and write
// fails with its error and the session closes.
func rawConnOf(conn *net.UnixConn) syscall.RawConn {
	if conn == nil {
		return brokenConn{net.ErrClosed}
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		return brokenConn{err}
	}
	return rc
}

type brokenConn struct{ err error }

func (b brokenConn) Control(func(uintptr)) error    { return b.err }
func (b brokenConn) Read(func(uintptr) bool) error  { return b.err }
func (b brokenConn) Write(func(uintptr) bool) error { return b.err }
