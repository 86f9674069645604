package main

import (
	"time"

	"github.com/cloudwego/kitex/client"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/internal/shmflags"
)

// shmClientOption turns the command-line settings into kshm's client option.
func shmClientOption(socketPath string, regionSize, maxMessage int, wake string) (client.Option, error) {
	opts, err := shmflags.Options(socketPath, regionSize, maxMessage, wake)
	if err != nil {
		return client.Option{}, err
	}
	return kshm.WithClientShmIPC(opts...), nil
}

// shmCounters are the process-wide kshm counters the table reports.
type shmCounters struct {
	calls, fallbacks, late uint64
}

func readCounters() shmCounters {
	s := kshm.ReadStats()
	return shmCounters{calls: s.Calls, fallbacks: s.Fallbacks, late: s.LateResponses}
}

func (c shmCounters) sub(old shmCounters) shmCounters {
	return shmCounters{calls: c.calls - old.calls, fallbacks: c.fallbacks - old.fallbacks, late: c.late - old.late}
}

// waitBuffersBack waits up to timeout for every shared-memory buffer this
// process allocated to have come back from the server, and returns how many
// buffers and bytes are still out.
func waitBuffersBack(timeout time.Duration) (buffers, bytes int64) {
	deadline := time.Now().Add(timeout)
	for {
		s := kshm.ReadStats()
		if s.InUseBuffers == 0 || time.Now().After(deadline) {
			return s.InUseBuffers, s.InUseBytes
		}
		time.Sleep(20 * time.Millisecond)
	}
}
