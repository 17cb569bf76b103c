//! mediacache: a gRPC cache tier that many Matrix media repositories share, in front of a ring of
//! Redis shards, with an in-memory tier per replica.
//!
//! # Layout
//! Modules, in the order a request meets them; each file is one concept, and imports run one way.
//!
//! - [`server`]: wires config, ring, store and services together and serves until shutdown.
//! - [`auth`]: client tokens, checked by a tower layer in front of every gRPC service.
//! - [`tls`]: TLS on the gRPC port, with certificates reloaded when their files change.
//! - [`coalesce`]: a connection's small writes gathered into one system call per turn.
//! - [`service`]: the gRPC services, thin adapters between the wire and the store.
//! - [`key`]: media key validation and the Redis key names derived from it.
//! - [`store`]: the memory tier and the Redis tier composed into one store.
//! - [`object`]: the layout of one stored object (header + body) in a Redis string.
//! - [`ring`]: weighted rendezvous hashing over shard names; the one ring builder.
//! - [`shard`]: one Redis shard (pool, health, reads, pub/sub), knowing nothing of the store.
//! - [`events`]: cluster events over pub/sub, delivered to a listener the store registers.
//! - [`reload`]: watches the config, validates it, and swaps in the next ring.
//! - [`config`]: the YAML model, its defaults, and the one validation step.
//! - [`telemetry`]: Prometheus metrics, `/healthz` and `/readyz`.
//! - [`wire`]: HTTP/2 sizes and method paths that the server and the client agree on.
//! - [`clock`]: wall-clock time shared with other processes (quarantine ends, timestamps).
//! - [`client`]: a small typed client for Rust users and the CLI.
//! - [`sim`]: the cache policy simulator behind `mediacache simulate`.

#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod clock;
pub mod coalesce;
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
