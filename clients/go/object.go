package mediacache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	pb "github.com/mediacache/mediacache/clients/go/mediacachepb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

func metadataWithToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// errChanged ends reads of an Object whose key was stored again meanwhile: its bytes would mix
// two objects.
var errChanged = &Error{Code: codes.Aborted, Message: "the object was replaced while being read"}

// Object is a hit, read lazily: an io.ReadSeeker and io.ReaderAt over the object's bytes.
// Sequential reads share one streamed Get; a Seek elsewhere ends it, and the next Read opens a
// ranged Get from there; each ReadAt is one ranged Get. A read that fails returns an *Error
// (Miss tells whether to treat it as one). Close it when done; it is not safe for concurrent
// Read and Seek, but ReadAt may be called concurrently.
type Object struct {
	Info Info

	client *Client
	key    Key
	ctx    context.Context

	mu     sync.Mutex
	pos    int64
	stream *openRange
}

// openRange is one streamed Get and where its next byte is.
type openRange struct {
	recv   func() (*pb.GetResponse, error)
	cancel context.CancelFunc
	at     int64
	buf    []byte
}

// openRange starts a Get of [offset, offset+limit) (limit 0: to the end) and reads its info;
// nil on a miss.
func (c *Client) openRange(ctx context.Context, key Key, offset, limit int64, lease bool, wait time.Duration) (*openRange, *pb.GetResponse, error) {
	ctx, cancel := c.call(ctx, wait)
	stream, err := c.cache.Get(ctx, &pb.GetRequest{
		Key: key.proto(), Offset: uint64(offset), Limit: uint64(limit),
		WantLease: lease, WaitMs: uint32(wait / time.Millisecond),
	})
	if err != nil {
		cancel()
		return nil, nil, wrap(err)
	}
	first, err := stream.Recv()
	if err != nil {
		cancel()
		if err == io.EOF {
			return nil, nil, &Error{Code: codes.Internal, Message: "a Get ended without a message"}
		}
		return nil, nil, wrap(err)
	}
	if first.GetInfo() == nil {
		cancel()
		if first.GetMiss() == nil {
			return nil, nil, &Error{Code: codes.Internal, Message: "a Get answered neither info nor miss"}
		}
		return nil, first, nil
	}
	return &openRange{recv: stream.Recv, cancel: cancel, at: offset}, first, nil
}

// next returns the next chunk of the range, io.EOF at its end.
func (r *openRange) next() ([]byte, error) {
	if len(r.buf) > 0 {
		return r.buf, nil
	}
	m, err := r.recv()
	if err == io.EOF {
		return nil, io.EOF
	}
	if err != nil {
		return nil, wrap(err)
	}
	chunk := m.GetChunk()
	if chunk == nil && m.GetInfo() != nil {
		return nil, &Error{Code: codes.Internal, Message: "a Get sent a second info"}
	}
	r.buf = chunk
	return r.buf, nil
}

// Get opens the object for reading, or returns nil on a miss. Nothing but its info is read yet.
func (c *Client) Get(ctx context.Context, key Key) (*Object, error) {
	obj, _, err := c.GetOrLease(ctx, key, false, 0)
	return obj, err
}

// GetOrLease is Get for a media repo about to fetch from the origin on a miss: with lease, a
// miss may carry the fill lease (a non-empty token: fetch, then Put with it, or ReleaseLease on
// failure); with wait, a miss first waits that long for another caller's fill.
func (c *Client) GetOrLease(ctx context.Context, key Key, lease bool, wait time.Duration) (*Object, string, error) {
	r, first, err := c.openRange(ctx, key, 0, 0, lease, wait)
	if err != nil || r == nil {
		if first != nil {
			return nil, first.GetMiss().GetLeaseToken(), nil
		}
		return nil, "", err
	}
	return &Object{Info: infoFrom(first.GetInfo()), client: c, key: key, ctx: ctx, stream: r}, "", nil
}

// Read reads from the current position, continuing one streamed Get while reads are sequential.
func (o *Object) Read(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.pos >= o.Info.Size {
		return 0, io.EOF
	}
	if o.stream != nil && o.stream.at != o.pos {
		o.stream.cancel()
		o.stream = nil
	}
	if o.stream == nil {
		r, err := o.reopen(o.pos, 0)
		if err != nil {
			return 0, err
		}
		o.stream = r
	}
	chunk, err := o.stream.next()
	if err == io.EOF {
		// The range ended before the object's end: not a whole object.
		return 0, &Error{Code: codes.DataLoss, Message: fmt.Sprintf("a Get ended at byte %d of %d", o.pos, o.Info.Size)}
	}
	if err != nil {
		return 0, err
	}
	n := copy(p, chunk)
	o.stream.buf = chunk[n:]
	o.stream.at += int64(n)
	o.pos += int64(n)
	return n, nil
}

// reopen starts a ranged Get and checks that it reads the same object.
func (o *Object) reopen(offset, limit int64) (*openRange, error) {
	r, first, err := o.client.openRange(o.ctx, o.key, offset, limit, false, 0)
	if err != nil {
		return nil, err
	}
	if r == nil {
		return nil, &Error{Code: codes.NotFound, Message: "the object left the cache while being read"}
	}
	if !bytes.Equal(infoFrom(first.GetInfo()).SHA256, o.Info.SHA256) {
		r.cancel()
		return nil, errChanged
	}
	return r, nil
}

// Seek moves the position; the next Read opens a ranged Get there if it is elsewhere.
func (o *Object) Seek(offset int64, whence int) (int64, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += o.pos
	case io.SeekEnd:
		offset += o.Info.Size
	default:
		return o.pos, errors.New("Seek: bad whence")
	}
	if offset < 0 {
		return o.pos, errors.New("Seek: negative position")
	}
	o.pos = offset
	return offset, nil
}

// ReadAt reads len(p) bytes at off with one ranged Get.
func (o *Object) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("ReadAt: negative offset")
	}
	if off >= o.Info.Size {
		return 0, io.EOF
	}
	want := int64(len(p))
	if rest := o.Info.Size - off; want > rest {
		want = rest
	}
	r, err := o.reopen(off, want)
	if err != nil {
		return 0, err
	}
	defer r.cancel()
	n := 0
	for int64(n) < want {
		chunk, err := r.next()
		if err == io.EOF {
			return n, &Error{Code: codes.DataLoss, Message: fmt.Sprintf("a ranged Get ended after %d of %d bytes", n, want)}
		}
		if err != nil {
			return n, err
		}
		n += copy(p[n:], chunk)
		r.buf = nil
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Close ends any Get in progress.
func (o *Object) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.stream != nil {
		o.stream.cancel()
		o.stream = nil
	}
	return nil
}

// ReadAll reads the whole object into memory; an error part-way is returned (a miss for
// Miss).
func (o *Object) ReadAll() ([]byte, error) {
	buf := make([]byte, 0, o.Info.Size)
	w := bytes.NewBuffer(buf)
	if _, err := io.Copy(w, o); err != nil {
		return nil, err
	}
	return w.Bytes(), nil
}

// Fill is what a GetOrFill fetch returns.
type Fill struct {
	Body        []byte
	ContentType string
	FileName    string
}

// GetOrFill returns the object's bytes from the cache, or from fetch (the origin) stored on the
// way: of N callers missing the key at once, through any replica, one gets the fill lease and
// calls fetch; the others wait up to wait for its Put and read the object from the cache. If
// fetch fails the lease is released (a waiter gets it at once) and the error returned. If the
// tier is down or slow (a transient error), fetch is called and its result returned without
// storing: the cache never fails the request. It holds the body in memory: for objects that
// may not fit, use GetOrLease, Put and ReleaseLease.
func (c *Client) GetOrFill(ctx context.Context, key Key, wait time.Duration, fetch func(context.Context) (Fill, error)) ([]byte, Info, error) {
	obj, token, err := c.GetOrLease(ctx, key, true, wait)
	if err == nil && obj != nil {
		defer obj.Close()
		body, err := obj.ReadAll()
		if err == nil {
			return body, obj.Info, nil
		}
		if !Miss(err) {
			return nil, Info{}, err
		}
		// Cut short: a miss; fetch without a lease.
	} else if err != nil && !Miss(err) {
		return nil, Info{}, err
	}
	fill, ferr := fetch(ctx)
	if ferr != nil {
		if token != "" {
			_ = c.ReleaseLease(context.Background(), key, token)
		}
		return nil, Info{}, ferr
	}
	info := Info{Size: int64(len(fill.Body)), ContentType: fill.ContentType, FileName: fill.FileName}
	if err == nil {
		// The tier answered: store, under the lease when this caller holds it.
		_, _ = c.PutBytes(ctx, key, fill.Body, PutOptions{ContentType: fill.ContentType, FileName: fill.FileName, LeaseToken: token})
	}
	return fill.Body, info, nil
}
