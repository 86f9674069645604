// Command run runs the kshm example end to end: it builds the example server
// and client into a temporary directory, starts the server (TCP on 127.0.0.1,
// kshm on a unix socket in the temporary directory), waits for it to be
// ready, runs the client against it, stops the server with SIGTERM and waits
// for it to exit. It exits 0 only if every step succeeded.
//
//	go run ./example/run
//
// With -upgrade it demonstrates a zero-downtime server replacement instead
// (see upgrade): a client calls from several goroutines while the server is
// replaced twice, and the run fails if any call failed.
//
//	go run ./example/run -upgrade
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	serverPkg = "github.com/shmkit/kshm/example/server"
	clientPkg = "github.com/shmkit/kshm/example/client"
)

func main() {
	// SIGINT or SIGTERM stops the client and the server (they are not left
	// behind) and fails the run.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "run: FAIL:", err)
		os.Exit(1)
	}
	fmt.Println("run: ok")
}

// run runs the example with the command-line arguments args. The client's
// table goes to stdout, everything else (build output, the server's and the
// client's logs) to stderr; both may be written from several goroutines.
// Cancelling sigCtx stops the client and the server and fails the run.
func run(sigCtx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		duration    = fs.Duration("duration", time.Second, "client: how long to call Echo at each payload size")
		concurrency = fs.Int("concurrency", 1, "client: concurrent callers")
		sizes       = fs.String("sizes", "", "client: comma-separated payload sizes in bytes (empty: the client's default)")
		wake        = fs.String("wake", "", "kshm wake mode for both sides: notify, poll or timed (empty: default)")
		regionSize  = fs.Int("region-size", 0, "kshm region size in bytes for both sides (0: default)")
		maxMessage  = fs.Int("max-message", 0, "largest message kshm carries in shared memory, both sides (0: default)")
		compareTCP  = fs.Bool("compare-tcp", true, "client: measure each size over plain Kitex on the server's TCP address too, side by side")
		race        = fs.Bool("race", false, "build the server and client with the race detector")
		readyWait   = fs.Duration("ready-timeout", 30*time.Second, "how long to wait for the server to be ready")
		stopWait    = fs.Duration("stop-timeout", 15*time.Second, "how long to wait for the server to exit after SIGTERM")
		upgradeMode = fs.Bool("upgrade", false, "instead: replace the server under load (-replacements times, -phase apart) and count failed calls")
		repl        = fs.Int("replacements", 2, "upgrade: how many times the server is replaced")
		phaseLen    = fs.Duration("phase", time.Second, "upgrade: how long each phase of the replacement lasts")
		zeroConfig  = fs.Bool("zero-config", false, "upgrade: no socket path on either side (kshm's per-host directory, under a temporary TMPDIR)")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}

	var shared []string
	if *wake != "" {
		shared = append(shared, "-wake", *wake)
	}
	if *regionSize > 0 {
		shared = append(shared, "-region-size", fmt.Sprint(*regionSize))
	}
	if *maxMessage > 0 {
		shared = append(shared, "-max-message", fmt.Sprint(*maxMessage))
	}

	if *upgradeMode {
		cfg := upgradeConfig{race: *race, concurrency: 8, size: 16 << 10, phase: *phaseLen, replacements: *repl,
			readyWait: *readyWait, stopWait: *stopWait, shared: shared, zeroConfig: *zeroConfig}
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "concurrency" {
				cfg.concurrency = *concurrency
			}
		})
		if *sizes != "" {
			n, err := strconv.Atoi(strings.Split(*sizes, ",")[0])
			if err != nil || n < 0 {
				return fmt.Errorf("-sizes %q: want a payload size in bytes", *sizes)
			}
			cfg.size = n
		}
		if cfg.concurrency < 1 || cfg.replacements < 1 || cfg.phase <= 0 {
			return fmt.Errorf("-upgrade: -concurrency %d, -replacements %d, -phase %v: want each above 0", cfg.concurrency, cfg.replacements, cfg.phase)
		}
		_, err := upgrade(sigCtx, cfg, stdout, stderr)
		return err
	}

	dir, err := os.MkdirTemp("", "kshm-example-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	fmt.Fprintln(stdout, "run: building server and client")
	buildArgs := []string{"build", "-o", dir + string(filepath.Separator)}
	if *race {
		buildArgs = append(buildArgs, "-race")
	}
	build := exec.Command(goCommand(), append(buildArgs, serverPkg, clientPkg)...)
	build.Stdout, build.Stderr = stderr, stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("go build: %w", err)
	}

	socketPath := filepath.Join(dir, "kshm.sock")
	srv := exec.Command(filepath.Join(dir, "server"),
		append([]string{"-addr", "127.0.0.1:0", "-socket", socketPath}, shared...)...)
	srv.Stderr = prefixWriter("server| ", stderr)
	srvOut, err := srv.StdoutPipe()
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return fmt.Errorf("start server: %w", err)
	}
	srvDone := make(chan error, 1)
	var exited bool
	wait := func(timeout time.Duration) error {
		select {
		case err := <-srvDone:
			exited = true
			return err
		case <-time.After(timeout):
			return fmt.Errorf("server still running after %v", timeout)
		}
	}
	// Whatever happens, do not leave the server behind.
	defer func() {
		if !exited {
			_ = srv.Process.Kill()
			<-srvDone
		}
	}()

	ready := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(srvOut)
		for sc.Scan() {
			line := sc.Text()
			if f := strings.Fields(line); len(f) == 3 && f[0] == "ready" {
				select {
				case ready <- f[1:]:
				default:
				}
			}
			fmt.Fprintln(stderr, "server| "+line)
		}
		srvDone <- srv.Wait()
	}()

	var addrs []string
	select {
	case addrs = <-ready:
	case err := <-srvDone:
		exited = true
		return fmt.Errorf("server exited before it was ready: %v", err)
	case <-time.After(*readyWait):
		return fmt.Errorf("server not ready after %v", *readyWait)
	case <-sigCtx.Done():
		return errors.New("interrupted")
	}
	fmt.Fprintf(stdout, "run: server ready: tcp %s, kshm %s\n", addrs[0], addrs[1])

	cliArgs := append([]string{"-addr", addrs[0], "-socket", addrs[1],
		"-duration", duration.String(), "-concurrency", fmt.Sprint(*concurrency)}, shared...)
	if *sizes != "" {
		cliArgs = append(cliArgs, "-sizes", *sizes)
	}
	cliArgs = append(cliArgs, fmt.Sprintf("-compare-tcp=%v", *compareTCP))
	// The client's own limit: every size's duration (twice with the
	// comparison) plus generous slack.
	ctx, cancel := context.WithTimeout(sigCtx, 20*(*duration)+60*time.Second)
	defer cancel()
	cli := exec.CommandContext(ctx, filepath.Join(dir, "client"), cliArgs...)
	cli.Stdout, cli.Stderr = stdout, prefixWriter("client| ", stderr)
	cli.WaitDelay = 5 * time.Second
	clientErr := cli.Run()
	if sigCtx.Err() != nil {
		clientErr = errors.New("interrupted")
	}

	if err := srv.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("signal server: %w", err)
	}
	serverErr := wait(*stopWait)

	switch {
	case clientErr != nil && serverErr != nil:
		return fmt.Errorf("client: %v; server: %v", clientErr, serverErr)
	case clientErr != nil:
		return fmt.Errorf("client: %w", clientErr)
	case serverErr != nil:
		return fmt.Errorf("server: %w", serverErr)
	}
	if _, err := os.Stat(socketPath); err == nil {
		fmt.Fprintln(stderr, "run: note: the server left its socket file behind")
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// goCommand is the go command to build with: $GOROOT/bin/go when the go
// command that runs us exported GOROOT, else "go" from PATH.
func goCommand() string {
	if root := os.Getenv("GOROOT"); root != "" {
		p := filepath.Join(root, "bin", "go")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "go"
}

// linePrefixer writes each complete line written to it to w, with prefix in
// front. Its Write is called from one goroutine (the exec package's copier).
type linePrefixer struct {
	prefix string
	w      io.Writer
	buf    []byte // the incomplete last line
}

func prefixWriter(prefix string, w io.Writer) io.Writer {
	return &linePrefixer{prefix: prefix, w: w}
}

func (l *linePrefixer) Write(p []byte) (int, error) {
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		if _, err := fmt.Fprintf(l.w, "%s%s\n", l.prefix, l.buf[:i]); err != nil {
			return 0, err
		}
		l.buf = l.buf[i+1:]
	}
	return len(p), nil
}
