// Package mmr puts matrix-media-repo's Redis media cache (redislib/cache.go) on the tier: the
// same three functions, signatures and semantics, so a patch replaces their bodies and nothing
// else (clients/go/README.md shows it).
//
// Keys: matrix-media-repo names objects by the SHA-256 of their body (hex). Each is stored as
// origin "sha256.mmr" (Config.Origin), media_id the hex hash, variant "". A quarantine in
// matrix-media-repo calls DeleteMedia with the hash, which purges that key (every variant)
// from every shard and replica and quarantines it.
//
// Every error is a miss: TryGetMedia answers (nil, nil) and StoreMedia logs, counts and returns
// nil, so a cache that is down or slow never fails a download or an upload. DeleteMedia logs
// and counts its error and returns it too.
package mmr

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"log"
	"os"
	"strings"
	"sync"
	"time"

	mediacache "github.com/mediacache/mediacache/clients/go"
)

// MaxObjectBytes: matrix-media-repo skips caching objects this large or larger.
const MaxObjectBytes = 512 * 1024 * 1024

// GetTimeout bounds TryGetMedia, as matrix-media-repo's 20 s.
const GetTimeout = 20 * time.Second

// Hooks are called on each lookup; point Hit and Miss at matrix-media-repo's
// metrics.CacheHits / metrics.CacheMisses (label cache="media") to keep its metric names.
// Error is called on every error, which is also counted as a miss.
type Hooks struct {
	Hit, Miss, Error func()
}

// Config says how to reach the tier.
type Config struct {
	Address string
	Options mediacache.Options
	// Origin under which hashes are stored; "" is "sha256.mmr".
	Origin string
	Hooks  Hooks
	// Logf logs errors; nil: the standard logger.
	Logf func(format string, args ...interface{})
}

// Cache is one connection to the tier with matrix-media-repo's three cache functions.
type Cache struct {
	client *mediacache.Client
	cfg    Config
}

// New connects (lazily: a tier that is down shows as misses).
func New(cfg Config) (*Cache, error) {
	if cfg.Origin == "" {
		cfg.Origin = "sha256.mmr"
	}
	if cfg.Logf == nil {
		cfg.Logf = log.Printf
	}
	c, err := mediacache.Dial(context.Background(), cfg.Address, cfg.Options)
	if err != nil {
		return nil, err
	}
	return &Cache{client: c, cfg: cfg}, nil
}

// Close closes the connection.
func (c *Cache) Close() error { return c.client.Close() }

func (c *Cache) key(hash string) (mediacache.Key, []byte, bool) {
	hash = strings.ToLower(hash)
	digest, err := hex.DecodeString(hash)
	if err != nil || len(digest) != 32 {
		return mediacache.Key{}, nil, false
	}
	return mediacache.Key{Origin: c.cfg.Origin, MediaID: hash}, digest, true
}

func (c *Cache) failed(what, hash string, err error) {
	c.cfg.Logf("mediacache: %s %s: %v", what, hash, err)
	if c.cfg.Hooks.Error != nil {
		c.cfg.Hooks.Error()
	}
}

func (c *Cache) count(hit bool) {
	if hit && c.cfg.Hooks.Hit != nil {
		c.cfg.Hooks.Hit()
	} else if !hit && c.cfg.Hooks.Miss != nil {
		c.cfg.Hooks.Miss()
	}
}

// StoreMedia stores size bytes of content under hash (the body's SHA-256, hex, which the tier
// checks). Objects of 512 MiB or more are skipped. It returns nil when the tier fails: the
// error is logged and counted, and the upload goes on.
func (c *Cache) StoreMedia(ctx context.Context, hash string, content io.Reader, size int64) error {
	if size >= MaxObjectBytes {
		return nil
	}
	key, digest, ok := c.key(hash)
	if !ok {
		c.failed("store", hash, errors.New("not a SHA-256 in hex; not cached"))
		return nil
	}
	r, err := c.client.Put(ctx, key, content, size, mediacache.PutOptions{SHA256: digest})
	if err != nil {
		c.failed("store", hash, err)
		return nil
	}
	if !r.Stored {
		c.cfg.Logf("mediacache: store %s: not stored: %s", hash, r.Outcome)
	}
	return nil
}

// TryGetMedia reads the whole object into memory within 20 s; (nil, nil) on a miss, and on any
// error, which is logged and counted (a download then goes to the datastore, never fails).
func (c *Cache) TryGetMedia(ctx context.Context, hash string) (io.ReadSeeker, error) {
	key, _, ok := c.key(hash)
	if !ok {
		c.count(false)
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(ctx, GetTimeout)
	defer cancel()
	obj, err := c.client.Get(ctx, key)
	if err != nil {
		c.failed("get", hash, err)
		c.count(false)
		return nil, nil
	}
	if obj == nil {
		c.count(false)
		return nil, nil
	}
	defer obj.Close()
	body, err := obj.ReadAll()
	if err != nil {
		c.failed("get", hash, err)
		c.count(false)
		return nil, nil
	}
	c.count(true)
	return bytes.NewReader(body), nil
}

// DeleteMedia purges hash (every variant) from every shard and replica and quarantines it, so
// a StoreMedia of it already under way, or another within the tier's quarantine_ttl, stores
// nothing. Unlike a read, its error is returned (as well as logged and counted): a quarantined
// object left in the cache is worth knowing about.
func (c *Cache) DeleteMedia(ctx context.Context, hash string) error {
	key, _, ok := c.key(hash)
	if !ok {
		return nil
	}
	if _, err := c.client.Purge(ctx, key, true, true); err != nil {
		c.failed("delete", hash, err)
		return err
	}
	return nil
}

var (
	defaultOnce  sync.Once
	defaultCache *Cache
)

// Default is the Cache the package-level functions use, configured from the environment on
// first use: MEDIACACHE_ADDR (required; unset: every call is a miss), MEDIACACHE_TOKEN_FILE,
// MEDIACACHE_CA_FILE, MEDIACACHE_CERT_FILE, MEDIACACHE_KEY_FILE and MEDIACACHE_ORIGIN. Hooks
// set with SetHooks before first use are kept.
func Default() *Cache {
	defaultOnce.Do(func() {
		address := os.Getenv("MEDIACACHE_ADDR")
		if address == "" {
			return
		}
		c, err := New(Config{
			Address: address,
			Options: mediacache.Options{
				TokenFile: os.Getenv("MEDIACACHE_TOKEN_FILE"),
				CAFile:    os.Getenv("MEDIACACHE_CA_FILE"),
				CertFile:  os.Getenv("MEDIACACHE_CERT_FILE"),
				KeyFile:   os.Getenv("MEDIACACHE_KEY_FILE"),
			},
			Origin: os.Getenv("MEDIACACHE_ORIGIN"),
			Hooks:  defaultHooks,
		})
		if err != nil {
			log.Printf("mediacache: not configured: %v", err)
			return
		}
		defaultCache = c
	})
	return defaultCache
}

var defaultHooks Hooks

// SetHooks sets the hooks of the Default cache; call it before the first cache call.
func SetHooks(h Hooks) { defaultHooks = h }

// StoreMedia is Default().StoreMedia; without a configured tier it does nothing.
func StoreMedia(ctx context.Context, hash string, content io.Reader, size int64) error {
	if c := Default(); c != nil {
		return c.StoreMedia(ctx, hash, content, size)
	}
	return nil
}

// TryGetMedia is Default().TryGetMedia; without a configured tier it answers (nil, nil) and
// counts nothing, as matrix-media-repo does without Redis.
func TryGetMedia(ctx context.Context, hash string) (io.ReadSeeker, error) {
	if c := Default(); c != nil {
		return c.TryGetMedia(ctx, hash)
	}
	return nil, nil
}

// DeleteMedia is Default().DeleteMedia; without a configured tier it does nothing.
func DeleteMedia(ctx context.Context, hash string) error {
	if c := Default(); c != nil {
		return c.DeleteMedia(ctx, hash)
	}
	return nil
}
