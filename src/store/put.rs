//! A Put through the store: to the ring (and to memory too for a key already popular enough),
//! or with an empty ring to the memory tier alone. Every step ends in success or a [`PutError`].

use bytes::Bytes;

use super::fill::Copy;
use super::memory::Admission;
use super::redis::RedisWriter;
use super::types::{PutError, Tier};
use super::Store;
use crate::key::Key;
use crate::proto::{MediaInfo, PutOutcome};

/// Where a Put's bytes go until it is committed.
pub struct Writer(WriterTo);

enum WriterTo {
    /// Memory-only mode: the memory tier is the store.
    Memory { key: Key, copy: Copy },
    /// To the ring, and to memory as well when the key is already popular enough and the tier
    /// has room for the copy.
    Redis {
        key: Key,
        redis: Box<RedisWriter>,
        memory: Option<Copy>,
    },
}

impl Writer {
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), PutError> {
        match &mut self.0 {
            WriterTo::Memory { copy, .. } => {
                copy.write(&chunk);
                Ok(())
            }
            WriterTo::Redis { redis, memory, .. } => {
                if let Some(copy) = memory {
                    copy.write(&chunk);
                }
                redis.write(chunk).await
            }
        }
    }

    /// Which tier and shard the object is going to.
    pub fn target(&self) -> (Tier, &str) {
        match &self.0 {
            WriterTo::Memory { .. } => (Tier::Memory, ""),
            WriterTo::Redis { redis, .. } => (Tier::Redis, redis.shard_name()),
        }
    }
}

fn refused(outcome: PutOutcome) -> PutError {
    PutError::Refused(outcome)
}

/// How a memory-only Put the memory tier did not take is answered.
fn not_stored(why: Admission) -> PutOutcome {
    match why {
        Admission::TooLarge => PutOutcome::TooLarge,
        _ => PutOutcome::NotAdmitted,
    }
}

impl Store {
    /// Starts a Put of an object whose info was validated.
    pub async fn begin_put(&self, key: &Key, info: &MediaInfo) -> Result<Writer, PutError> {
        let since = self.memory.epoch();
        if self.quarantined(key) {
            return Err(refused(PutOutcome::Quarantined));
        }
        if self.redis.is_empty() {
            if info.size > self.memory.max_object_bytes() {
                return Err(refused(PutOutcome::TooLarge));
            }
            return match Copy::start(&self.memory, key, info.size, true, since) {
                Ok(copy) => Ok(Writer(WriterTo::Memory {
                    key: key.clone(),
                    copy,
                })),
                Err(why) => Err(refused(not_stored(why))),
            };
        }
        let redis = self.redis.begin_put(key, info).await?;
        let memory = Copy::start(&self.memory, key, info.size, false, since).ok();
        Ok(Writer(WriterTo::Redis {
            key: key.clone(),
            redis: Box::new(redis),
            memory,
        }))
    }

    /// Publishes a complete, verified body.
    pub async fn commit(&self, writer: Writer, info: MediaInfo) -> Result<(), PutError> {
        match writer.0 {
            WriterTo::Memory { key, copy } => {
                if self.quarantined(&key) {
                    return Err(refused(PutOutcome::Quarantined));
                }
                let redis_key = key.redis_key();
                match copy.offer(key, info, 0) {
                    Admission::Stored => {
                        self.events.wake(&redis_key);
                        Ok(())
                    }
                    why => Err(refused(not_stored(why))),
                }
            }
            WriterTo::Redis { key, redis, memory } => {
                // The shard checks its own record atomically; this one holds even if the shard
                // lost it.
                if self.quarantined(&key) {
                    return Err(refused(PutOutcome::Quarantined));
                }
                let version = redis.version();
                redis.commit(&info).await?;
                if let Some(copy) = memory {
                    copy.offer(key, info, version);
                }
                Ok(())
            }
        }
    }
}
