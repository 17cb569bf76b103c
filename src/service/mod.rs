//! The gRPC services: `mediacache.v1.MediaCache` and `mediacache.v1.CacheAdmin`, thin adapters
//! between the wire and the store.
//!
//! - `media`: the MediaCache handlers.
//! - `admin`: the CacheAdmin handlers.
//! - `framing`: `MediaCache.Get` framed by hand, so body chunks reach the transport uncopied.
//! - `stream`: a request's span and typed outcome, and the pacing of a Get's stream.
//! - `drain`: admission (`limits.max_streams`) and the drain at shutdown.
//! - `error`: the one table from errors to gRPC statuses.

mod admin;
mod drain;
mod error;
mod framing;
mod media;
mod stream;

pub use admin::CacheAdminService;
pub use drain::Drain;
pub use error::{to_status, ServiceError};
pub use framing::MediaCacheRoutes;
pub use media::MediaCacheService;
