//! The memory tier's state under its one lock: the download tracker, the entries with their
//! eviction index and the Fenwick tree over popularity, and the invalidation log that refuses
//! copies a purge made stale.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::key::Key;
use crate::proto::MediaInfo;

/// Popularity counts above this are treated as equal (the Fenwick tree's size).
pub(super) const MAX_POPULARITY: u32 = (1 << 16) - 1;
/// Buckets the tracked window is divided into.
pub(super) const BUCKETS: u64 = 30;
/// Keys the download tracker holds at most; under a flood of unique keys the oldest buckets are
/// dropped early, so the window shrinks instead of memory growing.
pub const MAX_TRACKED_KEYS: usize = 1_000_000;

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
pub(super) struct Policy {
    pub(super) max_bytes: u64,
    pub(super) max_object_bytes: u64,
    pub(super) bucket_ms: u64,
    pub(super) min_downloads: u32,
    pub(super) min_cache_ms: u64,
    pub(super) min_evicted_ms: u64,
}

/// What an invalidation covers.
#[derive(Debug, Clone)]
pub(super) enum Scope {
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
    pub(super) fn covers(&self, key: &Key, hash: u64, version: u64) -> bool {
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
pub(super) const INVALIDATION_LOG: usize = 65_536;

#[derive(Default)]
pub(super) struct Tracker {
    /// Oldest first; each holds the downloads per key hash in its time span.
    pub(super) buckets: VecDeque<(u64, HashMap<u64, u32>)>,
    pub(super) totals: HashMap<u64, u32>,
}

impl Tracker {
    pub(super) fn popularity(&self, h: u64) -> u32 {
        capped(self.totals.get(&h).copied().unwrap_or(0))
    }

    /// Drops the oldest bucket; returns the keys whose totals fell, with their new totals.
    pub(super) fn drop_oldest(&mut self, changed: &mut Vec<(u64, u32)>) {
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
    pub(super) fn advance(&mut self, bucket: u64, changed: &mut Vec<(u64, u32)>) {
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
    pub(super) fn record(&mut self, h: u64, changed: &mut Vec<(u64, u32)>) -> Option<u32> {
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
pub(super) fn capped(pop: u32) -> u32 {
    pop.min(MAX_POPULARITY)
}

/// Bytes of mature entries per popularity value, with prefix sums in O(log n).
pub(super) struct Fenwick(Vec<u64>);

impl Fenwick {
    pub(super) fn new() -> Self {
        Self(vec![0; MAX_POPULARITY as usize + 2])
    }
    pub(super) fn add(&mut self, pop: u32, delta: i64) {
        let mut i = pop.min(MAX_POPULARITY) as usize + 1;
        while i < self.0.len() {
            self.0[i] = self.0[i].wrapping_add_signed(delta);
            i += i & i.wrapping_neg();
        }
    }
    /// Sum over popularity values below `pop`.
    pub(super) fn below(&self, pop: u32) -> u64 {
        let mut i = pop.min(MAX_POPULARITY + 1) as usize;
        let mut sum = 0u64;
        while i > 0 {
            sum = sum.wrapping_add(self.0[i]);
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

pub(super) struct Entry {
    pub(super) key: Key,
    pub(super) object: Arc<Object>,
    pub(super) cached_at: u64,
    /// Popularity under which the entry sits in the eviction index; `None` while young.
    pub(super) indexed: Option<u32>,
}

impl Entry {
    pub(super) fn size(&self) -> u64 {
        self.object.body.len() as u64
    }
}

pub(super) struct Inner {
    pub(super) tracker: Tracker,
    pub(super) entries: HashMap<u64, Entry>,
    /// Mature entries by (popularity, size, key hash): the eviction order.
    pub(super) index: BTreeSet<(u32, u64, u64)>,
    pub(super) mature_bytes: Fenwick,
    /// Entries not yet past `min_cache_time`, oldest first.
    pub(super) young: VecDeque<(u64, u64)>,
    /// Recently evicted keys and when their exclusion ends, with the same in time order.
    pub(super) excluded: HashMap<u64, u64>,
    pub(super) excluded_order: VecDeque<(u64, u64)>,
    pub(super) bytes: u64,
    /// Bytes promised to copies being gathered; `bytes + reserved` never exceeds `max_bytes`.
    pub(super) reserved: u64,
    /// Bumped by every invalidation; a copy records it when it starts.
    pub(super) epoch: u64,
    /// The latest invalidations with the epoch each one made, oldest first.
    pub(super) invalidations: VecDeque<(u64, Scope)>,
    pub(super) stats: MemoryStats,
}

impl Inner {
    pub(super) fn invalidate(&mut self, scope: Scope) {
        self.epoch += 1;
        if self.invalidations.len() == INVALIDATION_LOG {
            self.invalidations.pop_front();
        }
        self.invalidations.push_back((self.epoch, scope));
    }

    /// Whether a copy of `key` (hash `hash`) at `version` started at epoch `since` is still
    /// current. Only the invalidations after `since` are looked at, newest first.
    pub(super) fn current(&self, key: &Key, hash: u64, version: u64, since: u64) -> bool {
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

    pub(super) fn unindex(&mut self, h: u64) {
        if let Some(entry) = self.entries.get_mut(&h) {
            if let Some(pop) = entry.indexed.take() {
                let size = entry.object.body.len() as u64;
                self.index.remove(&(pop, size, h));
                self.mature_bytes.add(pop, -(size as i64));
            }
        }
    }

    pub(super) fn index_at(&mut self, h: u64, pop: u32) {
        let pop = capped(pop);
        if let Some(entry) = self.entries.get_mut(&h) {
            let size = entry.object.body.len() as u64;
            entry.indexed = Some(pop);
            self.index.insert((pop, size, h));
            self.mature_bytes.add(pop, size as i64);
        }
    }

    /// A tracked total changed: move the entry in the eviction order if it is mature.
    pub(super) fn repopularize(&mut self, h: u64, pop: u32) {
        if self.entries.get(&h).is_some_and(|e| e.indexed.is_some()) {
            self.unindex(h);
            self.index_at(h, pop);
        }
    }

    pub(super) fn remove(&mut self, h: u64) -> Option<Entry> {
        self.unindex(h);
        let entry = self.entries.remove(&h)?;
        self.bytes -= entry.size();
        Some(entry)
    }

    /// Brings time forward: expire tracker buckets, mature young entries, end exclusions.
    pub(super) fn tick(&mut self, now: u64, policy: &Policy) {
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
    pub(super) fn check(
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
    pub(super) fn make_room(&mut self, size: u64, pop: u32, now: u64, policy: &Policy) {
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

    pub(super) fn insert(&mut self, h: u64, key: Key, object: Object, now: u64) {
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

    pub(super) fn count_refusal(&mut self, why: Admission) {
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
