//! One Redis shard: a fred pool with connect and command timeouts, plus a health state.
//!
//! A shard that failed a command is marked down and skipped (a miss, or `UNAVAILABLE` for a
//! Put) until a background ping answers again, so a dead shard costs nothing but a fast miss.
//!
//! This is the connection layer: it knows Redis commands, not what the cache stores with them.
//! The store brings its own scripts and keys; the events published on a shard are handed to a
//! [`Subscription`] the caller gives [`Shard::connect`].
//!
//! - `connect`: the clients, their TLS and password set-up, and the reconnect policy.
//! - `reads`: `GETRANGE` window reads, shared by every request that asks for the same bytes.
//! - [`pinned`]: one connection held for the commands of a write, in order.
//! - `subscription`: the pub/sub loop that delivers a shard's events.
//! - [`upload`]: a long value sent as one `SET`, streamed over a connection of its own.

mod connect;
pub mod pinned;
mod reads;
mod subscription;
pub mod upload;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{SubscriberClient, WithOptions};
use fred::prelude::*;
use fred::types::config::Options;
use fred::types::scan::Scanner;
use futures_util::StreamExt;
use prometheus_client::metrics::histogram::Histogram;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{redact_url, RedisConfig, ShardConfig};

/// What receives the events published on a shard. The connection layer only carries them: the
/// receiver decodes them, and decides what a possible loss means.
pub trait Subscription: Send + Sync + 'static {
    /// The channel to subscribe to.
    fn channel(&self) -> String;
    /// A message arrived on the channel.
    fn message(&self, text: &str);
    /// Messages of `shard` may have been missed: the subscription fell behind (`lagged`) or its
    /// connection was re-established (`reconnected`).
    fn lost(&self, shard: &str, reason: &'static str);
    /// A reconnected subscription is confirmed: what was published between the loss and now
    /// may have been missed too.
    fn resubscribed(&self);
}

/// The first window of a value, as [`Shard::read_first`] found it.
#[derive(Debug, Clone)]
pub struct FirstRead {
    pub first: Bytes,
    /// Length of the value (0: absent), as a command of its own right after the read saw it.
    pub total: u64,
    /// Whether the key is in its media's variant index.
    pub indexed: bool,
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

/// Queues `EVAL script` on a pipeline, which has no `eval` of its own: the command spelled out,
/// script, key count, keys, arguments.
async fn queue_eval<C: ClientLike>(
    p: &C,
    script: &'static str,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<(), Error> {
    let eval = fred::types::CustomCommand::new_static("EVAL", None::<u16>, false);
    let mut words: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
    words.push(Value::from(script));
    words.push(Value::from(keys.len() as i64));
    words.extend(keys.into_iter().map(Value::from));
    words.extend(args);
    p.custom::<(), Value>(eval, words).await
}

/// The label of every per-shard metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

/// Whether `e` is a failure of the connection or of the client (the shard is then marked down)
/// rather than the shard's answer to the command. Some of the client's own failures come with
/// no kind of their own (a command queued on a connection that just dropped: "Failed to route
/// command."); the shard's answers always start with an error code in capitals (`ERR`,
/// `WRONGTYPE`, `OOM`, `BUSY`, `LOADING`), so an unkinded error without one is the client's.
fn is_fault(e: &Error) -> bool {
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Routing
        | ErrorKind::Backpressure
        | ErrorKind::Protocol
        | ErrorKind::Auth => true,
        ErrorKind::Unknown => {
            let code = e.details().split_whitespace().next().unwrap_or("");
            code.is_empty() || !code.bytes().all(|b| b.is_ascii_uppercase())
        }
        _ => false,
    }
}

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

impl ShardError {
    /// The shard's answer that the key holds a value of another type than the command's.
    pub fn is_wrong_type(&self) -> bool {
        matches!(self, ShardError::Reply { source, .. } if source.details().starts_with("WRONGTYPE"))
    }
}

/// How to open a connection of one's own to a shard (an [`upload`]): what its pool was built
/// with.
struct Direct {
    host: String,
    port: u16,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<String>,
    database: Option<u8>,
    connect_timeout: Duration,
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
    /// How an upload opens its own connection.
    direct: Direct,
    /// MiB of values this replica may be uploading to the shard at once.
    upload_slots: Arc<tokio::sync::Semaphore>,
    health: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Wakes requests waiting on this shard when it is found down, so a command sent just
    /// before a crash is not left to run out its whole timeout.
    went_down: tokio::sync::Notify,
    /// Receives the events published on this shard (see `subscription`).
    subscriber: SubscriberClient,
    /// Reads in flight, shared by every request that asks for the same bytes meanwhile: a
    /// storm of Gets for one hot object costs one read per window, not one per request.
    first_reads: InFlight<(Arc<str>, usize), FirstRead>,
    window_reads: InFlight<WindowRead, (Bytes, Bytes)>,
    /// Reads answered by joining one already in flight.
    coalesced: AtomicU64,
}

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
        let e = self.classify(e);
        if let ShardError::Fault { source, .. } = &e {
            warn!(shard = %self.name, error = %source, "shard command failed");
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.set_up(false);
        }
        e
    }

    /// A fault (of the connection or the client) or the shard's answer, as [`is_fault`] tells.
    fn classify(&self, e: Error) -> ShardError {
        let shard = self.name.clone();
        if is_fault(&e) {
            ShardError::Fault { shard, source: e }
        } else {
            ShardError::Reply { shard, source: e }
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

    /// One connected client of the pool (one connection), failing fast (not queueing) if its
    /// connection drops.
    ///
    /// Several commands go to the shard in order and usually in one write when their futures
    /// are joined in order (`try_join`) and none is awaited first: the client queues a command
    /// for its connection when its future is first polled, and writes what is queued together.
    /// (Not always: if the client's connection task is already running on the other worker, it
    /// may write the first command before the next is queued.) A fred `Pipeline` keeps the
    /// order too, but writes and flushes each of its commands on its own, so that three
    /// commands cost three writes and often three wake-ups of the shard.
    ///
    /// Box each command's future before joining it: each one is about 6.6 KB (it holds the
    /// client's path for interrupting a blocked connection, unused here), and joined in place
    /// they made a Get's read some 20 KB, copied whole each time it moved (callgrind counted 2.3
    /// times the instructions per Get).
    fn connection(&self) -> Result<WithOptions<Client>, ShardError> {
        Ok(self.client()?.with_options(&self.options()))
    }

    /// Runs `command` under the command timeout, ended early if the shard is found down.
    async fn bounded<R>(
        &self,
        command: impl std::future::Future<Output = Result<R, Error>>,
    ) -> Result<R, ShardError> {
        self.bounded_as(command, |e| self.fail(e)).await
    }

    /// [`Shard::bounded`], its failures (a timeout among them) judged by `fail`.
    async fn bounded_as<R>(
        &self,
        command: impl std::future::Future<Output = Result<R, Error>>,
        fail: impl Fn(Error) -> ShardError,
    ) -> Result<R, ShardError> {
        let down = self.went_down.notified();
        tokio::pin!(down);
        down.as_mut().enable();
        tokio::select! {
            done = tokio::time::timeout(self.command_timeout, command) => match done {
                Ok(result) => result.map_err(fail),
                Err(_) => Err(fail(Error::new(ErrorKind::Timeout, "command timed out"))),
            },
            () = &mut down => Err(ShardError::Down(self.name.clone())),
        }
    }

    /// `SET key value NX PX ttl`: false when the key already exists.
    pub async fn set_new(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, ShardError> {
        self.check_up()?;
        let set: Option<String> = self
            .pool
            .with_options(&self.options())
            .set(
                key,
                value,
                Some(Expiration::PX(ttl.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(set.is_some())
    }

    /// Milliseconds left on a key's TTL; `None` when the key is absent (or has no TTL).
    pub async fn ttl_left(&self, key: &str) -> Result<Option<u64>, ShardError> {
        self.check_up()?;
        let ms: i64 = self
            .pool
            .with_options(&self.options())
            .pttl(key)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(u64::try_from(ms).ok())
    }

    /// Publishes `message` on `channel`.
    pub async fn publish(&self, channel: &str, message: String) -> Result<(), ShardError> {
        self.client()?
            .with_options(&self.options())
            .publish::<(), _, _>(channel, message)
            .await
            .map_err(|e| self.fail(e))
    }

    /// Runs a Lua script (`EVAL`; the shard caches the script after its first run).
    pub async fn eval<R: FromValue>(
        &self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, ShardError> {
        self.eval_on(&self.pool, script, keys, args).await
    }

    /// [`Shard::eval`] on `on`: the pool, or one pinned connection of it.
    async fn eval_on<R: FromValue>(
        &self,
        on: &impl LuaInterface,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, ShardError> {
        self.check_up()?;
        on.eval(script, keys, args).await.map_err(|e| self.fail(e))
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

    /// Stops health checks and closes the connections, waiting at most `QUIT_WAIT` for a shard
    /// that does not answer.
    pub async fn close(&self) {
        if let Some(task) = self.health.lock().expect("health lock").take() {
            task.abort();
        }
        quit(&self.pool, &self.subscriber).await;
    }
}

/// How long closing waits for a shard to acknowledge `QUIT`. A client of a shard that is down
/// queues the command until it reconnects, which may be never.
const QUIT_WAIT: Duration = Duration::from_secs(1);

async fn quit(pool: &Pool, subscriber: &SubscriberClient) {
    let _ = tokio::time::timeout(QUIT_WAIT, async {
        let _ = tokio::join!(pool.quit(), subscriber.quit());
    })
    .await;
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
                quit(&pool, &subscriber).await;
                debug!(shard = %name, "shard connections closed");
            });
        }
    }
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

#[cfg(test)]
mod tests {
    use fred::error::{Error, ErrorKind};

    use super::{is_fault, ShardError};

    fn unknown(details: &'static str) -> Error {
        Error::new(ErrorKind::Unknown, details)
    }

    #[test]
    fn the_shards_answers_are_replies_and_the_clients_own_failures_are_faults() {
        for answer in [
            "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "BUSY Redis is busy running a script.",
            "LOADING Redis is loading the dataset in memory",
            "EXECABORT Transaction discarded because of previous errors.",
        ] {
            assert!(!is_fault(&unknown(answer)), "{answer}");
        }
        let wrong = Error::new(
            ErrorKind::InvalidArgument,
            "WRONGTYPE Operation against a key",
        );
        assert!(!is_fault(&wrong));
        for failure in [
            "Failed to route command.",
            "Too many failed write attempts.",
            "Max attempts exceeded",
            "",
        ] {
            assert!(is_fault(&unknown(failure)), "{failure:?}");
        }
        assert!(is_fault(&Error::new(
            ErrorKind::Timeout,
            "Request timed out."
        )));
        assert!(is_fault(&Error::new(ErrorKind::IO, "Connection reset")));
    }

    #[test]
    fn only_a_wrongtype_answer_is_a_wrong_type() {
        let reply = |source| ShardError::Reply {
            shard: "a".into(),
            source,
        };
        let wrong = Error::new(
            ErrorKind::InvalidArgument,
            "WRONGTYPE Operation against a key",
        );
        assert!(reply(wrong.clone()).is_wrong_type());
        assert!(!reply(unknown("BUSY Redis is busy running a script.")).is_wrong_type());
        assert!(!reply(unknown("LOADING Redis is loading the dataset")).is_wrong_type());
        let fault = ShardError::Fault {
            shard: "a".into(),
            source: wrong,
        };
        assert!(!fault.is_wrong_type());
    }
}
