//! Prometheus metrics and the HTTP endpoints for them and for Kubernetes probes.
//!
//! The registry is created in [`crate::server::run`] and passed down; nothing is global.
//! `GET /metrics` (text exposition), `GET /healthz` (the process is alive), `GET /readyz`
//! (config loaded and serving; fails as soon as shutdown starts, so traffic drains away first).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::reload::ReloadStats;
use crate::ring::Ring;
use crate::shard::ShardLabel;
use crate::store::memory::MemoryStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcOutcome {
    pub rpc: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rpc {
    pub rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RpcOutcome, Counter>,
    pub latency: HistogramFamily<Rpc>,
    pub get_first_byte: Histogram,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub leases_granted: Counter,
    pub lease_waits: Counter,
    pub lease_waits_hit: Counter,
    pub purges: Counter,
    memory_bytes: Gauge,
    memory_entries: Gauge,
    memory_tracked_keys: Gauge,
    memory_admissions: Gauge,
    memory_evictions: Family<ResultLabel, Gauge>,
    memory_refusals: Family<ResultLabel, Gauge>,
    shard_up: Family<ShardLabel, Gauge>,
    shard_errors: Family<ShardLabel, Gauge>,
    shard_coalesced: Family<ShardLabel, Gauge>,
    shard_used_memory: Family<ShardLabel, Gauge>,
    shard_keys: Family<ShardLabel, Gauge>,
    ring_generation: Gauge,
    ring_shards: Gauge,
    reloads: Family<ResultLabel, Gauge>,
    last_reload: Gauge,
}

/// Per-shard command latency, read from the shards of the running ring at scrape time.
struct ShardLatency(Arc<ArcSwap<Ring>>);

impl std::fmt::Debug for ShardLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShardLatency")
    }
}

impl Collector for ShardLatency {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ring = self.0.load();
        let mut metric = encoder.encode_descriptor(
            "shard_command_duration_seconds",
            "Round trips of reads and writes, by shard",
            None,
            MetricType::Histogram,
        )?;
        for shard in ring.shards() {
            let label = ShardLabel {
                shard: shard.name().to_owned(),
            };
            shard.latency().encode(metric.encode_family(&label)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// `events_lost` is the events' own counter (see [`crate::events::Events::lost`]).
    pub fn new(
        ring: Arc<ArcSwap<Ring>>,
        events_lost: Family<crate::events::LostLabels, Counter>,
        quarantine_restored: Family<ShardLabel, Counter>,
    ) -> Self {
        let mut registry = Registry::with_prefix("mediacache");
        registry.register(
            "events_lost",
            "Times a shard's event subscription lagged or reconnected, so events may have been missed and the memory tier was dropped",
            events_lost,
        );
        registry.register(
            "quarantine_restored",
            "Quarantines written back to a shard that had lost them (eviction, restart, or joining the ring)",
            quarantine_restored,
        );
        registry.register_collector(Box::new(ShardLatency(ring)));
        let requests = Family::<RpcOutcome, Counter>::default();
        registry.register("requests", "Requests by RPC and outcome", requests.clone());
        let latency: HistogramFamily<Rpc> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to the last byte, by RPC",
            latency.clone(),
        );
        let get_first_byte = latency_histogram();
        registry.register(
            "get_first_byte_seconds",
            "Time from a Get request to its first message",
            get_first_byte.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let bytes_sent = counter(&mut registry, "sent_bytes", "Body bytes sent to clients");
        let bytes_received = counter(
            &mut registry,
            "received_bytes",
            "Body bytes received from clients",
        );
        let leases_granted = counter(&mut registry, "leases_granted", "Fill leases handed out");
        let lease_waits = counter(
            &mut registry,
            "lease_waits",
            "Gets that waited for another caller's fill",
        );
        let lease_waits_hit = counter(
            &mut registry,
            "lease_waits_hit",
            "Waits that ended in a hit",
        );
        let purges = counter(&mut registry, "purges", "Purge requests served");
        let memory_bytes = gauge(
            &mut registry,
            "memory_bytes",
            "Body bytes held by the memory tier",
        );
        let memory_entries = gauge(
            &mut registry,
            "memory_entries",
            "Objects held by the memory tier",
        );
        let memory_tracked_keys = gauge(
            &mut registry,
            "memory_tracked_keys",
            "Keys whose downloads are being counted",
        );
        let memory_admissions = gauge(
            &mut registry,
            "memory_admissions",
            "Objects admitted to the memory tier since start",
        );
        let memory_evictions = Family::<ResultLabel, Gauge>::default();
        registry.register(
            "memory_evictions",
            "Objects evicted from the memory tier since start, by reason",
            memory_evictions.clone(),
        );
        let memory_refusals = Family::<ResultLabel, Gauge>::default();
        registry.register(
            "memory_refusals",
            "Objects the memory tier did not admit since start, by reason",
            memory_refusals.clone(),
        );
        let family = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<ShardLabel, Gauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        let shard_up = family(&mut registry, "shard_up", "1 if the shard answers, else 0");
        let shard_coalesced = family(
            &mut registry,
            "shard_reads_coalesced",
            "Reads answered by joining an identical read in flight, since the shard's client was created",
        );
        let shard_errors = family(
            &mut registry,
            "shard_command_errors",
            "Failed commands since the shard's client was created",
        );
        let shard_used_memory = family(
            &mut registry,
            "shard_used_memory_bytes",
            "used_memory from the shard's INFO memory",
        );
        let shard_keys = family(&mut registry, "shard_keys", "DBSIZE of the shard");
        let ring_generation = gauge(
            &mut registry,
            "ring_generation",
            "Generation of the running ring",
        );
        let ring_shards = gauge(&mut registry, "ring_shards", "Shards in the running ring");
        let reloads = Family::<ResultLabel, Gauge>::default();
        registry.register(
            "reloads",
            "Config reloads since start, by result",
            reloads.clone(),
        );
        let last_reload = gauge(
            &mut registry,
            "last_reload_timestamp_seconds",
            "Unix time of the last applied config",
        );
        Self {
            registry,
            requests,
            latency,
            get_first_byte,
            bytes_sent,
            bytes_received,
            leases_granted,
            lease_waits,
            lease_waits_hit,
            purges,
            memory_bytes,
            memory_entries,
            memory_tracked_keys,
            memory_admissions,
            memory_evictions,
            memory_refusals,
            shard_up,
            shard_errors,
            shard_coalesced,
            shard_used_memory,
            shard_keys,
            ring_generation,
            ring_shards,
            reloads,
            last_reload,
        }
    }

    /// A counter of requests by RPC and outcome.
    pub fn count(&self, rpc: &'static str, outcome: &'static str) -> u64 {
        self.requests
            .get_or_create(&RpcOutcome { rpc, outcome })
            .get()
    }

    /// Counts one finished request. The labels are static: no allocation per request.
    pub fn request(&self, rpc: &'static str, outcome: &'static str, elapsed: Duration) {
        self.requests
            .get_or_create(&RpcOutcome { rpc, outcome })
            .inc();
        self.latency
            .get_or_create(&Rpc { rpc })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition, with the values read at scrape time refreshed first.
    pub fn encode(&self, sources: &Sources) -> String {
        let m = sources.memory.stats();
        self.memory_bytes.set(m.bytes as i64);
        self.memory_entries.set(m.entries as i64);
        self.memory_tracked_keys.set(m.tracked_keys as i64);
        self.memory_admissions.set(m.admissions as i64);
        let reason = |r: &str| ResultLabel {
            result: r.to_owned(),
        };
        self.memory_evictions
            .get_or_create(&reason("room"))
            .set(m.evicted_for_room as i64);
        for (r, n) in [
            ("not_popular", m.refused_not_popular),
            ("excluded", m.refused_excluded),
            ("no_room", m.refused_no_room),
            ("too_large", m.refused_too_large),
            ("invalidated", m.refused_invalidated),
        ] {
            self.memory_refusals.get_or_create(&reason(r)).set(n as i64);
        }
        let ring = sources.ring.load();
        self.ring_generation.set(ring.generation as i64);
        self.ring_shards.set(ring.shards().len() as i64);
        // Shards that left the ring stop being exported.
        for family in [&self.shard_up, &self.shard_errors, &self.shard_coalesced] {
            family.clear();
        }
        for shard in ring.shards() {
            let label = ShardLabel {
                shard: shard.name().to_owned(),
            };
            self.shard_up
                .get_or_create(&label)
                .set(i64::from(shard.is_up()));
            self.shard_errors
                .get_or_create(&label)
                .set(shard.errors() as i64);
            self.shard_coalesced
                .get_or_create(&label)
                .set(shard.coalesced_reads() as i64);
        }
        self.reloads
            .get_or_create(&reason("applied"))
            .set(sources.reloads.applied.load(Ordering::Relaxed) as i64);
        self.reloads
            .get_or_create(&reason("rejected"))
            .set(sources.reloads.failed.load(Ordering::Relaxed) as i64);
        self.last_reload
            .set(sources.reloads.last_applied_unix.load(Ordering::Relaxed) as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Reads each shard's real memory use and key count, every `interval`.
    pub async fn poll_shards(self: Arc<Self>, ring: Arc<ArcSwap<Ring>>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ring = ring.load_full();
            self.shard_used_memory.clear();
            self.shard_keys.clear();
            for shard in ring.shards() {
                if let Ok((used, keys)) = shard.usage().await {
                    let label = ShardLabel {
                        shard: shard.name().to_owned(),
                    };
                    self.shard_used_memory
                        .get_or_create(&label)
                        .set(used as i64);
                    self.shard_keys.get_or_create(&label).set(keys as i64);
                }
            }
        }
    }
}

/// What `/metrics` and `/readyz` read.
pub struct Sources {
    pub memory: Arc<MemoryStore>,
    pub ring: Arc<ArcSwap<Ring>>,
    pub reloads: Arc<ReloadStats>,
    /// False once shutdown started.
    pub ready: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>, sources: Arc<Sources>) {
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, sources) = (metrics.clone(), sources.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, sources) = (metrics.clone(), sources.clone());
                async move { Ok::<_, Infallible>(route(&req, &metrics, &sources)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

fn route<B>(req: &Request<B>, metrics: &Metrics, sources: &Sources) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode(sources),
        ),
        (&hyper::Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        (&hyper::Method::GET, "/readyz") => {
            if sources.ready.load(Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n".into(),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
