//! Cluster-wide events over Redis pub/sub: every replica subscribes to one channel on every shard.
//!
//! - `filled` / `released`: an object was published or a fill lease was given up, so callers
//!   waiting for that key (on any replica) look again instead of polling Redis.
//! - `purge`: drop a key (or every variant of a media) from this replica's memory tier.
//!
//! Messages are published on the shard that owns the key (fills, leases) or on every shard
//! (purges); a replica may get a purge once per shard, which is harmless.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;
use tracing::debug;

use crate::key::{Key, SCHEMA_MAJOR};
use crate::store::memory::MemoryStore;

/// The pub/sub channel, versioned like the keys.
pub fn channel() -> String {
    format!("mc:{SCHEMA_MAJOR}:events")
}

const SEP: char = '\u{1f}';

/// One event, as carried in a pub/sub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The object under this Redis key was published.
    Filled(String),
    /// The fill lease of this Redis key was released without an object.
    Released(String),
    Purge {
        key: Key,
        all_variants: bool,
    },
    /// Drop every media of an origin.
    PurgeOrigin(String),
}

impl Event {
    pub fn encode(&self) -> String {
        match self {
            Event::Filled(k) => format!("filled{SEP}{k}"),
            Event::Released(k) => format!("released{SEP}{k}"),
            Event::Purge { key, all_variants } => format!(
                "purge{SEP}{}{SEP}{}{SEP}{}{SEP}{}",
                key.origin(),
                key.media_id(),
                key.variant(),
                u8::from(*all_variants)
            ),
            Event::PurgeOrigin(origin) => format!("purge_origin{SEP}{origin}"),
        }
    }

    /// Parses a message; anything malformed (another program on the channel) is `None`.
    pub fn decode(text: &str) -> Option<Event> {
        let parts: Vec<&str> = text.split(SEP).collect();
        match parts.as_slice() {
            ["filled", k] => Some(Event::Filled((*k).to_owned())),
            ["released", k] => Some(Event::Released((*k).to_owned())),
            ["purge_origin", origin] => {
                crate::key::check_origin(origin).ok()?;
                Some(Event::PurgeOrigin((*origin).to_owned()))
            }
            ["purge", origin, media_id, variant, all] => Some(Event::Purge {
                key: Key::new(origin, media_id, variant).ok()?,
                all_variants: *all == "1",
            }),
            _ => None,
        }
    }
}

/// Dispatches events to local waiters and to the memory tier.
pub struct Events {
    memory: Arc<MemoryStore>,
    /// Waiters per Redis key; entries go away with their last waiter.
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Events {
    pub fn new(memory: Arc<MemoryStore>) -> Arc<Self> {
        Arc::new(Self {
            memory,
            waiters: Mutex::new(HashMap::new()),
        })
    }

    /// A handle that is notified when the key is filled or its lease released. Register before
    /// checking the state, so that an event between the check and the wait is not lost.
    pub fn watch(&self, redis_key: &str) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.retain(|_, w| w.strong_count() > 0);
        if let Some(existing) = waiters.get(redis_key).and_then(Weak::upgrade) {
            return existing;
        }
        let notify = Arc::new(Notify::new());
        waiters.insert(redis_key.to_owned(), Arc::downgrade(&notify));
        notify
    }

    fn wake(&self, redis_key: &str) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiters.get(redis_key).and_then(Weak::upgrade) {
            n.notify_waiters();
        }
    }

    /// Applies an event from any shard (or from this replica itself).
    pub fn handle(&self, event: Event) {
        debug!(?event, "event");
        match event {
            Event::Filled(k) | Event::Released(k) => self.wake(&k),
            Event::Purge { key, all_variants } => {
                if all_variants {
                    self.memory.remove_variants(&key);
                } else {
                    self.memory.remove(&key);
                }
            }
            Event::PurgeOrigin(origin) => {
                self.memory.remove_origin(&origin);
            }
        }
    }

    pub fn handle_message(&self, text: &str) {
        if let Some(event) = Event::decode(text) {
            self.handle(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_junk_is_ignored() {
        let key = Key::new("example.org:8448", "m_1", "thumb/1x1/crop").unwrap();
        for e in [
            Event::Filled(key.redis_key()),
            Event::Released(key.redis_key()),
            Event::Purge {
                key: key.clone(),
                all_variants: true,
            },
            Event::PurgeOrigin("example.org".into()),
        ] {
            assert_eq!(Event::decode(&e.encode()), Some(e));
        }
        assert_eq!(Event::decode("hello"), None);
        assert_eq!(
            Event::decode(&format!("purge{SEP}bad origin{SEP}m{SEP}{SEP}0")),
            None
        );
    }

    #[tokio::test]
    async fn waiters_are_woken_by_fills() {
        let events = Events::new(Arc::new(MemoryStore::new(&Default::default())));
        let n = events.watch("k");
        let woken = n.notified();
        events.handle(Event::Filled("other".into()));
        events.handle(Event::Filled("k".into()));
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("woken");
    }
}
