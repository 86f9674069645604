package shm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cloudwego/kitex/pkg/klog"
	"golang.org/x/sys/unix"
)

// Dial connects to a kshm listener at the unix socket path and performs the
// client side of the handshake.
func Dial(ctx context.Context, path string, cfg Config) (*Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	s, err := ClientSession(c.(*net.UnixConn), cfg)
	if err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

// ClientSession performs the client side of the handshake on a connected
// unix socket: it sends the preface itself. On success the session owns conn.
func ClientSession(conn *net.UnixConn, cfg Config) (*Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	pid, uid, err := peerCred(conn)
	if err != nil {
		return nil, err
	}
	if !cfg.allowed(uid) {
		return nil, fmt.Errorf("%w: server uid %d", ErrPeerNotAllowed, uid)
	}
	mine := hello{
		MinVersion: protoMinVersion, MaxVersion: protoMaxVersion, WakeMode: uint8(cfg.WakeMode),
		RegionSize: uint64(cfg.initialRegion()), RingEntries: uint32(cfg.RingEntries),
		SlotCount: uint32(cfg.maxBuffers()), MaxMessage: uint64(cfg.MaxMessageSize), PID: uint32(os.Getpid()),
		MaxInline: cfg.maxInline(), MaxTotal: uint64(cfg.RegionSize), PeerCap: cfg.maxPeerRegion(),
	}
	if _, err := conn.Write(append(preface[:], mine.encode()...)); err != nil {
		return nil, fmt.Errorf("%w: send hello: %v", ErrHandshake, err)
	}
	b, fd, err := recvWithFD(conn, helloSize)
	if err != nil {
		return nil, err
	}
	srv, err := decodeHello(b)
	if err != nil {
		closeFD(fd)
		return nil, err
	}
	if srv.Status != statusOK {
		closeFD(fd)
		if srv.Reason == errNotAllowedReason {
			return nil, fmt.Errorf("%w: server refused our uid %d", ErrPeerNotAllowed, os.Getuid())
		}
		return nil, fmt.Errorf("%w: server refused: %s", ErrHandshake, srv.Reason)
	}
	if srv.Version < protoMinVersion || srv.Version > protoMaxVersion {
		closeFD(fd)
		return nil, fmt.Errorf("%w: server chose version %d", ErrHandshake, srv.Version)
	}
	if fd < 0 {
		return nil, fmt.Errorf("%w: server sent no region", ErrHandshake)
	}
	if srv.RegionSize > cfg.maxPeerRegion() {
		closeFD(fd)
		return nil, fmt.Errorf("%w: server's region of %d bytes is above our MaxPeerRegionSize (%d)", ErrHandshake, srv.RegionSize, cfg.maxPeerRegion())
	}
	peer, err := mapPeerRegion(fd, cfg.maxPeerRegion())
	if err != nil {
		return nil, err
	}
	if err := agrees(peer, srv); err != nil {
		peer.unmap()
		return nil, err
	}
	local, err := createRegion(uint64(cfg.initialRegion()), uint64(cfg.RingEntries), nextPow2(uint64(srv.SlotCount)),
		uint64(cfg.maxBuffers()), uint64(cfg.MaxMessageSize), uint64(cfg.RegionSize), roleClient, pid)
	if err != nil {
		peer.unmap()
		return nil, err
	}
	// The deadline bounds the peer, not our own page reservation.
	conn.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	mine.Version = srv.Version
	if _, _, err := conn.WriteMsgUnix(mine.encode(), unix.UnixRights(local.fd), nil); err != nil {
		peer.unmap()
		local.unmap()
		return nil, fmt.Errorf("%w: send region: %v", ErrHandshake, err)
	}
	var f [frameHeaderSize]byte
	if _, err := readFull(conn, f[:]); err != nil {
		peer.unmap()
		local.unmap()
		return nil, fmt.Errorf("%w: wait for ready: %v", ErrHandshake, err)
	}
	if fh, err := parseFrameHeader(f[:]); err != nil || fh.Type != frameReady {
		peer.unmap()
		local.unmap()
		return nil, fmt.Errorf("%w: expected ready frame, got % x", ErrHandshake, f)
	}
	conn.SetDeadline(time.Time{})
	return newSession(cfg, conn, roleClient, local, peer, pid, uid, srv.MaxInline, srv.PeerCap), nil
}

const errNotAllowedReason = "peer uid not allowed"

// ServerSession performs the server side of the handshake on an accepted
// unix socket whose PrefaceSize bytes of preface the caller has already read
// and checked with IsPreface. The client's uid is checked first, before
// anything is read or reserved; at most maxServerHandshakes run at once in
// the process (a client that waits longer than HandshakeTimeout for its turn
// is refused, ErrBusy). The session adopts the client's wake mode if cfg
// accepts it (Config.AcceptWakeModes), and keeps cfg.WakeMode otherwise. On
// success the session owns conn.
func ServerSession(conn *net.UnixConn, cfg Config) (*Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	pid, uid, err := peerCred(conn)
	if err != nil {
		return nil, err
	}
	// The uid is known from the socket: refuse before reading or reserving
	// anything for a client we do not accept.
	if !cfg.allowed(uid) {
		refuse := hello{Status: statusRefused, Reason: errNotAllowedReason}
		conn.Write(refuse.encode())
		return nil, fmt.Errorf("%w: client uid %d (pid %d)", ErrPeerNotAllowed, uid, pid)
	}
	// Bound the handshakes that may reserve a region at once, process-wide
	// (the Listener and transports that call ServerSession share it).
	if !serverHandshakes.acquire(cfg.HandshakeTimeout) {
		refuse := hello{Status: statusRefused, Reason: "server busy"}
		conn.Write(refuse.encode())
		return nil, fmt.Errorf("%w: %w: %d in progress", ErrHandshake, ErrBusy, maxServerHandshakes)
	}
	defer serverHandshakes.release()
	b := make([]byte, helloSize)
	if _, err := readFull(conn, b); err != nil {
		return nil, fmt.Errorf("%w: read hello: %v", ErrHandshake, err)
	}
	cli, err := decodeHello(b)
	if err == nil && cli.Status != statusOK {
		err = fmt.Errorf("%w: client hello with status %d", ErrHandshake, cli.Status)
	}
	var v uint16
	if err == nil {
		v, err = negotiate(cli)
	}
	if err == nil && cli.RegionSize > cfg.maxPeerRegion() {
		err = fmt.Errorf("%w: client's region of %d bytes is above our MaxPeerRegionSize (%d)", ErrHandshake, cli.RegionSize, cfg.maxPeerRegion())
	}
	if err != nil {
		refuse := hello{Status: statusRefused, Reason: err.Error()}
		conn.Write(refuse.encode())
		return nil, err
	}
	if m := WakeMode(cli.WakeMode); cfg.acceptsWakeMode(m) {
		cfg.WakeMode = m
	}
	local, err := createRegion(uint64(cfg.initialRegion()), uint64(cfg.RingEntries), nextPow2(uint64(cli.SlotCount)),
		uint64(cfg.maxBuffers()), uint64(cfg.MaxMessageSize), uint64(cfg.RegionSize), roleServer, pid)
	if err != nil {
		refuse := hello{Status: statusRefused, Reason: "server cannot create its region"}
		conn.Write(refuse.encode())
		return nil, err
	}
	// The deadline bounds the peer, not our own page reservation.
	conn.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	mine := hello{
		MinVersion: protoMinVersion, MaxVersion: protoMaxVersion, Version: v, WakeMode: uint8(cfg.WakeMode),
		RegionSize: uint64(cfg.initialRegion()), RingEntries: uint32(cfg.RingEntries),
		SlotCount: uint32(cfg.maxBuffers()), MaxMessage: uint64(cfg.MaxMessageSize), PID: uint32(os.Getpid()),
		MaxInline: cfg.maxInline(), MaxTotal: uint64(cfg.RegionSize), PeerCap: cfg.maxPeerRegion(),
	}
	if _, _, err := conn.WriteMsgUnix(mine.encode(), unix.UnixRights(local.fd), nil); err != nil {
		local.unmap()
		return nil, fmt.Errorf("%w: send region: %v", ErrHandshake, err)
	}
	ack, fd, err := recvWithFD(conn, helloSize)
	if err != nil {
		local.unmap()
		return nil, err
	}
	ah, err := decodeHello(ack)
	if err == nil && (ah.Status != statusOK || ah.Version != v || ah.RegionSize != cli.RegionSize ||
		ah.RingEntries != cli.RingEntries || ah.SlotCount != cli.SlotCount || ah.MaxMessage != cli.MaxMessage ||
		ah.MaxTotal != cli.MaxTotal || ah.PeerCap != cli.PeerCap) {
		err = fmt.Errorf("%w: client's second hello disagrees with its first", ErrHandshake)
	}
	if err == nil && fd < 0 {
		err = fmt.Errorf("%w: client sent no region", ErrHandshake)
	}
	if err != nil {
		closeFD(fd)
		local.unmap()
		return nil, err
	}
	peer, err := mapPeerRegion(fd, cfg.maxPeerRegion())
	if err == nil {
		if err = agrees(peer, cli); err != nil {
			peer.unmap()
		}
	}
	if err != nil {
		local.unmap()
		return nil, err
	}
	var f [frameHeaderSize]byte
	putFrameHeader(f[:], frameReady, 0)
	if _, err := conn.Write(f[:]); err != nil {
		local.unmap()
		peer.unmap()
		return nil, fmt.Errorf("%w: send ready: %v", ErrHandshake, err)
	}
	conn.SetDeadline(time.Time{})
	return newSession(cfg, conn, roleServer, local, peer, pid, uid, cli.MaxInline, cli.PeerCap), nil
}

// agrees checks that a mapped region matches what its owner announced.
func agrees(r *region, h hello) error {
	g := r.geo
	if g.size != h.RegionSize || g.ringEntries != uint64(h.RingEntries) || g.slotCount != uint64(h.SlotCount) ||
		g.maxMessage != h.MaxMessage || g.maxTotal != h.MaxTotal || g.index != 0 {
		return fmt.Errorf("%w: peer's region (size %d, ring %d, slots %d, max %d) disagrees with its hello (%d, %d, %d, %d)",
			ErrHandshake, g.size, g.ringEntries, g.slotCount, g.maxMessage, h.RegionSize, h.RingEntries, h.SlotCount, h.MaxMessage)
	}
	return nil
}

// recvWithFD reads exactly n bytes, the first of which carry at most one
// descriptor (SCM_RIGHTS). fd is -1 when none came.
func recvWithFD(conn *net.UnixConn, n int) ([]byte, int, error) {
	b := make([]byte, n)
	oob := make([]byte, unix.CmsgSpace(4*4))
	k, oobn, flags, _, err := conn.ReadMsgUnix(b, oob)
	if err != nil {
		return nil, -1, fmt.Errorf("%w: read: %v", ErrHandshake, err)
	}
	fd := -1
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, -1, fmt.Errorf("%w: control message: %v", ErrHandshake, err)
		}
		var fds []int
		for _, m := range msgs {
			r, err := unix.ParseUnixRights(&m)
			if err == nil {
				fds = append(fds, r...)
			}
		}
		if len(fds) != 1 {
			for _, f := range fds {
				unix.Close(f)
			}
			return nil, -1, fmt.Errorf("%w: expected one descriptor, got %d", ErrHandshake, len(fds))
		}
		fd = fds[0]
	}
	if flags&unix.MSG_CTRUNC != 0 {
		closeFD(fd)
		return nil, -1, fmt.Errorf("%w: control message truncated", ErrHandshake)
	}
	if _, err := readFull(conn, b[k:]); err != nil {
		closeFD(fd)
		return nil, -1, fmt.Errorf("%w: read: %v", ErrHandshake, err)
	}
	return b, fd, nil
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// peerCred returns the peer's pid and uid from SO_PEERCRED.
func peerCred(conn *net.UnixConn) (int32, uint32, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if cerr != nil {
		return 0, 0, fmt.Errorf("%w: SO_PEERCRED: %v", ErrHandshake, cerr)
	}
	return cred.Pid, cred.Uid, nil
}

// maxServerHandshakes bounds the server handshakes in progress in this
// process, each of which may reserve a region.
const maxServerHandshakes = 16

var serverHandshakes = handshakeSlots{c: make(chan struct{}, maxServerHandshakes)}

type handshakeSlots struct{ c chan struct{} }

// acquire waits for a slot at most d.
func (h handshakeSlots) acquire(d time.Duration) bool {
	select {
	case h.c <- struct{}{}:
		return true
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case h.c <- struct{}{}:
		return true
	case <-t.C:
		return false
	}
}

func (h handshakeSlots) release() { <-h.c }

// Listener accepts kshm sessions on a unix socket. Handshakes run
// concurrently, each bounded by Config.HandshakeTimeout, so a stalled client
// delays nobody else.
type Listener struct {
	cfg      Config
	path     string
	ln       *net.UnixListener
	sessions chan *Session
	done     chan struct{}
	once     sync.Once
	wg       sync.WaitGroup
}

// Listen creates the unix socket at path with mode cfg.SocketMode (created
// with that mode in a private directory, then renamed into place) and starts
// accepting. A stale socket file nobody listens on is replaced.
func Listen(path string, cfg Config) (*Listener, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ln, err := ListenUnix(path, cfg.SocketMode)
	if err != nil {
		return nil, err
	}
	l := &Listener{cfg: cfg, path: path, ln: ln, sessions: make(chan *Session), done: make(chan struct{})}
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

// ListenUnix creates a listening unix socket at path with the given mode,
// never exposing it with a wider mode. Used by Listen and by transports that
// share the socket with other protocols.
func ListenUnix(path string, mode os.FileMode) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("shm: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, 100*time.Millisecond); err == nil {
			c.Close()
			return nil, fmt.Errorf("shm: %s: address already in use", path)
		}
		os.Remove(path)
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".kshm-")
	if err != nil {
		return nil, fmt.Errorf("shm: listen %s: %w", path, err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("shm: listen %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("shm: chmod socket: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return nil, fmt.Errorf("shm: listen %s: %w", path, err)
	}
	return ln, nil
}

func (l *Listener) acceptLoop() {
	defer l.wg.Done()
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			select {
			case <-l.done:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			klog.Warnf("kshm: accept on %s: %v", l.path, err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		l.wg.Add(1)
		go l.handshake(c)
	}
}

func (l *Listener) handshake(c *net.UnixConn) {
	defer l.wg.Done()
	c.SetDeadline(time.Now().Add(l.cfg.HandshakeTimeout))
	var p [PrefaceSize]byte
	if _, err := readFull(c, p[:]); err != nil || !IsPreface(p[:]) {
		klog.Warnf("kshm: %s: connection without kshm preface closed", l.path)
		c.Close()
		return
	}
	s, err := ServerSession(c, l.cfg)
	if err != nil {
		klog.Warnf("kshm: %s: handshake: %v", l.path, err)
		c.Close()
		return
	}
	select {
	case l.sessions <- s:
	case <-l.done:
		s.Close()
	}
}

// Accept returns the next session whose handshake succeeded.
func (l *Listener) Accept() (*Session, error) {
	select {
	case s := <-l.sessions:
		return s, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Addr is the listening socket's address.
func (l *Listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Close stops accepting, removes the socket file and waits for handshakes in
// progress. Sessions already accepted stay open.
func (l *Listener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.ln.Close()
		os.Remove(l.path)
	})
	l.wg.Wait()
	return nil
}
