//! What both ends of a connection agree on: HTTP/2 frame and window sizes, and the method paths
//! that more than one part of the service names. The server and the client take them from here,
//! so neither depends on the other.

/// Largest HTTP/2 frame either end sends: a 256 KiB chunk goes out in a few frames (each one a
/// write) instead of sixteen at the protocol's default 16 KiB.
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// How far the server may run ahead of a client's reads, per download and per connection (the
/// client advertises these).
pub const CLIENT_STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
pub const CLIENT_CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// How much of a Put's body a client may send ahead of the service's reads (the server
/// advertises these). Unread data is buffered: per connection it stays under the window.
pub const SERVER_STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
pub const SERVER_CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// `MediaCacheService.Get`, which the service frames by hand.
pub const GET_PATH: &str = "/mediacache.v1.MediaCacheService/Get";
/// The methods a read-only token may call.
pub const READ_ONLY_PATHS: &[&str] = &[
    GET_PATH,
    "/mediacache.v1.MediaCacheService/Stat",
    "/mediacache.v1.CacheAdminService/RingStatus",
    "/mediacache.v1.CacheAdminService/Stats",
];
/// Paths open to everyone: health checks come from probes and load balancers.
pub const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
