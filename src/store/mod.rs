//! Where objects live: the memory tier of this replica and the Redis tier over the ring.
//!
//! With an empty ring the memory tier is the store and admits every object that fits; with
//! shards the Redis tier is the store.

pub mod memory;
pub mod redis;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{stream, Stream, StreamExt};

use crate::key::Key;
use crate::object::LayoutError;
use crate::proto::MediaInfo;
use crate::shard::ShardError;
use memory::{MemoryStore, MemoryWriter, Object};
use redis::{RedisStore, RedisWriter};

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
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{0}")]
    Internal(String),
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

pub struct Store {
    memory: MemoryStore,
    redis: RedisStore,
    chunk_bytes: u64,
}

/// Where a Put's bytes go until it is committed.
pub enum Writer {
    Memory { key: Key, buf: MemoryWriter },
    Redis(RedisWriter),
}

impl Writer {
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        match self {
            Writer::Memory { buf, .. } => {
                buf.write(&chunk);
                Ok(())
            }
            Writer::Redis(w) => w.write(chunk).await,
        }
    }

    /// Which tier and shard the object is going to.
    pub fn target(&self) -> (Tier, &str) {
        match self {
            Writer::Memory { .. } => (Tier::Memory, ""),
            Writer::Redis(w) => (Tier::Redis, w.shard_name()),
        }
    }
}

/// Why a Put was not started; these are normal answers, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooLarge,
    Unavailable,
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    pub fn new(memory: MemoryStore, redis: RedisStore, chunk_bytes: u64) -> Self {
        Self {
            memory,
            redis,
            chunk_bytes,
        }
    }

    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// Opens `[offset, offset+limit)` of an object. `Ok(None)` is a miss.
    pub async fn get(&self, key: &Key, offset: u64, limit: u64) -> Result<Option<Hit>, StoreError> {
        if self.redis.is_empty() {
            let Some(object) = self.memory.get(key) else {
                return Ok(None);
            };
            let range = Range::new(offset, limit, object.info.size)?;
            return Ok(Some(Hit {
                info: object.info.clone(),
                tier: Tier::Memory,
                body: memory_chunks(object, range, self.chunk_bytes),
            }));
        }
        let Some(located) = self.redis.locate(key, true).await else {
            return Ok(None);
        };
        let info = located.header.info.clone();
        let range = Range::new(offset, limit, info.size)?;
        Ok(Some(Hit {
            info,
            tier: Tier::Redis,
            body: self.redis.stream(key, located, range),
        }))
    }

    pub async fn stat(&self, key: &Key) -> Option<Found> {
        if let Some(object) = self.memory.peek(key) {
            return Some(Found {
                info: object.info.clone(),
                tier: Tier::Memory,
                shard: None,
            });
        }
        if self.redis.is_empty() {
            return None;
        }
        let located = self.redis.locate(key, false).await?;
        Some(Found {
            info: located.header.info,
            tier: Tier::Redis,
            shard: Some(located.shard.name().to_owned()),
        })
    }

    /// Starts a Put of an object whose info was validated; `Err(Refusal)` is a normal "not
    /// stored" answer.
    pub async fn begin_put(
        &self,
        key: &Key,
        info: &MediaInfo,
    ) -> Result<Result<Writer, Refusal>, StoreError> {
        if self.redis.is_empty() {
            if info.size > self.memory.max_object_bytes() {
                return Ok(Err(Refusal::TooLarge));
            }
            return Ok(Ok(Writer::Memory {
                key: key.clone(),
                buf: MemoryWriter::new(info.size),
            }));
        }
        Ok(match self.redis.begin_put(key, info).await? {
            Some(w) => Ok(Writer::Redis(w)),
            None => Err(Refusal::Unavailable),
        })
    }

    /// Publishes a complete, verified body. False when the write was lost on the way.
    pub async fn commit(&self, writer: Writer, info: MediaInfo) -> Result<bool, StoreError> {
        match writer {
            Writer::Memory { key, buf } => Ok(self.memory.insert(
                key,
                Object {
                    info,
                    body: buf.body(),
                },
            )),
            Writer::Redis(w) => w.commit(&info).await,
        }
    }

    /// Removes from both tiers; returns the count removed and the shards that were unreachable.
    pub async fn purge(&self, key: &Key, all_variants: bool) -> (u64, Vec<String>) {
        let from_memory = if all_variants {
            self.memory.remove_variants(key)
        } else {
            u64::from(self.memory.remove(key))
        };
        let (from_redis, failed) = self.redis.purge(key, all_variants).await;
        (from_memory + from_redis, failed)
    }
}

fn memory_chunks(object: Arc<Object>, range: Range, chunk: u64) -> ChunkStream {
    stream::iter(
        body_ranges(range, chunk).map(move |(s, e)| Ok(object.body.slice(s as usize..e as usize))),
    )
    .boxed()
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
}
