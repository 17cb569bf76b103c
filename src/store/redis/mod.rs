//! The Redis tier over the shard ring: one string per object (see [`crate::object`]), read in
//! `GETRANGE` windows and written through a temporary key that is published atomically.
//!
//! - `scripts`: the atomic steps (publish, purge, lease release, quarantine merge) and the
//!   events they announce.
//! - `writer`: a Put on its way to one shard.
//! - `sync`: this replica's quarantines merged with every shard's, and an origin's objects
//!   deleted from a shard.

mod scripts;
mod sync;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures_util::{stream, StreamExt};
use tracing::{debug, error, warn, Instrument};

use crate::config::Failover;
use crate::key::{origin_quarantine_field, temp_key, Key};
use crate::object::{self, Header, MAX_HEADER_LEN, PREFIX_LEN};
use crate::proto::{MediaInfo, PutOutcome};
use crate::ring::Ring;
use crate::shard::{FirstRead, Shard, ShardError};
use crate::store::types::{
    body_ranges, chunk_slices, lease_shard, lease_token, ChunkStream, LeaseAttempt, PutError,
    Range, StoreError,
};
pub use writer::RedisWriter;
use writer::TempGuard;

/// Windows fetched ahead of the one being sent, so the next `GETRANGE` overlaps the send.
const READ_AHEAD: usize = 4;
/// Bytes of a `GETRANGE` window, at least: each window goes out as `chunk_bytes` slices. Chunks
/// far smaller than this cost one round trip each; a whole 1 MiB image is one.
const READ_WINDOW_BYTES: u64 = 256 * 1024;

/// A window read started ahead of its turn, stopped if the Get ends before it is needed.
struct ReadAhead(tokio::task::JoinHandle<Result<(Bytes, Bytes), ShardError>>);

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct RedisStore {
    /// Swapped by the reloader; each operation loads it once and keeps that ring to its end.
    ring: Arc<ArcSwap<Ring>>,
    /// The size of the chunks a read yields and a write gathers.
    chunk_bytes: u64,
    /// Body bytes per `GETRANGE`: a whole number of chunks.
    window_bytes: u64,
    /// How long an unfinished Put's temporary key lives without a write.
    temp_key_ttl: Duration,
    /// Where this replica's quarantines stand on each shard.
    sync: sync::Synced,
}

/// A found object: its shard, header, and the first window already read.
pub struct Located {
    pub shard: Arc<Shard>,
    pub header: Header,
    first: Bytes,
    /// The object's Redis key, named once per Get and shared by its reads.
    redis_key: Arc<str>,
}

impl RedisStore {
    pub fn new(ring: Arc<ArcSwap<Ring>>, chunk_bytes: u64, temp_key_ttl: Duration) -> Self {
        Self {
            ring,
            chunk_bytes,
            window_bytes: READ_WINDOW_BYTES.div_ceil(chunk_bytes).max(1) * chunk_bytes,
            temp_key_ttl,
            sync: sync::Synced::default(),
        }
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.load().is_empty()
    }

    /// The shard a key is read from and written to now: its owner, or with `failover: next`
    /// the first live shard in its rendezvous order.
    fn pick(ring: &Ring, key: &Key) -> Option<Arc<Shard>> {
        let route = key.route_key();
        match ring.failover {
            Failover::None => ring.owner(&route).filter(|s| s.is_up()).cloned(),
            Failover::Next => ring.ranked(&route).find(|s| s.is_up()).cloned(),
        }
    }

    /// Reads the header of `key`, and with `with_body` the first body window too, in one round
    /// trip. `None` is a miss: absent, shard down, or a value that is not a whole object of ours
    /// (which is deleted).
    pub async fn locate(&self, key: &Key, with_body: bool) -> Option<Located> {
        let ring = self.ring.load_full();
        let shard = Self::pick(&ring, key)?;
        let redis_key: Arc<str> = key.redis_key().into();
        let first_len = MAX_HEADER_LEN
            + if with_body {
                self.window_bytes as usize
            } else {
                0
            };
        let FirstRead {
            first,
            total,
            indexed,
        } = match shard
            .read_first_shared(&redis_key, key.variants_key(), first_len)
            .await
        {
            Ok(found) => found,
            Err(e) if e.is_wrong_type() => {
                // Something that is not a string sits under our name. Only that: any other
                // error (the shard busy or loading, a connection that just dropped) says
                // nothing against the value.
                Self::discard(&shard, key, &redis_key, &e).await;
                return None;
            }
            Err(e) => {
                debug!(key = %key, error = %e, "read failed, answering a miss");
                return None;
            }
        };
        // Absent; or, with a length, published between the read and the length: a miss.
        if first.is_empty() {
            return None;
        }
        if !indexed {
            // Out of reach of a purge of every variant (its index was evicted, or it was stored
            // by a release before the index): never served. It is left for the shard to evict
            // or for the next Put of the key to replace; deleting it here could race a publish.
            debug!(key = %key, "not in its media's variant index; a miss");
            return None;
        }
        let read = first.len() as u64;
        let header = match object::decode_header(&first) {
            Ok(h) => h,
            Err(e) => {
                // Deleted only if the value is still the one read: read whole, or with the same
                // first bytes now. Anything else may be an object published in between.
                let same = read == total
                    || (read >= PREFIX_LEN as u64
                        && Self::length_if_same(&shard, &redis_key, &first)
                            .await
                            .is_some());
                if same {
                    Self::discard(&shard, key, &redis_key, &e).await;
                }
                return None;
            }
        };
        if header.value_len() != total {
            // Read whole, the value is what was read: a length that is not the header's means
            // it is not a whole object. Read in part, the length may be another value's, put in
            // between: the value is looked at again before anything is deleted.
            let actual = if read < first_len as u64 {
                read
            } else {
                // Replaced (or gone) in between: a miss, nothing deleted.
                Self::length_if_same(&shard, &redis_key, &first).await?
            };
            if actual != header.value_len() {
                let e = object::LayoutError::WrongLength {
                    expected: header.value_len(),
                    actual,
                };
                Self::discard(&shard, key, &redis_key, &e).await;
                return None;
            }
        }
        Some(Located {
            shard,
            header,
            first,
            redis_key,
        })
    }

    /// The value's length now, if it still begins as `first` did (the same publish: its first
    /// bytes hold the publish's nonce); `None` for another value, none, or no answer.
    async fn length_if_same(shard: &Shard, redis_key: &str, first: &[u8]) -> Option<u64> {
        match shard.length_and_prefix(redis_key, PREFIX_LEN).await {
            Ok((now, prefix)) => (prefix[..] == first[..PREFIX_LEN]).then_some(now),
            Err(e) => {
                debug!(key = %redis_key, error = %e, "read failed, answering a miss");
                None
            }
        }
    }

    /// Deletes a value under our key that is not a whole object of ours.
    async fn discard(
        shard: &Shard,
        key: &Key,
        redis_key: &str,
        why: &(dyn std::fmt::Display + Sync),
    ) {
        warn!(key = %key, shard = %shard.name(), error = %why, "deleting a value that is not a whole object");
        if let Err(e) = shard.del(vec![redis_key.to_owned()]).await {
            warn!(key = %key, error = %e, "could not delete a bad value");
        }
    }

    /// Streams `range` of a located object: slices of the first window where it covers them,
    /// else windows read with a check that the value was not replaced in between.
    pub fn stream(&self, located: Located, range: Range) -> ChunkStream {
        let Located {
            shard,
            header,
            first,
            redis_key,
        } = located;
        // Shared by every window's read instead of a copy of the name per window.
        let header_len = header.len as u64;
        let prefix = header.prefix;
        let chunk_bytes = self.chunk_bytes;
        let windows = body_ranges(range, self.window_bytes).map(move |(start, end)| {
            let (vs, ve) = (header_len + start, header_len + end);
            let first = first.clone();
            // A window past the first read starts here, as the stream takes it in, not when it
            // is first polled: on a busy runtime the stream may poll only the window being sent
            // before the sender waits on a slow client, and a read never polled is never sent.
            // (So the stream is polled inside a tokio runtime, as every Get is.)
            let read = (ve > first.len() as u64).then(|| {
                let shard = shard.clone();
                let redis_key = redis_key.clone();
                let read = async move {
                    shard
                        .read_window_shared(&redis_key, vs, ve, PREFIX_LEN)
                        .await
                };
                ReadAhead(tokio::spawn(read.in_current_span()))
            });
            async move {
                let Some(mut read) = read else {
                    return Ok(first.slice(vs as usize..ve as usize));
                };
                let (window, now) = (&mut read.0)
                    .await
                    .map_err(|e| {
                        error!(error = %e, "a window read ended without a result");
                        StoreError::Internal("a window read ended without a result".into())
                    })?
                    .map_err(StoreError::Shard)?;
                if now[..] != prefix[..] || window.len() as u64 != end - start {
                    return Err(StoreError::Changed);
                }
                Ok(window)
            }
        });
        stream::iter(windows)
            .buffered(READ_AHEAD)
            .flat_map(move |window| {
                let slices: Vec<Result<Bytes, StoreError>> = match window {
                    Ok(w) => {
                        let whole = Range {
                            start: 0,
                            end: w.len() as u64,
                        };
                        chunk_slices(&w, whole, chunk_bytes).map(Ok).collect()
                    }
                    Err(e) => vec![Err(e)],
                };
                stream::iter(slices)
            })
            .boxed()
    }

    /// Starts a Put, refused as unavailable when no shard can take it now. Quarantine is
    /// checked by the caller against the replica's own set, and atomically by the publish.
    pub async fn begin_put(&self, key: &Key, info: &MediaInfo) -> Result<RedisWriter, PutError> {
        let ring = self.ring.load_full();
        let Some(shard) = Self::pick(&ring, key) else {
            return Err(PutError::Refused(PutOutcome::Unavailable));
        };
        let nonce = object::new_nonce();
        // The digest is patched in at publish time when the client did not send one, so the
        // header has its final length from the start.
        let mut draft = info.clone();
        if draft.sha256.is_empty() {
            draft.sha256 = Bytes::from_static(&[0; 32]);
        }
        let header = object::encode_header(&draft, nonce).map_err(StoreError::from)?;
        let conn = shard.pin().map_err(|e| {
            debug!(key = %key, error = %e, "put not started");
            PutError::from(e)
        })?;
        let total = header.len() + info.size as usize;
        let mut pending = BytesMut::with_capacity(total.min(writer::FIRST_WRITE_BYTES));
        pending.extend_from_slice(&header);
        Ok(RedisWriter {
            guard: TempGuard {
                conn: Some(conn),
                temp: temp_key(),
            },
            key: key.clone(),
            nonce,
            header_len: header.len() as u64,
            pending,
            size: info.size,
            created: false,
            upload: None,
            written: 0,
            ttl: self.temp_key_ttl,
            refreshed: std::time::Instant::now(),
        })
    }

    /// Deletes every object of `origin` on every shard, one shard and one SCAN page at a time so
    /// other traffic goes on, reporting the running count after each page; with `quarantine`, an
    /// origin tombstone goes on every shard first. Every replica is told to drop the origin from
    /// memory. Returns the count removed and the shards that could not be reached.
    pub async fn purge_origin(
        &self,
        origin: &str,
        quarantine: Option<i64>,
        mut progress: impl FnMut(&str, u64, usize, usize) + Send,
    ) -> (u64, Vec<String>) {
        let ring = self.ring.load_full();
        let total = ring.shards().len();
        let mut removed = 0;
        let mut failed = Vec::new();
        let quarantined = quarantine.map(|until| (origin_quarantine_field(origin), until));
        for (done, shard) in ring.shards().iter().enumerate() {
            let before = removed;
            let r = async {
                if let Some((field, until)) = &quarantined {
                    // Written with its tombstone, like a quarantine a replica writes back.
                    scripts::sync_quarantine(shard, "", [(field.as_str(), *until)]).await?;
                }
                let n = sync::delete_origin(shard, origin, |n| {
                    progress(shard.name(), before + n, done, total)
                })
                .await?;
                if let Some((field, until)) = &quarantined {
                    scripts::announce_quarantine(shard, field.clone(), *until).await?;
                }
                scripts::announce_origin_purge(shard, origin).await?;
                Ok::<u64, ShardError>(n)
            }
            .await;
            match r {
                Ok(n) => removed += n,
                Err(e) => {
                    warn!(shard = %shard.name(), origin, error = %e, "origin purge could not reach shard");
                    failed.push(shard.name().to_owned());
                }
            }
        }
        (removed, failed)
    }

    /// Merges this replica's quarantines with every shard's (see `sync`).
    pub async fn sync_quarantine(&self, quarantine: &crate::store::quarantine::Quarantine) {
        self.sync.run(&self.ring(), quarantine).await
    }

    /// Takes the fill lease of `key` on the shard it would be written to.
    pub async fn acquire_lease(&self, key: &Key, ttl: Duration) -> LeaseAttempt {
        let ring = self.ring.load_full();
        let Some(shard) = Self::pick(&ring, key) else {
            return LeaseAttempt::Unavailable;
        };
        let token = lease_token(Some(shard.name()));
        match shard.set_new(&key.lease_key(), &token, ttl).await {
            Ok(true) => LeaseAttempt::Acquired(token),
            Ok(false) => LeaseAttempt::Held,
            Err(_) => LeaseAttempt::Unavailable,
        }
    }

    /// Time left on the key's lease, if any.
    pub async fn lease_left(&self, key: &Key) -> Option<Duration> {
        let ring = self.ring.load_full();
        let shard = Self::pick(&ring, key)?;
        let ms = shard.ttl_left(&key.lease_key()).await.ok()??;
        Some(Duration::from_millis(ms))
    }

    /// Gives a lease up if `token` still holds it, waking waiters on every replica. The release
    /// goes to the shard the token names, even if the key has another owner since a reload; a
    /// token that names none (from a release before tokens did) goes to the key's shard now.
    pub async fn release_lease(&self, key: &Key, token: &str) {
        let ring = self.ring.load_full();
        let shard = match lease_shard(token) {
            Some(name) => ring.find(name).map(|(shard, _)| shard.clone()),
            None => Self::pick(&ring, key),
        };
        let Some(shard) = shard else {
            // The shard left the ring: its lease is read by nobody, and expires.
            debug!(key = %key, "lease's shard not in the ring; left to expire");
            return;
        };
        if let Err(e) = scripts::release_lease(&shard, key, token).await {
            debug!(key = %key, error = %e, "lease left to expire");
        }
    }

    /// Deletes the key (or every variant, found in the media's variant index) on every shard of
    /// the ring, since a ring change leaves copies on former owners, and tells every replica to
    /// drop it from memory. With `quarantine` (its end, unix ms), the media is quarantined on
    /// every shard in the same step, so a Put publishing meanwhile is refused. Shards that could
    /// not be reached are returned by name.
    pub async fn purge(
        &self,
        key: &Key,
        all_variants: bool,
        quarantine: Option<i64>,
    ) -> (u64, Vec<String>) {
        let ring = self.ring.load_full();
        let results =
            futures_util::future::join_all(ring.shards().iter().map(|shard| async move {
                let r = scripts::purge(shard, key, all_variants, quarantine).await;
                (shard.name().to_owned(), r)
            }))
            .await;
        let mut removed = 0;
        let mut failed = Vec::new();
        for (name, r) in results {
            match r {
                Ok(n) => removed += n,
                Err(e) => {
                    warn!(shard = %name, key = %key, error = %e, "purge could not reach shard");
                    failed.push(name);
                }
            }
        }
        (removed, failed)
    }
}
