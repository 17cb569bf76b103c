//! One Redis shard: a fred pool with connect and command timeouts, plus a health state.
//!
//! A shard that failed a command is marked down and skipped (a miss, or `UNAVAILABLE` for a
//! Put) until a background ping answers again, so a dead shard costs nothing but a fast miss.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Pipeline, SubscriberClient, WithOptions};
use fred::prelude::*;
use fred::types::config::Options;
use fred::types::scan::Scanner;
use futures_util::StreamExt;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{redact_url, RedisConfig, ShardConfig};
use crate::events::{channel, Event, Events};
use crate::key::{
    origin_quarantine_field, origin_tombstone_key, quarantine_field, tombstone_key, Key,
    ORIGIN_TOMBSTONE_PREFIX, QUARANTINE_KEY, TOMBSTONE_PREFIX, VARIANTS_PREFIX,
};

/// Why a shard operation did not return a value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShardError {
    /// Known to be down; the command was not sent.
    #[error("shard {0} is down")]
    Down(String),
    /// The connection failed or timed out; the shard is now marked down.
    #[error("shard {shard}: {source}")]
    Fault { shard: String, source: Error },
    /// The shard answered with an error about the value (e.g. a foreign key of another type).
    #[error("shard {shard} rejected the command: {source}")]
    Reply { shard: String, source: Error },
}

/// How long a reconnected subscription waits for the shard to confirm it.
const RESUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Applies the events of one shard's subscription until the shard's client is closed. It never
/// ends on a lag or a reconnect: both mean events may have been missed, which is reported to
/// [`Events::lost`] before going on.
async fn listen(
    subscriber: SubscriberClient,
    shard: String,
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    events: std::sync::Weak<Events>,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Recorded even while the shard is down, and sent again on every reconnect.
    let _ = subscriber.subscribe(channel()).await;
    let mut connected_before = false;
    loop {
        tokio::select! {
            message = messages.recv() => {
                let Some(events) = events.upgrade() else { return };
                match message {
                    Ok(message) => {
                        if let Some(text) = message.value.as_str() {
                            events.handle_message(&text);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        debug!(shard = %shard, missed = n, "event subscription lagged");
                        events.lost(&shard, "lagged");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
            reconnect = reconnects.recv() => match reconnect {
                // The first connection missed nothing: nothing was cached from events before it.
                Ok(_) if !connected_before => connected_before = true,
                // Several reconnects at once are still one loss.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    let Some(events) = events.upgrade() else { return };
                    events.lost(&shard, "reconnected");
                    // And once more when the subscription is back, so that nothing published
                    // between the reconnect and the resubscription slips through.
                    let resubscribed = tokio::time::timeout(
                        RESUBSCRIBE_WAIT,
                        subscriber.subscribe(channel()),
                    )
                    .await;
                    if !matches!(resubscribed, Ok(Ok(()))) {
                        debug!(shard = %shard, "resubscribe not confirmed");
                    }
                    events.forget_all();
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Lua that sets `now` to the shard's clock in unix ms: quarantines end by it.
macro_rules! lua_now {
    () => {
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// Publishes a temporary key under its final name, only when it holds exactly the expected
/// number of bytes and the media is not quarantined: writes the final header over the draft one,
/// renames, clears the TTL, adds the key to its media's variant index and announces the fill,
/// all in one atomic step.
/// KEYS: temporary, final, quarantine hash, variant index, media tombstone, origin tombstone
/// (the tombstones are how releases before the quarantine hash quarantine). ARGV: expected
/// length, header, channel, event, media field, origin field.
/// Returns 1 published, 0 lost (temporary key missing or short), 2 quarantined.
const PUBLISH_SCRIPT: &str = concat!(
    lua_now!(),
    r#"
if redis.call('EXISTS', KEYS[5], KEYS[6]) > 0 then
  redis.call('DEL', KEYS[1])
  return 2
end
local q = redis.call('HMGET', KEYS[3], ARGV[5], ARGV[6])
for i = 1, 2 do
  if q[i] and (tonumber(q[i]) or 0) > now then
    redis.call('DEL', KEYS[1])
    return 2
  end
end
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SADD', KEYS[4], KEYS[2])
redis.call('SETRANGE', KEYS[1], 0, ARGV[2])
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#
);

/// Appends to a temporary key and renews its TTL in one step, only while the key exists: a key
/// that expired is not recreated without its header (and never lives on without a TTL).
/// KEYS: temporary. ARGV: bytes, TTL in ms. Returns the new length, 0 when the key was gone.
const APPEND_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local n = redis.call('APPEND', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return n
"#;

/// Purges one object, or with ARGV[1] = '1' every variant in its media's index, optionally
/// quarantining first, then announces the purge; one round trip, one atomic step.
/// The quarantine is also written as a tombstone key with a TTL, the form releases before the
/// quarantine hash read, so that both honour it while they run side by side.
/// KEYS: object, variant index, quarantine hash, tombstone. ARGV: all variants ('1'/'0'),
/// quarantine field ('' for none), its end (unix ms), channel, purge event, quarantine event.
/// Returns the objects deleted.
const PURGE_SCRIPT: &str = concat!(
    lua_now!(),
    r#"
if ARGV[2] ~= '' then
  if redis.call('HEXISTS', KEYS[3], '~id') == 0 then
    redis.call('HSET', KEYS[3], '~id', t[1] .. '.' .. t[2], '~gen', 0)
  end
  local current = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') or 0
  if tonumber(ARGV[3]) > current then
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
    redis.call('HINCRBY', KEYS[3], '~gen', 1)
  end
  redis.call('SET', KEYS[4], '1', 'PX', math.max(1, tonumber(ARGV[3]) - now))
  redis.call('PUBLISH', ARGV[4], ARGV[6])
end
local n = 0
if ARGV[1] == '1' then
  for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    n = n + redis.call('DEL', k)
  end
  n = n + redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
else
  n = redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], KEYS[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return n
"#
);

/// Merges a replica's quarantines into the shard's hash, and tells the replica what it holds
/// when that changed since the replica last looked.
///
/// The hash carries its identity in two fields: `~id` (set when the hash is created, so a hash
/// that was evicted or lost in a restart comes back as another one) and `~gen` (bumped by every
/// change); `id:gen` is the token a replica remembers. A pushed field that is new or longer is
/// written, with the tombstone key that releases before the hash read; if the shard lacked it,
/// the media's objects on this shard are deleted with its variant index (a Put may have stored
/// them while the field was missing). Replicas learn written-back fields by pulling, not by one event per field: a
/// hash of thousands lost at once would overflow every replica's event buffer.
/// KEYS: quarantine hash. ARGV: variant index prefix, media tombstone prefix, origin tombstone
/// prefix, the caller's token ('' none), then (field, end) for each pushed quarantine.
/// Returns {n, n fields the shard lacked, token ('' while there is no hash), then (field, end)
/// for every live quarantine only when the token differs from the caller's}. Without anything
/// to push, a missing hash is not created.
const QUARANTINE_SYNC_SCRIPT: &str = concat!(
    lua_now!(),
    r#"
local exists = redis.call('HEXISTS', KEYS[1], '~id') == 1
if not exists and #ARGV > 4 then
  redis.call('HSET', KEYS[1], '~id', t[1] .. '.' .. t[2], '~gen', 0)
  exists = true
end
local lacked = {}
for i = 5, #ARGV, 2 do
  local field = ARGV[i]
  local want = tonumber(ARGV[i + 1])
  local current = tonumber(redis.call('HGET', KEYS[1], field) or '0') or 0
  if want > now and want > current then
    redis.call('HSET', KEYS[1], field, ARGV[i + 1])
    redis.call('HINCRBY', KEYS[1], '~gen', 1)
    local whole_origin = string.sub(field, -2) == '|*'
    if whole_origin then
      redis.call('SET', ARGV[3] .. string.sub(field, 1, -3), '1', 'PX', want - now)
    else
      redis.call('SET', ARGV[2] .. field, '1', 'PX', want - now)
    end
    if current <= now then
      table.insert(lacked, field)
      if not whole_origin then
        local index = ARGV[1] .. field
        for _, k in ipairs(redis.call('SMEMBERS', index)) do
          redis.call('DEL', k)
        end
        redis.call('DEL', index)
      end
    end
  end
end
local token = ''
if exists then
  token = (redis.call('HGET', KEYS[1], '~id') or '') .. ':' ..
    (redis.call('HGET', KEYS[1], '~gen') or '0')
end
local out = {#lacked}
for _, f in ipairs(lacked) do
  table.insert(out, f)
end
table.insert(out, token)
if token ~= ARGV[4] and exists then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) ~= '~' then
      if (tonumber(all[i + 1]) or 0) <= now then
        redis.call('HDEL', KEYS[1], all[i])
      else
        table.insert(out, all[i])
        table.insert(out, all[i + 1])
      end
    end
  end
end
return out
"#
);

/// Deletes a lease only if it is still the caller's, and announces that it is free.
/// KEYS: lease. ARGV: token, channel, event.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

/// What one quarantine merge with a shard found.
#[derive(Debug, Clone)]
pub struct QuarantineSync {
    /// Fields the shard lacked and now holds again.
    pub lacked: Vec<String>,
    /// Every live quarantine of the shard, when its hash changed since the caller's token.
    pub held: Option<Vec<(String, i64)>>,
    /// The hash's token now.
    pub token: String,
}

/// The first window of a value, as [`Shard::read_first`] found it.
#[derive(Debug, Clone)]
pub struct FirstRead {
    pub first: Bytes,
    /// Length of the whole value; 0 when absent (or replaced while being read).
    pub total: u64,
    /// Whether the key is in its media's variant index.
    pub indexed: bool,
}

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Stored,
    /// The temporary key was gone or short (expired, or the shard restarted).
    Lost,
    /// A tombstone for the media was found at publish time.
    Quarantined,
}

pub struct Shard {
    name: String,
    /// The configured URL, kept to tell whether a reload changed the connection settings.
    url: String,
    /// Connection settings the pool was built with; a reload that changes them reconnects.
    redis: RedisConfig,
    pool: Pool,
    up: AtomicBool,
    /// Commands that failed for connection reasons, for metrics.
    errors: AtomicU64,
    /// Round trips of reads and writes, for metrics.
    latency: Histogram,
    command_timeout: Duration,
    health: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Wakes requests waiting on this shard when it is found down, so a command sent just
    /// before a crash is not left to run out its whole timeout.
    went_down: tokio::sync::Notify,
    /// Receives cluster events published on this shard.
    subscriber: SubscriberClient,
    /// Reads in flight, shared by every request that asks for the same bytes meanwhile: a
    /// storm of Gets for one hot object costs one read per window, not one per request.
    first_reads: InFlight<(String, usize), FirstRead>,
    window_reads: InFlight<WindowRead, (Bytes, Bytes)>,
    /// Reads answered by joining one already in flight.
    coalesced: AtomicU64,
}

type SharedRead<T> =
    futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<T, ShardError>>>;
/// Key, start, end and prefix length of a window read.
type WindowRead = (Arc<str>, u64, u64, usize);
/// Held weakly: a read whose requests all went away is dropped, not kept for a later one.
type InFlight<K, T> = std::sync::Mutex<
    std::collections::HashMap<
        K,
        futures_util::future::WeakShared<
            futures_util::future::BoxFuture<'static, Result<T, ShardError>>,
        >,
    >,
>;
/// Entries of reads nobody waits for any more are swept once a map holds this many.
const IN_FLIGHT_SWEEP: usize = 256;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("up", &self.is_up())
            .finish()
    }
}

impl Shard {
    /// Creates the pool and starts connecting. Waits at most `wait` for a first connection; a
    /// shard that is down then starts as down and is retried in the background.
    pub async fn connect(
        cfg: &ShardConfig,
        redis: &RedisConfig,
        wait: Duration,
        events: &Arc<Events>,
    ) -> Result<Arc<Shard>, Error> {
        // TLS is set up below from our own CA file, so fred is handed the plain-text form and
        // never loads the system's roots.
        let (url, tls) = match cfg.url.strip_prefix("rediss://") {
            Some(rest) => (format!("redis://{rest}"), true),
            None => (cfg.url.clone(), false),
        };
        let mut config = Config::from_url(&url)?;
        config.fail_fast = false;
        if let Some(user) = &redis.username {
            config.username = Some(user.clone());
        }
        if let Some(path) = &redis.password_file {
            config.password = Some(read_password(path)?);
        }
        if tls {
            let ca = redis.tls_ca_file.as_deref().ok_or_else(|| {
                Error::new(ErrorKind::Config, "rediss:// needs redis.tls_ca_file")
            })?;
            config.tls = Some(shard_tls(ca)?.into());
        }
        let subscriber = Builder::from_config(config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = redis.connect_timeout;
                c.internal_command_timeout = redis.command_timeout;
            })
            // Pub/sub messages buffered between the connection and the task that applies them:
            // a burst of Puts from many replicas arrives faster than it is applied for a moment.
            // Should it still overflow, the replica treats it as lost events (`Events::lost`).
            // fred sizes every notification channel of the client with it, preallocated.
            .with_performance_config(|p| {
                p.broadcast_channel_capacity = redis.event_buffer;
            })
            .set_policy(reconnect_policy())
            .build_subscriber_client()?;
        // Taken before connecting, so that the first connection is seen too.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        let _connection = subscriber.connect();
        let _resubscriber = subscriber.manage_subscriptions();
        tokio::spawn(listen(
            subscriber.clone(),
            cfg.name.clone(),
            messages,
            reconnects,
            Arc::downgrade(events),
        ));
        let pool = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = redis.connect_timeout;
                c.internal_command_timeout = redis.command_timeout;
                c.max_command_attempts = 1;
                c.tcp.nodelay = Some(true);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = redis.command_timeout;
            })
            .set_policy(reconnect_policy())
            .build_pool(redis.pool_size)?;
        let _connections = pool.connect_pool();
        // Usable as soon as one connection is: requests pick connected clients of the pool.
        let first = futures_util::future::select_ok(
            pool.clients()
                .iter()
                .map(|c| Box::pin(c.wait_for_connect())),
        );
        let up = tokio::time::timeout(wait, first)
            .await
            .is_ok_and(|r| r.is_ok());
        if !up {
            warn!(shard = %cfg.name, url = %redact_url(&cfg.url), "shard unreachable at start");
        }
        let shard = Arc::new(Shard {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            redis: redis.clone(),
            pool,
            up: AtomicBool::new(up),
            errors: AtomicU64::new(0),
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            command_timeout: redis.command_timeout,
            health: std::sync::Mutex::new(None),
            went_down: tokio::sync::Notify::new(),
            subscriber,
            first_reads: Default::default(),
            window_reads: Default::default(),
            coalesced: AtomicU64::new(0),
        });
        let task = tokio::spawn(health_loop(Arc::downgrade(&shard), redis.health_interval));
        *shard.health.lock().expect("health lock") = Some(task);
        Ok(shard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn url(&self) -> &str {
        &self.url
    }
    /// Whether this shard's client can serve `cfg` as it is: same name, URL and settings.
    pub fn serves(&self, cfg: &ShardConfig, redis: &RedisConfig) -> bool {
        self.name == cfg.name && self.url == cfg.url && &self.redis == redis
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Failed commands since this shard's client was created.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Durations of this shard's reads and writes.
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    fn observe(&self, started: std::time::Instant) {
        self.latency.observe(started.elapsed().as_secs_f64());
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                info!(shard = %self.name, "shard up");
            } else {
                warn!(shard = %self.name, "shard down");
                self.went_down.notify_waiters();
            }
        }
    }

    fn options(&self) -> Options {
        Options {
            timeout: Some(self.command_timeout),
            fail_fast: true,
            max_attempts: Some(1),
            ..Default::default()
        }
    }

    fn check_up(&self) -> Result<(), ShardError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(ShardError::Down(self.name.clone()))
        }
    }

    /// Classifies a fred error: connection trouble marks the shard down.
    fn fail(&self, e: Error) -> ShardError {
        match e.kind() {
            ErrorKind::IO
            | ErrorKind::Timeout
            | ErrorKind::Canceled
            | ErrorKind::Routing
            | ErrorKind::Backpressure
            | ErrorKind::Protocol
            | ErrorKind::Auth => {
                warn!(shard = %self.name, error = %e, "shard command failed");
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.set_up(false);
                ShardError::Fault {
                    shard: self.name.clone(),
                    source: e,
                }
            }
            _ => ShardError::Reply {
                shard: self.name.clone(),
                source: e,
            },
        }
    }

    /// A connected client of the pool, or the reason there is none.
    fn client(&self) -> Result<&Client, ShardError> {
        self.check_up()?;
        let client = self.pool.next_connected();
        if client.is_connected() {
            Ok(client)
        } else {
            Err(self.fail(Error::new(ErrorKind::IO, "not connected")))
        }
    }

    /// A pipeline on one connected client, failing fast (not queueing) if its connection drops.
    fn pipeline(&self) -> Result<Pipeline<WithOptions<Client>>, ShardError> {
        Ok(Pipeline::from(self.client()?.with_options(&self.options())))
    }

    /// Sends a pipeline under the command timeout. A pipeline keeps its commands in order on one
    /// connection, which the windowed reads rely on.
    async fn finish<R: FromValue>(
        &self,
        pipeline: Pipeline<WithOptions<Client>>,
    ) -> Result<R, ShardError> {
        self.bounded(pipeline.all::<R>()).await
    }

    /// Runs `command` under the command timeout, ended early if the shard is found down.
    async fn bounded<R>(
        &self,
        command: impl std::future::Future<Output = Result<R, Error>>,
    ) -> Result<R, ShardError> {
        let down = self.went_down.notified();
        tokio::pin!(down);
        down.as_mut().enable();
        tokio::select! {
            done = tokio::time::timeout(self.command_timeout, command) => match done {
                Ok(result) => result.map_err(|e| self.fail(e)),
                Err(_) => Err(self.fail(Error::new(ErrorKind::Timeout, "command timed out"))),
            },
            () = &mut down => Err(ShardError::Down(self.name.clone())),
        }
    }

    /// Reads answered by joining an identical read already in flight, since this client was made.
    pub fn coalesced_reads(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Joins the read of `key` in `map` if one is in flight, else starts it with `read`. The
    /// read runs to its end even if the request that started it goes away, as long as another
    /// waits for it; its entry is removed when it is done, so later requests read afresh.
    fn coalesce<K, T, F>(
        self: &Arc<Self>,
        map: fn(&Shard) -> &InFlight<K, T>,
        key: K,
        read: F,
    ) -> SharedRead<T>
    where
        K: std::hash::Hash + Eq + Clone + Send + 'static,
        T: Clone + Send + Sync + 'static,
        F: std::future::Future<Output = Result<T, ShardError>> + Send + 'static,
    {
        use futures_util::FutureExt;
        let mut reads = map(self).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(read) = reads.get(&key).and_then(|weak| weak.upgrade()) {
            self.coalesced.fetch_add(1, Ordering::Relaxed);
            return read;
        }
        if reads.len() >= IN_FLIGHT_SWEEP {
            reads.retain(|_, weak| weak.upgrade().is_some());
        }
        let shard = Arc::downgrade(self);
        let entry = key.clone();
        let shared = async move {
            let result = read.await;
            if let Some(shard) = shard.upgrade() {
                map(&shard)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&entry);
            }
            result
        }
        .boxed()
        .shared();
        if let Some(weak) = shared.downgrade() {
            reads.insert(key, weak);
        }
        shared
    }

    /// [`Shard::read_first`], shared with identical reads in flight.
    pub async fn read_first_shared(
        self: &Arc<Self>,
        key: &str,
        index: String,
        len: usize,
        prefix_len: usize,
    ) -> Result<FirstRead, ShardError> {
        let shard = self.clone();
        let owned = key.to_owned();
        self.coalesce(|s| &s.first_reads, (owned.clone(), len), async move {
            shard.read_first(&owned, &index, len, prefix_len).await
        })
        .await
    }

    /// [`Shard::read_window`], shared with identical reads in flight.
    pub async fn read_window_shared(
        self: &Arc<Self>,
        key: &Arc<str>,
        start: u64,
        end: u64,
        prefix_len: usize,
    ) -> Result<(Bytes, Bytes), ShardError> {
        let shard = self.clone();
        let owned = key.clone();
        self.coalesce(
            |s| &s.window_reads,
            (key.clone(), start, end, prefix_len),
            async move { shard.read_window(&owned, start, end, prefix_len).await },
        )
        .await
    }

    /// The first window of a value, the value's total length, and whether the key is in its
    /// media's variant index `index`.
    ///
    /// The index is asked in the same round trip: an object that is not in it would escape a
    /// purge of every variant, so it is never served; and reading the index with every object
    /// of the media keeps it at least as hot as they are for `allkeys-lfu`.
    ///
    /// A value shorter than `len` is read whole by one command, which also gives its length. A
    /// longer one costs a second round trip for its length, with its first `prefix_len` bytes
    /// read after it: if they still match, the length is that of the value first read.
    pub async fn read_first(
        &self,
        key: &str,
        index: &str,
        len: usize,
        prefix_len: usize,
    ) -> Result<FirstRead, ShardError> {
        let started = std::time::Instant::now();
        let len = len.max(prefix_len).max(1);
        let p = self.pipeline()?;
        let queued: Result<(), Error> = async {
            p.getrange::<(), _>(key, 0, len - 1).await?;
            p.sismember::<(), _, _>(index, key).await
        }
        .await;
        queued.map_err(|e| self.fail(e))?;
        let (first, indexed): (Bytes, bool) = self.finish(p).await?;
        if first.len() < len {
            self.observe(started);
            let total = first.len() as u64;
            return Ok(FirstRead {
                first,
                total,
                indexed,
            });
        }
        let p = self.pipeline()?;
        let queued: Result<(), Error> = async {
            p.strlen::<(), _>(key).await?;
            p.getrange::<(), _>(key, 0, prefix_len - 1).await
        }
        .await;
        queued.map_err(|e| self.fail(e))?;
        let (total, prefix): (u64, Bytes) = self.finish(p).await?;
        self.observe(started);
        if prefix[..] != first[..prefix_len] {
            // Replaced in between: the caller answers a miss rather than trust either read.
            return Ok(FirstRead {
                first,
                total: 0,
                indexed,
            });
        }
        Ok(FirstRead {
            first,
            total,
            indexed,
        })
    }

    /// Bytes `[start, end)` of a value and then its first `prefix_len` bytes, read in that
    /// order on one connection: if the prefix still matches, the window came from the same value.
    pub async fn read_window(
        &self,
        key: &str,
        start: u64,
        end: u64,
        prefix_len: usize,
    ) -> Result<(Bytes, Bytes), ShardError> {
        let started = std::time::Instant::now();
        let p = self.pipeline()?;
        let queued: Result<(), Error> = async {
            p.getrange::<(), _>(key, start as usize, end as usize - 1)
                .await?;
            p.getrange::<(), _>(key, 0, prefix_len - 1).await
        }
        .await;
        queued.map_err(|e| self.fail(e))?;
        let read = self.finish(p).await;
        self.observe(started);
        read
    }

    /// Takes a fill lease: `SET lease token NX PX ttl`. False when someone else holds it.
    pub async fn acquire_lease(
        &self,
        lease: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, ShardError> {
        self.check_up()?;
        let set: Option<String> = self
            .pool
            .with_options(&self.options())
            .set(
                lease,
                token,
                Some(Expiration::PX(ttl.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(set.is_some())
    }

    /// Milliseconds left on a lease; `None` when there is none.
    pub async fn lease_left(&self, lease: &str) -> Result<Option<u64>, ShardError> {
        self.check_up()?;
        let ms: i64 = self
            .pool
            .with_options(&self.options())
            .pttl(lease)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(u64::try_from(ms).ok())
    }

    /// Releases a lease if `token` still holds it, and announces `event`.
    pub async fn release_lease(
        &self,
        lease: &str,
        token: &str,
        event: String,
    ) -> Result<bool, ShardError> {
        self.check_up()?;
        let done: i64 = self
            .pool
            .with_options(&self.options())
            .eval(
                RELEASE_SCRIPT,
                vec![lease],
                vec![token.to_owned(), channel(), event],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(done == 1)
    }

    /// Merges `quarantines` (field, end in unix ms) into this shard's quarantine hash (see
    /// [`QUARANTINE_SYNC_SCRIPT`]); `known` is the token this caller saw last.
    pub async fn sync_quarantine<'a>(
        &self,
        known: &str,
        quarantines: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> Result<QuarantineSync, ShardError> {
        self.check_up()?;
        let mut args: Vec<Value> = vec![
            Value::from(VARIANTS_PREFIX),
            Value::from(TOMBSTONE_PREFIX),
            Value::from(ORIGIN_TOMBSTONE_PREFIX),
            Value::from(known),
        ];
        for (field, until) in quarantines {
            args.extend([Value::from(field), Value::from(until)]);
        }
        let reply: Vec<Value> = self
            .pool
            .with_options(&self.options())
            .eval(QUARANTINE_SYNC_SCRIPT, vec![QUARANTINE_KEY], args)
            .await
            .map_err(|e| self.fail(e))?;
        let mut reply = reply.into_iter();
        let n = reply.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let lacked: Vec<String> = reply
            .by_ref()
            .take(n as usize)
            .filter_map(|v| v.as_string())
            .collect();
        let token = reply.next().and_then(|v| v.as_string()).unwrap_or_default();
        let mut held = Vec::new();
        while let (Some(field), Some(until)) = (reply.next(), reply.next()) {
            if let (Some(field), Some(until)) = (field.as_string(), until.as_i64()) {
                held.push((field, until));
            }
        }
        let changed = token != known;
        Ok(QuarantineSync {
            lacked,
            held: changed.then_some(held),
            token,
        })
    }

    /// Deletes `key` (with `all_variants`, every object in its media's variant index), first
    /// quarantining `quarantine` (field, end in unix ms) if given, then announces `event`; one
    /// atomic step. Returns the objects deleted.
    pub async fn purge(
        &self,
        key: &Key,
        all_variants: bool,
        quarantine: Option<(String, i64)>,
        event: String,
    ) -> Result<u64, ShardError> {
        self.check_up()?;
        let (field, until) = quarantine.unwrap_or_default();
        let announce = if field.is_empty() {
            String::new()
        } else {
            Event::Quarantine {
                field: field.clone(),
                until,
            }
            .encode()
        };
        let args: Vec<Value> = vec![
            Value::from(if all_variants { "1" } else { "0" }),
            Value::from(field),
            Value::from(until),
            Value::from(channel()),
            Value::from(event),
            Value::from(announce),
        ];
        let keys = vec![
            key.redis_key(),
            key.variants_key(),
            QUARANTINE_KEY.to_owned(),
            tombstone_key(key.origin(), key.media_id()),
        ];
        self.pool
            .with_options(&self.options())
            .eval(PURGE_SCRIPT, keys, args)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Publishes an event on this shard's channel.
    pub async fn announce(&self, event: String) -> Result<(), ShardError> {
        self.client()?
            .with_options(&self.options())
            .publish::<(), _, _>(channel(), event)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Pins one connection for a write, so that its commands (and the clean-up of an abandoned
    /// write) reach Redis in the order they were sent.
    pub fn pin(self: &Arc<Self>) -> Result<Pinned, ShardError> {
        let client = self.client()?.clone();
        Ok(Pinned {
            shard: self.clone(),
            client,
        })
    }

    /// Deletes keys; returns how many existed.
    pub async fn del(&self, keys: Vec<String>) -> Result<u64, ShardError> {
        self.check_up()?;
        self.pool
            .with_options(&self.options())
            .del(keys)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Deletes every key matching `pattern`, a page at a time so the shard is never blocked.
    pub async fn delete_matching(&self, pattern: &str) -> Result<u64, ShardError> {
        self.delete_matching_with(pattern, |_| {}).await
    }

    /// Like [`Shard::delete_matching`], calling `progress` with the running count after each page.
    ///
    /// A walk over a large shard is long and one of its pages may be slow; that fails the walk
    /// (the caller reports the shard as not reached) but never marks the shard down, which would
    /// fail every other request on it. The health check alone decides that.
    pub async fn delete_matching_with(
        &self,
        pattern: &str,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<u64, ShardError> {
        self.check_up()?;
        let walk_failed = |e: Error| {
            warn!(shard = %self.name, error = %e, "scan walk failed");
            ShardError::Fault {
                shard: self.name.clone(),
                source: e,
            }
        };
        let client = self.pool.next_connected().clone();
        let mut pages = client.scan(pattern, Some(500), None);
        let mut removed = 0;
        while let Some(page) = pages.next().await {
            let mut page = page.map_err(walk_failed)?;
            if let Some(keys) = page.take_results() {
                if !keys.is_empty() {
                    removed += client
                        .with_options(&self.options())
                        .del::<u64, _>(keys)
                        .await
                        .map_err(walk_failed)?;
                }
            }
            progress(removed);
            page.next();
        }
        Ok(removed)
    }

    /// `used_memory` from `INFO memory` and `DBSIZE`.
    pub async fn usage(&self) -> Result<(u64, u64), ShardError> {
        self.check_up()?;
        let pool = self.pool.with_options(&self.options());
        let info: String = pool
            .info(Some(fred::types::InfoKind::Memory))
            .await
            .map_err(|e| self.fail(e))?;
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let keys: u64 = pool.dbsize().await.map_err(|e| self.fail(e))?;
        Ok((used, keys))
    }

    async fn ping(&self) -> bool {
        let pool = self.pool.with_options(&self.options());
        matches!(pool.ping::<String>(None).await, Ok(ref s) if s == "PONG")
    }

    /// Stops health checks and closes the connections.
    pub async fn close(&self) {
        if let Some(task) = self.health.lock().expect("health lock").take() {
            task.abort();
        }
        let _ = self.pool.quit().await;
        let _ = self.subscriber.quit().await;
    }
}

/// The last holder of a shard is gone: either a ring that no longer lists it, or the last request
/// that loaded such a ring. Only now are its connections closed.
impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(task) = self.health.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
        let pool = self.pool.clone();
        let subscriber = self.subscriber.clone();
        let name = std::mem::take(&mut self.name);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = pool.quit().await;
                let _ = subscriber.quit().await;
                debug!(shard = %name, "shard connections closed");
            });
        }
    }
}

/// Retries forever, from 5 ms up to 2 s apart, with a little jitter so replicas do not reconnect
/// in lockstep. With `fail_fast` off the first connection also goes through this policy, so its
/// first delay is what a new shard waits before its first attempt: kept small.
/// A TLS client config that trusts the CA certificates in `ca`.
fn shard_tls(ca: &std::path::Path) -> Result<tokio_rustls::rustls::ClientConfig, Error> {
    use tokio_rustls::rustls;
    let config_error = |e: String| Error::new(ErrorKind::Config, format!("redis.tls_ca_file: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::read_certs(ca).map_err(|e| config_error(format!("{e:#}")))? {
        roots
            .add(cert)
            .map_err(|e| config_error(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The password in `path`, without the line break a Secret or an editor may leave after it.
fn read_password(path: &std::path::Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("redis.password_file: cannot read {}: {e}", path.display()),
        )
    })?;
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("redis.password_file: {} is empty", path.display()),
        ));
    }
    Ok(password.to_owned())
}

fn reconnect_policy() -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new_exponential(0, 5, 2_000, 2);
    policy.set_jitter(20);
    policy
}

async fn health_loop(shard: std::sync::Weak<Shard>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shard) = shard.upgrade() else { return };
        let ok = shard.ping().await;
        shard.set_up(ok);
    }
}

/// One connection of a shard, held for the length of a write.
pub struct Pinned {
    shard: Arc<Shard>,
    client: Client,
}

impl Pinned {
    pub fn shard(&self) -> &Arc<Shard> {
        &self.shard
    }

    /// Starts a temporary key with its first bytes and a TTL.
    pub async fn create_temp(
        &self,
        key: &str,
        first: Bytes,
        ttl: Duration,
    ) -> Result<(), ShardError> {
        self.shard.check_up()?;
        self.client
            .with_options(&self.shard.options())
            .set::<(), _, _>(
                key,
                first,
                Some(Expiration::PX(ttl.as_millis() as i64)),
                None,
                false,
            )
            .await
            .map_err(|e| self.shard.fail(e))
    }

    /// Appends to a temporary key and renews its TTL in one atomic step. False when the key was
    /// gone (it expired, or the shard restarted): the write is lost.
    pub async fn append_temp(
        &self,
        key: &str,
        data: Bytes,
        ttl: Duration,
    ) -> Result<bool, ShardError> {
        let started = std::time::Instant::now();
        self.shard.check_up()?;
        let client = self.client.with_options(&self.shard.options());
        let length: u64 = self
            .shard
            .bounded(client.eval(
                APPEND_SCRIPT,
                vec![key],
                vec![Value::from(data), Value::from(ttl.as_millis() as i64)],
            ))
            .await?;
        self.shard.observe(started);
        Ok(length > 0)
    }

    /// Atomically writes `header` at the start of a complete temporary key and renames it to its
    /// final name. False when the temporary key did not hold `expected_len` bytes (it expired or
    /// was cut short); it is then deleted.
    pub async fn publish(
        &self,
        temp: &str,
        key: &Key,
        header: Bytes,
        expected_len: u64,
        version: u64,
    ) -> Result<Published, ShardError> {
        self.shard.check_up()?;
        let redis_key = key.redis_key();
        let filled = Event::Filled {
            key: redis_key.clone(),
            version: Some(version),
        };
        let args: Vec<Value> = vec![
            Value::from(expected_len as i64),
            Value::from(header),
            Value::from(channel()),
            Value::from(filled.encode()),
            Value::from(quarantine_field(key.origin(), key.media_id())),
            Value::from(origin_quarantine_field(key.origin())),
        ];
        let keys = vec![
            temp.to_owned(),
            redis_key,
            QUARANTINE_KEY.to_owned(),
            key.variants_key(),
            tombstone_key(key.origin(), key.media_id()),
            origin_tombstone_key(key.origin()),
        ];
        let done: i64 = self
            .client
            .with_options(&self.shard.options())
            .eval(PUBLISH_SCRIPT, keys, args)
            .await
            .map_err(|e| self.shard.fail(e))?;
        Ok(match done {
            1 => Published::Stored,
            2 => Published::Quarantined,
            _ => Published::Lost,
        })
    }

    /// Deletes a key on this connection, after every command sent before it.
    pub async fn del(&self, key: &str) -> Result<(), ShardError> {
        self.client
            .with_options(&self.shard.options())
            .del::<(), _>(key)
            .await
            .map_err(|e| self.shard.fail(e))
    }
}
