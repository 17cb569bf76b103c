//! What every request shares on its way out: its span and typed outcome, recorded once in the
//! metrics and the log; the pacing of a Get's response stream; and the idle bound on a client's
//! messages.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{stream, Stream, StreamExt};
use tonic::{Status, Streaming};

use crate::proto::{get_response, GetResponse, MediaInfo};
use crate::telemetry::Metrics;

/// One message of a Get's response, with a chunk's bytes as the store produced them: the
/// hand-made framing sends them uncopied.
#[derive(Debug)]
pub enum GetItem {
    Info(MediaInfo),
    /// A miss; the lease token is empty unless this caller holds the fill lease.
    Miss(String),
    Chunk(Bytes),
}

impl From<GetItem> for GetResponse {
    fn from(item: GetItem) -> Self {
        let kind = match item {
            GetItem::Info(info) => get_response::Kind::Info(info),
            GetItem::Miss(lease_token) => {
                get_response::Kind::Miss(crate::proto::Miss { lease_token })
            }
            GetItem::Chunk(bytes) => get_response::Kind::Chunk(bytes),
        };
        GetResponse { kind: Some(kind) }
    }
}

/// A Get's response messages.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<GetItem, Status>> + Send>>;

/// How a request ended, as the `outcome` label of `mediacache_requests_total` and the
/// request's log line give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    Hit,
    Miss,
    Stored,
    /// A Put answered with a refusal (too large, quarantined, no room, unavailable).
    Refused,
    Ok,
    Error,
    /// The client went away before the end of the response.
    Cancelled,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stored => "stored",
            Outcome::Refused => "refused",
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }

    const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Stored,
        Outcome::Refused,
        Outcome::Ok,
        Outcome::Error,
        Outcome::Cancelled,
    ];
}

/// One request's span and start, recorded once when it ends.
pub struct Call {
    rpc: &'static str,
    pub span: tracing::Span,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl Call {
    /// A span per request; the handler records the key (and shard, size), [`Call::finish`] the
    /// rest.
    pub fn start(rpc: &'static str, metrics: &Arc<Metrics>) -> Self {
        let span = tracing::info_span!(
            "rpc",
            rpc,
            key = tracing::field::Empty,
            shard = tracing::field::Empty,
            size = tracing::field::Empty,
            outcome = tracing::field::Empty,
            bytes = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        Self {
            rpc,
            span,
            started: Instant::now(),
            metrics: metrics.clone(),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Counts the request in the metrics, records how it ended on its span, and logs it (at
    /// debug: one line per request).
    pub fn finish(&self, outcome: Outcome, bytes: u64) {
        let outcome = outcome.as_str();
        self.metrics
            .request(self.rpc, outcome, self.started.elapsed());
        self.span.record("outcome", outcome);
        if bytes > 0 {
            self.span.record("bytes", bytes);
        }
        self.span
            .record("duration_ms", self.started.elapsed().as_millis() as u64);
        tracing::debug!(parent: &self.span, "request done");
    }
}

/// A Get stream's outcome while it runs: `Cancelled` until the body ends (`Hit`) or fails
/// (`Error`); read when the stream is dropped.
pub struct StreamOutcome(AtomicU8);

impl Default for StreamOutcome {
    fn default() -> Self {
        StreamOutcome(AtomicU8::new(Outcome::Cancelled as u8))
    }
}

impl StreamOutcome {
    pub fn failed(&self) {
        self.0.store(Outcome::Error as u8, Ordering::Relaxed);
    }

    /// The body ended; a failure recorded before stays one.
    pub fn completed(&self) {
        let _ = self.0.compare_exchange(
            Outcome::Cancelled as u8,
            Outcome::Hit as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> Outcome {
        let v = self.0.load(Ordering::Relaxed);
        Outcome::ALL[v as usize]
    }
}

/// Where a Get stream's place among the requests in flight is.
pub enum Place {
    Held { _active: super::drain::Active },
    Lent { _lent: super::drain::Lent },
}

/// Records a Get stream's outcome, bytes and duration when the stream is dropped, and holds the
/// stream's place among the requests in flight until then.
pub struct StreamDone {
    pub call: Call,
    pub outcome: Arc<StreamOutcome>,
    pub bytes: Arc<AtomicU64>,
    /// The stream's place among the requests in flight: its own while it is paced, lent while
    /// the transport holds it whole.
    pub _place: Place,
}

impl Drop for StreamDone {
    fn drop(&mut self) {
        let bytes = self.bytes.load(Ordering::Relaxed);
        self.call.finish(self.outcome.get(), bytes);
    }
}

/// The next message of a client stream, or `DEADLINE_EXCEEDED` if the client sends nothing
/// for `idle`.
pub async fn next_message<T>(
    incoming: &mut Streaming<T>,
    idle: Duration,
) -> Result<Option<T>, Status> {
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
pub fn paced(
    mut body: GetStream,
    idle: Duration,
    deadline: tokio::time::Instant,
    request_timeout: Duration,
) -> GetStream {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let cut: Arc<std::sync::OnceLock<Status>> = Arc::default();
    let cut_by_task = cut.clone();
    let complete = Arc::new(AtomicBool::new(false));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Result<GetItem, Status> {
        Ok(GetItem::Chunk(Bytes::from(vec![n; 3])))
    }

    async fn run(body: GetStream) -> Vec<Result<GetItem, Status>> {
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

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_idle_timeout() {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let endless = stream::repeat_with(|| chunk(7)).boxed();
        let mut out = paced(
            endless,
            Duration::from_secs(5),
            far,
            Duration::from_secs(3600),
        );
        assert!(out.next().await.unwrap().is_ok());
        // The client reads nothing for longer than the idle timeout.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut last = None;
        while let Some(item) = out.next().await {
            last = Some(item);
        }
        let status = last.expect("the stream ends").unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("limits.idle_timeout"));
    }

    #[test]
    fn a_failure_is_not_overwritten_by_the_end_of_the_body() {
        let outcome = StreamOutcome::default();
        assert_eq!(outcome.get(), Outcome::Cancelled);
        outcome.failed();
        outcome.completed();
        assert_eq!(outcome.get(), Outcome::Error);
        let outcome = StreamOutcome::default();
        outcome.completed();
        assert_eq!(outcome.get(), Outcome::Hit);
    }
}
