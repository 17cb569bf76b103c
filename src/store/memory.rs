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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use xxhash_rust::xxh3::Xxh3;

use crate::config::MemoryConfig;
use crate::key::Key;
use crate::proto::MediaInfo;

/// Popularity counts above this are treated as equal (the Fenwick tree's size).
const MAX_POPULARITY: u32 = (1 << 16) - 1;
/// Buckets the tracked window is divided into.
const BUCKETS: u64 = 30;
/// Keys the download tracker holds at most; under a flood of unique keys the oldest buckets are
/// dropped early, so the window shrinks instead of memory growing.
pub const MAX_TRACKED_KEYS: usize = 1_000_000;

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

/// One cached object; readers clone the `Arc` and stream slices of `body` without copying.
#[derive(Debug)]
pub struct Object {
    pub info: MediaInfo,
    pub body: Bytes,
    /// Which publish of the key this is (the nonce of its Redis header; 0 for memory-only Puts):
    /// an event announcing another publish of the key drops this copy, one for this publish not.
    pub version: u64,
}

/// The answer to an offer of an object to the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Stored,
    TooLarge,
    /// Fewer than `min_downloads` downloads in the window.
    NotPopular,
    /// Evicted less than `min_evicted_time` ago.
    Excluded,
    /// Full, and the evictable entries would not free enough room.
    NoRoom,
    /// A purge or another publish covering the key came after the copy was started.
    Invalidated,
}

/// Counters since start, for metrics and the simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub bytes: u64,
    pub entries: u64,
    pub tracked_keys: u64,
    pub admissions: u64,
    pub evicted_for_room: u64,
    pub refused_not_popular: u64,
    pub refused_excluded: u64,
    pub refused_no_room: u64,
    pub refused_too_large: u64,
    pub refused_invalidated: u64,
    /// Bytes reserved by copies being gathered (fills, Puts), counted against `max_bytes`.
    pub reserved: u64,
}

#[derive(Debug, Clone)]
struct Policy {
    max_bytes: u64,
    max_object_bytes: u64,
    bucket_ms: u64,
    min_downloads: u32,
    min_cache_ms: u64,
    min_evicted_ms: u64,
}

pub struct MemoryStore {
    policy: Policy,
    clock: Arc<dyn Clock>,
    /// The key's identity for the maps; entries also keep the key, which is compared on every
    /// lookup, so two keys that share a hash never see each other's bytes.
    hasher: fn(&Key) -> u64,
    inner: Mutex<Inner>,
}

/// What an invalidation covers.
#[derive(Debug, Clone)]
enum Scope {
    /// One key, by its hash (a key sharing it is refused too: harmless); a copy of the publish
    /// `keep` (when set) is still current.
    Key {
        hash: u64,
        keep: Option<u64>,
    },
    Media {
        origin: String,
        media_id: String,
    },
    Origin(String),
    /// Everything: events may have been missed.
    All,
}

impl Scope {
    fn covers(&self, key: &Key, hash: u64, version: u64) -> bool {
        match self {
            Scope::Key { hash: h, keep } => *h == hash && *keep != Some(version),
            Scope::Media { origin, media_id } => {
                key.origin() == origin && key.media_id() == media_id
            }
            Scope::Origin(origin) => key.origin() == origin,
            Scope::All => true,
        }
    }
}

/// Invalidations remembered for copies in flight; a copy older than all of them is refused.
/// Every publish in the cluster is one (its event drops other publishes' copies), so this is
/// sized for a fill of a few minutes at thousands of Puts per second (about 3 MiB).
const INVALIDATION_LOG: usize = 65_536;

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("policy", &self.policy)
            .finish()
    }
}

/// Downloads per key over a window of `BUCKETS` buckets.
#[derive(Default)]
struct Tracker {
    /// Oldest first; each holds the downloads per key hash in its time span.
    buckets: VecDeque<(u64, HashMap<u64, u32>)>,
    totals: HashMap<u64, u32>,
}

impl Tracker {
    fn popularity(&self, h: u64) -> u32 {
        capped(self.totals.get(&h).copied().unwrap_or(0))
    }

    /// Drops the oldest bucket; returns the keys whose totals fell, with their new totals.
    fn drop_oldest(&mut self, changed: &mut Vec<(u64, u32)>) {
        if let Some((_, counts)) = self.buckets.pop_front() {
            for (h, n) in counts {
                if let Some(total) = self.totals.get_mut(&h) {
                    *total -= n;
                    changed.push((h, capped(*total)));
                    if *total == 0 {
                        self.totals.remove(&h);
                    }
                }
            }
        }
    }

    /// Moves the window to `bucket` (an index of time), expiring buckets that fell out of it.
    fn advance(&mut self, bucket: u64, changed: &mut Vec<(u64, u32)>) {
        while self
            .buckets
            .front()
            .is_some_and(|(start, _)| *start + BUCKETS <= bucket)
        {
            self.drop_oldest(changed);
        }
        if self.buckets.back().is_none_or(|(start, _)| *start < bucket) {
            self.buckets.push_back((bucket, HashMap::new()));
        }
    }

    /// Counts one download in the current bucket; returns the key's new total, or `None` when
    /// the tracker is full even after shrinking the window to the current bucket.
    fn record(&mut self, h: u64, changed: &mut Vec<(u64, u32)>) -> Option<u32> {
        while !self.totals.contains_key(&h)
            && self.totals.len() >= MAX_TRACKED_KEYS
            && self.buckets.len() > 1
        {
            self.drop_oldest(changed);
        }
        if !self.totals.contains_key(&h) && self.totals.len() >= MAX_TRACKED_KEYS {
            return None;
        }
        let (_, current) = self.buckets.back_mut().expect("advance made a bucket");
        *current.entry(h).or_default() += 1;
        let total = self.totals.entry(h).or_default();
        *total = total.saturating_add(1);
        Some(capped(*total))
    }
}

/// Every popularity value is capped here once, so the eviction index, the Fenwick tree and the
/// admission check agree on it (a count above the cap must not outrank a capped victim).
fn capped(pop: u32) -> u32 {
    pop.min(MAX_POPULARITY)
}

/// Bytes of mature entries per popularity value, with prefix sums in O(log n).
struct Fenwick(Vec<u64>);

impl Fenwick {
    fn new() -> Self {
        Self(vec![0; MAX_POPULARITY as usize + 2])
    }
    fn add(&mut self, pop: u32, delta: i64) {
        let mut i = pop.min(MAX_POPULARITY) as usize + 1;
        while i < self.0.len() {
            self.0[i] = self.0[i].wrapping_add_signed(delta);
            i += i & i.wrapping_neg();
        }
    }
    /// Sum over popularity values below `pop`.
    fn below(&self, pop: u32) -> u64 {
        let mut i = pop.min(MAX_POPULARITY + 1) as usize;
        let mut sum = 0u64;
        while i > 0 {
            sum = sum.wrapping_add(self.0[i]);
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

struct Entry {
    key: Key,
    object: Arc<Object>,
    cached_at: u64,
    /// Popularity under which the entry sits in the eviction index; `None` while young.
    indexed: Option<u32>,
}

impl Entry {
    fn size(&self) -> u64 {
        self.object.body.len() as u64
    }
}

struct Inner {
    tracker: Tracker,
    entries: HashMap<u64, Entry>,
    /// Mature entries by (popularity, size, key hash): the eviction order.
    index: BTreeSet<(u32, u64, u64)>,
    mature_bytes: Fenwick,
    /// Entries not yet past `min_cache_time`, oldest first.
    young: VecDeque<(u64, u64)>,
    /// Recently evicted keys and when their exclusion ends, with the same in time order.
    excluded: HashMap<u64, u64>,
    excluded_order: VecDeque<(u64, u64)>,
    bytes: u64,
    /// Bytes promised to copies being gathered; `bytes + reserved` never exceeds `max_bytes`.
    reserved: u64,
    /// Bumped by every invalidation; a copy records it when it starts.
    epoch: u64,
    /// The latest invalidations with the epoch each one made, oldest first.
    invalidations: VecDeque<(u64, Scope)>,
    stats: MemoryStats,
}

impl Inner {
    fn invalidate(&mut self, scope: Scope) {
        self.epoch += 1;
        if self.invalidations.len() == INVALIDATION_LOG {
            self.invalidations.pop_front();
        }
        self.invalidations.push_back((self.epoch, scope));
    }

    /// Whether a copy of `key` (hash `hash`) at `version` started at epoch `since` is still
    /// current. Only the invalidations after `since` are looked at, newest first.
    fn current(&self, key: &Key, hash: u64, version: u64, since: u64) -> bool {
        if since == self.epoch {
            return true;
        }
        match self.invalidations.front() {
            // Older than everything remembered: it cannot be proven current.
            Some((oldest, _)) if *oldest > since + 1 => false,
            _ => !self
                .invalidations
                .iter()
                .rev()
                .take_while(|(e, _)| *e > since)
                .any(|(_, scope)| scope.covers(key, hash, version)),
        }
    }

    fn unindex(&mut self, h: u64) {
        if let Some(entry) = self.entries.get_mut(&h) {
            if let Some(pop) = entry.indexed.take() {
                let size = entry.object.body.len() as u64;
                self.index.remove(&(pop, size, h));
                self.mature_bytes.add(pop, -(size as i64));
            }
        }
    }

    fn index_at(&mut self, h: u64, pop: u32) {
        let pop = capped(pop);
        if let Some(entry) = self.entries.get_mut(&h) {
            let size = entry.object.body.len() as u64;
            entry.indexed = Some(pop);
            self.index.insert((pop, size, h));
            self.mature_bytes.add(pop, size as i64);
        }
    }

    /// A tracked total changed: move the entry in the eviction order if it is mature.
    fn repopularize(&mut self, h: u64, pop: u32) {
        if self.entries.get(&h).is_some_and(|e| e.indexed.is_some()) {
            self.unindex(h);
            self.index_at(h, pop);
        }
    }

    fn remove(&mut self, h: u64) -> Option<Entry> {
        self.unindex(h);
        let entry = self.entries.remove(&h)?;
        self.bytes -= entry.size();
        Some(entry)
    }

    /// Brings time forward: expire tracker buckets, mature young entries, end exclusions.
    fn tick(&mut self, now: u64, policy: &Policy) {
        let mut changed = Vec::new();
        self.tracker.advance(now / policy.bucket_ms, &mut changed);
        for (h, pop) in changed {
            self.repopularize(h, pop);
        }
        while let Some(&(cached_at, h)) = self.young.front() {
            if cached_at + policy.min_cache_ms > now {
                break;
            }
            self.young.pop_front();
            let current = self
                .entries
                .get(&h)
                .is_some_and(|e| e.cached_at == cached_at && e.indexed.is_none());
            if current {
                let pop = self.tracker.popularity(h);
                self.index_at(h, pop);
            }
        }
        while let Some(&(until, h)) = self.excluded_order.front() {
            if until > now {
                break;
            }
            self.excluded_order.pop_front();
            if self.excluded.get(&h) == Some(&until) {
                self.excluded.remove(&h);
            }
        }
    }

    /// Whether `size` bytes for `h` at popularity `pop` can be admitted now. With `replacing`,
    /// the key's old copy is freed first (an admission); without, it stays while the new copy
    /// is gathered (a reservation), so it is not counted as room.
    fn check(
        &mut self,
        h: u64,
        size: u64,
        pop: u32,
        now: u64,
        policy: &Policy,
        replacing: bool,
    ) -> Result<(), Admission> {
        if size > policy.max_object_bytes {
            return Err(Admission::TooLarge);
        }
        if self.excluded.get(&h).is_some_and(|until| *until > now) {
            return Err(Admission::Excluded);
        }
        // A replacement frees its old bytes first; they are not also counted as a victim's.
        // Either way the key's own copy is never one of its victims.
        let (old, old_victim) = self.entries.get(&h).map_or((0, 0), |e| {
            let as_victim = e
                .indexed
                .filter(|p| *p < capped(pop))
                .map_or(0, |_| e.size());
            (if replacing { e.size() } else { 0 }, as_victim)
        });
        let need = (self.bytes + self.reserved - old + size).saturating_sub(policy.max_bytes);
        if need > 0 && self.mature_bytes.below(pop) - old_victim < need {
            return Err(Admission::NoRoom);
        }
        Ok(())
    }

    /// Evicts the least popular, then smallest, mature entries below `pop` until `size` fits.
    /// Only called after [`Inner::check`] proved that these victims make enough room.
    fn make_room(&mut self, size: u64, pop: u32, now: u64, policy: &Policy) {
        while self.bytes + self.reserved + size > policy.max_bytes {
            let Some(&(victim_pop, _, h)) = self.index.first() else {
                break;
            };
            if victim_pop >= pop {
                break;
            }
            self.remove(h);
            let until = now + policy.min_evicted_ms;
            self.excluded.insert(h, until);
            self.excluded_order.push_back((until, h));
            self.stats.evicted_for_room += 1;
        }
    }

    fn insert(&mut self, h: u64, key: Key, object: Object, now: u64) {
        self.remove(h);
        self.bytes += object.body.len() as u64;
        self.entries.insert(
            h,
            Entry {
                key,
                object: Arc::new(object),
                cached_at: now,
                indexed: None,
            },
        );
        self.young.push_back((now, h));
        self.stats.admissions += 1;
    }

    fn count_refusal(&mut self, why: Admission) {
        match why {
            Admission::TooLarge => self.stats.refused_too_large += 1,
            Admission::NotPopular => self.stats.refused_not_popular += 1,
            Admission::Excluded => self.stats.refused_excluded += 1,
            Admission::NoRoom => self.stats.refused_no_room += 1,
            Admission::Invalidated => self.stats.refused_invalidated += 1,
            Admission::Stored => {}
        }
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
        let h = (self.hasher)(key);
        let (inner, _) = self.lock();
        inner
            .entries
            .get(&h)
            .filter(|e| e.key == *key)
            .map(|e| e.object.clone())
    }

    /// The current invalidation epoch: taken before a copy starts (before its source is read),
    /// and handed back when the copy is offered, so that a purge in between refuses it.
    pub fn epoch(&self) -> u64 {
        self.lock().0.epoch
    }

    /// [`MemoryStore::get`], or when the key is not held, the current [`MemoryStore::epoch`]:
    /// one look for a read that may go on to fill the tier.
    pub fn get_or_epoch(&self, key: &Key) -> Result<Arc<Object>, u64> {
        let h = (self.hasher)(key);
        let (inner, _) = self.lock();
        match inner.entries.get(&h).filter(|e| e.key == *key) {
            Some(entry) => Ok(entry.object.clone()),
            None => Err(inner.epoch),
        }
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
        let sum: u64 = inner.entries.values().map(Entry::size).sum();
        assert_eq!(inner.bytes, sum, "bytes");
        let indexed: Vec<_> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.indexed.is_some())
            .collect();
        assert_eq!(indexed.len(), inner.index.len(), "index entries");
        let mature: u64 = indexed.iter().map(|(_, e)| e.size()).sum();
        assert_eq!(
            inner.mature_bytes.below(MAX_POPULARITY + 1),
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn config(max_bytes: u64) -> MemoryConfig {
        MemoryConfig {
            max_bytes,
            max_object_bytes: max_bytes,
            tracked_window: 30 * MIN,
            min_downloads: 3,
            min_cache_time: 5 * MIN,
            min_evicted_time: MIN,
        }
    }

    fn store(max_bytes: u64) -> (MemoryStore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        clock.set_ms(1_000_000);
        (
            MemoryStore::with_clock(&config(max_bytes), clock.clone()),
            clock,
        )
    }

    fn obj(n: usize) -> Object {
        Object {
            info: MediaInfo {
                size: n as u64,
                ..Default::default()
            },
            body: Bytes::from(vec![1; n]),
            version: 0,
        }
    }

    fn key(i: u32) -> Key {
        Key::new("o", &format!("m{i}"), "").unwrap()
    }

    fn download(m: &MemoryStore, k: &Key, times: u32) -> u32 {
        (0..times).map(|_| m.record_download(k)).last().unwrap_or(0)
    }

    #[test]
    fn window_counts_and_forgets() {
        let (m, clock) = store(1000);
        assert_eq!(download(&m, &key(1), 4), 4);
        clock.advance(20 * MIN);
        assert_eq!(download(&m, &key(1), 1), 5);
        // 31 minutes after the first four, only the later one is in the window.
        clock.advance(11 * MIN);
        assert_eq!(m.popularity(&key(1)), 1);
        clock.advance(30 * MIN);
        assert_eq!(m.popularity(&key(1)), 0);
        assert_eq!(m.stats().tracked_keys, 0, "forgotten keys take no memory");
    }

    #[test]
    fn tracker_is_bounded_under_unique_keys() {
        let mut t = Tracker::default();
        let mut changed = Vec::new();
        for bucket in 0..3u64 {
            t.advance(bucket, &mut changed);
            for i in 0..(MAX_TRACKED_KEYS as u64 / 2 + 10) {
                t.record(bucket << 40 | i, &mut changed);
            }
            assert!(t.totals.len() <= MAX_TRACKED_KEYS);
        }
        let counted: usize = t.buckets.iter().map(|(_, c)| c.len()).sum();
        assert_eq!(counted, t.totals.len(), "totals agree with the buckets");
    }

    #[test]
    fn admission_needs_downloads_and_size() {
        let (m, _) = store(1000);
        assert_eq!(m.admit(key(1), obj(10)), Admission::NotPopular);
        download(&m, &key(1), 2);
        assert!(!m.would_admit(&key(1), 10));
        assert_eq!(m.admit(key(1), obj(10)), Admission::NotPopular);
        download(&m, &key(1), 1);
        assert!(m.would_admit(&key(1), 10));
        assert_eq!(m.admit(key(1), obj(10)), Admission::Stored);
        download(&m, &key(2), 5);
        assert_eq!(m.admit(key(2), obj(1001)), Admission::TooLarge);
        assert_eq!(m.usage(), (10, 1));
    }

    #[test]
    fn evicts_least_popular_then_smallest_only_when_that_makes_room() {
        let (m, clock) = store(100);
        for (i, (downloads, size)) in [(3, 30), (4, 20), (3, 10), (6, 40)].into_iter().enumerate() {
            download(&m, &key(i as u32), downloads);
            assert_eq!(m.admit(key(i as u32), obj(size)), Admission::Stored);
        }
        assert_eq!(m.usage(), (100, 4));
        clock.advance(6 * MIN); // all past min_cache_time
                                // Newcomer with 5 downloads and 35 bytes: candidates below 5 are (3,10), (3,30), (4,20).
        download(&m, &key(9), 5);
        assert_eq!(m.admit(key(9), obj(35)), Admission::Stored);
        // (3,10) then (3,30) freed 40 >= 35; (4,20) stays.
        assert!(m.get(&key(2)).is_none() && m.get(&key(0)).is_none());
        assert!(m.get(&key(1)).is_some() && m.get(&key(3)).is_some());
        assert_eq!(m.usage(), (95, 3));
        assert_eq!(m.stats().evicted_for_room, 2);
        m.check_invariants();

        // A newcomer that even all less popular entries cannot make room for evicts nothing.
        download(&m, &key(10), 5);
        assert_eq!(m.admit(key(10), obj(60)), Admission::NoRoom);
        assert_eq!(m.usage(), (95, 3));
        // Equally popular entries are not victims.
        download(&m, &key(11), 4);
        assert_eq!(m.admit(key(11), obj(30)), Admission::NoRoom);
        m.check_invariants();
    }

    #[test]
    fn min_cache_time_protects_new_entries() {
        let (m, clock) = store(100);
        download(&m, &key(1), 3);
        assert_eq!(m.admit(key(1), obj(80)), Admission::Stored);
        download(&m, &key(2), 10);
        assert_eq!(
            m.admit(key(2), obj(50)),
            Admission::NoRoom,
            "key 1 is too young to evict"
        );
        clock.advance(5 * MIN - Duration::from_millis(1));
        assert_eq!(m.admit(key(2), obj(50)), Admission::NoRoom);
        clock.advance(Duration::from_millis(1));
        assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
        assert!(m.get(&key(1)).is_none());
    }

    #[test]
    fn min_evicted_time_keeps_evicted_keys_out() {
        let (m, clock) = store(100);
        download(&m, &key(1), 3);
        m.admit(key(1), obj(80));
        clock.advance(5 * MIN);
        download(&m, &key(2), 10);
        assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
        // key 1 is excluded for a minute even though it is popular now.
        download(&m, &key(1), 20);
        clock.advance(MIN - Duration::from_millis(1));
        assert!(!m.would_admit(&key(1), 40));
        assert_eq!(m.admit(key(1), obj(40)), Admission::Excluded);
        clock.advance(Duration::from_millis(1));
        assert_eq!(m.admit(key(1), obj(40)), Admission::Stored);
        assert_eq!(m.stats().refused_excluded, 1);
    }

    #[test]
    fn popularity_changes_reorder_the_victims() {
        let (m, clock) = store(100);
        download(&m, &key(1), 3);
        m.admit(key(1), obj(50));
        download(&m, &key(2), 3);
        m.admit(key(2), obj(50));
        clock.advance(6 * MIN);
        // key 1 becomes popular after it was indexed; key 2 is now the only victim below 8.
        download(&m, &key(1), 10);
        download(&m, &key(3), 8);
        assert_eq!(m.admit(key(3), obj(50)), Admission::Stored);
        assert!(m.get(&key(1)).is_some() && m.get(&key(2)).is_none());
        // As the window slides, key 1's downloads expire and it becomes evictable again.
        clock.advance(31 * MIN);
        download(&m, &key(4), 3);
        assert_eq!(m.admit(key(4), obj(50)), Admission::Stored);
        m.check_invariants();
    }

    #[test]
    fn memory_only_puts_replace_entries_nobody_downloads() {
        let (m, clock) = store(100);
        assert_eq!(m.put(key(1), obj(60)), Admission::Stored);
        assert_eq!(m.put(key(2), obj(60)), Admission::NoRoom, "key 1 is young");
        clock.advance(6 * MIN);
        assert_eq!(
            m.put(key(2), obj(60)),
            Admission::Stored,
            "key 1 had no downloads"
        );
        clock.advance(6 * MIN);
        download(&m, &key(2), 2);
        assert_eq!(
            m.put(key(3), obj(60)),
            Admission::NoRoom,
            "key 2 is downloaded"
        );
        // Replacing a key with a new body is not an eviction.
        assert_eq!(m.put(key(2), obj(70)), Admission::Stored);
        assert_eq!(m.usage(), (70, 1));
        m.check_invariants();
    }

    #[test]
    fn accounting_is_exact_under_concurrency() {
        let clock = Arc::new(ManualClock::default());
        let m = Arc::new(MemoryStore::with_clock(&config(50_000), clock.clone()));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let m = m.clone();
                let clock = clock.clone();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t);
                    for i in 0..20_000u32 {
                        // Skewed popularity, so that newcomers outrank some entries.
                        let k = key((rng.f64().powi(3) * 300.0) as u32);
                        match rng.u8(..10) {
                            0..=4 => {
                                m.record_download(&k);
                            }
                            5..=6 => {
                                m.admit(k, obj(rng.usize(1..2000)));
                            }
                            7 => {
                                m.put(k, obj(rng.usize(1..2000)));
                            }
                            8 => {
                                m.remove(&k);
                            }
                            _ => {
                                m.get(&k);
                            }
                        }
                        if i % 500 == 0 {
                            clock.advance(Duration::from_secs(30));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        m.check_invariants();
        let stats = m.stats();
        assert!(
            stats.admissions > 100 && stats.evicted_for_room > 0,
            "{stats:?}"
        );
    }

    #[test]
    fn removes_all_variants_of_one_media() {
        let (m, _) = store(1000);
        m.put(Key::new("o", "m", "").unwrap(), obj(1));
        m.put(Key::new("o", "m", "thumb/1x1/crop").unwrap(), obj(1));
        m.put(Key::new("o", "n", "").unwrap(), obj(1));
        assert_eq!(m.remove_variants(&Key::new("o", "m", "x").unwrap()), 2);
        assert_eq!(m.usage(), (1, 1));
    }

    #[test]
    fn keys_that_share_a_hash_never_see_each_other() {
        let clock = Arc::new(ManualClock::default());
        let m = MemoryStore::with_hasher(&config(1000), clock, |_| 42);
        let (a, b) = (key(1), key(2));
        assert_eq!(m.put(a.clone(), obj(10)), Admission::Stored);
        assert!(m.get(&a).is_some());
        assert!(m.get(&b).is_none(), "b shares a's hash but is not a");
        assert!(!m.remove(&b), "removing b leaves a alone");
        assert!(m.get(&a).is_some());
        assert_eq!(m.put(b.clone(), obj(20)), Admission::Stored);
        assert!(m.get(&a).is_none(), "one slot per hash: b replaced a");
        assert_eq!(m.get(&b).unwrap().body.len(), 20);
        m.check_invariants();
    }

    /// Counts `n` downloads under one lock (popularity far above the cap, quickly).
    fn bulk_download(m: &MemoryStore, k: &Key, n: u32) {
        let h = (m.hasher)(k);
        let (mut inner, _) = m.lock();
        let mut changed = Vec::new();
        let mut last = 0;
        for _ in 0..n {
            last = inner.tracker.record(h, &mut changed).unwrap_or(0);
        }
        inner.repopularize(h, last);
    }

    #[test]
    fn popularity_above_the_cap_never_overfills_the_tier() {
        let (m, clock) = store(100);
        bulk_download(&m, &key(1), 70_000);
        assert_eq!(m.admit(key(1), obj(50)), Admission::Stored);
        bulk_download(&m, &key(2), 66_000);
        assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
        clock.advance(6 * MIN);
        // As popular as the most popular entry once capped: neither is a victim.
        bulk_download(&m, &key(3), 70_000);
        assert_eq!(m.admit(key(3), obj(100)), Admission::NoRoom);
        m.check_invariants();
        assert_eq!(m.usage(), (100, 2));
    }

    #[test]
    fn reservations_count_against_the_budget_until_used_or_dropped() {
        let (m, _) = store(100);
        let m = Arc::new(m);
        download(&m, &key(1), 3);
        download(&m, &key(2), 3);
        let r1 = m.reserve(&key(1), 60, false).expect("room for 60");
        assert_eq!(m.stats().reserved, 60);
        assert_eq!(
            m.reserve(&key(2), 60, false).unwrap_err(),
            Admission::NoRoom,
            "60 + 60 > 100"
        );
        assert_eq!(
            m.reserve(&key(3), 10, false).unwrap_err(),
            Admission::NotPopular
        );
        let since = m.epoch();
        assert_eq!(
            r1.offer(
                key(1),
                Object {
                    version: 5,
                    ..obj(60)
                },
                since
            ),
            Admission::Stored
        );
        assert_eq!(m.stats().reserved, 0);
        let r2 = m.reserve(&key(2), 40, false).expect("room for 40");
        drop(r2);
        assert_eq!(
            m.stats().reserved,
            0,
            "a dropped reservation gives its room back"
        );
        m.check_invariants();
    }

    #[test]
    fn a_new_copy_never_evicts_the_old_copy_of_its_own_key() {
        let (m, clock) = store(100);
        let m = Arc::new(m);
        download(&m, &key(1), 3);
        assert_eq!(m.admit(key(1), obj(40)), Admission::Stored);
        download(&m, &key(2), 4);
        assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
        clock.advance(6 * MIN);
        // Key 1 grows popular; its new copy needs room, which key 2 makes, not key 1 itself.
        download(&m, &key(1), 3);
        let since = m.epoch();
        let r = m.reserve(&key(1), 40, false).expect("room");
        assert!(m.get(&key(1)).is_some(), "the old copy is served meanwhile");
        assert!(m.get(&key(2)).is_none());
        assert_eq!(
            r.offer(
                key(1),
                Object {
                    version: 2,
                    ..obj(40)
                },
                since
            ),
            Admission::Stored,
            "not refused as a key evicted moments ago"
        );
        m.check_invariants();
    }

    #[test]
    fn a_reservation_that_cannot_fit_evicts_nothing() {
        let (m, clock) = store(100);
        let m = Arc::new(m);
        download(&m, &key(1), 5);
        assert_eq!(m.admit(key(1), obj(60)), Admission::Stored);
        download(&m, &key(2), 3);
        assert_eq!(m.admit(key(2), obj(30)), Admission::Stored);
        clock.advance(6 * MIN);
        // A new copy of key 1 while its old one is still served: 60 + 60 > 100 even with key 2
        // gone, so key 2 must stay.
        assert_eq!(
            m.reserve(&key(1), 60, false).unwrap_err(),
            Admission::NoRoom
        );
        assert!(
            m.get(&key(2)).is_some(),
            "nothing evicted for a refused reservation"
        );
        assert_eq!(m.stats().evicted_for_room, 0);
        m.check_invariants();
    }

    #[test]
    fn a_copy_started_before_an_invalidation_is_refused() {
        let (m, _) = store(1000);
        let m = Arc::new(m);
        let k = Key::new("o", "m", "thumb/1x1/crop").unwrap();
        download(&m, &k, 3);
        let copy = |version: u64| Object { version, ..obj(10) };
        // A purge of the media, after the copy started: refused.
        let since = m.epoch();
        let r = m.reserve(&k, 10, false).unwrap();
        m.remove_variants(&Key::new("o", "m", "").unwrap());
        assert_eq!(r.offer(k.clone(), copy(1), since), Admission::Invalidated);
        // Another publish of the key: refused, unless the copy is of that very publish.
        let since = m.epoch();
        let r = m.reserve(&k, 10, false).unwrap();
        m.invalidate_except(&k, 2);
        assert_eq!(r.offer(k.clone(), copy(1), since), Admission::Invalidated);
        let since = m.epoch();
        let r = m.reserve(&k, 10, false).unwrap();
        m.invalidate_except(&k, 2);
        assert_eq!(r.offer(k.clone(), copy(2), since), Admission::Stored);
        // An event of this same publish keeps the copy; one of another drops it.
        assert!(!m.invalidate_except(&k, 2));
        assert!(m.get(&k).is_some());
        assert!(m.invalidate_except(&k, 3));
        assert!(m.get(&k).is_none());
        // Unrelated purges do not refuse it; a purge of its origin or a clear does.
        for (purge, refused) in [(0, false), (1, true), (2, true)] {
            let since = m.epoch();
            let r = m.reserve(&k, 10, false).unwrap();
            match purge {
                0 => {
                    m.remove_origin("other");
                }
                1 => {
                    m.remove_origin("o");
                }
                _ => {
                    m.clear();
                }
            }
            let answer = r.offer(k.clone(), copy(4), since);
            assert_eq!(
                answer == Admission::Invalidated,
                refused,
                "{purge}: {answer:?}"
            );
            m.remove(&k);
        }
        // Older than every invalidation remembered: refused, it cannot be proven current.
        let since = m.epoch();
        let r = m.reserve(&k, 10, false).unwrap();
        for i in 0..INVALIDATION_LOG + 1 {
            m.remove(&key(i as u32 + 10));
        }
        assert_eq!(r.offer(k.clone(), copy(5), since), Admission::Invalidated);
        m.check_invariants();
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Download(u8, u32),
            Admit(u8, u16),
            Put(u8, u16),
            Reserve(u8, u16),
            Release,
            Remove(u8),
            Advance(u16),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (any::<u8>(), prop_oneof![1u32..5, Just(70_000u32)])
                    .prop_map(|(k, n)| Op::Download(k % 16, n)),
                (any::<u8>(), 1u16..400).prop_map(|(k, s)| Op::Admit(k % 16, s)),
                (any::<u8>(), 1u16..400).prop_map(|(k, s)| Op::Put(k % 16, s)),
                (any::<u8>(), 1u16..400).prop_map(|(k, s)| Op::Reserve(k % 16, s)),
                Just(Op::Release),
                any::<u8>().prop_map(|k| Op::Remove(k % 16)),
                (0u16..600).prop_map(Op::Advance),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn random_operations_never_exceed_max_bytes(ops in proptest::collection::vec(op(), 1..60)) {
                let clock = Arc::new(ManualClock::default());
                let m = Arc::new(MemoryStore::with_clock(&config(1000), clock.clone()));
                let mut held = Vec::new();
                for op in ops {
                    match op {
                        Op::Download(k, n) => bulk_download(&m, &key(k.into()), n),
                        Op::Admit(k, s) => {
                            m.admit(key(k.into()), obj(s.into()));
                        }
                        Op::Put(k, s) => {
                            m.put(key(k.into()), obj(s.into()));
                        }
                        Op::Reserve(k, s) => {
                            if let Ok(r) = m.reserve(&key(k.into()), s.into(), k % 2 == 0) {
                                held.push((k, r));
                            }
                        }
                        Op::Release => {
                            if let Some((k, r)) = held.pop() {
                                let size = r.size() as usize;
                                r.offer(key(k.into()), obj(size), m.epoch());
                            }
                        }
                        Op::Remove(k) => {
                            m.remove(&key(k.into()));
                        }
                        Op::Advance(s) => clock.advance(Duration::from_secs(s.into())),
                    }
                    m.check_invariants();
                }
            }
        }
    }

    #[test]
    fn fenwick_prefix_sums() {
        let mut f = Fenwick::new();
        f.add(0, 5);
        f.add(3, 7);
        f.add(MAX_POPULARITY + 10, 11);
        assert_eq!(f.below(0), 0);
        assert_eq!(f.below(1), 5);
        assert_eq!(f.below(4), 12);
        assert_eq!(f.below(MAX_POPULARITY + 1), 23);
        f.add(3, -7);
        assert_eq!(f.below(4), 5);
    }
}
