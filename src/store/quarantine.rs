//! Quarantined media, remembered by every replica and by every shard, so that a quarantine holds
//! for its whole TTL whatever the shards evict, and on shards that join or come back empty.
//!
//! - Each shard holds one hash, [`crate::key::QUARANTINE_KEY`]: a field per quarantined media
//!   (`origin|media_id`) or origin (`origin|*`), whose value is when it ends (unix ms). Every
//!   publish reads it inside its script, so a Put is refused atomically, and the key is hot for
//!   `allkeys-lfu`, the last a shard under pressure would evict.
//! - Every replica holds the union of the quarantines it made and learned. Puts are checked
//!   against it before they start and again before they publish, so a shard that lost its hash
//!   cannot let a Put through meanwhile.
//! - Every `quarantine_sync`, each replica merges its set with each shard's in one script: fields
//!   a shard lacks are written back (a shard that evicted the hash, restarted empty, or just
//!   joined the ring), counted as `mediacache_quarantine_restored_total{shard}` and logged; fields
//!   the replica lacks are learned. A quarantine is lost only if every shard and every replica
//!   forget it at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[cfg(test)]
use crate::key::origin_quarantine_field as origin_field;
use crate::key::{quarantine_field as media_field, Key};
use crate::shard::ShardLabel;

/// Stands for "every media" of an origin (never a valid media id).
const WHOLE_ORIGIN: &str = "*";

/// origin → media id (or `*`) → (end in unix ms, the generation that set it).
type Entries = HashMap<String, HashMap<String, (i64, u64)>>;

/// This replica's quarantines.
#[derive(Default)]
pub struct Quarantine {
    /// Read on every Get without a lock; replaced whole (copy on write) by the rare changes.
    entries: ArcSwap<Entries>,
    /// Serialises the changes.
    writer: Mutex<()>,
    /// Bumped by every quarantine added or lengthened, which records the value: what a shard
    /// was last given is known by the generation it was given at.
    generation: AtomicU64,
    /// Fields written back to a shard that had lost them, by shard.
    restored: Family<ShardLabel, Counter>,
}

impl Quarantine {
    /// Records the quarantine of `field` (`origin|media_id` or `origin|*`) ending at `until`
    /// (unix ms); a longer one already held is kept.
    pub fn add(&self, field: &str, until: i64) {
        self.learn([(field.to_owned(), until)]);
    }

    /// Records many quarantines at once (what a shard holds); one copy of the set at most.
    pub fn learn(&self, fields: impl IntoIterator<Item = (String, i64)>) {
        let _writing = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.entries.load();
        let mut next: Option<Entries> = None;
        for (field, until) in fields {
            let Some((origin, media_id)) = field.split_once('|') else {
                continue;
            };
            let held = next.as_ref().unwrap_or(&current);
            let known = held
                .get(origin)
                .and_then(|m| m.get(media_id))
                .is_some_and(|(end, _)| *end >= until);
            if known {
                continue;
            }
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            next.get_or_insert_with(|| (**current).clone())
                .entry(origin.to_owned())
                .or_default()
                .insert(media_id.to_owned(), (until, generation));
        }
        if let Some(next) = next {
            self.entries.store(Arc::new(next));
        }
    }

    /// Changes so far (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether Puts of `key` are refused, and reads of it are misses, at `now` (unix ms).
    pub fn covers(&self, key: &Key, now: i64) -> bool {
        let entries = self.entries.load();
        if entries.is_empty() {
            return false;
        }
        entries.get(key.origin()).is_some_and(|media| {
            [key.media_id(), WHOLE_ORIGIN]
                .iter()
                .any(|m| media.get(*m).is_some_and(|(until, _)| *until > now))
        })
    }

    /// The quarantines running at `now` as (field, end, the generation that set it). Ended ones
    /// are forgotten.
    pub fn live(&self, now: i64) -> Vec<(String, i64, u64)> {
        self.forget_ended(now);
        self.entries
            .load()
            .iter()
            .flat_map(|(origin, media)| {
                media
                    .iter()
                    .filter(move |(_, (until, _))| *until > now)
                    .map(move |(m, (until, generation))| {
                        (media_field(origin, m), *until, *generation)
                    })
            })
            .collect()
    }

    fn forget_ended(&self, now: i64) {
        let ended = |entries: &Entries| {
            entries
                .values()
                .any(|media| media.values().any(|(until, _)| *until <= now))
        };
        if !ended(&self.entries.load()) {
            return;
        }
        let _writing = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = (**self.entries.load()).clone();
        for media in next.values_mut() {
            media.retain(|_, (until, _)| *until > now);
        }
        next.retain(|_, media| !media.is_empty());
        self.entries.store(Arc::new(next));
    }

    /// Counts fields written back to `shard`.
    pub fn count_restored(&self, shard: &str, n: u64) {
        self.restored
            .get_or_create(&ShardLabel {
                shard: shard.to_owned(),
            })
            .inc_by(n);
    }

    /// The restored-quarantines counter, for the metrics registry.
    pub fn restored_counter(&self) -> Family<ShardLabel, Counter> {
        self.restored.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_and_origin_quarantines_end_on_time() {
        let q = Quarantine::default();
        let key = Key::new("example.org", "m1", "thumb/1x1/crop").unwrap();
        assert!(!q.covers(&key, 0));
        q.add(&media_field("example.org", "m1"), 100);
        assert!(q.covers(&key, 99));
        assert!(!q.covers(&key, 100));
        q.add(&media_field("example.org", "m1"), 50);
        assert!(
            q.covers(&key, 99),
            "a shorter quarantine does not cut a longer one"
        );
        q.learn([(origin_field("example.org"), 200)]);
        assert!(q.covers(&Key::new("example.org", "other", "").unwrap(), 150));
        assert!(!q.covers(&Key::new("example.com", "m1", "").unwrap(), 150));
        let since = |q: &Quarantine, generation: u64| -> Vec<(String, i64)> {
            q.live(150)
                .into_iter()
                .filter(|(_, _, g)| *g > generation)
                .map(|(f, until, _)| (f, until))
                .collect()
        };
        assert_eq!(since(&q, 0), vec![(origin_field("example.org"), 200)]);
        let generation = q.generation();
        assert!(since(&q, generation).is_empty(), "nothing set since");
        q.add(&media_field("example.com", "n"), 300);
        assert_eq!(
            since(&q, generation),
            vec![(media_field("example.com", "n"), 300)],
            "only what was set since"
        );
        q.learn([(media_field("example.com", "n"), 300)]);
        assert_eq!(
            q.generation(),
            generation + 1,
            "what is known changes nothing"
        );
    }
}
