//! The gRPC services: `mediacache.v1.MediaCache` and `mediacache.v1.CacheAdmin`.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{stream, Stream, StreamExt};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};
use tracing::{error, Instrument};

use crate::auth::Access;
use crate::config::LimitsConfig;
use crate::key::{check_info, FieldError, Key};
use crate::proto::{
    self, get_response, put_request, GetRequest, GetResponse, Miss, PurgeOriginProgress,
    PurgeOriginRequest, PurgeRequest, PurgeResponse, PutOutcome, PutRequest, PutResponse,
    RingStatusRequest, RingStatusResponse, ShardStatus, StatRequest, StatResponse, StatsRequest,
    StatsResponse,
};
use crate::reload::ReloadStats;
use crate::store::{Committed, Lookup, Refusal, Store, StoreError};
use crate::telemetry::Metrics;

/// Everything a handler can fail with; [`to_status`] is the one place it becomes a `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("purge incomplete: shards {shards:?} could not be reached ({removed} objects removed elsewhere); retry")]
    PurgeIncomplete { shards: Vec<String>, removed: u64 },
}

/// Maps errors to a small set of codes and logs the internal ones.
pub fn to_status(e: ServiceError) -> Status {
    match &e {
        ServiceError::Field(_) => Status::invalid_argument(e.to_string()),
        ServiceError::PurgeIncomplete { .. } => Status::unavailable(e.to_string()),
        ServiceError::Store(s) => match s {
            StoreError::OutOfRange { .. } => Status::out_of_range(e.to_string()),
            StoreError::Shard(_) | StoreError::Lost => Status::unavailable(e.to_string()),
            StoreError::Changed => Status::aborted(e.to_string()),
            StoreError::Layout(_) | StoreError::Internal(_) => {
                error!(error = %e, "internal error");
                Status::internal(e.to_string())
            }
        },
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        to_status(e)
    }
}

fn field(name: &str, message: impl Into<String>) -> Status {
    to_status(FieldError::new(name, message).into())
}

/// The longest a Get waits for another caller's fill, whatever `wait_ms` asks.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Releases a fill lease when dropped.
struct LeaseRelease {
    store: Arc<Store>,
    key: Key,
    token: String,
}

impl Drop for LeaseRelease {
    fn drop(&mut self) {
        let store = self.store.clone();
        let key = self.key.clone();
        let token = std::mem::take(&mut self.token);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { store.release_lease(&key, &token).await });
        }
    }
}

pub struct MediaCacheService {
    store: Arc<Store>,
    /// Largest object accepted at all.
    max_object_bytes: u64,
    metrics: Arc<Metrics>,
    drain: Arc<Drain>,
    limits: LimitsConfig,
}

impl MediaCacheService {
    pub fn new(
        store: Arc<Store>,
        max_object_bytes: u64,
        metrics: Arc<Metrics>,
        drain: Arc<Drain>,
        limits: LimitsConfig,
    ) -> Self {
        Self {
            store,
            max_object_bytes,
            metrics,
            drain,
            limits,
        }
    }
}

/// Counts requests in flight so shutdown can wait for them itself before the transport closes
/// connections: new requests are refused once draining starts.
pub struct Drain {
    active: std::sync::atomic::AtomicUsize,
    /// Requests allowed in flight at once (`limits.max_streams`).
    max: usize,
    closing: std::sync::atomic::AtomicBool,
    idle: tokio::sync::Notify,
}

/// Held for as long as a request (or a Get's stream) runs.
pub struct Active(Arc<Drain>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Active {
    /// Another hold on the same drain, for work that outlives the handler (a Get's stream);
    /// taken while this one is held, so it is never refused.
    fn also(&self) -> Active {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        Active(self.0.clone())
    }
}

impl Drain {
    pub fn new(max: usize) -> Self {
        Self {
            active: Default::default(),
            max,
            closing: Default::default(),
            idle: Default::default(),
        }
    }

    fn enter(self: &Arc<Self>) -> Result<Active, Status> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let active = Active(self.clone());
        if self.closing.load(Ordering::Acquire) {
            return Err(Status::unavailable("shutting down"));
        }
        if before >= self.max {
            return Err(Status::resource_exhausted(format!(
                "limits.max_streams: {} requests are in flight on this replica; retry later",
                self.max
            )));
        }
        Ok(active)
    }

    /// Refuses new requests and waits until those in flight have finished.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// A span per request; the handler records the key (and shard, size), [`finished`] the rest.
fn request_span(rpc: &'static str) -> tracing::Span {
    tracing::info_span!(
        "rpc",
        rpc,
        key = tracing::field::Empty,
        shard = tracing::field::Empty,
        size = tracing::field::Empty,
        outcome = tracing::field::Empty,
        bytes = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    )
}

/// Records how a request ended on its span and logs it (at debug: one line per request).
fn finished(span: &tracing::Span, outcome: &str, bytes: u64, started: Instant) {
    span.record("outcome", outcome);
    if bytes > 0 {
        span.record("bytes", bytes);
    }
    span.record("duration_ms", started.elapsed().as_millis() as u64);
    tracing::debug!(parent: span, "request done");
}

/// Records a Get stream's outcome, bytes and duration when the stream is dropped.
struct StreamDone {
    _active: Active,
    metrics: Arc<Metrics>,
    span: tracing::Span,
    started: Instant,
    outcome: Arc<std::sync::Mutex<&'static str>>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for StreamDone {
    fn drop(&mut self) {
        let outcome = *self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match outcome {
            "memory" | "redis" => "hit",
            other => other,
        };
        self.metrics.request("get", outcome, self.started.elapsed());
        let bytes = self.bytes.load(Ordering::Relaxed);
        finished(&self.span, outcome, bytes, self.started);
    }
}

#[tonic::async_trait]
impl proto::media_cache_server::MediaCache for MediaCacheService {
    type GetStream = GetStream;

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetStream>, Status> {
        let active = self.enter()?;
        self.get_entered(req, active).await
    }

    async fn put(
        &self,
        req: Request<Streaming<PutRequest>>,
    ) -> Result<Response<PutResponse>, Status> {
        let started = Instant::now();
        let _active = self.drain.enter()?;
        let span = request_span("put");
        let limit = self.limits.request_timeout;
        let answer = tokio::time::timeout(limit, self.handle_put(req).instrument(span.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "limits.request_timeout: the Put ran longer than {limit:?}"
                )))
            });
        let outcome = match &answer {
            Ok(r) if r.get_ref().stored => "stored",
            Ok(_) => "refused",
            Err(_) => "error",
        };
        self.metrics.request("put", outcome, started.elapsed());
        finished(&span, outcome, 0, started);
        answer
    }

    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let started = Instant::now();
        let _active = self.drain.enter()?;
        let span = request_span("stat");
        let answer = self.handle_stat(req).instrument(span.clone()).await;
        let outcome = match &answer {
            Ok(r) if r.get_ref().found => "hit",
            Ok(_) => "miss",
            Err(_) => "error",
        };
        self.metrics.request("stat", outcome, started.elapsed());
        finished(&span, outcome, 0, started);
        answer
    }

    async fn purge(&self, req: Request<PurgeRequest>) -> Result<Response<PurgeResponse>, Status> {
        let started = Instant::now();
        let _active = self.drain.enter()?;
        let span = request_span("purge");
        let answer = self.handle_purge(req).instrument(span.clone()).await;
        self.metrics.purges.inc();
        let outcome = if answer.is_ok() { "ok" } else { "error" };
        self.metrics.request("purge", outcome, started.elapsed());
        finished(&span, outcome, 0, started);
        answer
    }
}

impl MediaCacheService {
    /// Takes a place among the requests in flight (`limits.max_streams`); refused while
    /// draining. A Get takes it before its request body is read.
    pub(crate) fn enter(&self) -> Result<Active, Status> {
        self.drain.enter()
    }

    pub(crate) fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// A Get whose place is already taken.
    pub(crate) async fn get_entered(
        &self,
        req: Request<GetRequest>,
        active: Active,
    ) -> Result<Response<GetStream>, Status> {
        let started = Instant::now();
        let span = request_span("get");
        let answer = self
            .handle_get(req, started, &active)
            .instrument(span.clone())
            .await;
        if answer.is_err() {
            self.metrics.request("get", "error", started.elapsed());
            finished(&span, "error", 0, started);
        }
        answer
    }
}

/// A Get's response messages, as the hand-made framing (`framing`) sends them.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<GetResponse, Status>> + Send>>;

/// The next message of a client stream, or `DEADLINE_EXCEEDED` if the client sends nothing
/// for `idle`.
async fn next_message<T>(incoming: &mut Streaming<T>, idle: Duration) -> Result<Option<T>, Status> {
    tokio::time::timeout(idle, incoming.message())
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "limits.idle_timeout: no message from the client for {idle:?}"
            )))
        })
}

/// Runs a Get's response stream in its own task, one message ahead of the client. A client
/// that reads nothing for `idle`, or a stream still running at `deadline`, is cut off: the task
/// ends (freeing its buffers and its place in `limits.max_streams`), and the client receives
/// `DEADLINE_EXCEEDED` after what it was already sent, never a silently short body. A task that
/// ends any other way before the body's end (a panic, an abort) ends the stream with `INTERNAL`.
fn paced(
    mut body: GetStream,
    idle: Duration,
    deadline: tokio::time::Instant,
    request_timeout: Duration,
) -> GetStream {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let cut: Arc<std::sync::OnceLock<Status>> = Arc::default();
    let cut_by_task = cut.clone();
    let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let completed_by_task = complete.clone();
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = body.next() => next,
                () = tokio::time::sleep_until(deadline) => {
                    let _ = cut_by_task.set(Status::deadline_exceeded(format!(
                        "limits.request_timeout: the Get ran longer than {request_timeout:?}"
                    )));
                    return;
                }
                () = tx.closed() => return,
            };
            let Some(item) = next else {
                completed_by_task.store(true, Ordering::Release);
                return;
            };
            match tokio::time::timeout(idle, tx.send(item)).await {
                Ok(Ok(())) => {}
                // The client went away.
                Ok(Err(_)) => return,
                Err(_) => {
                    let _ = cut_by_task.set(Status::deadline_exceeded(format!(
                        "limits.idle_timeout: the client read nothing for {idle:?}"
                    )));
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .chain(stream::poll_fn({
            let mut ended = false;
            move |_| {
                if std::mem::replace(&mut ended, true) {
                    return std::task::Poll::Ready(None);
                }
                std::task::Poll::Ready(match cut.get() {
                    Some(status) => Some(Err(status.clone())),
                    None if complete.load(Ordering::Acquire) => None,
                    None => Some(Err(Status::internal(
                        "the Get ended before its last message; retry",
                    ))),
                })
            }
        }))
        .boxed()
}

fn put_answer(outcome: PutOutcome) -> Response<PutResponse> {
    Response::new(PutResponse {
        stored: outcome == PutOutcome::Stored,
        outcome: outcome as i32,
    })
}

impl MediaCacheService {
    async fn handle_get(
        &self,
        req: Request<GetRequest>,
        started: Instant,
        active: &Active,
    ) -> Result<Response<GetStream>, Status> {
        // A read-only caller may wait for a fill but never takes the lease: it could not Put.
        let read_only = req.extensions().get::<Access>() == Some(&Access::ReadOnly);
        let req = req.into_inner();
        let key = Key::from_proto(req.key.as_ref()).map_err(ServiceError::from)?;
        tracing::Span::current().record("key", tracing::field::display(&key));
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_WAIT);
        let want_lease = req.want_lease && !read_only;
        let (found, waited) = self
            .store
            .lookup(&key, req.offset, req.limit, want_lease, wait)
            .await
            .map_err(ServiceError::from)?;
        let m = &self.metrics;
        if waited {
            m.lease_waits.inc();
            if matches!(found, Lookup::Hit(_)) {
                m.lease_waits_hit.inc();
            }
        }
        let hit = match found {
            Lookup::Hit(hit) => hit,
            Lookup::Miss { lease_token } => {
                if !lease_token.is_empty() {
                    m.leases_granted.inc();
                }
                m.request("get", "miss", started.elapsed());
                finished(&tracing::Span::current(), "miss", 0, started);
                let miss = GetResponse {
                    kind: Some(get_response::Kind::Miss(Miss { lease_token })),
                };
                return Ok(Response::new(stream::once(async { Ok(miss) }).boxed()));
            }
        };
        m.get_first_byte.observe(started.elapsed().as_secs_f64());
        let info = GetResponse {
            kind: Some(get_response::Kind::Info(hit.info)),
        };
        // Counted when the stream is dropped: a hit when it completed, else an error or a client
        // that went away.
        let outcome = Arc::new(std::sync::Mutex::new("cancelled"));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = StreamDone {
            _active: active.also(),
            metrics: self.metrics.clone(),
            span: tracing::Span::current(),
            started,
            outcome: outcome.clone(),
            bytes: sent.clone(),
        };
        let tier = hit.tier.as_str();
        let metrics = self.metrics.clone();
        let failed = outcome.clone();
        let chunks = hit
            .body
            .map(move |chunk| match chunk {
                Ok(bytes) => {
                    metrics.bytes_sent.inc_by(bytes.len() as u64);
                    sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    Ok(GetResponse {
                        kind: Some(get_response::Kind::Chunk(bytes)),
                    })
                }
                Err(e) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = "error";
                    Err(to_status(e.into()))
                }
            })
            .chain(stream::poll_fn(move |_| {
                let _held = &done;
                let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
                if *o == "cancelled" {
                    *o = tier;
                }
                std::task::Poll::Ready(None)
            }));
        let limits = &self.limits;
        Ok(Response::new(paced(
            stream::once(async { Ok(info) }).chain(chunks).boxed(),
            limits.idle_timeout,
            tokio::time::Instant::from_std(started) + limits.request_timeout,
            limits.request_timeout,
        )))
    }

    async fn handle_put(
        &self,
        req: Request<Streaming<PutRequest>>,
    ) -> Result<Response<PutResponse>, Status> {
        let mut incoming = req.into_inner();
        let idle = self.limits.idle_timeout;
        let header = match next_message(&mut incoming, idle)
            .await?
            .and_then(|m| m.kind)
        {
            Some(put_request::Kind::Header(h)) => h,
            Some(put_request::Kind::Chunk(_)) => {
                return Err(field(
                    "header",
                    "the first message must be a header, got a chunk",
                ))
            }
            None => return Err(field("header", "the first message must be a header")),
        };
        let key = Key::from_proto(header.key.as_ref()).map_err(ServiceError::from)?;
        let span = tracing::Span::current();
        span.record("key", tracing::field::display(&key));
        let mut info = header.info.ok_or_else(|| field("info", "is required"))?;
        check_info(&info).map_err(ServiceError::from)?;
        span.record("size", info.size);
        if info.size > self.max_object_bytes {
            return Ok(put_answer(PutOutcome::TooLarge));
        }
        info.stored_at_unix_ms = crate::clock::unix_ms();

        // Whatever way this Put ends (stored, refused, failed, or the client gone), the lease it
        // names is given up at once, so waiters need not sit out its TTL.
        let _lease = (!header.lease_token.is_empty()).then(|| LeaseRelease {
            store: self.store.clone(),
            key: key.clone(),
            token: header.lease_token.clone(),
        });
        let mut writer = match self
            .store
            .begin_put(&key, &info)
            .await
            .map_err(ServiceError::from)?
        {
            Ok(w) => w,
            Err(Refusal::TooLarge) => return Ok(put_answer(PutOutcome::TooLarge)),
            Err(Refusal::Unavailable) => return Ok(put_answer(PutOutcome::Unavailable)),
            Err(Refusal::Quarantined) => return Ok(put_answer(PutOutcome::Quarantined)),
            Err(Refusal::NotAdmitted) => return Ok(put_answer(PutOutcome::NotAdmitted)),
        };
        span.record("shard", writer.target().1);

        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        while let Some(msg) = next_message(&mut incoming, idle).await? {
            let chunk: Bytes = match msg.kind {
                Some(put_request::Kind::Chunk(c)) => c,
                Some(put_request::Kind::Header(_)) => {
                    return Err(field("header", "only the first message may be a header"))
                }
                None => return Err(field("kind", "message has neither header nor chunk")),
            };
            received += chunk.len() as u64;
            if received > info.size {
                return Err(field(
                    "info.size",
                    format!("declared {} bytes, the body is longer", info.size),
                ));
            }
            hasher.update(&chunk);
            self.metrics.bytes_received.inc_by(chunk.len() as u64);
            if let Err(e) = writer.write(chunk).await {
                return match e {
                    StoreError::Shard(_) | StoreError::Lost => {
                        Ok(put_answer(PutOutcome::Unavailable))
                    }
                    other => Err(ServiceError::from(other).into()),
                };
            }
        }
        tracing::Span::current().record("bytes", received);
        if received != info.size {
            return Err(field(
                "info.size",
                format!("declared {} bytes, received {received}", info.size),
            ));
        }
        let digest = hasher.finalize();
        if !info.sha256.is_empty() && info.sha256[..] != digest[..] {
            return Err(field(
                "info.sha256",
                format!(
                    "does not match the body (body hashes to {})",
                    hex::encode(digest)
                ),
            ));
        }
        info.sha256 = Bytes::copy_from_slice(&digest);
        match self.store.commit(writer, info).await {
            Ok(Committed::Stored) => Ok(put_answer(PutOutcome::Stored)),
            Ok(Committed::NotAdmitted) => Ok(put_answer(PutOutcome::NotAdmitted)),
            Ok(Committed::TooLarge) => Ok(put_answer(PutOutcome::TooLarge)),
            Ok(Committed::Quarantined) => Ok(put_answer(PutOutcome::Quarantined)),
            Ok(Committed::Lost) | Err(StoreError::Shard(_) | StoreError::Lost) => {
                Ok(put_answer(PutOutcome::Unavailable))
            }
            Err(e) => Err(ServiceError::from(e).into()),
        }
    }

    async fn handle_stat(
        &self,
        req: Request<StatRequest>,
    ) -> Result<Response<StatResponse>, Status> {
        let key = Key::from_proto(req.get_ref().key.as_ref()).map_err(ServiceError::from)?;
        tracing::Span::current().record("key", tracing::field::display(&key));
        let answer = match self.store.stat(&key).await {
            Some(found) => StatResponse {
                found: true,
                info: Some(found.info),
                tier: found.tier.as_str().to_owned(),
                shard: found.shard.unwrap_or_default(),
            },
            None => StatResponse::default(),
        };
        Ok(Response::new(answer))
    }

    async fn handle_purge(
        &self,
        req: Request<PurgeRequest>,
    ) -> Result<Response<PurgeResponse>, Status> {
        let req = req.into_inner();
        let key = Key::from_proto(req.key.as_ref()).map_err(ServiceError::from)?;
        tracing::Span::current().record("key", tracing::field::display(&key));
        let (removed, failed) = self
            .store
            .purge(&key, req.all_variants, req.quarantine)
            .await;
        if !failed.is_empty() {
            return Err(ServiceError::PurgeIncomplete {
                shards: failed,
                removed,
            }
            .into());
        }
        Ok(Response::new(PurgeResponse { removed }))
    }
}

pub struct CacheAdminService {
    store: Arc<Store>,
    reloads: Arc<ReloadStats>,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl CacheAdminService {
    pub fn new(store: Arc<Store>, reloads: Arc<ReloadStats>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            reloads,
            metrics,
            started: Instant::now(),
        }
    }
}

#[tonic::async_trait]
impl proto::cache_admin_server::CacheAdmin for CacheAdminService {
    type PurgeOriginStream =
        Pin<Box<dyn Stream<Item = Result<PurgeOriginProgress, Status>> + Send>>;

    /// Runs in its own task, so a slow purge neither blocks nor is cancelled by the caller;
    /// progress goes out as it is made (dropped, not queued, if the caller reads slowly).
    async fn purge_origin(
        &self,
        req: Request<PurgeOriginRequest>,
    ) -> Result<Response<Self::PurgeOriginStream>, Status> {
        let req = req.into_inner();
        crate::key::check_origin(&req.origin).map_err(ServiceError::from)?;
        self.metrics.purges.inc();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let progress = tx.clone();
            let (removed, failed) = store
                .purge_origin(
                    &req.origin,
                    req.quarantine,
                    |shard, removed, done, total| {
                        let _ = progress.try_send(Ok(PurgeOriginProgress {
                            shard: shard.to_owned(),
                            removed,
                            shards_done: done as u32,
                            shards_total: total as u32,
                            done: false,
                        }));
                    },
                )
                .await;
            let last = if failed.is_empty() {
                Ok(PurgeOriginProgress {
                    shard: String::new(),
                    removed,
                    shards_done: store.redis().ring().shards().len() as u32,
                    shards_total: store.redis().ring().shards().len() as u32,
                    done: true,
                })
            } else {
                Err(to_status(ServiceError::PurgeIncomplete {
                    shards: failed,
                    removed,
                }))
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
        ))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let m = &self.metrics;
        let (memory_bytes, memory_entries) = self.store.memory().usage();
        Ok(Response::new(StatsResponse {
            uptime_seconds: self.started.elapsed().as_secs(),
            get_hits: m.count("get", "hit"),
            get_misses: m.count("get", "miss"),
            bytes_served: m.bytes_sent.get(),
            bytes_received: m.bytes_received.get(),
            puts_stored: m.count("put", "stored"),
            memory_bytes,
            memory_entries,
            leases_granted: m.leases_granted.get(),
            lease_waiters: self.store.lease_waiters(),
        }))
    }

    async fn ring_status(
        &self,
        _req: Request<RingStatusRequest>,
    ) -> Result<Response<RingStatusResponse>, Status> {
        let ring = self.store.redis().ring();
        let shards =
            futures_util::future::join_all(ring.shards().iter().enumerate().map(|(i, shard)| {
                let ring = &ring;
                async move {
                    let (used, keys) = shard.usage().await.unwrap_or((0, 0));
                    ShardStatus {
                        name: shard.name().to_owned(),
                        address: crate::config::redact_url(shard.url()),
                        weight: ring.weight(i),
                        up: shard.is_up(),
                        used_memory_bytes: used,
                        keys,
                        share: ring.share(i),
                    }
                }
            }))
            .await;
        Ok(Response::new(RingStatusResponse {
            generation: ring.generation,
            config_digest: ring.digest.clone(),
            shards,
            reloads_failed: self.reloads.failed.load(Ordering::Relaxed),
            last_reload_error: self.reloads.last_error(),
            reloads_applied: self.reloads.applied.load(Ordering::Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Result<GetResponse, Status> {
        Ok(GetResponse {
            kind: Some(get_response::Kind::Chunk(Bytes::from(vec![n; 3]))),
        })
    }

    async fn run(body: GetStream) -> Vec<Result<GetResponse, Status>> {
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        paced(body, Duration::from_secs(60), far, Duration::from_secs(60))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_complete_body_ends_without_an_error() {
        let out = run(stream::iter([chunk(1), chunk(2)]).boxed()).await;
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn a_body_whose_task_dies_ends_with_an_error() {
        let dying = stream::iter([chunk(1)])
            .chain(stream::poll_fn(|_| -> std::task::Poll<Option<_>> {
                panic!("the body's producer failed")
            }))
            .boxed();
        let out = run(dying).await;
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].is_ok());
        assert_eq!(out[1].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }
}
