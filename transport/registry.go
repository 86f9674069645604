package transport

import (
	"fmt"
	"sync"
)

// registry holds the process's shared ClientPools: one per socket path and
// configuration, so that every Kitex client of the process reaching the
// same server shares its sessions (and their shared memory).
var registry struct {
	mu    sync.Mutex // guards pools and every pool's refs
	pools map[string]*ClientPool
}

// poolKey identifies a shared pool: the socket path and every setting that
// shapes its sessions.
func poolKey(cfg Config, path string) string {
	return fmt.Sprintf("%s|%+v|%d|%d|%v|%v|%v|%v", path, cfg.Shm, cfg.Sessions, cfg.MaxIdleConns,
		cfg.DialTimeout, cfg.ReconnectMin, cfg.ReconnectMax, cfg.MaxIdleTimeout)
}

// acquirePool returns the process's pool for path and cfg, creating it, and
// takes a reference to it; releasePool gives the reference back.
func acquirePool(cfg Config, path string) *ClientPool {
	key := poolKey(cfg, path)
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if registry.pools == nil {
		registry.pools = make(map[string]*ClientPool)
	}
	p := registry.pools[key]
	if p == nil {
		p = NewClientPool(cfg, path, nil)
		p.key = key
		registry.pools[key] = p
	}
	p.refs++
	return p
}

// releasePool drops a reference; the last one closes the pool's sessions.
func releasePool(p *ClientPool) {
	registry.mu.Lock()
	p.refs--
	last := p.refs == 0
	if last && registry.pools[p.key] == p {
		delete(registry.pools, p.key)
	}
	registry.mu.Unlock()
	if last {
		p.Close()
	}
}

// SharedPools is the number of shared client pools in the process (one per
// socket path and configuration in use).
func SharedPools() int {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	return len(registry.pools)
}
