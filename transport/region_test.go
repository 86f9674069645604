package transport_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/cloudwego/kitex/client"

	"github.com/shmkit/kshm"
	"github.com/shmkit/kshm/example/kitex_gen/echo"
)

// WithRegionSize alone, on both sides, at 1 MiB and 8 MiB: 32 goroutines
// of mixed sizes, some larger than the region, all verified; the large ones
// go inline and are counted.
func TestRegion_SizeAloneMixedStress(t *testing.T) {
	for _, region := range []int{1 << 20, 8 << 20} {
		t.Run(fmt.Sprintf("%dMiB", region>>20), func(t *testing.T) {
			sock := sockPath(t)
			srv := startServer(t, sock, fmt.Sprintf("%s=%d", envRegion, region))
			c := newEchoClient(t, kshm.WithClientShmIPC(kshm.WithSocketPath(sock), kshm.WithRegionSize(region)), client.WithHostPorts(srv.addr))
			before := kshm.ReadStats()
			small := []int{64, 4 << 10, 100 << 10, 300 << 10}
			var wg sync.WaitGroup
			errs := make(chan error, 32)
			for g := 0; g < 32; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					sizes, n := small, 6
					if g%16 == 0 { // two of them: one message at half the region, one larger than it
						sizes, n = []int{region / 2, region + 1000}, 2
					}
					for i := 0; i < n; i++ {
						seq := int64(g*100 + i)
						p := payload(sizes[(g+i)%len(sizes)], seq)
						resp, err := c.Echo(context.Background(), &echo.EchoRequest{Payload: p, Seq: seq})
						if err == nil && (!bytes.Equal(resp.Payload, p) || resp.Seq != seq) {
							err = fmt.Errorf("call %d: response does not match", seq)
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			st := kshm.ReadStats()
			if st.InlineTooLarge == before.InlineTooLarge {
				t.Fatal("no message went inline for its size")
			}
			if want := uint64(30*6 + 2*2); st.Client.CallsShm-before.Client.CallsShm != want {
				t.Fatalf("%d of %d calls over the session", st.Client.CallsShm-before.Client.CallsShm, want)
			}
			waitClientNoBuffers(t)
			srv.waitNoBuffers(t)
			srv.stop(t)
		})
	}
}
