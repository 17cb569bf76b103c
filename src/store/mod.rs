//! Where objects live: the memory tier of this replica and the Redis tier over the ring.
//!
//! Reads look in memory first, then in the ring; every read counts a download, and a whole-object
//! read from Redis of a key the memory policy admits fills the memory tier as it streams. Writes
//! go to the ring, and to memory only for keys already popular enough. With an empty ring the
//! memory tier is the store and takes every Put its policy can make room for.

pub mod memory;
pub mod quarantine;
pub mod redis;

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{stream, Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::clock;
use crate::events::{Event, Events};
use crate::key::Key;
use crate::object::LayoutError;
use crate::proto::MediaInfo;
use crate::shard::{Published, QuarantineSync, ShardError};
use memory::{Admission, MemoryStore, Object, Reservation};
use quarantine::Quarantine;
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
    #[error("the write was lost on the way (its temporary key expired or its shard restarted)")]
    Lost,
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
    memory: Arc<MemoryStore>,
    redis: RedisStore,
    chunk_bytes: u64,
    /// Keys whose memory fill (a tee of a Redis read) is under way: one at a time per key.
    filling: Arc<Mutex<HashSet<Key>>>,
    events: Arc<Events>,
    lease_ttl: Duration,
    quarantine_ttl: Duration,
    /// Memory-only mode: fill leases (Redis key → token and expiry).
    local_leases: Mutex<HashMap<String, (String, Instant)>>,
    /// The quarantines this replica knows, in both modes (see [`quarantine`]); shared with the
    /// events, which record those announced by other replicas.
    quarantine: Arc<Quarantine>,
    /// Gets waiting for another caller's fill right now.
    waiting: Arc<std::sync::atomic::AtomicU64>,
    /// Per shard: the token of its quarantine hash when last merged, and the generation of this
    /// replica's quarantines last pushed to it.
    synced: Mutex<HashMap<String, (String, u64)>>,
    /// Quarantined origins (shard, origin) whose objects are still to be deleted from a shard
    /// that had lost the quarantine.
    origin_walks: Mutex<HashSet<(String, String)>>,
}

/// The answer to a request for a fill lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAttempt {
    Acquired,
    /// Another caller holds it.
    Held,
    /// The key's shard cannot be reached.
    Unavailable,
}

/// What a Get found, after waiting for a fill if it was asked to.
pub enum Lookup {
    Hit(Hit),
    /// A miss; `lease_token` is non-empty when this caller holds the fill lease.
    Miss {
        lease_token: String,
    },
}

/// How often a waiter looks again even without an event, in case one was missed.
const RECHECK: Duration = Duration::from_millis(250);

fn new_token() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// A copy of an object being gathered for the memory tier: its room is reserved from the
/// tier's budget before any byte is buffered, and it remembers the invalidation epoch it started
/// at, so that a purge (or another publish of the key) that comes in between refuses it.
struct Copy {
    reservation: Reservation,
    buf: BytesMut,
    since: u64,
}

impl Copy {
    /// `since` must be taken before the source of the copy is read.
    fn start(
        memory: &Arc<MemoryStore>,
        key: &Key,
        size: u64,
        is_put: bool,
        since: u64,
    ) -> Result<Self, Admission> {
        let reservation = memory.reserve(key, size, is_put)?;
        Ok(Copy {
            buf: reservation.buffer(),
            reservation,
            since,
        })
    }

    fn write(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Whether the copy holds exactly the object `info` describes: a read from Redis is checked
    /// before it is offered (a Put's body was already checked as it arrived).
    fn is_whole(&self, info: &MediaInfo) -> bool {
        self.buf.len() as u64 == info.size
            && (info.sha256.is_empty() || Sha256::digest(&self.buf)[..] == info.sha256[..])
    }

    /// Offers the complete copy.
    fn offer(self, key: Key, info: MediaInfo, version: u64) -> Admission {
        let object = Object {
            info,
            body: self.buf.freeze(),
            version,
        };
        self.reservation.offer(key, object, self.since)
    }
}

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
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
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

/// Why a Put was not started; these are normal answers, not errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooLarge,
    Unavailable,
    Quarantined,
    /// Memory-only mode: the policy has no room for it now.
    NotAdmitted,
}

/// How a complete Put ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Stored,
    /// Memory-only mode: the policy found no room (or the key was evicted moments ago).
    NotAdmitted,
    TooLarge,
    /// The write was lost on the way (its temporary key expired, its shard restarted).
    Lost,
    /// The media was quarantined while the Put was streaming.
    Quarantined,
}

/// Store settings that are not the tiers themselves.
pub struct Settings {
    pub chunk_bytes: u64,
    pub lease_ttl: Duration,
    pub quarantine_ttl: Duration,
    /// The replica's quarantines, shared with its [`Events`].
    pub quarantine: Arc<Quarantine>,
}

impl Store {
    pub fn new(
        memory: Arc<MemoryStore>,
        redis: RedisStore,
        events: Arc<Events>,
        settings: Settings,
    ) -> Self {
        Self {
            memory,
            redis,
            chunk_bytes: settings.chunk_bytes,
            filling: Arc::default(),
            events,
            lease_ttl: settings.lease_ttl,
            quarantine_ttl: settings.quarantine_ttl,
            local_leases: Mutex::default(),
            quarantine: settings.quarantine,
            waiting: Arc::default(),
            synced: Mutex::default(),
            origin_walks: Mutex::default(),
        }
    }

    /// A Get that, on a miss, may take the fill lease (`want_lease`) and may wait up to `wait`
    /// for another caller's fill, woken by fill and release events from any replica rather than
    /// by polling Redis. The flag says whether it waited at all.
    pub async fn lookup(
        &self,
        key: &Key,
        offset: u64,
        limit: u64,
        want_lease: bool,
        wait: Duration,
    ) -> Result<(Lookup, bool), StoreError> {
        let plain_miss = Lookup::Miss {
            lease_token: String::new(),
        };
        if !want_lease && wait.is_zero() {
            return Ok(match self.get(key, offset, limit).await? {
                Some(hit) => (Lookup::Hit(hit), false),
                None => (plain_miss, false),
            });
        }
        // A quarantined media is never filled: no lease, no wait for one.
        if self.quarantined(key) {
            return Ok((plain_miss, false));
        }
        // Registered before each look, so a fill between the look and the wait is not missed.
        let notify = self.events.watch(&key.redis_key());
        let mut notified = std::pin::pin!(notify.notified());
        notified.as_mut().enable();
        if let Some(hit) = self.get(key, offset, limit).await? {
            return Ok((Lookup::Hit(hit), false));
        }
        let mut waited = false;
        let mut _waiting = None;
        let deadline = Instant::now() + wait;
        loop {
            if want_lease {
                let token = new_token();
                match self.acquire_lease(key, &token).await {
                    LeaseAttempt::Acquired => {
                        return Ok((Lookup::Miss { lease_token: token }, waited))
                    }
                    LeaseAttempt::Held => {}
                    // The key's shard is down: nobody can fill it through the cache now, so
                    // waiting would only delay the caller's own fetch.
                    LeaseAttempt::Unavailable => return Ok((plain_miss, waited)),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok((plain_miss, waited));
            }
            // Look again when the holder's lease runs out, if nobody filled the key by then.
            let mut nap = (deadline - now).min(RECHECK);
            if let Some(left) = self.lease_left(key).await {
                nap = nap.min(left + Duration::from_millis(5));
            }
            waited = true;
            _waiting.get_or_insert_with(|| Waiting::new(&self.waiting));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {}
            }
            notified.set(notify.notified());
            notified.as_mut().enable();
            if let Some(hit) = self.find(key, offset, limit).await? {
                return Ok((Lookup::Hit(hit), waited));
            }
        }
    }

    async fn acquire_lease(&self, key: &Key, token: &str) -> LeaseAttempt {
        if !self.redis.is_empty() {
            return self.redis.acquire_lease(key, token, self.lease_ttl).await;
        }
        let mut leases = self.local_leases.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        leases.retain(|_, (_, until)| *until > now);
        match leases.entry(key.redis_key()) {
            std::collections::hash_map::Entry::Occupied(_) => LeaseAttempt::Held,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((token.to_owned(), now + self.lease_ttl));
                LeaseAttempt::Acquired
            }
        }
    }

    async fn lease_left(&self, key: &Key) -> Option<Duration> {
        if !self.redis.is_empty() {
            return self.redis.lease_left(key).await;
        }
        let leases = self.local_leases.lock().unwrap_or_else(|p| p.into_inner());
        let (_, until) = leases.get(&key.redis_key())?;
        Some(until.saturating_duration_since(Instant::now()))
    }

    /// Gives up a lease if `token` still holds it (a foreign or expired token changes nothing),
    /// and wakes the waiters.
    pub async fn release_lease(&self, key: &Key, token: &str) {
        if !self.redis.is_empty() {
            return self.redis.release_lease(key, token).await;
        }
        let released = {
            let mut leases = self.local_leases.lock().unwrap_or_else(|p| p.into_inner());
            let redis_key = key.redis_key();
            let mine = leases.get(&redis_key).is_some_and(|(t, _)| t == token);
            if mine {
                leases.remove(&redis_key);
            }
            mine
        };
        if released {
            self.events.handle(Event::Released(key.redis_key()));
        }
    }

    fn quarantined(&self, key: &Key) -> bool {
        self.quarantine.covers(key, clock::unix_ms())
    }

    /// Records a quarantine here and returns when it ends (unix ms), for the shards.
    fn quarantine(&self, field: &str) -> i64 {
        let until = clock::unix_ms().saturating_add(self.quarantine_ttl.as_millis() as i64);
        self.quarantine.add(field, until);
        until
    }

    /// Gets waiting for another caller's fill right now.
    pub fn lease_waiters(&self) -> u64 {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The quarantine registry (its metrics).
    pub fn quarantines(&self) -> &Quarantine {
        &self.quarantine
    }

    /// Merges this replica's quarantines with every shard's, every `interval`, so that a shard
    /// that lost them (eviction, restart, or joining the ring) gets them back and this replica
    /// learns those made elsewhere.
    pub async fn keep_quarantines(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sync_quarantine().await;
        }
    }

    /// One merge of [`Store::keep_quarantines`]. Per shard it costs one small round trip while
    /// nothing changed: the replica pushes only the quarantines it set or learned since it last
    /// pushed to that shard, and pulls the shard's only when the shard's hash changed. A shard
    /// whose hash is another one (evicted, restarted, new to this replica) gets everything.
    pub async fn sync_quarantine(&self) {
        if self.redis.is_empty() {
            return;
        }
        let ring = self.redis.ring();
        let generation = self.quarantine.generation();
        let live = self.quarantine.live(clock::unix_ms());
        let all = || {
            live.iter()
                .map(|(field, until, _)| (field.as_str(), *until))
        };
        let synced = |name: &str| {
            let synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            synced.get(name).cloned().unwrap_or_default()
        };
        let results = futures_util::future::join_all(ring.shards().iter().map(|shard| {
            let (known, pushed) = synced(shard.name());
            let live = &live;
            async move {
                let fresh = known.is_empty();
                let push = live
                    .iter()
                    .filter(|(_, _, set_at)| fresh || *set_at > pushed)
                    .map(|(field, until, _)| (field.as_str(), *until));
                let first = shard.sync_quarantine(&known, push).await;
                fn identity(token: &str) -> &str {
                    token.split(':').next().unwrap_or("")
                }
                let result = match first {
                    // Another hash than the one this replica knew: it may lack anything.
                    Ok(changed) if !fresh && identity(&changed.token) != identity(&known) => shard
                        .sync_quarantine(&changed.token, all())
                        .await
                        .map(|again| QuarantineSync {
                            held: again.held.or(changed.held),
                            lacked: [changed.lacked, again.lacked].concat(),
                            ..again
                        }),
                    other => other,
                };
                (shard.clone(), result)
            }
        }))
        .await;
        for (shard, result) in results {
            let sync = match result {
                Ok(sync) => sync,
                Err(e) => {
                    tracing::debug!(shard = %shard.name(), error = %e, "quarantine sync skipped");
                    continue;
                }
            };
            if !sync.lacked.is_empty() {
                tracing::warn!(
                    shard = %shard.name(),
                    restored = sync.lacked.len(),
                    "shard had lost quarantines; written back and their media deleted there"
                );
                self.quarantine
                    .count_restored(shard.name(), sync.lacked.len() as u64);
                let mut walks = self.origin_walks.lock().unwrap_or_else(|p| p.into_inner());
                for origin in sync.lacked.iter().filter_map(|f| f.strip_suffix("|*")) {
                    walks.insert((shard.name().to_owned(), origin.to_owned()));
                }
            }
            if let Some(held) = sync.held {
                self.quarantine.learn(held);
            }
            let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            synced.insert(shard.name().to_owned(), (sync.token, generation));
        }
        self.walk_quarantined_origins(&ring).await;
    }

    /// Deletes the objects of quarantined origins from the shards that had lost the quarantine
    /// (a Put may have been stored meanwhile); a walk that fails is tried again next time.
    async fn walk_quarantined_origins(&self, ring: &crate::ring::Ring) {
        let walks: Vec<(String, String)> = {
            let walks = self.origin_walks.lock().unwrap_or_else(|p| p.into_inner());
            walks.iter().cloned().collect()
        };
        for (name, origin) in walks {
            let Some(shard) = ring.shards().iter().find(|s| s.name() == name) else {
                // The shard left the ring: nothing of it is read any more.
                self.origin_walks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(name, origin));
                continue;
            };
            let patterns = [
                crate::key::origin_pattern(&origin),
                crate::key::origin_variants_pattern(&origin),
            ];
            let mut done = true;
            for pattern in patterns {
                if let Err(e) = shard.delete_matching(&pattern).await {
                    tracing::warn!(shard = %name, origin, error = %e, "quarantined origin not deleted yet; trying again at the next sync");
                    done = false;
                    break;
                }
            }
            if done {
                self.origin_walks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(name, origin));
            }
        }
    }

    /// Removes every media of `origin` from every shard and every replica's memory tier,
    /// calling `progress(shard, removed, shards_done, shards_total)` as it goes.
    pub async fn purge_origin(
        &self,
        origin: &str,
        quarantine: bool,
        progress: impl FnMut(&str, u64, usize, usize) + Send,
    ) -> (u64, Vec<String>) {
        let until =
            quarantine.then(|| self.quarantine(&crate::key::origin_quarantine_field(origin)));
        let from_memory = self.memory.remove_origin(origin);
        let (from_redis, failed) = self.redis.purge_origin(origin, until, progress).await;
        (from_memory + from_redis, failed)
    }

    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// Opens `[offset, offset+limit)` of an object: memory first, then the ring. Every Get
    /// counts as a download of the key. `Ok(None)` is a miss.
    pub async fn get(&self, key: &Key, offset: u64, limit: u64) -> Result<Option<Hit>, StoreError> {
        self.memory.record_download(key);
        self.find(key, offset, limit).await
    }

    /// A Get that does not count a download (a waiter looking again). A quarantined media is a
    /// miss wherever a copy of it may still sit (a shard that lost the quarantine for a moment
    /// and took a Put meanwhile, a replica's memory).
    async fn find(&self, key: &Key, offset: u64, limit: u64) -> Result<Option<Hit>, StoreError> {
        if self.quarantined(key) {
            return Ok(None);
        }
        // The epoch is taken with the look in memory, before the Redis read: a purge after
        // this point refuses the copy the read may fill.
        let since = match self.memory.get_or_epoch(key) {
            Ok(object) => {
                let range = Range::new(offset, limit, object.info.size)?;
                return Ok(Some(Hit {
                    info: object.info.clone(),
                    tier: Tier::Memory,
                    body: memory_chunks(object, range, self.chunk_bytes),
                }));
            }
            Err(epoch) => epoch,
        };
        if self.redis.is_empty() {
            return Ok(None);
        }
        let Some(located) = self.redis.locate(key, true).await else {
            return Ok(None);
        };
        let info = located.header.info.clone();
        let version = located.header.nonce();
        let range = Range::new(offset, limit, info.size)?;
        let mut body = self.redis.stream(key, located, range);
        let whole = range.start == 0 && range.end == info.size;
        if whole {
            if let Some(fill) = FillGuard::start(&self.filling, key) {
                if let Ok(copy) = Copy::start(&self.memory, key, info.size, false, since) {
                    body = tee(body, fill, copy, info.clone(), version);
                }
            }
        }
        Ok(Some(Hit {
            info,
            tier: Tier::Redis,
            body,
        }))
    }

    pub async fn stat(&self, key: &Key) -> Option<Found> {
        if self.quarantined(key) {
            return None;
        }
        if let Some(object) = self.memory.get(key) {
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
        let since = self.memory.epoch();
        if self.quarantined(key) {
            return Ok(Err(Refusal::Quarantined));
        }
        if self.redis.is_empty() {
            if info.size > self.memory.max_object_bytes() {
                return Ok(Err(Refusal::TooLarge));
            }
            return Ok(
                match Copy::start(&self.memory, key, info.size, true, since) {
                    Ok(copy) => Ok(Writer(WriterTo::Memory {
                        key: key.clone(),
                        copy,
                    })),
                    Err(Admission::TooLarge) => Err(Refusal::TooLarge),
                    Err(_) => Err(Refusal::NotAdmitted),
                },
            );
        }
        let redis = match self.redis.begin_put(key, info).await? {
            Ok(w) => w,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let memory = Copy::start(&self.memory, key, info.size, false, since).ok();
        Ok(Ok(Writer(WriterTo::Redis {
            key: key.clone(),
            redis: Box::new(redis),
            memory,
        })))
    }

    /// Publishes a complete, verified body.
    pub async fn commit(&self, writer: Writer, info: MediaInfo) -> Result<Committed, StoreError> {
        match writer.0 {
            WriterTo::Memory { key, copy } => {
                if self.quarantined(&key) {
                    return Ok(Committed::Quarantined);
                }
                let redis_key = key.redis_key();
                Ok(match copy.offer(key, info, 0) {
                    Admission::Stored => {
                        self.events.wake(&redis_key);
                        Committed::Stored
                    }
                    Admission::TooLarge => Committed::TooLarge,
                    _ => Committed::NotAdmitted,
                })
            }
            WriterTo::Redis { key, redis, memory } => {
                // The shard checks its own record atomically; this one holds even if the shard
                // lost it.
                if self.quarantined(&key) {
                    return Ok(Committed::Quarantined);
                }
                let version = redis.version();
                match redis.commit(&info).await? {
                    Published::Stored => {}
                    Published::Lost => return Ok(Committed::Lost),
                    Published::Quarantined => return Ok(Committed::Quarantined),
                }
                if let Some(copy) = memory {
                    copy.offer(key, info, version);
                }
                Ok(Committed::Stored)
            }
        }
    }

    /// Removes from both tiers, here and (through the shards) on every replica; with
    /// `quarantine`, later Puts of the media are refused for `quarantine_ttl`. Returns the count
    /// removed and the shards that were unreachable.
    pub async fn purge(
        &self,
        key: &Key,
        all_variants: bool,
        quarantine: bool,
    ) -> (u64, Vec<String>) {
        let until = quarantine
            .then(|| self.quarantine(&crate::key::quarantine_field(key.origin(), key.media_id())));
        // A quarantine refuses every variant of the media, so it removes every variant too.
        let all_variants = all_variants || quarantine;
        let from_memory = if all_variants {
            self.memory.remove_variants(key)
        } else {
            u64::from(self.memory.remove(key))
        };
        let (from_redis, failed) = self.redis.purge(key, all_variants, until).await;
        (from_memory + from_redis, failed)
    }
}

/// What the cluster's events do to this replica's store: drop memory-tier copies that a purge
/// or another publish made stale, and record quarantines announced by other replicas.
pub struct StoreListener {
    memory: Arc<MemoryStore>,
    quarantine: Arc<Quarantine>,
}

impl StoreListener {
    pub fn new(memory: Arc<MemoryStore>, quarantine: Arc<Quarantine>) -> Self {
        Self { memory, quarantine }
    }
}

impl crate::events::Listener for StoreListener {
    fn apply(&self, event: &Event) {
        match event {
            Event::Filled {
                key,
                version: Some(version),
            } => {
                if let Some(k) = Key::from_redis_key(key) {
                    self.memory.invalidate_except(&k, *version);
                }
            }
            Event::Filled { version: None, .. } | Event::Released(_) => {}
            Event::Purge { key, all_variants } => {
                if *all_variants {
                    self.memory.remove_variants(key);
                } else {
                    self.memory.remove(key);
                }
            }
            Event::PurgeOrigin(origin) => {
                self.memory.remove_origin(origin);
            }
            Event::Quarantine { field, until } => self.quarantine.add(field, *until),
        }
    }

    fn forget_all(&self) -> u64 {
        self.memory.clear()
    }
}

/// Counts one Get among the waiters while it waits, however its wait ends.
struct Waiting(Arc<std::sync::atomic::AtomicU64>);

impl Waiting {
    fn new(count: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Marks a key as being filled into memory; unmarks it when dropped.
struct FillGuard {
    filling: Arc<Mutex<HashSet<Key>>>,
    key: Key,
}

impl FillGuard {
    fn start(filling: &Arc<Mutex<HashSet<Key>>>, key: &Key) -> Option<Self> {
        let mut set = filling.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.clone()).then(|| FillGuard {
            filling: filling.clone(),
            key: key.clone(),
        })
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut set = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.key);
    }
}

/// Passes a whole-object read through to the client while gathering a copy into room reserved
/// for it; once the read completes and the digest matches, the copy is offered to the memory
/// tier, which refuses it if a purge or another publish of the key came meanwhile. A read that
/// fails or is dropped fills nothing and gives its room back.
fn tee(
    body: ChunkStream,
    fill: FillGuard,
    copy: Copy,
    info: MediaInfo,
    version: u64,
) -> ChunkStream {
    let state = (body, Some((fill, copy, info)));
    stream::unfold(state, move |(mut body, mut pending)| async move {
        match body.next().await {
            Some(Ok(chunk)) => {
                if let Some((_, copy, _)) = pending.as_mut() {
                    copy.write(&chunk);
                }
                Some((Ok(chunk), (body, pending)))
            }
            Some(Err(e)) => Some((Err(e), (body, None))),
            None => {
                if let Some((fill, copy, info)) = pending.take() {
                    if copy.is_whole(&info) {
                        copy.offer(fill.key.clone(), info, version);
                    }
                }
                None
            }
        }
    })
    .boxed()
}

fn memory_chunks(object: Arc<Object>, range: Range, chunk: u64) -> ChunkStream {
    stream::iter(chunk_slices(&object.body, range, chunk).map(Ok)).boxed()
}

/// `range` of `bytes` as slices of `chunk` bytes (the last one shorter), sharing its buffer.
pub fn chunk_slices(bytes: &Bytes, range: Range, chunk: u64) -> impl Iterator<Item = Bytes> {
    let bytes = bytes.clone();
    body_ranges(range, chunk).map(move |(s, e)| bytes.slice(s as usize..e as usize))
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
