//! This replica's quarantines merged with every shard's, every `quarantine_sync`: a shard that
//! lost them (eviction, restart, or joining the ring) gets them back, with its objects of that
//! media deleted, and this replica learns the quarantines made elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tracing::{debug, warn};

use super::scripts::{self, QuarantineSync};
use crate::clock;
use crate::key::{origin_pattern, origin_variants_pattern};
use crate::ring::Ring;
use crate::shard::{Shard, ShardError};
use crate::store::quarantine::Quarantine;

/// Where this replica's quarantines stand on each shard.
#[derive(Default)]
pub(super) struct Synced {
    /// Per shard: the token of its quarantine hash when last merged, and the generation of this
    /// replica's quarantines last pushed to it.
    synced: Mutex<HashMap<String, (String, u64)>>,
    /// Quarantined origins (shard, origin) whose objects are still to be deleted from a shard
    /// that had lost the quarantine.
    origin_walks: Mutex<HashSet<(String, String)>>,
}

impl Synced {
    /// Merges `quarantine` (this replica's) with every shard's. Per shard it costs one small
    /// round trip while nothing changed: the replica pushes only the quarantines it set or
    /// learned since it last pushed to that shard, and pulls the shard's only when the shard's
    /// hash changed. A shard whose hash is another one (evicted, restarted, new to this replica)
    /// gets everything.
    pub(super) async fn run(&self, ring: &Ring, quarantine: &Quarantine) {
        if ring.is_empty() {
            return;
        }
        let generation = quarantine.generation();
        let live = quarantine.live(clock::unix_ms());
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
                let first = scripts::sync_quarantine(shard, &known, push).await;
                fn identity(token: &str) -> &str {
                    token.split(':').next().unwrap_or("")
                }
                let result = match first {
                    // Another hash than the one this replica knew: it may lack anything.
                    Ok(changed) if !fresh && identity(&changed.token) != identity(&known) => {
                        scripts::sync_quarantine(shard, &changed.token, all())
                            .await
                            .map(|again| QuarantineSync {
                                held: again.held.or(changed.held),
                                lacked: [changed.lacked, again.lacked].concat(),
                                ..again
                            })
                    }
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
                    debug!(shard = %shard.name(), error = %e, "quarantine sync skipped");
                    continue;
                }
            };
            if !sync.lacked.is_empty() {
                warn!(
                    shard = %shard.name(),
                    restored = sync.lacked.len(),
                    "shard had lost quarantines; written back and their media deleted there"
                );
                quarantine.count_restored(shard.name(), sync.lacked.len() as u64);
                let mut walks = self.origin_walks.lock().unwrap_or_else(|p| p.into_inner());
                for origin in sync.lacked.iter().filter_map(|f| f.strip_suffix("|*")) {
                    walks.insert((shard.name().to_owned(), origin.to_owned()));
                }
            }
            if let Some(held) = sync.held {
                quarantine.learn(held);
            }
            let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            synced.insert(shard.name().to_owned(), (sync.token, generation));
        }
        self.walk_quarantined_origins(ring).await;
    }

    /// Deletes the objects of quarantined origins from the shards that had lost the quarantine
    /// (a Put may have been stored meanwhile); a walk that fails is tried again next time.
    async fn walk_quarantined_origins(&self, ring: &Ring) {
        let walks: Vec<(String, String)> = {
            let walks = self.origin_walks.lock().unwrap_or_else(|p| p.into_inner());
            walks.iter().cloned().collect()
        };
        for (name, origin) in walks {
            let Some((shard, _)) = ring.find(&name) else {
                // The shard left the ring: nothing of it is read any more.
                self.origin_walks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(name, origin));
                continue;
            };
            let done = match delete_origin(shard, &origin, |_| {}).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(shard = %name, origin, error = %e, "quarantined origin not deleted yet; trying again at the next sync");
                    false
                }
            };
            if done {
                self.origin_walks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(name, origin));
            }
        }
    }
}

/// Deletes every object of `origin` on `shard` and then their variant indexes, a `SCAN` page at
/// a time, calling `progress` with the objects removed so far; returns how many.
pub(super) async fn delete_origin(
    shard: &Shard,
    origin: &str,
    progress: impl FnMut(u64) + Send,
) -> Result<u64, ShardError> {
    let removed = shard
        .delete_matching_with(&origin_pattern(origin), progress)
        .await?;
    shard
        .delete_matching(&origin_variants_pattern(origin))
        .await?;
    Ok(removed)
}
