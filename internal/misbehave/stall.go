package misbehave

import (
	"context"
	"errors"
	"io"
	"net"
	"time"
)

// StallKind says how far a stalled handshake goes before it stops.
type StallKind int

const (
	StallSilent      StallKind = iota // connects and sends nothing
	StallPreface                      // sends the preface only
	StallHalfHello                    // sends the preface and half a hello
	StallBeforeReady                  // never answers the server's hello (a forger that stops)
)

func (k StallKind) String() string {
	switch k {
	case StallSilent:
		return "silent"
	case StallPreface:
		return "preface"
	case StallHalfHello:
		return "half-hello"
	case StallBeforeReady:
		return "before-region"
	}
	return "unknown"
}

// Stall connects to path and stops the handshake at the given point. The
// connection is left open for the caller to watch (WaitServerClose).
func Stall(ctx context.Context, path string, kind StallKind) (*net.UnixConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	conn := c.(*net.UnixConn)
	h := hello{MinVersion: 1, MaxVersion: 1, RegionSize: 2 << 20, RingEntries: 64, SlotCount: 64, MaxMessage: 64 << 10}
	full := append(preface[:], h.encode()...)
	var w []byte
	switch kind {
	case StallPreface:
		w = full[:prefaceSize]
	case StallHalfHello:
		w = full[:prefaceSize+helloSize/2]
	case StallBeforeReady:
		w = full
	}
	if len(w) > 0 {
		if _, err := conn.Write(w); err != nil {
			conn.Close()
			return nil, err
		}
	}
	return conn, nil
}

// WaitServerClose reads and discards until the server closes c, and reports
// whether it did within timeout.
func WaitServerClose(c net.Conn, timeout time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(timeout))
	_, err := io.Copy(io.Discard, c) // nil at EOF
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// Garbage connects to path, writes b (no kshm preface) and returns the
// connection.
func Garbage(ctx context.Context, path string, b []byte) (*net.UnixConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write(b); err != nil {
		c.Close()
		return nil, err
	}
	return c.(*net.UnixConn), nil
}
