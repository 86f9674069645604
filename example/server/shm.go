package main

import (
	"fmt"

	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/shm"
)

// shmServerOption turns the command-line settings into kshm's server option.
func shmServerOption(socketPath string, regionSize, maxMessage int, wake string) (server.Option, error) {
	opts := []kshm.Option{kshm.WithSocketPath(socketPath)}
	if regionSize > 0 {
		opts = append(opts, kshm.WithRegionSize(regionSize))
	}
	if maxMessage > 0 {
		opts = append(opts, kshm.WithMaxMessageSize(maxMessage))
	}
	if wake != "" {
		m, err := parseWakeMode(wake)
		if err != nil {
			return server.Option{}, err
		}
		opts = append(opts, kshm.WithWakeMode(m))
	}
	return kshm.WithServerShmIPC(opts...), nil
}

func parseWakeMode(s string) (shm.WakeMode, error) {
	for _, m := range []shm.WakeMode{shm.WakeNotify, shm.WakePoll, shm.WakeTimed} {
		if m.String() == s {
			return m, nil
		}
	}
	return 0, fmt.Errorf("bad -wake %q: want notify, poll or timed", s)
}
