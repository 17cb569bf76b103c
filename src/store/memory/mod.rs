//! The per-replica memory tier, with the cache strategy of seed 001:
//!
//! - Downloads per key are counted over a sliding window (`tracked_window`) kept as buckets, not
//!   one timestamp per download; the tracker holds at most `MAX_TRACKED_KEYS` keys.
//! - A key is admitted once it reached `min_downloads` in the window, fits `max_object_bytes`,
//!   and is not inside the `min_evicted_time` exclusion that follows its eviction.
//! - When full, victims are taken in ascending order of popularity, then size, skipping entries
//!   cached less than `min_cache_time` ago and entries at least as popular as the newcomer. They
//!   are evicted only if together they free enough room; otherwise nothing is evicted and the
//!   newcomer is not cached.
//!
//! Entries younger than `min_cache_time` wait in a queue and join the eviction index when they
//! mature, and a Fenwick tree over popularity holds the bytes of mature entries, so whether room
//! can be made is answered in O(log n) before any victim is touched, and every victim visited is
//! evicted: admission costs O(log n) amortised, never a scan. Bytes and entries held are exact.

mod inner;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use xxhash_rust::xxh3::Xxh3;

use crate::config::MemoryConfig;
use crate::key::Key;
pub use inner::{Admission, MemoryStats, Object, MAX_TRACKED_KEYS};
use inner::{Fenwick, Inner, Policy, Scope, Tracker, BUCKETS};

/// Milliseconds on a monotonic clock; tests and the simulator drive their own.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The process's monotonic clock.
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// A clock that moves only when told to.
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn set_ms(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct MemoryStore {
    policy: Policy,
    clock: Arc<dyn Clock>,
    /// The key's identity for the maps; entries also keep the key, which is compared on every
    /// lookup, so two keys that share a hash never see each other's bytes.
    hasher: fn(&Key) -> u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("policy", &self.policy)
            .finish()
    }
}

/// The key's identity inside this tier, hashed from its fields without building a string:
/// every Get calls this several times. `|` is outside every field's character set.
fn hash(key: &Key) -> u64 {
    let mut h = Xxh3::new();
    h.update(key.origin().as_bytes());
    h.update(b"|");
    h.update(key.media_id().as_bytes());
    h.update(b"|");
    h.update(key.variant().as_bytes());
    h.digest()
}

impl MemoryStore {
    pub fn new(config: &MemoryConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock::default()))
    }

    pub fn with_clock(config: &MemoryConfig, clock: Arc<dyn Clock>) -> Self {
        Self::with_hasher(config, clock, hash)
    }

    fn with_hasher(config: &MemoryConfig, clock: Arc<dyn Clock>, hasher: fn(&Key) -> u64) -> Self {
        let window_ms = config.tracked_window.as_millis() as u64;
        Self {
            policy: Policy {
                max_bytes: config.max_bytes,
                max_object_bytes: config.max_object_bytes.min(config.max_bytes),
                bucket_ms: (window_ms / BUCKETS).max(1),
                min_downloads: config.min_downloads,
                min_cache_ms: config.min_cache_time.as_millis() as u64,
                min_evicted_ms: config.min_evicted_time.as_millis() as u64,
            },
            clock,
            hasher,
            inner: Mutex::new(Inner {
                tracker: Tracker::default(),
                entries: HashMap::new(),
                index: BTreeSet::new(),
                mature_bytes: Fenwick::new(),
                young: VecDeque::new(),
                excluded: HashMap::new(),
                excluded_order: VecDeque::new(),
                bytes: 0,
                reserved: 0,
                epoch: 0,
                invalidations: VecDeque::new(),
                stats: MemoryStats::default(),
            }),
        }
    }

    pub fn max_object_bytes(&self) -> u64 {
        self.policy.max_object_bytes
    }

    /// Locks and brings the tier to the current time.
    fn lock(&self) -> (std::sync::MutexGuard<'_, Inner>, u64) {
        // Every mutation completes before anything that could panic, so a poisoned lock still
        // guards consistent state.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now_ms();
        inner.tick(now, &self.policy);
        (inner, now)
    }

    /// Counts one download of `key`; returns its downloads in the window.
    pub fn record_download(&self, key: &Key) -> u32 {
        let h = (self.hasher)(key);
        let (mut inner, _) = self.lock();
        self.record(&mut inner, h)
    }

    /// [`MemoryStore::record_download`] and [`MemoryStore::get_or_epoch`] under one lock: what
    /// every Get does first. A tier with no room at all (`max_bytes: 0`) tracks nothing.
    pub fn download(&self, key: &Key) -> Result<Arc<Object>, u64> {
        self.look(key, self.policy.max_bytes > 0)
    }

    /// The entry of `key`, or the invalidation epoch now; with `count`, a download of it is
    /// counted under the same lock.
    fn look(&self, key: &Key, count: bool) -> Result<Arc<Object>, u64> {
        let h = (self.hasher)(key);
        let (mut inner, _) = self.lock();
        if count {
            self.record(&mut inner, h);
        }
        match inner.entries.get(&h).filter(|e| e.key == *key) {
            Some(entry) => Ok(entry.object.clone()),
            None => Err(inner.epoch),
        }
    }

    fn record(&self, inner: &mut Inner, h: u64) -> u32 {
        let mut changed = Vec::new();
        let total = inner.tracker.record(h, &mut changed);
        for (k, pop) in changed {
            inner.repopularize(k, pop);
        }
        match total {
            Some(pop) => {
                inner.repopularize(h, pop);
                pop
            }
            None => 0,
        }
    }

    /// Downloads of `key` in the window.
    pub fn popularity(&self, key: &Key) -> u32 {
        self.lock().0.tracker.popularity((self.hasher)(key))
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Object>> {
        self.look(key, false).ok()
    }

    /// The current invalidation epoch: taken before a copy starts (before its source is read),
    /// and handed back when the copy is offered, so that a purge in between refuses it.
    pub fn epoch(&self) -> u64 {
        self.lock().0.epoch
    }

    /// [`MemoryStore::get`], or when the key is not held, the current [`MemoryStore::epoch`]:
    /// one look for a read that may go on to fill the tier.
    pub fn get_or_epoch(&self, key: &Key) -> Result<Arc<Object>, u64> {
        self.look(key, false)
    }

    /// Reserves room for a copy of `key` of `size` bytes that is about to be gathered: checked
    /// by the same policy as an admission (by popularity unless `is_put`), victims evicted now,
    /// and the bytes counted against `max_bytes` until the reservation is used or dropped.
    /// An error (why not) when the policy would not admit it: the copy is then skipped, never
    /// waited for.
    pub fn reserve(
        self: &Arc<Self>,
        key: &Key,
        size: u64,
        is_put: bool,
    ) -> Result<Reservation, Admission> {
        let h = (self.hasher)(key);
        let (mut inner, now) = self.lock();
        let tracked = inner.tracker.popularity(h);
        if !is_put && tracked < self.policy.min_downloads {
            return Err(Admission::NotPopular);
        }
        let pop = if is_put { tracked.max(1) } else { tracked };
        if let Err(why) = inner.check(h, size, pop, now, &self.policy, false) {
            if is_put {
                inner.count_refusal(why);
            }
            return Err(why);
        }
        // The key's own old copy is not freed yet (it is still served), so room is made as if
        // the newcomer came on top of it, and that copy is kept out of the victims meanwhile.
        let own = inner.entries.get(&h).and_then(|e| e.indexed);
        inner.unindex(h);
        inner.make_room(size, pop, now, &self.policy);
        if let Some(own) = own {
            inner.index_at(h, own);
        }
        if inner.bytes + inner.reserved + size > self.policy.max_bytes {
            if is_put {
                inner.count_refusal(Admission::NoRoom);
            }
            return Err(Admission::NoRoom);
        }
        inner.reserved += size;
        Ok(Reservation {
            store: self.clone(),
            size,
            is_put,
            used: false,
        })
    }

    /// Offers an object the way the tiered store does: admitted only by popularity.
    pub fn admit(&self, key: Key, object: Object) -> Admission {
        self.offer(key, object, false, None, 0)
    }

    /// Stores a Put when the memory tier is the only store: no download count is needed, and the
    /// newcomer counts as popular enough to replace entries nobody downloaded in the window.
    pub fn put(&self, key: Key, object: Object) -> Admission {
        self.offer(key, object, true, None, 0)
    }

    /// `since` is the epoch the copy started at (`None` for an object known current);
    /// `reserved` the bytes its reservation held, given back under the same lock.
    fn offer(
        &self,
        key: Key,
        object: Object,
        is_put: bool,
        since: Option<u64>,
        reserved: u64,
    ) -> Admission {
        let h = (self.hasher)(&key);
        let size = object.body.len() as u64;
        let (mut inner, now) = self.lock();
        inner.reserved -= reserved;
        if since.is_some_and(|since| !inner.current(&key, h, object.version, since)) {
            inner.count_refusal(Admission::Invalidated);
            return Admission::Invalidated;
        }
        let tracked = inner.tracker.popularity(h);
        if !is_put && tracked < self.policy.min_downloads {
            inner.count_refusal(Admission::NotPopular);
            return Admission::NotPopular;
        }
        let pop = if is_put { tracked.max(1) } else { tracked };
        if let Err(why) = inner.check(h, size, pop, now, &self.policy, true) {
            inner.count_refusal(why);
            return why;
        }
        inner.remove(h);
        inner.make_room(size, pop, now, &self.policy);
        debug_assert!(
            inner.bytes + inner.reserved + size <= self.policy.max_bytes,
            "check proved the room"
        );
        inner.insert(h, key, object, now);
        Admission::Stored
    }

    /// Removes `key`'s copy; a copy of it being gathered is refused when offered.
    pub fn remove(&self, key: &Key) -> bool {
        self.invalidate_key(key, None)
    }

    /// Another publish of `key` (`version`) happened: a copy of any other publish is stale.
    pub fn invalidate_except(&self, key: &Key, version: u64) -> bool {
        self.invalidate_key(key, Some(version))
    }

    /// Invalidates `key` (all but the copy of publish `keep`, when set); returns whether a held
    /// copy was dropped.
    fn invalidate_key(&self, key: &Key, keep: Option<u64>) -> bool {
        let h = (self.hasher)(key);
        let scope = Scope::Key { hash: h, keep };
        let (mut inner, _) = self.lock();
        let stale = inner
            .entries
            .get(&h)
            .is_some_and(|e| e.key == *key && scope.covers(key, h, e.object.version));
        inner.invalidate(scope);
        stale && inner.remove(h).is_some()
    }

    /// Removes every variant of `key`'s media; returns how many.
    pub fn remove_variants(&self, key: &Key) -> u64 {
        self.remove_where(Scope::Media {
            origin: key.origin().to_owned(),
            media_id: key.media_id().to_owned(),
        })
    }

    /// Removes every media of `origin`; returns how many objects.
    pub fn remove_origin(&self, origin: &str) -> u64 {
        self.remove_where(Scope::Origin(origin.to_owned()))
    }

    /// Drops every entry and refuses every copy in flight: for when this replica may have
    /// missed invalidations. Returns how many objects were dropped.
    pub fn clear(&self) -> u64 {
        self.remove_where(Scope::All)
    }

    /// Removes every entry `scope` covers and refuses copies of them in flight.
    fn remove_where(&self, scope: Scope) -> u64 {
        let (mut inner, _) = self.lock();
        let hashes: Vec<u64> = inner
            .entries
            .iter()
            .filter(|(h, e)| scope.covers(&e.key, **h, e.object.version))
            .map(|(h, _)| *h)
            .collect();
        inner.invalidate(scope);
        hashes
            .into_iter()
            .filter(|h| inner.remove(*h).is_some())
            .count() as u64
    }

    /// Bytes of bodies held and number of entries.
    pub fn usage(&self) -> (u64, u64) {
        let (inner, _) = self.lock();
        (inner.bytes, inner.entries.len() as u64)
    }

    pub fn stats(&self) -> MemoryStats {
        let (inner, _) = self.lock();
        MemoryStats {
            bytes: inner.bytes,
            entries: inner.entries.len() as u64,
            tracked_keys: inner.tracker.totals.len() as u64,
            reserved: inner.reserved,
            ..inner.stats.clone()
        }
    }

    /// Whether an object of `size` would be admitted now by popularity (tests).
    #[cfg(test)]
    fn would_admit(&self, key: &Key, size: u64) -> bool {
        let h = (self.hasher)(key);
        let (mut inner, now) = self.lock();
        let pop = inner.tracker.popularity(h);
        pop >= self.policy.min_downloads
            && inner.check(h, size, pop, now, &self.policy, true).is_ok()
    }

    /// Recomputes what the counters claim from the entries themselves (tests).
    #[cfg(test)]
    fn check_invariants(&self) {
        let (inner, _) = self.lock();
        let sum: u64 = inner.entries.values().map(inner::Entry::size).sum();
        assert_eq!(inner.bytes, sum, "bytes");
        let indexed: Vec<_> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.indexed.is_some())
            .collect();
        assert_eq!(indexed.len(), inner.index.len(), "index entries");
        let mature: u64 = indexed.iter().map(|(_, e)| e.size()).sum();
        assert_eq!(
            inner.mature_bytes.below(inner::MAX_POPULARITY + 1),
            mature,
            "mature bytes"
        );
        assert!(
            inner.bytes + inner.reserved <= self.policy.max_bytes,
            "over budget: {} held, {} reserved",
            inner.bytes,
            inner.reserved
        );
    }
}

/// Room in the memory tier promised to one copy being gathered. Dropped unused (the read or
/// the Put failed), it gives the room back.
pub struct Reservation {
    store: Arc<MemoryStore>,
    size: u64,
    is_put: bool,
    used: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("size", &self.size)
            .finish()
    }
}

impl Reservation {
    /// A buffer for the copy, allocated only now that its room is reserved.
    pub fn buffer(&self) -> BytesMut {
        BytesMut::with_capacity(self.size as usize)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offers the gathered copy, started at epoch `since`: refused when a purge or another
    /// publish covering it came in between. The reserved room is given back either way.
    pub fn offer(mut self, key: Key, object: Object, since: u64) -> Admission {
        self.used = true;
        self.store
            .offer(key, object, self.is_put, Some(since), self.size)
    }

    fn release(&mut self) {
        if !self.used {
            self.used = true;
            let (mut inner, _) = self.store.lock();
            inner.reserved -= self.size;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}
