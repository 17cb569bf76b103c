//! Cluster-wide events over Redis pub/sub: every replica subscribes to one channel on every shard.
//!
//! - `filled` / `released`: an object was published or a fill lease was given up, so callers
//!   waiting for that key (on any replica) look again instead of polling Redis. A `filled`
//!   carries the publish's nonce: a memory-tier copy of any other publish of the key is dropped.
//! - `purge`: drop a key (or every variant of a media) from this replica's memory tier.
//!
//! Messages are published on the shard that owns the key (fills, leases) or on every shard
//! (purges); a replica may get a purge once per shard, which is harmless. A subscription that
//! lagged behind or reconnected may have missed some: [`Events::lost`] then drops the whole
//! memory tier and wakes every waiter, since nothing in it can be proven fresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::key::{Key, SCHEMA_MAJOR};

/// The pub/sub channel, versioned like the keys.
pub fn channel() -> String {
    format!("mc:{SCHEMA_MAJOR}:events")
}

const SEP: char = '\u{1f}';

/// One event, as carried in a pub/sub message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The object under this Redis key was published, with this nonce (absent from replicas
    /// that predate it: those only wake waiters).
    Filled {
        key: String,
        version: Option<u64>,
    },
    /// The fill lease of this Redis key was released without an object.
    Released(String),
    Purge {
        key: Key,
        all_variants: bool,
    },
    /// Drop every media of an origin.
    PurgeOrigin(String),
    /// A quarantine (field `origin|media_id` or `origin|*`) ending at `until` (unix ms): sent
    /// with the purge that makes it, so every replica refuses the media at once, whatever the
    /// shards later lose.
    Quarantine {
        field: String,
        until: i64,
    },
}

impl Event {
    pub fn encode(&self) -> String {
        match self {
            Event::Filled {
                key,
                version: Some(v),
            } => format!("filled{SEP}{key}{SEP}{v:016x}"),
            Event::Filled { key, version: None } => format!("filled{SEP}{key}"),
            Event::Released(k) => format!("released{SEP}{k}"),
            Event::Purge { key, all_variants } => format!(
                "purge{SEP}{}{SEP}{}{SEP}{}{SEP}{}",
                key.origin(),
                key.media_id(),
                key.variant(),
                u8::from(*all_variants)
            ),
            Event::PurgeOrigin(origin) => format!("purge_origin{SEP}{origin}"),
            Event::Quarantine { field, until } => format!("quarantine{SEP}{field}{SEP}{until}"),
        }
    }

    /// Parses a message; anything malformed (another program on the channel) is `None`.
    pub fn decode(text: &str) -> Option<Event> {
        let parts: Vec<&str> = text.split(SEP).collect();
        match parts.as_slice() {
            ["filled", k] => Some(Event::Filled {
                key: (*k).to_owned(),
                version: None,
            }),
            ["filled", k, v] => Some(Event::Filled {
                key: (*k).to_owned(),
                version: Some(u64::from_str_radix(v, 16).ok()?),
            }),
            ["released", k] => Some(Event::Released((*k).to_owned())),
            ["purge_origin", origin] => {
                crate::key::check_origin(origin).ok()?;
                Some(Event::PurgeOrigin((*origin).to_owned()))
            }
            ["quarantine", field, until] => {
                let (origin, media_id) = field.split_once('|')?;
                crate::key::check_origin(origin).ok()?;
                if media_id != "*" {
                    Key::new(origin, media_id, "").ok()?;
                }
                Some(Event::Quarantine {
                    field: (*field).to_owned(),
                    until: until.parse().ok()?,
                })
            }
            ["purge", origin, media_id, variant, all] => Some(Event::Purge {
                key: Key::new(origin, media_id, variant).ok()?,
                all_variants: *all == "1",
            }),
            _ => None,
        }
    }
}

/// Labels of the lost-events counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct LostLabels {
    pub shard: String,
    /// `lagged` (the subscription fell behind a burst) or `reconnected`.
    pub reason: String,
}

/// What a replica does with the events beyond waking its waiters: the store registers one (it
/// drops memory-tier copies and records quarantines), so this module knows nothing of the store.
pub trait Listener: Send + Sync {
    /// An event arrived (from any shard, or from this replica itself).
    fn apply(&self, event: &Event);
    /// Events may have been missed: forget everything that cannot be proven fresh; returns how
    /// many objects were dropped.
    fn forget_all(&self) -> u64;
}

/// Dispatches events to local waiters and to the store's [`Listener`].
pub struct Events {
    listener: Arc<dyn Listener>,
    /// Waiters per Redis key; entries go away with their last waiter.
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
    /// Times a subscription may have missed events, by shard and reason; exported as
    /// `mediacache_events_lost_total`.
    lost: Family<LostLabels, Counter>,
    /// When each shard's last loss was logged: a burst that overflows the buffer again and
    /// again is one warning, not one per overflow.
    warned: Mutex<HashMap<String, std::time::Instant>>,
}

/// Losses of one shard closer together than this are logged once.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Events {
    pub fn new(listener: Arc<dyn Listener>) -> Arc<Self> {
        Arc::new(Self {
            listener,
            waiters: Mutex::new(HashMap::new()),
            lost: Family::default(),
            warned: Mutex::default(),
        })
    }

    /// The lost-events counter, for the metrics registry.
    pub fn lost_counter(&self) -> Family<LostLabels, Counter> {
        self.lost.clone()
    }

    /// A subscription on `shard` may have missed events (it lagged behind or reconnected): a
    /// purge may be among them, so the memory tier is dropped whole and copies in flight are
    /// refused, and every waiter looks again.
    pub fn lost(&self, shard: &str, reason: &'static str) {
        let dropped = self.forget_all();
        let now = std::time::Instant::now();
        let first = {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            let last = warned.insert(shard.to_owned(), now);
            last.is_none_or(|last| now.duration_since(last) >= WARN_EVERY)
        };
        if first {
            warn!(
                shard,
                reason, dropped, "events may have been missed; memory tier dropped"
            );
        } else {
            debug!(shard, reason, dropped, "events may have been missed again");
        }
        self.lost
            .get_or_create(&LostLabels {
                shard: shard.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Drops the memory tier (refusing copies in flight) and wakes every waiter; returns the
    /// objects dropped. Part of [`Events::lost`], and repeated on its own once a reconnected
    /// subscription is confirmed.
    pub fn forget_all(&self) -> u64 {
        let dropped = self.listener.forget_all();
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for n in waiters.values().filter_map(Weak::upgrade) {
            n.notify_waiters();
        }
        dropped
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

    /// Wakes the waiters of a key (a local fill or release in memory-only mode).
    pub fn wake(&self, redis_key: &str) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiters.get(redis_key).and_then(Weak::upgrade) {
            n.notify_waiters();
        }
    }

    /// Applies an event from any shard (or from this replica itself).
    pub fn handle(&self, event: Event) {
        debug!(?event, "event");
        self.listener.apply(&event);
        if let Event::Filled { key, .. } | Event::Released(key) = &event {
            self.wake(key);
        }
    }
}

/// What a shard's subscription delivers: each message decoded and applied, and a possible loss
/// handled as [`Events::lost`] says.
impl crate::shard::Subscription for Events {
    fn channel(&self) -> String {
        channel()
    }

    fn message(&self, text: &str) {
        // Anything malformed (another program on the channel) is ignored.
        if let Some(event) = Event::decode(text) {
            self.handle(event);
        }
    }

    fn lost(&self, shard: &str, reason: &'static str) {
        Events::lost(self, shard, reason);
    }

    fn resubscribed(&self) {
        self.forget_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_junk_is_ignored() {
        let key = Key::new("example.org:8448", "m_1", "thumb/1x1/crop").unwrap();
        for e in [
            Event::Filled {
                key: key.redis_key(),
                version: Some(7),
            },
            Event::Filled {
                key: key.redis_key(),
                version: None,
            },
            Event::Released(key.redis_key()),
            Event::Purge {
                key: key.clone(),
                all_variants: true,
            },
            Event::PurgeOrigin("example.org".into()),
            Event::Quarantine {
                field: "example.org|m_1".into(),
                until: 1_800_000_000_000,
            },
            Event::Quarantine {
                field: "example.org|*".into(),
                until: 1,
            },
        ] {
            assert_eq!(Event::decode(&e.encode()), Some(e));
        }
        assert_eq!(Event::decode("hello"), None);
        assert_eq!(
            Event::decode(&format!("purge{SEP}bad origin{SEP}m{SEP}{SEP}0")),
            None
        );
    }

    /// Records what it is told, for the dispatch tests.
    #[derive(Default)]
    struct Recorder {
        applied: Mutex<Vec<Event>>,
        forgotten: std::sync::atomic::AtomicU64,
    }

    impl Listener for Recorder {
        fn apply(&self, event: &Event) {
            self.applied.lock().unwrap().push(event.clone());
        }
        fn forget_all(&self) -> u64 {
            self.forgotten
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            7
        }
    }

    #[tokio::test]
    async fn lost_events_forget_everything_and_wake_every_waiter() {
        let recorder = Arc::new(Recorder::default());
        let events = Events::new(recorder.clone());
        let (a, b) = (events.watch("a"), events.watch("b"));
        let (woken_a, woken_b) = (a.notified(), b.notified());
        events.lost("shard-0", "lagged");
        tokio::time::timeout(std::time::Duration::from_secs(1), async {
            woken_a.await;
            woken_b.await;
        })
        .await
        .expect("every waiter woken");
        let forgotten = recorder
            .forgotten
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(forgotten, 1, "the store is told to forget");
        let counted = events
            .lost
            .get_or_create(&LostLabels {
                shard: "shard-0".into(),
                reason: "lagged".into(),
            })
            .get();
        assert_eq!(counted, 1);
    }

    #[tokio::test]
    async fn waiters_are_woken_by_fills() {
        let recorder = Arc::new(Recorder::default());
        let events = Events::new(recorder.clone());
        let n = events.watch("k");
        let woken = n.notified();
        events.handle(Event::Released("other".into()));
        events.handle(Event::Released("k".into()));
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("woken");
        assert_eq!(
            recorder.applied.lock().unwrap().len(),
            2,
            "the store sees each event"
        );
    }
}
