// Package mediacache is the Go client of the mediacache gRPC cache tier.
//
//	c, err := mediacache.Dial(ctx, "mediacache.media.svc:50051", mediacache.Options{TokenFile: "/run/secrets/token"})
//	obj, err := c.Get(ctx, mediacache.Key{Origin: "example.org", MediaID: "AbCdEf"})
//	if obj == nil { /* a miss */ }
//	defer obj.Close()
//	http.ServeContent(w, r, "", obj.Info.StoredAt, obj) // ranges cost one ranged Get each
//
// Errors are *Error values; Miss(err) tells whether to treat one as a miss.
package mediacache

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/ioutil"
	"strings"
	"time"

	pb "github.com/mediacache/mediacache/clients/go/mediacachepb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// PutChunkBytes is the size of the body messages a Put sends.
const PutChunkBytes = 256 * 1024

// The HTTP/2 settings the service's README asks clients to advertise: a 4 MiB stream window and
// a 16 MiB connection window, so a download does not stall on window updates.
const (
	streamWindowBytes     = 4 << 20
	connectionWindowBytes = 16 << 20
	maxMessageBytes       = 8 << 20
)

// Key names one stored object; Variant is "" for the original.
type Key struct {
	Origin  string
	MediaID string
	Variant string
}

func (k Key) proto() *pb.MediaKey {
	return &pb.MediaKey{Origin: k.Origin, MediaId: k.MediaID, Variant: k.Variant}
}

// Info is what the cache knows of an object besides its bytes.
type Info struct {
	Size        int64
	ContentType string
	FileName    string
	SHA256      []byte
	StoredAt    time.Time
}

func infoFrom(m *pb.MediaInfo) Info {
	i := Info{Size: int64(m.GetSize()), ContentType: m.GetContentType(), FileName: m.GetFileName(), SHA256: m.GetSha256()}
	if ms := m.GetStoredAtUnixMs(); ms > 0 {
		i.StoredAt = time.Unix(0, ms*int64(time.Millisecond))
	}
	return i
}

// Options say how to reach the tier.
type Options struct {
	// Token, or TokenFile (read once at Dial), is sent as "authorization: Bearer TOKEN".
	Token     string
	TokenFile string
	// CAFile turns TLS on, verifying the server against that CA; CertFile and KeyFile add a
	// client certificate (mutual TLS); ServerName is the name to expect in the server's
	// certificate when the address carries another.
	CAFile     string
	CertFile   string
	KeyFile    string
	ServerName string
	// TLS, when set, is used as is instead of the files above.
	TLS *tls.Config
	// Timeout bounds each unary call and a Get's wait for its first message (a Get that waits
	// for a fill gets its wait on top); 0: 30 s. Reading an Object and sending a Put's body take
	// as long as the caller takes, bounded by its context and the service's idle limit.
	Timeout time.Duration
}

// Client is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	cache   pb.MediaCacheServiceClient
	admin   pb.CacheAdminServiceClient
	token   string
	timeout time.Duration
}

// Dial connects lazily: it fails only on bad options, and a tier that is down shows as
// Unavailable errors on the calls.
func Dial(ctx context.Context, address string, o Options) (*Client, error) {
	if address == "" {
		return nil, errors.New("address: required, e.g. 127.0.0.1:50051")
	}
	token := o.Token
	if o.TokenFile != "" {
		if token != "" {
			return nil, errors.New("Token, TokenFile: give one, not both")
		}
		b, err := ioutil.ReadFile(o.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("TokenFile: %w", err)
		}
		if token = strings.TrimSpace(string(b)); token == "" {
			return nil, fmt.Errorf("TokenFile: %s is empty", o.TokenFile)
		}
	}
	tlsConfig, err := o.tlsConfig()
	if err != nil {
		return nil, err
	}
	dial := []grpc.DialOption{
		grpc.WithInitialWindowSize(streamWindowBytes),
		grpc.WithInitialConnWindowSize(connectionWindowBytes),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)),
	}
	if tlsConfig != nil {
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig)))
	} else {
		dial = append(dial, grpc.WithInsecure())
	}
	address = strings.TrimPrefix(address, "http://")
	conn, err := grpc.DialContext(ctx, address, dial...)
	if err != nil {
		return nil, fmt.Errorf("address: %w", err)
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	return &Client{conn: conn, cache: pb.NewMediaCacheServiceClient(conn), admin: pb.NewCacheAdminServiceClient(conn), token: token, timeout: timeout}, nil
}

func (o Options) tlsConfig() (*tls.Config, error) {
	if o.TLS != nil {
		return o.TLS, nil
	}
	if o.CAFile == "" {
		if o.CertFile != "" || o.KeyFile != "" {
			return nil, errors.New("CAFile: required with a client certificate")
		}
		return nil, nil
	}
	pem, err := ioutil.ReadFile(o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CAFile: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("CAFile: no PEM certificate in %s", o.CAFile)
	}
	c := &tls.Config{RootCAs: roots, ServerName: o.ServerName, MinVersion: tls.VersionTLS12}
	if (o.CertFile == "") != (o.KeyFile == "") {
		return nil, errors.New("CertFile, KeyFile: a client certificate needs both")
	}
	if o.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("CertFile: %w", err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) call(ctx context.Context, extra time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout+extra)
	return c.authed(ctx), cancel
}

// stream is the context of a streaming call, which lives as long as the caller reads or writes
// (the service cuts off a peer idle for its own limit): cancelled by the caller only.
func (c *Client) stream(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	return c.authed(ctx), cancel
}

func (c *Client) authed(ctx context.Context) context.Context {
	if c.token != "" {
		ctx = metadataWithToken(ctx, c.token)
	}
	return ctx
}

// Error is a failed call: the gRPC code and the server's message.
type Error struct {
	Code    codes.Code
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("mediacache: %s: %s", e.Code, e.Message) }

// Transient errors (the tier or a shard down, slow or overloaded; a stream cut short) are
// misses for a reader: fetch from the origin and try the cache again later. The others are a
// wrong request or a wrong setup.
func (e *Error) Transient() bool {
	switch e.Code {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted,
		codes.Canceled, codes.DataLoss, codes.Internal, codes.Unknown:
		return true
	}
	return false
}

// Field names the request field an InvalidArgument error is about ("" otherwise).
func (e *Error) Field() string {
	if e.Code != codes.InvalidArgument {
		return ""
	}
	if i := strings.Index(e.Message, ":"); i > 0 {
		return e.Message[:i]
	}
	return ""
}

// Miss tells whether err should be treated as a cache miss: it is transient.
func Miss(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Transient()
}

func wrap(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &Error{Code: codes.DeadlineExceeded, Message: err.Error()}
	}
	if errors.Is(err, context.Canceled) {
		return &Error{Code: codes.Canceled, Message: err.Error()}
	}
	if s, ok := status.FromError(err); ok {
		return &Error{Code: s.Code(), Message: s.Message()}
	}
	return err
}

// PutResult is the answer to a Put: refusals are answers, not errors.
type PutResult struct {
	Stored bool
	// "stored", "too_large", "quarantined", "not_admitted", "unavailable", "lease_released",
	// or "unknown_N" for an outcome newer than this client.
	Outcome string
}

func putResult(r *pb.PutResponse) PutResult {
	name, ok := pb.PutOutcome_name[int32(r.GetOutcome())]
	if !ok {
		name = fmt.Sprintf("unknown_%d", r.GetOutcome())
	}
	return PutResult{Stored: r.GetStored(), Outcome: strings.ToLower(strings.TrimPrefix(name, "PUT_OUTCOME_"))}
}

// PutOptions are the optional parts of a Put.
type PutOptions struct {
	ContentType string
	FileName    string
	// SHA256 of the body: checked by the server, which stores nothing on a mismatch.
	SHA256 []byte
	// LeaseToken of the fill lease this Put fills (from GetOrLease).
	LeaseToken string
}

// Put stores size bytes read from body, as io.CopyN reads them: what follows them is left
// unread. A body that ends early stores nothing and returns an error naming size.
func (c *Client) Put(ctx context.Context, key Key, body io.Reader, size int64, o PutOptions) (PutResult, error) {
	buf := make([]byte, PutChunkBytes)
	return c.put(ctx, key, size, o, func(sent, n int64) ([]byte, error) {
		read, err := io.ReadFull(body, buf[:n])
		if err != nil {
			return nil, fmt.Errorf("size: %d declared, the body ended %d bytes early: %w", size, size-sent-int64(read), err)
		}
		return buf[:n], nil
	})
}

// put sends the header and then size bytes, PutChunkBytes at a time, each from next(sent, n).
// An error from next ends the stream short, so the server stores nothing.
func (c *Client) put(ctx context.Context, key Key, size int64, o PutOptions, next func(sent, n int64) ([]byte, error)) (PutResult, error) {
	if size < 0 {
		return PutResult{}, errors.New("size: must not be negative")
	}
	ctx, cancel := c.stream(ctx)
	defer cancel()
	stream, err := c.cache.Put(ctx)
	if err != nil {
		return PutResult{}, wrap(err)
	}
	header := &pb.PutHeader{
		Key:        key.proto(),
		Info:       &pb.MediaInfo{Size: uint64(size), ContentType: o.ContentType, FileName: o.FileName, Sha256: o.SHA256},
		LeaseToken: o.LeaseToken,
	}
	if err := stream.Send(&pb.PutRequest{Kind: &pb.PutRequest_Header{Header: header}}); err != nil {
		return c.putFailed(stream, err)
	}
	for sent := int64(0); sent < size; {
		n := int64(PutChunkBytes)
		if size-sent < n {
			n = size - sent
		}
		chunk, err := next(sent, n)
		if err != nil {
			cancel() // the server stores nothing of a Put cut short
			return PutResult{}, err
		}
		sent += n
		if err := stream.Send(&pb.PutRequest{Kind: &pb.PutRequest_Chunk{Chunk: chunk}}); err != nil {
			return c.putFailed(stream, err)
		}
	}
	answer, err := stream.CloseAndRecv()
	if err != nil {
		return PutResult{}, wrap(err)
	}
	return putResult(answer), nil
}

// putFailed fetches the status that ended a stream whose Send failed.
func (c *Client) putFailed(stream pb.MediaCacheService_PutClient, sendErr error) (PutResult, error) {
	if answer, err := stream.CloseAndRecv(); err != nil {
		return PutResult{}, wrap(err)
	} else if sendErr == io.EOF {
		return putResult(answer), nil
	}
	return PutResult{}, wrap(sendErr)
}

// PutBytes stores body, with its size and SHA-256 in the header.
func (c *Client) PutBytes(ctx context.Context, key Key, body []byte, o PutOptions) (PutResult, error) {
	if o.SHA256 == nil {
		sum := sha256.Sum256(body)
		o.SHA256 = sum[:]
	}
	// Sent straight from body: Send encodes each chunk before it returns.
	return c.put(ctx, key, int64(len(body)), o, func(sent, n int64) ([]byte, error) {
		return body[sent : sent+n], nil
	})
}

// ReleaseLease gives up a fill lease without storing anything (the origin fetch failed), so a
// caller waiting for the key gets the next lease at once.
func (c *Client) ReleaseLease(ctx context.Context, key Key, leaseToken string) error {
	if leaseToken == "" {
		return errors.New("leaseToken: required")
	}
	ctx, cancel := c.call(ctx, 0)
	defer cancel()
	stream, err := c.cache.Put(ctx)
	if err != nil {
		return wrap(err)
	}
	header := &pb.PutHeader{Key: key.proto(), LeaseToken: leaseToken, ReleaseLease: true}
	if err := stream.Send(&pb.PutRequest{Kind: &pb.PutRequest_Header{Header: header}}); err != nil && err != io.EOF {
		return wrap(err)
	}
	_, err = stream.CloseAndRecv()
	return wrap(err)
}

// Stat tells whether and where the object is; found is false on a miss.
type Stat struct {
	Found bool
	Info  Info
	Tier  string
	Shard string
}

// Stat looks an object up without reading it.
func (c *Client) Stat(ctx context.Context, key Key) (Stat, error) {
	ctx, cancel := c.call(ctx, 0)
	defer cancel()
	r, err := c.cache.Stat(ctx, &pb.StatRequest{Key: key.proto()})
	if err != nil {
		return Stat{}, wrap(err)
	}
	return Stat{Found: r.GetFound(), Info: infoFrom(r.GetInfo()), Tier: r.GetTier(), Shard: r.GetShard()}, nil
}

// Purge removes key (or with allVariants every variant of its media) from every shard and
// replica; with quarantine later Puts of the media are refused for the server's quarantine TTL.
func (c *Client) Purge(ctx context.Context, key Key, allVariants, quarantine bool) (int64, error) {
	ctx, cancel := c.call(ctx, 0)
	defer cancel()
	r, err := c.cache.Purge(ctx, &pb.PurgeRequest{Key: key.proto(), AllVariants: allVariants, Quarantine: quarantine})
	if err != nil {
		return 0, wrap(err)
	}
	return int64(r.GetRemoved()), nil
}

// PurgeOrigin removes every media of origin; progress (may be nil) sees each report.
func (c *Client) PurgeOrigin(ctx context.Context, origin string, quarantine bool, progress func(*pb.PurgeOriginResponse)) (int64, error) {
	ctx, cancel := c.call(ctx, 10*time.Minute)
	defer cancel()
	stream, err := c.admin.PurgeOrigin(ctx, &pb.PurgeOriginRequest{Origin: origin, Quarantine: quarantine})
	if err != nil {
		return 0, wrap(err)
	}
	var removed int64
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			return removed, nil
		}
		if err != nil {
			return removed, wrap(err)
		}
		removed = int64(r.GetRemoved())
		if progress != nil {
			progress(r)
		}
	}
}

// Stats are the replica's counters.
func (c *Client) Stats(ctx context.Context) (*pb.StatsResponse, error) {
	ctx, cancel := c.call(ctx, 0)
	defer cancel()
	r, err := c.admin.Stats(ctx, &pb.StatsRequest{})
	return r, wrap(err)
}
