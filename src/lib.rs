//! mediacache: a gRPC cache tier that many Matrix media repositories share, in front of a ring of
//! Redis shards, with an in-memory tier per replica.
//!
//! # Layout
//! - [`auth`]: client tokens, checked by a tower layer in front of every gRPC service.
//! - [`config`]: the YAML model, defaults and the one validation step.
//! - [`events`]: cluster events over Redis pub/sub (fills, lease releases, purges), and what a
//!   replica does when it may have missed some.
//! - [`framing`]: `MediaCache.Get` framed by hand, so body chunks reach the transport uncopied.
//! - [`key`]: media key validation and the Redis key names derived from it.
//! - [`object`]: the layout of one stored object (header + body) in a Redis string.
//! - [`reload`]: watches the config, validates it, and swaps in the next ring.
//! - [`ring`]: weighted rendezvous hashing over shard names; an immutable ring of shards.
//! - [`shard`]: one Redis shard: a fred pool with timeouts and a health state.
//! - [`sim`]: the cache policy simulator behind `mediacache simulate`.
//! - [`store`]: the memory tier, the Redis tier, quarantines, and the store over them.
//! - [`service`]: the tonic services `MediaCache` and `CacheAdmin`.
//! - [`server`]: wires config, ring, store and services together and serves until shutdown.
//! - [`tls`]: TLS on the gRPC port, with certificates reloaded when their files change.
//! - [`telemetry`]: Prometheus metrics, `/healthz` and `/readyz`.
//! - [`client`]: a small typed client for Rust users and the CLI.
//! - [`clock`]: wall-clock time shared with other processes (quarantine ends, timestamps).
//! - [`wire`]: HTTP/2 sizes and method paths that the server and the client agree on.

#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod events;
pub mod key;
pub mod object;
pub mod reload;
pub mod ring;
pub mod server;
pub mod service;
pub mod shard;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wire;

/// Code generated from `proto/mediacache/v1/mediacache.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mediacache.v1");

    /// Encoded descriptors of the protos, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/mediacache_descriptor.bin"));
}
