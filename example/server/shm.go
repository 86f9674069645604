package main

import (
	"github.com/cloudwego/kitex/server"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/internal/shmflags"
)

// shmServerOption turns the command-line settings into kshm's server option.
func shmServerOption(socketPath string, regionSize, maxMessage int, wake string) (server.Option, error) {
	opts, err := shmflags.Options(socketPath, regionSize, maxMessage, wake)
	if err != nil {
		return server.Option{}, err
	}
	return kshm.WithServerShmIPC(opts...), nil
}
