package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// child is a server or client process started by the orchestrator.
type child struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // control lines the child wrote to its fd 3
	logs  *tailBuffer // the child's stdout and stderr, last bytes
	done  chan struct{}
	err   error // exit status, valid after done
}

func startChild(name, self string, args ...string) (*child, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, args...)
	cmd.ExtraFiles = []*os.File{w}
	logs := &tailBuffer{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = logs, logs
	stdin, err := cmd.StdinPipe()
	if err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	w.Close()
	c := &child{name: name, cmd: cmd, stdin: stdin, lines: make(chan string, 16), logs: logs, done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		r.Close()
	}()
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *child) send(line string) error {
	_, err := io.WriteString(c.stdin, line+"\n")
	return err
}

// recv waits for the next control line; an "error ..." line becomes an error.
func (c *child) recv(timeout time.Duration) (string, error) {
	select {
	case line, ok := <-c.lines:
		if !ok {
			return "", c.failure("exited")
		}
		if rest, isErr := strings.CutPrefix(line, "error "); isErr {
			return "", fmt.Errorf("%s: %s", c.name, rest)
		}
		return line, nil
	case <-time.After(timeout):
		return "", c.failure(fmt.Sprintf("no answer within %v", timeout))
	}
}

func (c *child) expect(want string, timeout time.Duration) error {
	got, err := c.recv(timeout)
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("%s: said %q, want %q", c.name, got, want)
	}
	return nil
}

func (c *child) failure(what string) error {
	log := strings.TrimSpace(c.logs.String())
	if log != "" {
		log = "; its output ends:\n" + indent(log)
	}
	return fmt.Errorf("%s %s%s", c.name, what, log)
}

// stop closes the child's stdin (which tells it to finish), waits up to
// timeout for it to exit, and kills it otherwise.
func (c *child) stop(timeout time.Duration) error {
	c.stdin.Close()
	select {
	case <-c.done:
		if c.err != nil {
			return c.failure("exited with " + c.err.Error())
		}
		return nil
	case <-time.After(timeout):
		_ = c.cmd.Process.Kill()
		<-c.done
		return c.failure(fmt.Sprintf("did not exit within %v; killed", timeout))
	}
}

// kill ends the child at once (after a failure).
func (c *child) kill() {
	c.stdin.Close()
	_ = c.cmd.Process.Kill()
	<-c.done
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	t.mu.Unlock()
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
