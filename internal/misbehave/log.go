package misbehave

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/cloudwego/kitex/pkg/klog"
)

// Log captures what kshm logs through klog during a test, so the test can
// check that a closed session's reason was logged.
type Log struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

// CaptureLog sends klog's output to a Log until the test ends (then back to
// stderr). The captured text is printed if the test fails.
func CaptureLog(t testing.TB) *Log {
	t.Helper()
	l := &Log{}
	klog.SetOutput(l)
	t.Cleanup(func() {
		klog.SetOutput(os.Stderr)
		if t.Failed() {
			t.Logf("klog output:\n%s", l.String())
		}
	})
	return l
}

func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything logged so far.
func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Lines returns the logged lines that contain every one of subs.
func (l *Log) Lines(subs ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		ok := line != ""
		for _, s := range subs {
			ok = ok && strings.Contains(line, s)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}
