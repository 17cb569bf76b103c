//! Reads of stored values in `GETRANGE` windows, each checked against the value's first bytes
//! so that a value replaced mid-read is noticed, and shared by every request that asks for the
//! same bytes while a read is in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use fred::prelude::*;

use super::{FirstRead, InFlight, Shard, ShardError, SharedRead, IN_FLIGHT_SWEEP};

/// The length of the value KEYS[1] and whether it is a member of the set KEYS[2].
const LENGTH_AND_MEMBER_SCRIPT: &str = r#"
return {redis.call('STRLEN', KEYS[1]), redis.call('SISMEMBER', KEYS[2], KEYS[1])}
"#;

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
        use futures_util::FutureExt;
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
    /// variant index `index`, in one round trip of two commands.
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
        let len = len.max(1);
        let p = self.pipeline()?;
        // The length and the index membership come from one small script: the client writes
        // each command of a pipeline on its own, and two writes cost less than three.
        let both = vec![key.to_owned(), index];
        let queued: Result<(), Error> = async {
            p.getrange::<(), _>(key, 0, len - 1).await?;
            super::queue_eval(&p, LENGTH_AND_MEMBER_SCRIPT, both, Vec::new()).await
        }
        .await;
        queued.map_err(|e| self.fail(e))?;
        let (first, (total, member)): (Bytes, (u64, i64)) = self.finish(p).await?;
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
        let p = self.pipeline()?;
        let queued: Result<(), Error> = async {
            p.strlen::<(), _>(key).await?;
            p.getrange::<(), _>(key, 0, prefix_len - 1).await
        }
        .await;
        queued.map_err(|e| self.fail(e))?;
        self.finish(p).await
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
        let p = self.pipeline()?;
        let queued: Result<(), Error> = async {
            p.getrange::<(), _>(key, start as usize, end as usize - 1)
                .await?;
            p.getrange::<(), _>(key, 0, prefix_len - 1).await
        }
        .await;
        queued.map_err(|e| self.fail(e))?;
        let read = self.finish(p).await;
        self.observe(started);
        read
    }
}
