package transport

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/shmkit/kshm/shm"
)

// KindAnnounce is the kind of the first message of every session, sent by
// the server before anything else: which addresses the server behind the
// session serves, and which host and network namespace it runs in (an
// announcement). It is outside codec's kinds, and the client reads it
// before the session carries any call.
const KindAnnounce uint16 = 0x4b41 // "KA"

// maxAnnounceSize bounds an announcement read from the peer.
const maxAnnounceSize = 64 << 10

// ErrNoAnnounce: the server did not start the session with a valid
// announcement (an older or foreign server); the session is not used.
var ErrNoAnnounce = errors.New("kshm: the server did not announce its addresses")

// announce is what a server tells each client at the start of a session.
type announce struct {
	Version int      `json:"v"`
	Addrs   []string `json:"addrs"`          // normalized host:port the server serves
	Unix    string   `json:"unix,omitempty"` // the server's service address when it is a unix socket
	BootID  string   `json:"boot"`
	NetNS   uint64   `json:"netns"`
	PID     int      `json:"pid"`

	set map[string]struct{} // Addrs, for lookups (client side)
}

// hostID identifies this host (boot id) and network namespace (the inode of
// /proc/self/ns/net). Either may be empty or 0 where /proc cannot tell.
type hostID struct {
	BootID string
	NetNS  uint64
}

var localHost = sync.OnceValue(func() hostID {
	var h hostID
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		h.BootID = string(bytes.TrimSpace(b))
	}
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err == nil {
		h.NetNS = st.Ino
	}
	return h
})

// newAnnounce describes a server listening on addr (its service address).
func newAnnounce(addr net.Addr) *announce {
	h := localHost()
	a := &announce{Version: 1, Addrs: servedAddrs(addr), BootID: h.BootID, NetNS: h.NetNS, PID: os.Getpid()}
	if addr != nil && addr.Network() == "unix" {
		a.Unix = addr.String()
	}
	return a
}

// target is a call's picked address as routing compares it: an IP address
// and port, or a unix socket path.
type target struct {
	ap   netip.AddrPort
	unix string
}

// servedAddrs lists the addresses a listener on addr answers: the address
// itself, and for an unspecified IP (0.0.0.0, ::) every address of the
// host's interfaces with the port (IPv4 ones only for 0.0.0.0).
func servedAddrs(addr net.Addr) []string {
	if addr == nil {
		return nil
	}
	ap, ok := tcpAddrPort(addr)
	if !ok {
		return nil
	}
	if !ap.Addr().IsUnspecified() {
		return []string{ap.String()}
	}
	v4only := ap.Addr().Is4()
	out := []string{}
	ifs, err := net.InterfaceAddrs()
	if err != nil {
		ifs = nil
	}
	seen := map[string]bool{}
	add := func(ip netip.Addr) {
		if v4only && !ip.Is4() {
			return
		}
		s := netip.AddrPortFrom(ip, ap.Port()).String()
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	add(netip.MustParseAddr("127.0.0.1"))
	add(netip.IPv6Loopback())
	for _, a := range ifs {
		if pn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(pn.IP); ok {
				add(ip.Unmap().WithZone(""))
			}
		}
	}
	return out
}

// tcpAddrPort returns a TCP listener's address as an AddrPort.
func tcpAddrPort(addr net.Addr) (netip.AddrPort, bool) {
	if addr.Network() != "tcp" && addr.Network() != "tcp4" && addr.Network() != "tcp6" {
		return netip.AddrPort{}, false
	}
	if ta, ok := addr.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()), true
	}
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()), true
}

// normAddr normalizes a "host:port" Kitex picked for comparison with an
// announcement: the IP in canonical form ("localhost" counts as
// 127.0.0.1). ok is false for anything else (a hostname): such an address is
// never carried over shared memory.
func normAddr(address string) (netip.AddrPort, bool) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return netip.AddrPort{}, false
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, false
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip.Unmap().WithZone(""), uint16(p)), true
}

// serves reports whether the server behind the announcement is the instance
// at t: it announced the address, and it runs on this host; a loopback
// address also needs the same network namespace.
func (a *announce) serves(t target) bool {
	if a == nil || a.BootID != localHost().BootID {
		return false
	}
	if t.unix != "" {
		return a.Unix == t.unix
	}
	if _, ok := a.set[t.ap.String()]; !ok {
		return false
	}
	if t.ap.Addr().IsLoopback() && a.NetNS != localHost().NetNS {
		return false
	}
	return true
}

// sendAnnounce sends the announcement as the session's first message.
func sendAnnounce(ctx context.Context, s *shm.Session, a *announce) error {
	b, err := jsonMarshal(a)
	if err != nil {
		return err
	}
	buf, err := s.Alloc(len(b))
	if err != nil {
		// No room in a tiny region: the session socket carries it.
		return s.SendInline(ctx, 0, 0, KindAnnounce, b)
	}
	copy(buf.Bytes(), b)
	return s.Send(ctx, 0, 0, KindAnnounce, buf.Truncate(len(b)))
}

// recvAnnounce reads the session's first message, which must be the
// server's announcement.
func recvAnnounce(ctx context.Context, s *shm.Session) (*announce, error) {
	m, err := s.Recv(ctx)
	if err != nil {
		return nil, err
	}
	defer s.Release(&m)
	if m.Kind != KindAnnounce {
		return nil, fmt.Errorf("%w: first message of kind %d", ErrNoAnnounce, m.Kind)
	}
	n := m.Len()
	if n > maxAnnounceSize {
		return nil, fmt.Errorf("%w: announcement of %d bytes", ErrNoAnnounce, n)
	}
	b := make([]byte, 0, n)
	for i := 0; i < m.NumSegments(); i++ {
		b = append(b, m.Segment(i)...)
	}
	return parseAnnounce(b)
}

func parseAnnounce(b []byte) (*announce, error) {
	var a announce
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoAnnounce, err)
	}
	if a.Version != 1 {
		return nil, fmt.Errorf("%w: version %d", ErrNoAnnounce, a.Version)
	}
	a.set = make(map[string]struct{}, len(a.Addrs))
	for _, s := range a.Addrs {
		if ap, ok := normAddr(s); ok {
			a.set[ap.String()] = struct{}{}
		}
	}
	return &a, nil
}

func jsonMarshal(a *announce) ([]byte, error) { return json.Marshal(a) }
