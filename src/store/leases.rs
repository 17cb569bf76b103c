//! Fill leases: who fetches a missing key from the media repo's own storage while others wait.
//!
//! A lease is taken where the ring says at that moment: on the key's shard, or with an empty
//! ring (memory-only mode) in this replica. Its token names that place, and it is released
//! there whatever the ring became since: a lease taken in memory and given up after a reload to
//! N shards still frees its waiters at once, a reload back to none finds no stale lease, and a
//! lease taken on a shard is released on that shard after a reload gave the key another owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::debug;

use super::redis::RedisStore;
use super::types::{lease_shard, lease_token, LeaseAttempt};
use crate::events::Events;
use crate::key::Key;

pub(super) struct Leases {
    ttl: Duration,
    /// Leases taken while the ring was empty: Redis key → token and expiry.
    local: Mutex<HashMap<String, (String, Instant)>>,
    /// Wakes this replica's waiters when a local lease is released.
    events: Arc<Events>,
    /// Gets waiting for another caller's fill right now.
    waiting: Arc<AtomicU64>,
}

impl Leases {
    pub(super) fn new(ttl: Duration, events: Arc<Events>) -> Self {
        Self {
            ttl,
            local: Mutex::default(),
            events,
            waiting: Arc::default(),
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        local.retain(|_, (_, until)| *until > now);
        local
    }

    /// Takes the key's lease where the ring says now: on its shard, or with no shards here.
    pub(super) async fn acquire(&self, redis: &RedisStore, key: &Key) -> LeaseAttempt {
        if !redis.is_empty() {
            return redis.acquire_lease(key, self.ttl).await;
        }
        match self.local().entry(key.redis_key()) {
            std::collections::hash_map::Entry::Occupied(_) => LeaseAttempt::Held,
            std::collections::hash_map::Entry::Vacant(v) => {
                let token = lease_token(None);
                v.insert((token.clone(), Instant::now() + self.ttl));
                LeaseAttempt::Acquired(token)
            }
        }
    }

    /// Time left on the key's lease, wherever it was taken.
    pub(super) async fn left(&self, redis: &RedisStore, key: &Key) -> Option<Duration> {
        let local = self
            .local()
            .get(&key.redis_key())
            .map(|(_, until)| until.saturating_duration_since(Instant::now()));
        if local.is_some() || redis.is_empty() {
            return local;
        }
        redis.lease_left(key).await
    }

    /// Gives up a lease if `token` still holds it (a foreign or expired token changes nothing),
    /// and wakes the waiters, where the lease was taken: the token names the shard, or none for
    /// a lease taken in this replica's memory.
    pub(super) async fn release(&self, redis: &RedisStore, key: &Key, token: &str) {
        if lease_shard(token).is_some() {
            return redis.release_lease(key, token).await;
        }
        let redis_key = key.redis_key();
        let released_here = {
            let mut local = self.local();
            let mine = local.get(&redis_key).is_some_and(|(t, _)| t == token);
            if mine {
                local.remove(&redis_key);
            }
            mine
        };
        if released_here {
            self.events.wake(&redis_key);
        } else if !redis.is_empty() {
            // Not one of this replica's: a token from a release whose tokens named no shard.
            redis.release_lease(key, token).await;
        } else {
            debug!(key = %key, "lease to release not held (expired, or taken elsewhere)");
        }
    }

    /// Counts one Get among the waiters until the guard is dropped.
    pub(super) fn waiting(&self) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self.waiting.clone())
    }

    pub(super) fn waiters(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Counts one Get among the waiters while it waits, however its wait ends.
pub(super) struct Waiting(Arc<AtomicU64>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
