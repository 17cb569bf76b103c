//! What the store answers with: its errors, the tier that answered, body ranges and chunks,
//! and the one result of a Put.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

use crate::object::LayoutError;
use crate::proto::{MediaInfo, PutOutcome};
use crate::shard::ShardError;

/// Body chunks of a read, in order.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("offset {offset} is past the end of the object ({size} bytes)")]
    OutOfRange { offset: u64, size: u64 },
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("the object was replaced while it was being read")]
    Changed,
    #[error("the write was lost on the way (its temporary key expired or its shard restarted)")]
    Lost,
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{0}")]
    Internal(String),
}

/// How a Put that stored nothing ended: an answer for the client (`Refused`), or a failure.
/// Every step of a Put, from its start to its publish, ends with this or with success.
#[derive(Debug)]
pub enum PutError {
    /// A normal "not stored": too large, no room, quarantined, or no shard to take it now.
    Refused(PutOutcome),
    Failed(StoreError),
}

impl From<StoreError> for PutError {
    /// A Put that could not reach its shard, or whose write was lost on the way, is refused as
    /// `UNAVAILABLE`: the caller keeps serving from its own storage, and may retry.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Shard(_) | StoreError::Lost => PutError::Refused(PutOutcome::Unavailable),
            other => PutError::Failed(other),
        }
    }
}

impl From<ShardError> for PutError {
    fn from(e: ShardError) -> Self {
        StoreError::Shard(e).into()
    }
}

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Redis,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
        }
    }
}

/// The body range a reader asked for, already checked against the object's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    /// `[offset, offset+limit)` clipped to `size`; `limit` 0 is to the end. An offset past the
    /// end is an error; an offset equal to the size is an empty range.
    pub fn new(offset: u64, limit: u64, size: u64) -> Result<Self, StoreError> {
        if offset > size {
            return Err(StoreError::OutOfRange { offset, size });
        }
        let end = if limit == 0 {
            size
        } else {
            offset.saturating_add(limit).min(size)
        };
        Ok(Self { start: offset, end })
    }
}

/// Splits a range into consecutive chunks of at most `chunk` bytes.
pub fn body_ranges(range: Range, chunk: u64) -> impl Iterator<Item = (u64, u64)> + Send {
    let Range { start, end } = range;
    (start..end)
        .step_by(chunk as usize)
        .map(move |s| (s, (s + chunk).min(end)))
}

/// `range` of `bytes` as slices of `chunk` bytes (the last one shorter), sharing its buffer.
pub fn chunk_slices(bytes: &Bytes, range: Range, chunk: u64) -> impl Iterator<Item = Bytes> {
    let bytes = bytes.clone();
    body_ranges(range, chunk).map(move |(s, e)| bytes.slice(s as usize..e as usize))
}

/// A hit: the whole object's info, then the body of the requested range.
pub struct Hit {
    pub info: MediaInfo,
    pub tier: Tier,
    pub body: ChunkStream,
}

/// What Stat reports.
pub struct Found {
    pub info: MediaInfo,
    pub tier: Tier,
    pub shard: Option<String>,
}

/// The answer to a request for a fill lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAttempt {
    /// Granted, with the token its holder Puts with.
    Acquired(String),
    /// Another caller holds it.
    Held,
    /// The key's shard cannot be reached.
    Unavailable,
}

/// A new lease token: random, and naming the shard the lease was taken on (none for one taken
/// in a replica's memory), so that it is released there whatever the ring became since.
pub fn lease_token(shard: Option<&str>) -> String {
    let random = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    match shard {
        Some(shard) => format!("{random}@{shard}"),
        None => random,
    }
}

/// The shard a lease token names, if any. Shard names never hold `@`; a token from a client
/// is only ever compared, so a made-up one names at most a shard that holds no such lease.
pub fn lease_shard(token: &str) -> Option<&str> {
    token.rsplit_once('@').map(|(_, shard)| shard)
}

/// What a Get found, after waiting for a fill if it was asked to.
pub enum Lookup {
    Hit(Hit),
    /// A miss; `lease_token` is non-empty when this caller holds the fill lease.
    Miss {
        lease_token: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(Range::new(0, 0, 10).unwrap(), Range { start: 0, end: 10 });
        assert_eq!(Range::new(3, 4, 10).unwrap(), Range { start: 3, end: 7 });
        assert_eq!(Range::new(3, 100, 10).unwrap(), Range { start: 3, end: 10 });
        assert_eq!(Range::new(10, 0, 10).unwrap(), Range { start: 10, end: 10 });
        assert_eq!(
            Range::new(0, u64::MAX, 10).unwrap(),
            Range { start: 0, end: 10 }
        );
        assert!(matches!(
            Range::new(11, 0, 10),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        let r = Range { start: 3, end: 25 };
        let parts: Vec<_> = body_ranges(r, 10).collect();
        assert_eq!(parts, [(3, 13), (13, 23), (23, 25)]);
        assert_eq!(body_ranges(Range { start: 5, end: 5 }, 10).count(), 0);
    }

    #[test]
    fn lease_tokens_name_the_shard_they_were_taken_on() {
        let ring = lease_token(Some("shard-1.a"));
        assert_eq!(lease_shard(&ring), Some("shard-1.a"));
        let memory = lease_token(None);
        assert_eq!(lease_shard(&memory), None);
        assert_ne!(lease_token(None), memory, "tokens are random");
    }

    #[test]
    fn a_put_that_cannot_reach_its_shard_is_refused_not_failed() {
        let down = StoreError::Shard(ShardError::Down("s".into()));
        assert!(matches!(
            PutError::from(down),
            PutError::Refused(PutOutcome::Unavailable)
        ));
        assert!(matches!(
            PutError::from(StoreError::Lost),
            PutError::Refused(PutOutcome::Unavailable)
        ));
        assert!(matches!(
            PutError::from(StoreError::Internal("x".into())),
            PutError::Failed(_)
        ));
    }
}
