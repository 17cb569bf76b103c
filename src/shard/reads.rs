//! Reads of stored values in `GETRANGE` windows, each checked against the value's first bytes
//! so that a value replaced mid-read is noticed, and shared by every request that asks for the
//! same bytes while a read is in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use fred::prelude::*;
use futures_util::future::{try_join, try_join3};
use futures_util::FutureExt;

use super::{FirstRead, InFlight, Shard, ShardError, SharedRead, IN_FLIGHT_SWEEP};

impl Shard {
    /// Reads answered by joining an identical read already in flight, since this client was made.
    pub fn coalesced_reads(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Joins the read of `key` in `map` if one is in flight, else starts it with `read`. The
    /// read runs to its end even if the request that started it goes away, as long as another
    /// waits for it; its entry is removed when it is done, so later requests read afresh.
    fn coalesce<K, T, F>(
        self: &Arc<Self>,
        map: fn(&Shard) -> &InFlight<K, T>,
        key: K,
        read: F,
    ) -> SharedRead<T>
    where
        K: std::hash::Hash + Eq + Clone + Send + 'static,
        T: Clone + Send + Sync + 'static,
        F: std::future::Future<Output = Result<T, ShardError>> + Send + 'static,
    {
        let mut reads = map(self).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(read) = reads.get(&key).and_then(|weak| weak.upgrade()) {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
            return read;
        }
        if reads.len() >= IN_FLIGHT_SWEEP {
            reads.retain(|_, weak| weak.upgrade().is_some());
        }
        let shard = Arc::downgrade(self);
        let entry = key.clone();
        let shared = async move {
            let result = read.await;
            if let Some(shard) = shard.upgrade() {
                map(&shard)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&entry);
            }
            result
        }
        .boxed()
        .shared();
        if let Some(weak) = shared.downgrade() {
            reads.insert(key, weak);
        }
        shared
    }

    /// [`Shard::read_first`], shared with identical reads in flight.
    pub async fn read_first_shared(
        self: &Arc<Self>,
        key: &Arc<str>,
        index: String,
        len: usize,
    ) -> Result<FirstRead, ShardError> {
        let shard = self.clone();
        let owned = key.clone();
        self.coalesce(|s| &s.first_reads, (key.clone(), len), async move {
            shard.read_first(&owned, index, len).await
        })
        .await
    }

    /// [`Shard::read_window`], shared with identical reads in flight.
    pub async fn read_window_shared(
        self: &Arc<Self>,
        key: &Arc<str>,
        start: u64,
        end: u64,
        prefix_len: usize,
    ) -> Result<(Bytes, Bytes), ShardError> {
        let shard = self.clone();
        let owned = key.clone();
        self.coalesce(
            |s| &s.window_reads,
            (key.clone(), start, end, prefix_len),
            async move { shard.read_window(&owned, start, end, prefix_len).await },
        )
        .await
    }

    /// The first `len` bytes of a value, its length, and whether the key is in its media's
    /// variant index `index`: three commands in one write and one round trip.
    ///
    /// The index is asked with it: an object that is not in it would escape a purge of every
    /// variant, so it is never served; and reading the index with every object of the media
    /// keeps it at least as hot as they are for `allkeys-lfu`. The length comes from a command
    /// of its own: if it does not match what was read, [`Shard::length_and_prefix`] tells a
    /// value replaced in between from one that is not what it says.
    pub async fn read_first(
        &self,
        key: &str,
        index: String,
        len: usize,
    ) -> Result<FirstRead, ShardError> {
        let started = std::time::Instant::now();
        let c = self.connection()?;
        let (first, total, member) = self
            .bounded(try_join3(
                c.getrange::<Bytes, _>(key, 0, len.max(1) - 1).boxed(),
                c.strlen::<u64, _>(key).boxed(),
                c.sismember::<i64, _, _>(index, key).boxed(),
            ))
            .await?;
        self.observe(started);
        Ok(FirstRead {
            first,
            total,
            indexed: member == 1,
        })
    }

    /// A value's length and then its first `prefix_len` bytes, in that order on one connection.
    pub async fn length_and_prefix(
        &self,
        key: &str,
        prefix_len: usize,
    ) -> Result<(u64, Bytes), ShardError> {
        let c = self.connection()?;
        self.bounded(try_join(
            c.strlen(key).boxed(),
            c.getrange(key, 0, prefix_len - 1).boxed(),
        ))
        .await
    }

    /// Bytes `[start, end)` of a value and then its first `prefix_len` bytes, read in that
    /// order on one connection: if the prefix still matches, the window came from the same value.
    pub async fn read_window(
        &self,
        key: &str,
        start: u64,
        end: u64,
        prefix_len: usize,
    ) -> Result<(Bytes, Bytes), ShardError> {
        let started = std::time::Instant::now();
        let c = self.connection()?;
        let read = self
            .bounded(try_join(
                c.getrange(key, start as usize, end as usize - 1).boxed(),
                c.getrange(key, 0, prefix_len - 1).boxed(),
            ))
            .await;
        self.observe(started);
        read
    }
}
