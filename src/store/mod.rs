//! Where objects live: the memory tier of this replica and the Redis tier over the ring.
//!
//! Reads look in memory first, then in the ring; every read counts a download, and a whole-object
//! read from Redis of a key the memory policy admits fills the memory tier as it streams. Writes
//! go to the ring, and to memory only for keys already popular enough. With an empty ring the
//! memory tier is the store and takes every Put its policy can make room for.
//!
//! This file composes the parts; each concept has its own:
//! - [`types`]: errors, tiers, ranges, and the one result of a Put.
//! - [`memory`]: the memory tier and its popularity policy.
//! - [`redis`]: the Redis tier, its scripts and its quarantine merge.
//! - [`quarantine`]: the quarantines this replica knows.
//! - `leases`: fill leases, in memory or on the ring, released where they were taken.
//! - `fill`: copies into the memory tier, refused when a purge came in between.
//! - [`put`]: a Put's way through the tiers.

mod fill;
mod leases;
pub mod memory;
pub mod put;
pub mod quarantine;
pub mod redis;
pub mod types;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock;
use crate::events::{Event, Events};
use crate::key::Key;
use fill::{memory_chunks, tee, Copy, FillGuard};
use leases::Leases;
use memory::MemoryStore;
use quarantine::Quarantine;
use redis::RedisStore;
pub use types::{
    body_ranges, chunk_slices, ChunkStream, Found, Hit, LeaseAttempt, Lookup, PutError, Range,
    StoreError, Tier,
};

pub struct Store {
    /// Shared with the events' listener, which drops what purges and other publishes made
    /// stale.
    memory: Arc<MemoryStore>,
    redis: RedisStore,
    /// The size of the chunks a memory-tier read yields.
    chunk_bytes: u64,
    /// Keys whose memory fill (a tee of a Redis read) is under way: one at a time per key.
    filling: Arc<Mutex<HashSet<Key>>>,
    /// Wakes Gets waiting for a key, on this replica and (through the shards) on every other.
    events: Arc<Events>,
    leases: Leases,
    /// How long a purge's quarantine refuses the media.
    quarantine_ttl: Duration,
    /// The quarantines this replica knows, in both modes (see [`quarantine`]); shared with the
    /// events, which record those announced by other replicas.
    quarantine: Arc<Quarantine>,
}

/// How often a waiter looks again even without an event, in case one was missed.
const RECHECK: Duration = Duration::from_millis(250);

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
            leases: Leases::new(settings.lease_ttl, events.clone()),
            events,
            quarantine_ttl: settings.quarantine_ttl,
            quarantine: settings.quarantine,
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
                match self.leases.acquire(&self.redis, key).await {
                    LeaseAttempt::Acquired(token) => {
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
            if let Some(left) = self.leases.left(&self.redis, key).await {
                nap = nap.min(left + Duration::from_millis(5));
            }
            waited = true;
            _waiting.get_or_insert_with(|| self.leases.waiting());
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

    /// Gives up a lease if `token` still holds it (a foreign or expired token changes nothing),
    /// and wakes the waiters.
    pub async fn release_lease(&self, key: &Key, token: &str) {
        self.leases.release(&self.redis, key, token).await
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
        self.leases.waiters()
    }

    /// The quarantine registry (its metrics).
    pub fn quarantines(&self) -> &Quarantine {
        &self.quarantine
    }

    /// Merges this replica's quarantines with every shard's, every `interval` (see
    /// [`RedisStore::sync_quarantine`]).
    pub async fn keep_quarantines(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.redis.sync_quarantine(&self.quarantine).await;
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

    /// Opens `[offset, offset+limit)` of an object: memory first, then the ring. Every Get
    /// counts as a download of the key. `Ok(None)` is a miss.
    pub async fn get(&self, key: &Key, offset: u64, limit: u64) -> Result<Option<Hit>, StoreError> {
        self.look(key, offset, limit, true).await
    }

    /// A Get that does not count a download (a waiter looking again). A quarantined media is a
    /// miss wherever a copy of it may still sit (a shard that lost the quarantine for a moment
    /// and took a Put meanwhile, a replica's memory).
    async fn find(&self, key: &Key, offset: u64, limit: u64) -> Result<Option<Hit>, StoreError> {
        self.look(key, offset, limit, false).await
    }

    /// [`Store::get`] (`download`: a download is counted) or [`Store::find`].
    async fn look(
        &self,
        key: &Key,
        offset: u64,
        limit: u64,
        download: bool,
    ) -> Result<Option<Hit>, StoreError> {
        if self.quarantined(key) {
            if download {
                self.memory.record_download(key);
            }
            return Ok(None);
        }
        // The epoch is taken with the look in memory, before the Redis read: a purge after
        // this point refuses the copy the read may fill. A download is counted in the same look.
        let in_memory = if download {
            self.memory.download(key)
        } else {
            self.memory.get_or_epoch(key)
        };
        let since = match in_memory {
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
        let Some(located) = self.redis.locate(key, true).await else {
            return Ok(None);
        };
        let info = located.header.info.clone();
        let version = located.header.nonce();
        let range = Range::new(offset, limit, info.size)?;
        let mut body = self.redis.stream(located, range);
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
        let located = self.redis.locate(key, false).await?;
        Some(Found {
            info: located.header.info,
            tier: Tier::Redis,
            shard: Some(located.shard.name().to_owned()),
        })
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
