//! `mediacache.v1.MediaCacheService`: the handlers of Get, Put, Stat and Purge, each a thin adapter
//! from the request to the store and back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, FutureExt, StreamExt};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::drain::{Active, Drain};
use super::error::{field, PutEnd, ServiceError};
use super::stream::{
    next_message, paced, Call, GetItem, GetStream, Outcome, Place, StreamDone, StreamOutcome,
};
use crate::auth::Permission;
use crate::config::LimitsConfig;
use crate::key::{check_info, Key};
use crate::proto::{
    self, put_request, GetRequest, GetResponse, PurgeRequest, PurgeResponse, PutOutcome,
    PutRequest, PutResponse, StatRequest, StatResponse,
};
use crate::store::{ChunkStream, Lookup, Store, StoreError};
use crate::telemetry::Metrics;

/// Largest body answered without the pacing task when it is already in hand.
const SMALL_RESPONSE_BYTES: usize = 256 * 1024;

/// The chunks of `body` that are ready now, up to `limit` bytes, and the rest of the body
/// (`None` when the chunks taken are all of it). Nothing waits: a chunk that would is left in
/// the rest, and so is everything after `limit`.
fn take_ready(
    mut body: ChunkStream,
    limit: usize,
) -> (Vec<Result<Bytes, StoreError>>, Option<ChunkStream>) {
    let mut ready = Vec::new();
    let mut bytes = 0;
    while bytes <= limit {
        match body.next().now_or_never() {
            Some(Some(chunk)) => {
                bytes += chunk.as_ref().map_or(0, Bytes::len);
                ready.push(chunk);
            }
            Some(None) => return (ready, None),
            None => break,
        }
    }
    (ready, Some(body))
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

pub struct MediaHandlers {
    /// Where every handler's work is done; the handlers only translate.
    store: Arc<Store>,
    /// Largest object accepted at all: a bigger Put is refused before its body is read.
    max_object_bytes: u64,
    /// Shared with the admin service (Stats reads the same counters).
    metrics: Arc<Metrics>,
    /// Shared with the server, which closes it at shutdown and waits for it.
    drain: Arc<Drain>,
    /// Timeouts and bounds every request is held to.
    limits: LimitsConfig,
}

impl MediaHandlers {
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
    ) -> Result<GetStream, Status> {
        let call = Call::start("get", &self.metrics);
        let span = call.span.clone();
        match self.handle_get(req, call, active).instrument(span).await {
            Ok(stream) => Ok(stream),
            Err((call, status)) => {
                call.finish(Outcome::Error, 0);
                Err(status)
            }
        }
    }

    /// Finds the key (waiting for a fill if asked), and answers a miss at once or a hit as a
    /// paced stream whose outcome is recorded when it ends.
    async fn handle_get(
        &self,
        req: Request<GetRequest>,
        call: Call,
        active: Active,
    ) -> Result<GetStream, (Call, Status)> {
        // A read-only caller may wait for a fill but never takes the lease: it could not Put.
        let read_only = req.extensions().get::<Permission>() == Some(&Permission::ReadOnly);
        let req = req.into_inner();
        let key = match Key::from_proto(req.key.as_ref()) {
            Ok(key) => key,
            Err(e) => return Err((call, e.into())),
        };
        call.span.record("key", tracing::field::display(&key));
        let wait = Duration::from_millis(u64::from(req.wait_ms)).min(MAX_WAIT);
        let want_lease = req.want_lease && !read_only;
        let (found, waited) = match self
            .store
            .lookup(&key, req.offset, req.limit, want_lease, wait)
            .await
        {
            Ok(found) => found,
            Err(e) => return Err((call, e.into())),
        };
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
                call.finish(Outcome::Miss, 0);
                return Ok(stream::once(async { Ok(GetItem::Miss(lease_token)) }).boxed());
            }
        };
        m.get_first_byte
            .observe(call.started().elapsed().as_secs_f64());
        let deadline = tokio::time::Instant::from_std(call.started()) + self.limits.request_timeout;
        // A small body already in hand (a memory-tier hit, or an object inside the first Redis
        // read) is answered at once: every message is ready, so the transport writes the whole
        // response in one go, and there is nothing left to pace.
        let (in_hand, rest) = take_ready(hit.body, SMALL_RESPONSE_BYTES);
        let whole = rest.is_none();
        // Counted when the stream is dropped: a hit when it completed, else an error or a client
        // that went away.
        let outcome = Arc::new(StreamOutcome::default());
        let sent = Arc::new(AtomicU64::new(0));
        let done = StreamDone {
            call,
            outcome: outcome.clone(),
            bytes: sent.clone(),
            // A response handed whole to the transport keeps its place until its client has
            // read it, or for the idle timeout at most: nothing paces it to cut it off.
            _place: if whole {
                let until = tokio::time::Instant::now() + self.limits.idle_timeout;
                Place::Lent {
                    _lent: self.drain.lend(active.also(), until),
                }
            } else {
                Place::Held {
                    _active: active.also(),
                }
            },
        };
        let metrics = self.metrics.clone();
        let failed = outcome.clone();
        let body = stream::iter(in_hand).chain(rest.unwrap_or_else(|| stream::empty().boxed()));
        let chunks = body
            .map(move |chunk| match chunk {
                Ok(bytes) => {
                    metrics.bytes_sent.inc_by(bytes.len() as u64);
                    sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    Ok(GetItem::Chunk(bytes))
                }
                Err(e) => {
                    failed.failed();
                    Err(Status::from(e))
                }
            })
            .chain(stream::poll_fn(move |_| {
                let _held = &done;
                outcome.completed();
                std::task::Poll::Ready(None)
            }));
        let info = GetItem::Info(hit.info);
        let response = stream::once(async { Ok(info) }).chain(chunks).boxed();
        if whole {
            return Ok(response);
        }
        Ok(paced(
            response,
            self.limits.idle_timeout,
            deadline,
            self.limits.request_timeout,
        ))
    }

    /// Reads a Put's header and body, checking them as they come, into the store.
    /// Stored, or a lease given up; a refusal or an error is a `PutEnd`.
    async fn handle_put(&self, req: Request<Streaming<PutRequest>>) -> Result<PutOutcome, PutEnd> {
        let mut incoming = req.into_inner();
        let idle = self.limits.idle_timeout;
        let header = match next_message(&mut incoming, idle)
            .await?
            .and_then(|m| m.kind)
        {
            Some(put_request::Kind::Header(h)) => h,
            Some(put_request::Kind::Chunk(_)) => {
                return Err(
                    field("header", "the first message must be a header, got a chunk").into(),
                )
            }
            None => return Err(field("header", "the first message must be a header").into()),
        };
        let key = Key::from_proto(header.key.as_ref())?;
        let span = tracing::Span::current();
        span.record("key", tracing::field::display(&key));
        if header.release_lease {
            if header.lease_token.is_empty() {
                return Err(field("lease_token", "release_lease needs the lease's token").into());
            }
            // Given up before the answer, so a caller told "released" finds the key free.
            Box::pin(self.store.release_lease(&key, &header.lease_token)).await;
            return Ok(PutOutcome::LeaseReleased);
        }
        // Whatever way this Put ends from here (stored, refused, failed, or the client gone), the
        // lease it names is given up at once, so waiters need not sit out its TTL.
        let _lease = (!header.lease_token.is_empty()).then(|| LeaseRelease {
            store: self.store.clone(),
            key: key.clone(),
            token: header.lease_token.clone(),
        });
        let mut info = header.info.ok_or_else(|| field("info", "is required"))?;
        check_info(&info)?;
        span.record("size", info.size);
        if info.size > self.max_object_bytes {
            return Err(PutEnd::Answer(PutOutcome::TooLarge));
        }
        info.stored_at_unix_ms = crate::clock::unix_ms();

        // The store's futures are boxed where they are awaited (here and below), so this one
        // stays small: its state would otherwise hold the largest of them inline.
        let mut writer = Box::pin(self.store.begin_put(&key, &info)).await?;
        span.record("shard", writer.target().1);

        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        while let Some(msg) = next_message(&mut incoming, idle).await? {
            let chunk: Bytes = match msg.kind {
                Some(put_request::Kind::Chunk(c)) => c,
                Some(put_request::Kind::Header(_)) => {
                    return Err(field("header", "only the first message may be a header").into())
                }
                None => return Err(field("kind", "message has neither header nor chunk").into()),
            };
            received += chunk.len() as u64;
            if received > info.size {
                return Err(field(
                    "info.size",
                    format!("declared {} bytes, the body is longer", info.size),
                )
                .into());
            }
            hasher.update(&chunk);
            self.metrics.bytes_received.inc_by(chunk.len() as u64);
            Box::pin(writer.write(chunk)).await?;
        }
        span.record("bytes", received);
        if received != info.size {
            return Err(field(
                "info.size",
                format!("declared {} bytes, received {received}", info.size),
            )
            .into());
        }
        let digest = hasher.finalize();
        if !info.sha256.is_empty() && info.sha256[..] != digest[..] {
            return Err(field(
                "info.sha256",
                format!(
                    "does not match the body (body hashes to {})",
                    hex::encode(digest)
                ),
            )
            .into());
        }
        info.sha256 = Bytes::copy_from_slice(&digest);
        Box::pin(self.store.commit(writer, info)).await?;
        Ok(PutOutcome::Stored)
    }

    async fn handle_stat(&self, req: Request<StatRequest>) -> Result<StatResponse, Status> {
        let key = Key::from_proto(req.get_ref().key.as_ref())?;
        tracing::Span::current().record("key", tracing::field::display(&key));
        Ok(match self.store.stat(&key).await {
            Some(found) => StatResponse {
                found: true,
                info: Some(found.info),
                tier: found.tier.as_str().to_owned(),
                shard: found.shard.unwrap_or_default(),
            },
            None => StatResponse::default(),
        })
    }

    async fn handle_purge(&self, req: Request<PurgeRequest>) -> Result<PurgeResponse, Status> {
        let req = req.into_inner();
        let key = Key::from_proto(req.key.as_ref())?;
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
        Ok(PurgeResponse { removed })
    }
}

#[tonic::async_trait]
impl proto::media_cache_service_server::MediaCacheService for MediaHandlers {
    type GetStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<GetResponse, Status>> + Send>>;

    /// Only reached by a caller of the generated server on its own: the service routes Get to
    /// the hand-made framing (`framing`), which sends the same messages.
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let active = self.enter()?;
        let items = self.get_entered(req, active).await?;
        Ok(Response::new(
            items.map(|item| item.map(GetResponse::from)).boxed(),
        ))
    }

    async fn put(
        &self,
        req: Request<Streaming<PutRequest>>,
    ) -> Result<Response<PutResponse>, Status> {
        let _active = self.drain.enter()?;
        let call = Call::start("put", &self.metrics);
        let limit = self.limits.request_timeout;
        // Boxed: each wrapper around the Put (span, timeout, the generated service's box) would
        // otherwise copy its whole state when it moves.
        let handled = Box::pin(self.handle_put(req)).instrument(call.span.clone());
        let ended = tokio::time::timeout(limit, handled)
            .await
            .unwrap_or_else(|_| {
                Err(PutEnd::Status(Status::deadline_exceeded(format!(
                    "limits.request_timeout: the Put ran longer than {limit:?}"
                ))))
            });
        let (outcome, answer) = match ended {
            Ok(PutOutcome::Stored) => (Outcome::Stored, Ok(PutOutcome::Stored)),
            Ok(done) => (Outcome::Ok, Ok(done)),
            Err(PutEnd::Answer(refused)) => (Outcome::Refused, Ok(refused)),
            Err(PutEnd::Status(status)) => (Outcome::Error, Err(status)),
        };
        call.finish(outcome, 0);
        answer.map(|outcome| {
            Response::new(PutResponse {
                stored: outcome == PutOutcome::Stored,
                outcome: outcome as i32,
            })
        })
    }

    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let _active = self.drain.enter()?;
        let call = Call::start("stat", &self.metrics);
        let answer = self.handle_stat(req).instrument(call.span.clone()).await;
        call.finish(
            match &answer {
                Ok(r) if r.found => Outcome::Hit,
                Ok(_) => Outcome::Miss,
                Err(_) => Outcome::Error,
            },
            0,
        );
        answer.map(Response::new)
    }

    async fn purge(&self, req: Request<PurgeRequest>) -> Result<Response<PurgeResponse>, Status> {
        let _active = self.drain.enter()?;
        let call = Call::start("purge", &self.metrics);
        let answer = self.handle_purge(req).instrument(call.span.clone()).await;
        self.metrics.purges.inc();
        call.finish(
            if answer.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Error
            },
            0,
        );
        answer.map(Response::new)
    }
}
