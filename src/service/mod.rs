//! The gRPC services: `mediacache.v1.MediaCacheService` and `mediacache.v1.CacheAdminService`, thin adapters
//! between the wire and the store.
//!
//! - `media`: the MediaCacheService handlers.
//! - `admin`: the CacheAdminService handlers.
//! - `framing`: `MediaCacheService.Get` framed by hand, so body chunks reach the transport uncopied.
//! - `stream`: a request's span and typed outcome, and the pacing of a Get's stream.
//! - `drain`: admission (`limits.max_streams`) and the drain at shutdown.
//! - `error`: the one table from errors to gRPC statuses.

mod admin;
mod drain;
mod error;
mod framing;
mod media;
mod stream;

pub use admin::AdminHandlers;
pub use drain::Drain;
pub use error::{to_status, ServiceError};
pub use framing::MediaCacheRoutes;
pub use media::MediaHandlers;
