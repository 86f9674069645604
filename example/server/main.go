// Command server serves the example EchoService and MathService over TCP and,
// through kshm, over shared memory on a unix socket.
//
// When it serves, it prints one line on stdout:
//
//	ready <tcp-addr> <socket-path>
//
// and it stops gracefully on SIGTERM or SIGINT.
//
// With -reuse-port it listens on its TCP address through Kitex's
// server.WithReusePort(true), so that a second server started with the same
// flags shares the port and takes kshm's socket path over: the upgrade
// procedure of the README (see example/run -upgrade).
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cloudwego/kitex/pkg/rpcinfo"
	"github.com/cloudwego/kitex/pkg/transmeta"
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm/example/kitex_gen/echo/echoservice"
	"github.com/shmkit/kshm/example/kitex_gen/echo/mathservice"
	"github.com/shmkit/kshm/transport"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		addr       = flag.String("addr", "127.0.0.1:0", "TCP `address` to serve on (port 0 picks a free port)")
		socketPath = flag.String("socket", filepath.Join(os.TempDir(), "kshm-example.sock"), "unix socket `path` kshm listens on (empty: kshm's zero-config path for the TCP address, in its per-host directory)")
		regionSize = flag.Int("region-size", 0, "kshm region size in `bytes` per session side (0: kshm's default)")
		maxMessage = flag.Int("max-message", 0, "largest message kshm carries in shared memory, in `bytes` (0: kshm's default); larger ones fall back")
		wakeMode   = flag.String("wake", "", "kshm wake `mode`: notify, poll or timed (empty: kshm's default)")
		exitWait   = flag.Duration("exit-wait", 3*time.Second, "how long a graceful stop waits for calls in flight")
		reusePort  = flag.Bool("reuse-port", false, "listen with server.WithReusePort(true): a replacement server started with the same flags shares the TCP port (port 0 picks a free port first)")
	)
	flag.Parse()

	shmOpt, err := shmServerOption(*socketPath, *regionSize, *maxMessage, *wakeMode)
	if err != nil {
		return err
	}
	// The TCP side: a listener of our own, or, with -reuse-port, the address
	// Kitex listens on with SO_REUSEPORT.
	var tcpOpt server.Option
	var tcpAddr net.Addr
	if *reusePort {
		a, err := resolveReuseAddr(*addr)
		if err != nil {
			return err
		}
		tcpOpt, tcpAddr = server.WithServiceAddr(a), a
	} else {
		ln, err := net.Listen("tcp", *addr)
		if err != nil {
			return err
		}
		tcpOpt, tcpAddr = server.WithListener(ln), ln.Addr()
	}

	stop := make(chan error, 1)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() {
		s, ok := <-sigs
		if ok {
			fmt.Fprintf(os.Stderr, "server: %v, stopping\n", s)
		}
		stop <- nil
	}()

	// Where kshm's socket will be: -socket, or the zero-config path.
	sockPath := *socketPath
	if sockPath == "" {
		if sockPath, err = transport.LocalSocketPath(tcpAddr); err != nil {
			return err
		}
	}

	eh := &echoHandler{}
	svr, err := newServer(
		tcpOpt,
		server.WithReusePort(*reusePort),
		server.WithServerBasicInfo(&rpcinfo.EndpointBasicInfo{ServiceName: "kshm-example"}),
		server.WithMetaHandler(transmeta.ServerTTHeaderHandler),
		server.WithCompatibleMiddlewareForUnary(),
		server.WithExitWaitTime(*exitWait),
		server.WithExitSignal(func() <-chan error { return stop }),
		shmOpt,
	)
	if err != nil {
		return err
	}
	if err := echoservice.RegisterService(svr, eh); err != nil {
		return err
	}
	if err := mathservice.RegisterService(svr, &mathHandler{}); err != nil {
		return err
	}

	// Run blocks until the exit signal; announce readiness once both the TCP
	// listener and kshm's socket are there (a new socket: a file left at the
	// path by an earlier server does not count).
	old, _ := os.Stat(sockPath) // nil if there is none
	runErr := make(chan error, 1)
	go func() { runErr <- svr.Run() }()
	if err := waitSocket(sockPath, old, 10*time.Second, runErr); err != nil {
		_ = svr.Stop()
		return err
	}
	fmt.Printf("ready %s %s\n", tcpAddr, sockPath)

	err = <-runErr
	fmt.Fprintf(os.Stderr, "server: stopped (%d notifications received)\n", eh.notified.Load())
	return err
}

// resolveReuseAddr resolves the TCP address a -reuse-port server serves on.
// Port 0 becomes a free port: one the kernel picks for a listener opened
// and closed at once (the server, or its replacement, then listens there).
func resolveReuseAddr(addr string) (*net.TCPAddr, error) {
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return nil, err
	}
	if a.Port != 0 {
		return a, nil
	}
	ln, err := net.ListenTCP("tcp", a)
	if err != nil {
		return nil, err
	}
	a = ln.Addr().(*net.TCPAddr)
	return a, ln.Close()
}

// isNew reports whether fi is not the file old (nil: there was none).
// Inode numbers are reused at once on some file systems, so a file that
// replaced old may have old's inode; its modification time tells them apart.
func isNew(old, fi os.FileInfo) bool {
	return old == nil || !os.SameFile(old, fi) || !old.ModTime().Equal(fi.ModTime())
}

// newServer is server.NewServer, with the panic Kitex options use to reject
// a bad setting turned into an error.
func newServer(opts ...server.Option) (svr server.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("bad server option: %v", r)
		}
	}()
	return server.NewServer(opts...), nil
}

// waitSocket waits until path is a unix socket other than old (kshm's
// listener is up), until timeout, or until the server ends early (its error
// is returned).
func waitSocket(path string, old os.FileInfo, timeout time.Duration, runErr chan error) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case err := <-runErr:
			if err == nil {
				err = errors.New("server ended before it was ready")
			}
			return err
		default:
		}
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 && isNew(old, fi) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kshm socket %s did not appear within %v", path, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
