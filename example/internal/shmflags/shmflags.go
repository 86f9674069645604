// Package shmflags turns the example commands' kshm flags into kshm options,
// for the client and the server alike.
package shmflags

import (
	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/shm"
)

// Options returns the kshm options for, where set (non-zero or non-empty), a
// socket path (empty: kshm's zero-config path), a region size, a maximum
// message size and a wake mode name.
func Options(socketPath string, regionSize, maxMessage int, wake string) ([]kshm.Option, error) {
	var opts []kshm.Option
	if socketPath != "" {
		opts = append(opts, kshm.WithSocketPath(socketPath))
	}
	if regionSize > 0 {
		opts = append(opts, kshm.WithRegionSize(regionSize))
	}
	if maxMessage > 0 {
		opts = append(opts, kshm.WithMaxMessageSize(maxMessage))
	}
	if wake != "" {
		m, err := shm.ParseWakeMode(wake)
		if err != nil {
			return nil, err
		}
		opts = append(opts, kshm.WithWakeMode(m))
	}
	return opts, nil
}
