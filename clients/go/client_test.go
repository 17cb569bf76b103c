package mediacache_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"math/big"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mediacache "github.com/mediacache/mediacache/clients/go"
	"github.com/mediacache/mediacache/clients/go/internal/testenv"
	"google.golang.org/grpc/codes"
)

func body(n int, seed int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((i*31 + seed) % 251)
	}
	return b
}

func dial(t *testing.T, address string, o mediacache.Options) *mediacache.Client {
	t.Helper()
	c, err := mediacache.Dial(context.Background(), address, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRoundTripsKeepBytesAndDigest(t *testing.T) {
	s := testenv.StartService(t, 2, "")
	c := dial(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	for _, size := range []int{0, 1, 256*1024 + 1, 5 << 20, 64 << 20} {
		key := mediacache.Key{Origin: "example.org", MediaID: fmt.Sprintf("rt%d", size)}
		data := body(size, size)
		r, err := c.PutBytes(ctx, key, data, mediacache.PutOptions{ContentType: "video/mp4"})
		if err != nil || !r.Stored || r.Outcome != "stored" {
			t.Fatalf("put %d: %+v %v", size, r, err)
		}
		obj, err := c.Get(ctx, key)
		if err != nil || obj == nil {
			t.Fatalf("get %d: %v %v", size, obj, err)
		}
		got, err := obj.ReadAll()
		obj.Close()
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		if !bytes.Equal(got, data) || !bytes.Equal(obj.Info.SHA256, sum[:]) || obj.Info.Size != int64(size) {
			t.Fatalf("size %d: the bytes or the digest differ", size)
		}
		if obj.Info.ContentType != "video/mp4" {
			t.Fatalf("content type %q", obj.Info.ContentType)
		}
	}
	if obj, err := c.Get(ctx, mediacache.Key{Origin: "example.org", MediaID: "absent"}); obj != nil || err != nil {
		t.Fatalf("a miss is (nil, nil): %v %v", obj, err)
	}
}

func TestRangesAreReadLazily(t *testing.T) {
	s := testenv.StartService(t, 1, "")
	c := dial(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	key := mediacache.Key{Origin: "example.org", MediaID: "video"}
	data := body(64<<20, 7)
	if _, err := c.PutBytes(ctx, key, data, mediacache.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	served := func() uint64 {
		st, err := c.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.BytesServed
	}
	before := served()
	obj, err := c.Get(ctx, key)
	if err != nil || obj == nil {
		t.Fatal(obj, err)
	}
	defer obj.Close()
	// An HTTP range request served from the object.
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "video/mp4")
		http.ServeContent(w, r, "", obj.Info.StoredAt, obj)
	}))
	defer server.Close()
	req, _ := http.NewRequest("GET", server.URL, nil)
	req.Header.Set("Range", "bytes=1000000-1999999")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := ioutil.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(got, data[1000000:2000000]) {
		t.Fatalf("status %d, %d bytes", resp.StatusCode, len(got))
	}
	// Lazy: the first Get's chunk and one Get of the range rounded up to a megabyte, never the
	// rest of the object.
	if sent := served() - before; sent > 3<<20 {
		t.Fatalf("%d bytes served for a 1 MB range of a %d byte object", sent, len(data))
	}
	// io.ReaderAt: one ranged Get each, and the tail of the object.
	p := make([]byte, 4096)
	if n, err := obj.ReadAt(p, 123456); n != 4096 || err != nil || !bytes.Equal(p, data[123456:127552]) {
		t.Fatalf("ReadAt: %d %v", n, err)
	}
	if n, err := obj.ReadAt(p, int64(len(data))-100); n != 100 || err != io.EOF || !bytes.Equal(p[:100], data[len(data)-100:]) {
		t.Fatalf("ReadAt at the end: %d %v", n, err)
	}
	// Seek and read sequentially across chunk boundaries.
	if _, err := obj.Seek(-300000, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	rest, err := ioutil.ReadAll(obj)
	if err != nil || !bytes.Equal(rest, data[len(data)-300000:]) {
		t.Fatalf("tail: %d bytes, %v", len(rest), err)
	}
}

func TestPutReadsExactlyItsSize(t *testing.T) {
	s := testenv.StartService(t, 1, "max_object_bytes: 1000000\n")
	c := dial(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	get := func(key mediacache.Key) []byte {
		obj, err := c.Get(ctx, key)
		if err != nil || obj == nil {
			return nil
		}
		defer obj.Close()
		b, _ := obj.ReadAll()
		return b
	}
	// A body that ends early: nothing stored, an error naming size.
	for _, tc := range []struct{ declared, held int }{{1000, 10}, {300000, 299999}} {
		key := mediacache.Key{Origin: "example.org", MediaID: fmt.Sprintf("short-%d", tc.declared)}
		_, err := c.Put(ctx, key, bytes.NewReader(body(tc.held, 1)), int64(tc.declared), mediacache.PutOptions{})
		if err == nil || !strings.HasPrefix(err.Error(), "size: ") {
			t.Fatalf("%+v: %v", tc, err)
		}
		if st, _ := c.Stat(ctx, key); st.Found {
			t.Fatalf("%+v: stored", tc)
		}
	}
	// A longer one: its first size bytes, the rest left unread (as io.CopyN).
	for _, size := range []int{0, 10, 300000} {
		key := mediacache.Key{Origin: "example.org", MediaID: fmt.Sprintf("prefix-%d", size)}
		r := bytes.NewReader(body(size+100, 2))
		if res, err := c.Put(ctx, key, r, int64(size), mediacache.PutOptions{}); err != nil || !res.Stored {
			t.Fatalf("size %d: %+v %v", size, res, err)
		}
		if got := get(key); !bytes.Equal(got, body(size+100, 2)[:size]) || r.Len() != 100 {
			t.Fatalf("size %d: stored %d bytes, %d left unread", size, len(got), r.Len())
		}
	}
	// Refused before its body is read: an answer, not an error, even while still sending.
	res, err := c.PutBytes(ctx, mediacache.Key{Origin: "example.org", MediaID: "huge"}, body(8<<20, 5), mediacache.PutOptions{})
	if err != nil || res.Stored || res.Outcome != "too_large" {
		t.Fatalf("too large: %+v %v", res, err)
	}
	// A digest that does not match: refused, naming the field.
	_, err = c.PutBytes(ctx, mediacache.Key{Origin: "example.org", MediaID: "digest"}, []byte("abc"), mediacache.PutOptions{SHA256: make([]byte, 32)})
	var e *mediacache.Error
	if !errors.As(err, &e) || e.Code != codes.InvalidArgument || e.Field() != "info.sha256" || mediacache.Miss(err) {
		t.Fatalf("digest mismatch: %v", err)
	}
}

func TestAReplacedOrPurgedObjectFailsItsReadsAsAMiss(t *testing.T) {
	s := testenv.StartService(t, 1, "")
	c := dial(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	key := mediacache.Key{Origin: "example.org", MediaID: "changing"}
	if _, err := c.PutBytes(ctx, key, body(3<<20, 1), mediacache.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	obj, err := c.Get(ctx, key)
	if err != nil || obj == nil {
		t.Fatal(obj, err)
	}
	defer obj.Close()
	p := make([]byte, 1000)
	if _, err := obj.ReadAt(p, 2<<20); err != nil {
		t.Fatal(err)
	}
	// The same size, other bytes: only the digest tells.
	if _, err := c.PutBytes(ctx, key, body(3<<20, 2), mediacache.PutOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = obj.ReadAt(p, 2<<20)
	var e *mediacache.Error
	if !errors.As(err, &e) || e.Code != codes.Aborted || !mediacache.Miss(err) {
		t.Fatalf("read of a replaced object: %v", err)
	}
	if _, err := c.Purge(ctx, key, false, false); err != nil {
		t.Fatal(err)
	}
	if _, err := obj.Seek(1<<20, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if _, err := obj.Read(p); !errors.As(err, &e) || e.Code != codes.Aborted || !mediacache.Miss(err) {
		t.Fatalf("read of a purged object: %v", err)
	}
	obj.Close()
	if _, err := obj.Read(p); err == nil {
		t.Fatal("a closed Object reads")
	}
}

func TestGetOrFillFetchesOnceForManyCallers(t *testing.T) {
	s := testenv.StartService(t, 2, "")
	c := dial(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	key := mediacache.Key{Origin: "remote.example", MediaID: "popular"}
	const callers = 8
	var fetches int32
	fetch := func(ctx context.Context) (mediacache.Fill, error) {
		atomic.AddInt32(&fetches, 1)
		// The origin answers once every other caller waits for this fill.
		if !testenv.Poll(10*time.Second, func() bool {
			st, err := c.Stats(ctx)
			return err == nil && st.LeaseWaiters == callers-1
		}) {
			t.Error("the other callers never waited")
		}
		return mediacache.Fill{Body: body(100000, 3), ContentType: "image/png"}, nil
	}
	var wg sync.WaitGroup
	results := make([][]byte, callers)
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			got, _, err := c.GetOrFill(ctx, key, 20*time.Second, fetch)
			if err != nil {
				t.Error(err)
			}
			results[i] = got
		}(i)
	}
	wg.Wait()
	if fetches != 1 {
		t.Fatalf("%d origin fetches, want 1", fetches)
	}
	for _, r := range results {
		if !bytes.Equal(r, body(100000, 3)) {
			t.Fatal("a caller got other bytes")
		}
	}
}

func TestAFailedFetchReleasesTheLeaseAtOnce(t *testing.T) {
	s := testenv.StartService(t, 2, "lease_ttl: 60s\n")
	a := dial(t, s.Address, mediacache.Options{})
	b := dial(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	key := mediacache.Key{Origin: "remote.example", MediaID: "flaky"}
	var waited time.Duration
	done := make(chan []byte)
	failing := func(ctx context.Context) (mediacache.Fill, error) {
		go func() {
			start := time.Now()
			got, _, err := b.GetOrFill(ctx, key, 30*time.Second, func(context.Context) (mediacache.Fill, error) {
				return mediacache.Fill{Body: []byte("from the waiter")}, nil
			})
			if err != nil {
				t.Error(err)
			}
			waited = time.Since(start)
			done <- got
		}()
		testenv.Eventually(t, "a waiter", 10*time.Second, func() bool {
			st, err := a.Stats(ctx)
			return err == nil && st.LeaseWaiters == 1
		})
		return mediacache.Fill{}, errors.New("origin down")
	}
	if _, _, err := a.GetOrFill(ctx, key, time.Second, failing); err == nil || err.Error() != "origin down" {
		t.Fatalf("the fetch's error: %v", err)
	}
	if got := <-done; string(got) != "from the waiter" {
		t.Fatalf("waiter got %q", got)
	}
	if waited > 10*time.Second {
		t.Fatalf("released at once, not after the 60 s TTL: %v", waited)
	}
}

func TestFailOpenWhenTheTierIsDown(t *testing.T) {
	s := testenv.StartService(t, 1, "")
	c := dial(t, s.Address, mediacache.Options{Timeout: 2 * time.Second})
	s.Stop()
	ctx := context.Background()
	key := mediacache.Key{Origin: "example.org", MediaID: "x"}
	obj, err := c.Get(ctx, key)
	if obj != nil || err == nil || !mediacache.Miss(err) {
		t.Fatalf("a down tier is a transient error, a miss: %v %v", obj, err)
	}
	got, _, err := c.GetOrFill(ctx, key, time.Second, func(context.Context) (mediacache.Fill, error) {
		return mediacache.Fill{Body: []byte("origin bytes")}, nil
	})
	if err != nil || string(got) != "origin bytes" {
		t.Fatalf("fill with the tier down: %q %v", got, err)
	}
}

func writePEM(t *testing.T, path, kind string, der []byte) string {
	if err := ioutil.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// issue makes a certificate signed by parent (self-signed when parent is nil); its files.
func issue(t *testing.T, dir, name string, template *x509.Certificate, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey, string, string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template.SerialNumber = big.NewInt(time.Now().UnixNano())
	template.NotBefore = time.Now().Add(-time.Hour)
	template.NotAfter = time.Now().Add(24 * time.Hour)
	if parent == nil {
		parent, parentKey = template, key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	return cert, key, writePEM(t, filepath.Join(dir, name+".crt"), "CERTIFICATE", der),
		writePEM(t, filepath.Join(dir, name+".key"), "PRIVATE KEY", keyDER)
}

func TestTokensAndMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caFile, _ := issue(t, dir, "ca", &x509.Certificate{Subject: pkix.Name{CommonName: "test ca"}, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}, nil, nil)
	_, _, serverCert, serverKey := issue(t, dir, "server", &x509.Certificate{Subject: pkix.Name{CommonName: "mediacache"}, DNSNames: []string{"mediacache.test"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, ca, caKey)
	_, _, clientCert, clientKey := issue(t, dir, "client", &x509.Certificate{Subject: pkix.Name{CommonName: "media-repo"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, ca, caKey)
	token := "go-client-token-0123456789"
	tokenFile := filepath.Join(dir, "token")
	if err := ioutil.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := testenv.StartService(t, 1, fmt.Sprintf("auth:\n  token_files: [%s]\ntls:\n  cert_file: %s\n  key_file: %s\n  client_ca_file: %s\n",
		tokenFile, serverCert, serverKey, caFile))
	ctx := context.Background()
	key := mediacache.Key{Origin: "example.org", MediaID: "secret"}
	full := mediacache.Options{TokenFile: tokenFile, CAFile: caFile, CertFile: clientCert, KeyFile: clientKey, ServerName: "mediacache.test"}
	c := dial(t, s.Address, full)
	if r, err := c.PutBytes(ctx, key, []byte("guarded"), mediacache.PutOptions{}); err != nil || !r.Stored {
		t.Fatalf("put over mutual TLS with a token: %+v %v", r, err)
	}
	// Without the token: refused as such, not a miss.
	noToken := full
	noToken.TokenFile = ""
	_, err := dial(t, s.Address, noToken).Stat(ctx, key)
	var e *mediacache.Error
	if !errors.As(err, &e) || e.Code != codes.Unauthenticated || mediacache.Miss(err) {
		t.Fatalf("no token: %v", err)
	}
	// Without the client certificate, or the name the certificate carries: no connection.
	noCert := full
	noCert.CertFile, noCert.KeyFile = "", ""
	noName := full
	noName.ServerName = ""
	for name, o := range map[string]mediacache.Options{"no client certificate": noCert, "no server name": noName} {
		o.Timeout = 3 * time.Second
		if _, err := dial(t, s.Address, o).Stat(ctx, key); err == nil {
			t.Fatalf("%s: connected", name)
		}
	}
}
