package transport

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// ErrUnsafeDir: the per-host socket directory exists but is not a directory
// of ours with mode 0700.
var ErrUnsafeDir = errors.New("kshm: unsafe socket directory")

// LocalDir is the per-host directory where servers without WithSocketPath
// publish their sockets: <os.TempDir()>/kshm-<uid>, mode 0700, owned by the
// user. Clients look there for the address Kitex picked.
func LocalDir() string {
	return filepath.Join(os.TempDir(), fmt.Sprintf("kshm-%d", os.Getuid()))
}

// ensureLocalDir creates LocalDir if needed and checks that it is ours and
// private.
func ensureLocalDir() (string, error) {
	dir := LocalDir()
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("kshm: creating %s: %w", dir, err)
	}
	return dir, checkLocalDir(dir)
}

func checkLocalDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || st.Uid != uint32(os.Getuid()) || fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%w: %s must be a directory owned by uid %d with mode 0700 (it is %v)", ErrUnsafeDir, dir, os.Getuid(), fi.Mode())
	}
	return nil
}

// LocalSocketPath is where a server listening on addr publishes its socket
// when it has no WithSocketPath: <LocalDir>/<ip>-<port>.sock, or
// any-<port>.sock for an unspecified IP (0.0.0.0, ::).
func LocalSocketPath(addr net.Addr) (string, error) {
	if addr == nil {
		return "", fmt.Errorf("%w: WithSocketPath: not set, and the server has no TCP address to derive it from", ErrBadConfig)
	}
	ap, ok := tcpAddrPort(addr)
	if !ok {
		return "", fmt.Errorf("%w: WithSocketPath: not set, and the server's address %s/%s is not TCP", ErrBadConfig, addr.Network(), addr)
	}
	return localName(ap), nil
}

func localName(ap netip.AddrPort) string {
	host := "any"
	if !ap.Addr().IsUnspecified() {
		host = strings.ReplaceAll(ap.Addr().String(), ":", "_")
	}
	return filepath.Join(LocalDir(), fmt.Sprintf("%s-%d.sock", host, ap.Port()))
}

// localCandidates are the sockets in LocalDir that may serve ap: one bound
// to ap's IP, and one bound to every IP with ap's port.
func localCandidates(ap netip.AddrPort) []string {
	return []string{
		localName(ap),
		localName(netip.AddrPortFrom(netip.IPv4Unspecified(), ap.Port())),
	}
}

// bindReplace listens on path, replacing atomically whatever socket is
// there: it binds a temporary name in the same directory and renames it over
// path. A server still listening on the old socket keeps its accepted
// connections; new connections reach the new socket. A file at path that
// is not a socket is refused.
func bindReplace(path string, mode os.FileMode, listen func(string, os.FileMode) (*net.UnixListener, error)) (*net.UnixListener, os.FileInfo, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket == 0 {
		return nil, nil, fmt.Errorf("%w: WithSocketPath: %s exists and is not a socket", ErrBadConfig, path)
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, nil, err
	}
	dir, base := filepath.Split(path)
	tmp := filepath.Join(dir, "."+base+"."+hex.EncodeToString(rnd[:]))
	if len(tmp) > maxUnixPathLen {
		tmp = filepath.Join(dir, ".k"+hex.EncodeToString(rnd[:]))
	}
	ln, err := listen(tmp, mode)
	if err != nil {
		return nil, nil, fmt.Errorf("kshm: listen on %s: %w", tmp, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, nil, fmt.Errorf("kshm: publishing socket %s: %w", path, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("kshm: publishing socket %s: %w", path, err)
	}
	return ln, fi, nil
}

// publishAlias points the symlink alias at target, atomically replacing
// an older one (the service-name alias of a server without WithSocketPath).
func publishAlias(alias, target string) error {
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	tmp := filepath.Join(filepath.Dir(alias), ".l"+hex.EncodeToString(rnd[:]))
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, alias); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// removeAlias removes alias if it still points at target.
func removeAlias(alias, target string) {
	if cur, err := os.Readlink(alias); err == nil && cur == target {
		os.Remove(alias)
	}
}
