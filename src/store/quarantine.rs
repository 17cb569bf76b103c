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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

#[cfg(test)]
use crate::key::origin_quarantine_field as origin_field;
use crate::key::{quarantine_field as media_field, Key};

/// Labels of the restored-quarantines counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

/// Stands for "every media" of an origin (never a valid media id).
const WHOLE_ORIGIN: &str = "*";

/// This replica's quarantines: origin → media id (or `*`) → end (unix ms).
#[derive(Default)]
pub struct Quarantine {
    entries: Mutex<HashMap<String, HashMap<String, i64>>>,
    /// Whether `entries` may hold anything: lets the Get path skip the lock when there is no
    /// quarantine at all.
    any: AtomicBool,
    /// Bumped whenever a quarantine is added or lengthened: what the shards were last given is
    /// known by this number.
    generation: AtomicU64,
    /// Fields written back to a shard that had lost them, by shard.
    restored: Family<ShardLabel, Counter>,
}

impl Quarantine {
    /// Records the quarantine of `field` (`origin|media_id` or `origin|*`) ending at `until`
    /// (unix ms); a longer one already held is kept.
    pub fn add(&self, field: &str, until: i64) {
        let Some((origin, media_id)) = field.split_once('|') else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let end = entries
            .entry(origin.to_owned())
            .or_default()
            .entry(media_id.to_owned())
            .or_insert(i64::MIN);
        if until > *end {
            *end = until;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.any.store(true, Ordering::Release);
    }

    /// Changes so far (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether Puts of `key` are refused, and reads of it are misses, at `now` (unix ms).
    pub fn covers(&self, key: &Key, now: i64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key.origin()).is_some_and(|media| {
            [key.media_id(), WHOLE_ORIGIN]
                .iter()
                .any(|m| media.get(*m).is_some_and(|until| *until > now))
        })
    }

    /// The quarantines still running at `now` as (field, end); ended ones are forgotten.
    pub fn live(&self, now: i64) -> Vec<(String, i64)> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for media in entries.values_mut() {
            media.retain(|_, until| *until > now);
        }
        entries.retain(|_, media| !media.is_empty());
        if entries.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        entries
            .iter()
            .flat_map(|(origin, media)| {
                media
                    .iter()
                    .map(move |(m, until)| (media_field(origin, m), *until))
            })
            .collect()
    }

    /// Adds what a shard holds.
    pub fn learn(&self, fields: impl IntoIterator<Item = (String, i64)>) {
        for (field, until) in fields {
            self.add(&field, until);
        }
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
        assert_eq!(q.live(150), vec![(origin_field("example.org"), 200)]);
    }
}
