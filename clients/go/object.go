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

// errChanged ends reads of an Object whose key was stored again or purged meanwhile: its bytes
// would mix two objects.
var errChanged = &Error{Code: codes.Aborted, Message: "the object was replaced or removed while being read"}

// How much of an object one Get asks for: the first Get a chunk (enough for a thumbnail or to
// sniff a type), then sequential reads a window that doubles from readAheadMin to readAheadMax,
// back to readAheadMin after a Seek. A Get asks for what a reader is likely to read, so a range
// request costs one bounded Get (two or three for a range over a megabyte) and never streams
// the rest of the object.
const (
	firstGetBytes = 256 * 1024
	readAheadMin  = 1 << 20
	readAheadMax  = 16 << 20
)

// Object is a hit, read lazily: an io.ReadSeeker and io.ReaderAt over the object's bytes.
// Sequential reads continue ranged Gets of growing size; a Seek elsewhere ends the current one,
// and the next Read opens a ranged Get there; each ReadAt is one ranged Get. Every Get after the
// first checks that the object is still the one opened: a replaced or purged object fails the
// read with Aborted. A read that fails returns an *Error (Miss tells whether to treat it as
// one). Close it when done. Read and Seek are not safe for concurrent use; ReadAt is.
type Object struct {
	Info Info

	client *Client
	key    Key
	ctx    context.Context

	mu        sync.Mutex
	pos       int64
	stream    *openRange
	readAhead int64
	closed    bool
}

// openRange is one streamed Get and where its next byte is.
type openRange struct {
	recv   func() (*pb.GetResponse, error)
	cancel context.CancelFunc
	at     int64
	end    int64
	buf    []byte
}

// openRange starts a Get of [offset, offset+limit) (limit 0: to the end) and reads its info;
// nil on a miss. Only the wait for the first message is bounded by the client's timeout.
func (c *Client) openRange(ctx context.Context, key Key, offset, limit int64, lease bool, wait time.Duration) (*openRange, *pb.GetResponse, error) {
	ctx, cancel := c.stream(ctx)
	timer := time.AfterFunc(c.timeout+wait, cancel)
	stream, err := c.cache.Get(ctx, &pb.GetRequest{
		Key: key.proto(), Offset: uint64(offset), Limit: uint64(limit),
		WantLease: lease, WaitMs: uint32(wait / time.Millisecond),
	})
	var first *pb.GetResponse
	if err == nil {
		first, err = stream.Recv()
	}
	if !timer.Stop() && err != nil {
		err = &Error{Code: codes.DeadlineExceeded, Message: fmt.Sprintf("no answer within %v", c.timeout+wait)}
	}
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
	size := int64(first.GetInfo().GetSize())
	end := size
	if limit > 0 && offset+limit < size {
		end = offset + limit
	}
	return &openRange{recv: stream.Recv, cancel: cancel, at: offset, end: end}, first, nil
}

// next returns the next chunk of the range, io.EOF at its end.
func (r *openRange) next() ([]byte, error) {
	for len(r.buf) == 0 {
		if r.at >= r.end {
			return nil, io.EOF
		}
		m, err := r.recv()
		if err == io.EOF {
			return nil, &Error{Code: codes.DataLoss, Message: fmt.Sprintf("a Get ended at byte %d of %d", r.at, r.end)}
		}
		if err != nil {
			return nil, wrap(err)
		}
		if m.GetInfo() != nil || m.GetMiss() != nil {
			return nil, &Error{Code: codes.Internal, Message: "a Get sent something other than a chunk after its info"}
		}
		r.buf = m.GetChunk()
	}
	return r.buf, nil
}

// take consumes n bytes of the current chunk.
func (r *openRange) take(n int) {
	r.buf = r.buf[n:]
	r.at += int64(n)
}

// Get opens the object for reading, or returns nil on a miss. Only its first chunk is asked for.
func (c *Client) Get(ctx context.Context, key Key) (*Object, error) {
	obj, _, err := c.GetOrLease(ctx, key, false, 0)
	return obj, err
}

// GetOrLease is Get for a media repo about to fetch from the origin on a miss: with lease, a
// miss may carry the fill lease (a non-empty token: fetch, then Put with it, or ReleaseLease on
// failure); with wait, a miss first waits that long for another caller's fill.
func (c *Client) GetOrLease(ctx context.Context, key Key, lease bool, wait time.Duration) (*Object, string, error) {
	r, first, err := c.openRange(ctx, key, 0, firstGetBytes, lease, wait)
	if err != nil || r == nil {
		if first != nil {
			return nil, first.GetMiss().GetLeaseToken(), nil
		}
		return nil, "", err
	}
	return &Object{Info: infoFrom(first.GetInfo()), client: c, key: key, ctx: ctx, stream: r, readAhead: readAheadMin}, "", nil
}

var errClosed = errors.New("mediacache: read of a closed Object")

// Read reads from the current position.
func (o *Object) Read(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return 0, errClosed
	}
	if o.pos >= o.Info.Size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if o.stream != nil && (o.stream.at != o.pos || o.stream.at >= o.stream.end) {
		if o.stream.at != o.pos {
			o.readAhead = readAheadMin
		}
		o.stream.cancel()
		o.stream = nil
	}
	if o.stream == nil {
		want := o.readAhead
		if int64(len(p)) > want {
			want = int64(len(p))
		}
		r, err := o.reopen(o.pos, want)
		if err != nil {
			return 0, err
		}
		o.stream = r
		if o.readAhead < readAheadMax {
			o.readAhead *= 2
		}
	}
	chunk, err := o.stream.next()
	if err != nil {
		// A broken stream is dropped: the next Read opens another.
		o.stream.cancel()
		o.stream = nil
		return 0, err
	}
	n := copy(p, chunk)
	o.stream.take(n)
	o.pos += int64(n)
	return n, nil
}

// reopen starts a ranged Get and checks that it reads the same object.
func (o *Object) reopen(offset, limit int64) (*openRange, error) {
	r, first, err := o.client.openRange(o.ctx, o.key, offset, limit, false, 0)
	var e *Error
	if errors.As(err, &e) && (e.Code == codes.OutOfRange || e.Code == codes.NotFound) {
		return nil, errChanged
	}
	if err != nil {
		return nil, err
	}
	if r == nil {
		return nil, errChanged
	}
	info := infoFrom(first.GetInfo())
	if info.Size != o.Info.Size || !bytes.Equal(info.SHA256, o.Info.SHA256) {
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

// ReadAt reads len(p) bytes at off with one ranged Get of exactly those bytes.
func (o *Object) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("ReadAt: negative offset")
	}
	o.mu.Lock()
	closed := o.closed
	o.mu.Unlock()
	if closed {
		return 0, errClosed
	}
	if off >= o.Info.Size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
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
		if err != nil {
			return n, err
		}
		m := copy(p[n:], chunk)
		r.take(m)
		n += m
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Close ends any Get in progress; later reads fail.
func (o *Object) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closed = true
	if o.stream != nil {
		o.stream.cancel()
		o.stream = nil
	}
	return nil
}

// ReadAll reads the whole object into memory; an error part-way is returned (a miss for
// Miss).
func (o *Object) ReadAll() ([]byte, error) {
	// Room for the last read that finds the end, or the buffer grows and copies everything.
	w := bytes.NewBuffer(make([]byte, 0, o.Info.Size-o.pos+bytes.MinRead))
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
// fetch fails the lease is released (a waiting caller gets it at once) and fetch's error
// returned. The cache never fails the request: whatever error the tier gives (down, slow, a
// stream cut short, a token it no longer takes), fetch is called and its result returned; use
// Get to see those errors. It holds the body in memory: for objects that may not fit, use
// GetOrLease, Put and ReleaseLease.
func (c *Client) GetOrFill(ctx context.Context, key Key, wait time.Duration, fetch func(context.Context) (Fill, error)) ([]byte, Info, error) {
	obj, token, err := c.GetOrLease(ctx, key, true, wait)
	if err == nil && obj != nil {
		body, readErr := obj.ReadAll()
		obj.Close()
		if readErr == nil {
			return body, obj.Info, nil
		}
		err = readErr // cut short: fetch, and store nothing over what may be a new object
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
		// The tier answered a miss: store, under the lease when this caller holds it.
		_, _ = c.PutBytes(ctx, key, fill.Body, PutOptions{ContentType: fill.ContentType, FileName: fill.FileName, LeaseToken: token})
	}
	return fill.Body, info, nil
}
