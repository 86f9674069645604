package main

import "testing"

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		stack []string
		want  string
	}{
		{[]string{"syscall.Syscall", "github.com/shmkit/kshm/shm.osYield", "github.com/shmkit/kshm/shm.(*Session).pause",
			"github.com/shmkit/kshm/shm.(*Session).recvLoop"}, "wait"},
		{[]string{"internal/runtime/syscall/linux.Syscall6", "internal/runtime/syscall/linux.EpollWait",
			"github.com/cloudwego/netpoll.(*defaultPoll).Wait"}, "wait"},
		{[]string{"internal/runtime/syscall/linux.Syscall6", "syscall.RawSyscall6", "syscall.sendmsg"}, "syscall"},
		{[]string{"runtime.memmove", "github.com/cloudwego/gopkg/protocol/thrift.BinaryProtocol.ReadBinary"}, "copy"},
		{[]string{"runtime.scanObject", "runtime.gcDrain", "runtime.gcBgMarkWorker"}, "gc"},
		{[]string{"runtime.nextFreeFast", "runtime.mallocgc", "runtime.makeslice"}, "alloc"},
		{[]string{"runtime.futex", "runtime.futexwakeup", "runtime.notewakeup", "runtime.startm", "runtime.wakep"}, "scheduler"},
		{[]string{"github.com/cloudwego/kitex/pkg/remote.NewMessage"}, "kitex"},
		{[]string{"github.com/shmkit/kshm/example/kitex_gen/echo.(*EchoResponse).FastRead"}, "kitex"},
		{[]string{"github.com/shmkit/kshm/shm.(*Session).publish", "github.com/shmkit/kshm/shm.(*Session).Send"}, "transport"},
		{[]string{"main.fillRequest"}, "bench"},
		{[]string{"sort.Ints"}, "other"},
		{nil, "other"},
	} {
		if got := classify(c.stack); got != c.want {
			t.Errorf("classify(%v) = %q, want %q", c.stack, got, c.want)
		}
	}
}
