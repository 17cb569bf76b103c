package mmr_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/ioutil"
	"sync/atomic"
	"testing"
	"time"

	mediacache "github.com/mediacache/mediacache/clients/go"
	"github.com/mediacache/mediacache/clients/go/internal/testenv"
	"github.com/mediacache/mediacache/clients/go/mmr"
)

type counts struct{ hits, misses, errors int32 }

func open(t *testing.T, address string, o mediacache.Options) (*mmr.Cache, *counts) {
	n := &counts{}
	c, err := mmr.New(mmr.Config{
		Address: address,
		Options: o,
		Hooks: mmr.Hooks{
			Hit:   func() { atomic.AddInt32(&n.hits, 1) },
			Miss:  func() { atomic.AddInt32(&n.misses, 1) },
			Error: func() { atomic.AddInt32(&n.errors, 1) },
		},
		Logf: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, n
}

func hashOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestStoreGetAndDeleteByHash(t *testing.T) {
	s := testenv.StartService(t, 2, "")
	cache, n := open(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	data := bytes.Repeat([]byte("thumbnail "), 30000)
	hash := hashOf(data)
	if err := cache.StoreMedia(ctx, hash, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	r, err := cache.TryGetMedia(ctx, hash)
	if err != nil || r == nil {
		t.Fatalf("a stored hash is a hit: %v %v", r, err)
	}
	if got, _ := ioutil.ReadAll(r); !bytes.Equal(got, data) {
		t.Fatal("other bytes")
	}
	// Stored where the documented key says.
	client, _ := mediacache.Dial(ctx, s.Address, mediacache.Options{})
	defer client.Close()
	if st, err := client.Stat(ctx, mediacache.Key{Origin: "sha256.mmr", MediaID: hash}); err != nil || !st.Found {
		t.Fatalf("key sha256.mmr/%s: %+v %v", hash, st, err)
	}
	// Quarantine in matrix-media-repo deletes by hash: gone from the tier.
	if err := cache.DeleteMedia(ctx, hash); err != nil {
		t.Fatal(err)
	}
	if r, err := cache.TryGetMedia(ctx, hash); r != nil || err != nil {
		t.Fatalf("deleted: %v %v", r, err)
	}
	if n.hits != 1 || n.misses != 1 || n.errors != 0 {
		t.Fatalf("counts %+v", *n)
	}
	// And quarantined: storing it again (an upload already under way, say) stores nothing.
	if err := cache.StoreMedia(ctx, hash, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if r, _ := cache.TryGetMedia(ctx, hash); r != nil {
		t.Fatal("a deleted hash was stored again")
	}
}

func TestABodyThatIsNotItsHashIsNotStored(t *testing.T) {
	s := testenv.StartService(t, 1, "")
	cache, n := open(t, s.Address, mediacache.Options{})
	ctx := context.Background()
	hash := hashOf([]byte("the real body"))
	if err := cache.StoreMedia(ctx, hash, bytes.NewReader([]byte("another body!")), 13); err != nil {
		t.Fatalf("errors are logged, not returned: %v", err)
	}
	if r, _ := cache.TryGetMedia(ctx, hash); r != nil {
		t.Fatal("a body under another body's hash was stored")
	}
	if n.errors != 1 {
		t.Fatalf("the refused store is counted: %+v", *n)
	}
	// Not a SHA-256: a miss, nothing asked.
	if r, err := cache.TryGetMedia(ctx, "not-a-hash"); r != nil || err != nil {
		t.Fatal(r, err)
	}
}

type unreadable struct{}

func (unreadable) Read([]byte) (int, error) { return 0, errors.New("must not be read") }

func TestLargeObjectsAreSkippedUnread(t *testing.T) {
	s := testenv.StartService(t, 1, "")
	cache, n := open(t, s.Address, mediacache.Options{})
	if err := cache.StoreMedia(context.Background(), hashOf(nil), unreadable{}, mmr.MaxObjectBytes); err != nil {
		t.Fatal(err)
	}
	if n.errors != 0 {
		t.Fatalf("%+v", *n)
	}
}

func TestEveryErrorIsAMiss(t *testing.T) {
	s := testenv.StartService(t, 1, "")
	cache, n := open(t, s.Address, mediacache.Options{Timeout: 2 * time.Second})
	ctx := context.Background()
	data := []byte("cached before the tier went down")
	hash := hashOf(data)
	if err := cache.StoreMedia(ctx, hash, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	s.Stop()
	if r, err := cache.TryGetMedia(ctx, hash); r != nil || err != nil {
		t.Fatalf("with the tier down: %v %v, want a miss", r, err)
	}
	if err := cache.StoreMedia(ctx, hash, bytes.NewReader(data), int64(len(data))); err != nil {
		t.Fatalf("a store with the tier down: %v", err)
	}
	if err := cache.DeleteMedia(ctx, hash); err == nil {
		t.Fatal("a delete that did not happen is reported")
	}
	if n.misses != 1 || n.errors != 3 || n.hits != 0 {
		t.Fatalf("counts %+v", *n)
	}
}
