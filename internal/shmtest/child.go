// Package shmtest holds helpers shared by kshm's tests: running the test
// binary again as a child process, so that what crosses processes is tested
// between processes.
package shmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

const roleEnv = "KSHM_TEST_CHILD_ROLE"

// Role returns the child role this process was started with, "" in the
// parent test process.
func Role() string { return os.Getenv(roleEnv) }

// Proc is a child test process. Its stdout is read line by line.
type Proc struct {
	Cmd   *exec.Cmd
	lines chan string
	waitc chan error
}

// Start runs the current test binary as a child with the given role; the
// child's TestMain dispatches on shmtest.Role(). Extra environment entries
// are KEY=VALUE. The child is killed and reaped at test cleanup.
func Start(t testing.TB, role string, env ...string) *Proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$", "-test.v=false")
	cmd.Env = append(append(os.Environ(), roleEnv+"="+role), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &Proc{Cmd: cmd, lines: make(chan string, 1024), waitc: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		io.Copy(io.Discard, out)
		close(p.lines)
		p.waitc <- cmd.Wait()
	}()
	t.Cleanup(func() { p.Kill(); p.Wait() })
	return p
}

// Expect waits for a line starting with prefix and returns it; it fails the
// test if the child exits or timeout passes first.
func (p *Proc) Expect(t testing.TB, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("child %d exited before printing %q", p.Cmd.Process.Pid, prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-deadline:
			t.Fatalf("child %d: no %q line within %v", p.Cmd.Process.Pid, prefix, timeout)
		}
	}
}

// Kill sends SIGKILL (idempotent).
func (p *Proc) Kill() { p.Cmd.Process.Signal(syscall.SIGKILL) }

// Wait waits for the child to exit and returns its error (once).
func (p *Proc) Wait() error {
	select {
	case err := <-p.waitc:
		p.waitc <- err
		return err
	case <-time.After(30 * time.Second):
		p.Kill()
		return fmt.Errorf("child %d did not exit", p.Cmd.Process.Pid)
	}
}

// Printf writes a line for the parent to Expect. Children use it.
func Printf(format string, a ...any) {
	fmt.Fprintf(os.Stdout, format+"\n", a...)
}

// MemfdMappings counts the lines of /proc/self/maps that map a memfd.
func MemfdMappings(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "/memfd:") {
			n++
		}
	}
	return n
}

// MemfdFDs counts this process's open descriptors that are memfds.
func MemfdFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "/memfd:") {
			n++
		}
	}
	return n
}

// WaitBaseline polls until every count is back to its baseline, and fails
// the test with the counts if they are not within timeout.
func WaitBaseline(t testing.TB, timeout time.Duration, what string, baseline []int, count func() []int) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := count()
		ok := len(got) == len(baseline)
		for i := range got {
			if ok && got[i] > baseline[i] {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v, baseline %v", what, got, baseline)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
