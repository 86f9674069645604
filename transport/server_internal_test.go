package transport

import (
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudwego/kitex/pkg/remote"
	"github.com/cloudwego/kitex/pkg/utils"
)

// countingInner stands in for Kitex's netpoll trans server and counts what
// the composite asks of it.
type countingInner struct{ boots, shutdowns atomic.Int32 }

func (c *countingInner) CreateListener(net.Addr) (net.Listener, error) { return nil, nil }
func (c *countingInner) BootstrapServer(net.Listener) error            { c.boots.Add(1); return nil }
func (c *countingInner) Shutdown() error                               { c.shutdowns.Add(1); return nil }
func (c *countingInner) ConnCount() utils.AtomicInt                    { return 0 }

// Kitex may call Shutdown before BootstrapServer (Stop while Run is still
// starting). The server must then start nothing: no socket, no netpoll
// server serving after its shutdown.
func TestTransServer_BootstrapAfterShutdownStartsNothing(t *testing.T) {
	cfg := DefaultConfig()
	cfg.SocketPath = filepath.Join(t.TempDir(), "s.sock")
	inner := &countingInner{}
	ts := &TransServer{
		opt:      &remote.ServerOption{ExitWaitTime: 10 * time.Millisecond},
		cfg:      cfg,
		inner:    inner,
		service:  func() string { return "" },
		stopc:    make(chan struct{}),
		sessions: make(map[*serverSession]struct{}),
		plain:    make(map[*plainConn]struct{}),
		accepted: make(map[net.Conn]struct{}),
	}
	if err := ts.Shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := ts.BootstrapServer(nil); err != nil {
		t.Fatalf("BootstrapServer after Shutdown: %v", err)
	}
	if n := inner.boots.Load(); n != 0 {
		t.Fatalf("the netpoll server was bootstrapped %d times after shutdown", n)
	}
	if _, err := os.Stat(cfg.SocketPath); !os.IsNotExist(err) {
		t.Fatalf("socket published after shutdown: %v", err)
	}
}
