// Package testenv runs real processes for the tests: redis-server shards and the mediacache
// binary (MEDIACACHE_BIN, default the workspace's debug build), on free loopback ports.
package testenv

import (
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// FreePort is a loopback port nothing listens on now.
func FreePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Poll polls check until it is true or the timeout passes; whether it became true. For
// goroutines other than the test's, which must not call Fatal.
func Poll(timeout time.Duration, check func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !check() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// Eventually polls check until it is true, failing the test at the deadline.
func Eventually(t testing.TB, what string, timeout time.Duration, check func() bool) {
	t.Helper()
	if !Poll(timeout, check) {
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
	}
}

func accepts(port int) bool {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// Redis is one redis-server process.
type Redis struct {
	Port int
	cmd  *exec.Cmd
}

// StartRedis starts a shard, stopped when the test ends.
func StartRedis(t testing.TB) *Redis {
	r := &Redis{Port: FreePort(t)}
	r.cmd = exec.Command("redis-server", "--port", fmt.Sprint(r.Port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", t.TempDir())
	if err := r.cmd.Start(); err != nil {
		t.Fatalf("redis-server: %v", err)
	}
	t.Cleanup(r.Kill)
	Eventually(t, "redis-server", 10*time.Second, func() bool { return accepts(r.Port) })
	return r
}

// Kill stops the shard at once.
func (r *Redis) Kill() {
	if r.cmd.ProcessState == nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
}

// Service is one `mediacache serve` process.
type Service struct {
	Address string
	Shards  []*Redis
	cmd     *exec.Cmd
	log     string
	exited  chan struct{}
}

func binary() string {
	if b := os.Getenv("MEDIACACHE_BIN"); b != "" {
		return b
	}
	_, file, _, _ := runtime.Caller(0)
	dir := filepath.Dir(file)
	// In GOPATH mode this file is reached through a link: the workspace is beside the real one.
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	return filepath.Join(dir, "..", "..", "..", "..", "target", "debug", "mediacache")
}

// StartService starts shards redis-servers and a service in front of them (memory tier off),
// with extra YAML appended to its config; stopped when the test ends.
func StartService(t testing.TB, shards int, extra string) *Service {
	s := &Service{}
	port := FreePort(t)
	s.Address = fmt.Sprintf("127.0.0.1:%d", port)
	config := []string{"listen: " + s.Address, "memory:", "  max_bytes: 0", "  max_object_bytes: 0"}
	if shards > 0 {
		config = append(config, "shards:")
	}
	for i := 0; i < shards; i++ {
		r := StartRedis(t)
		s.Shards = append(s.Shards, r)
		config = append(config, fmt.Sprintf("  - name: shard-%d", i), fmt.Sprintf("    url: redis://127.0.0.1:%d", r.Port))
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if err := ioutil.WriteFile(path, []byte(strings.Join(config, "\n")+"\n"+extra), 0o600); err != nil {
		t.Fatal(err)
	}
	s.log = filepath.Join(dir, "service.log")
	logFile, err := os.Create(s.log)
	if err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command(binary(), "serve", "--config", path)
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("%s: %v", binary(), err)
	}
	s.exited = make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(s.Stop)
	Eventually(t, "mediacache serving", 30*time.Second, func() bool {
		select {
		case <-s.exited:
			out, _ := ioutil.ReadFile(s.log)
			t.Fatalf("mediacache exited: %s", out)
		default:
		}
		return accepts(port)
	})
	return s
}

// Stop kills the service at once.
func (s *Service) Stop() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}
