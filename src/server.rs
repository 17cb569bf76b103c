//! Builds the ring and the store from a config and serves gRPC until shutdown.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use futures_util::TryStreamExt;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::auth::{Auth, AuthLayer};
use crate::coalesce::Coalesced;
use crate::config::Loaded;
use crate::events::Events;
use crate::proto::{
    self, cache_admin_service_server::CacheAdminServiceServer,
    media_cache_service_server::MediaCacheServiceServer,
};
use crate::reload::{ReloadStats, Reloader};
use crate::ring::Ring;
use crate::service::{AdminHandlers, Drain, MediaCacheRoutes, MediaHandlers};
use crate::store::{
    memory::MemoryStore, quarantine::Quarantine, redis::RedisStore, Settings, Store, StoreListener,
};
use crate::telemetry::{self, Metrics, Sources};
use crate::tls::Tls;
use crate::{clock, wire};

/// Per connection; high enough for busy media repos, still a bound against a hostile peer.
const MAX_LOCAL_ERROR_RESETS: usize = 1 << 16;

/// Largest message a client may send: a chunk of the largest size the service itself uses,
/// plus room for the header fields. A bigger message ends its request with `OUT_OF_RANGE`.
const MAX_MESSAGE_BYTES: usize = crate::config::MAX_CHUNK_BYTES as usize + 64 * 1024;

/// How often each shard's real memory use and key count are read for metrics.
const SHARD_POLL: Duration = Duration::from_secs(5);

/// Serves on `listener` until `shutdown` completes, then drains in-flight streams for up to
/// `shutdown_grace`.
pub async fn run(
    listener: TcpListener,
    loaded: Loaded,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Loaded {
        config,
        digest,
        path,
    } = loaded;
    let auth = Auth::load(&config.auth)?;
    let tls = config.tls.as_ref().map(Tls::load).transpose()?;
    // Dropped (and so stopped) when `run` returns.
    let _auth_watch = auth
        .enabled()
        .then(|| AbortOnDrop(tokio::spawn(auth.clone().watch())));
    let _tls_watch = tls
        .as_ref()
        .map(|tls| AbortOnDrop(tokio::spawn(tls.clone().watch())));
    let memory = Arc::new(MemoryStore::new(&config.memory));
    let quarantine = Arc::new(Quarantine::default());
    let events = Events::new(Arc::new(StoreListener::new(
        memory.clone(),
        quarantine.clone(),
    )));
    // Every shard's subscription delivers to the events.
    let subscription: Arc<dyn crate::shard::Subscription> = events.clone();
    let first = Ring::build(
        &config,
        1,
        digest.clone(),
        None,
        config.redis.connect_timeout,
        &subscription,
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    let ring = Arc::new(ArcSwap::from_pointee(first));
    let store = Arc::new(Store::new(
        memory.clone(),
        RedisStore::new(ring.clone(), config.chunk_bytes, config.redis.temp_key_ttl),
        events.clone(),
        Settings {
            chunk_bytes: config.chunk_bytes,
            lease_ttl: config.lease_ttl,
            quarantine_ttl: config.quarantine_ttl,
            quarantine,
        },
    ));
    let reloads = Arc::new(ReloadStats::default());
    reloads
        .last_applied_unix
        .store(clock::unix_secs(), std::sync::atomic::Ordering::Relaxed);
    let metrics = Arc::new(Metrics::new(
        ring.clone(),
        events.lost_counter(),
        store.quarantines().restored_counter(),
    ));
    // Dropped (and so stopped) when `run` returns.
    let _quarantines = AbortOnDrop(tokio::spawn(
        store.clone().keep_quarantines(config.quarantine_sync),
    ));
    let ready = Arc::new(AtomicBool::new(true));
    // Dropped (and so stopped) when `run` returns.
    let _http = match config.metrics_listen {
        Some(addr) => {
            let http = TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics_listen: cannot listen on {addr}"))?;
            info!(addr = %http.local_addr()?, "serving /metrics, /healthz, /readyz");
            let sources = Arc::new(Sources {
                memory: memory.clone(),
                ring: ring.clone(),
                reloads: reloads.clone(),
                ready: ready.clone(),
            });
            Some(AbortOnDrop(tokio::spawn(telemetry::serve_http(
                http,
                metrics.clone(),
                sources,
            ))))
        }
        None => None,
    };
    let _poller = AbortOnDrop(tokio::spawn(
        metrics.clone().poll_shards(ring.clone(), SHARD_POLL),
    ));
    // Dropped (and so stopped) when `run` returns.
    let _reloader = path.map(|path| {
        let reloader = Arc::new(Reloader::new(
            path,
            ring.clone(),
            config.clone(),
            digest,
            reloads.clone(),
            subscription,
        ));
        AbortOnDrop(tokio::spawn(reloader.start()))
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<MediaCacheServiceServer<MediaHandlers>>()
        .await;
    health
        .set_serving::<CacheAdminServiceServer<AdminHandlers>>()
        .await;
    // Reflection in both versions: older grpcurl builds and many GUI clients speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = Arc::new(Drain::new(config.limits.max_streams));
    // Dropped (and so stopped) when `run` returns.
    let _lent = AbortOnDrop(tokio::spawn(drain.clone().take_back_expired(
        (config.limits.idle_timeout / 4).min(Duration::from_secs(1)),
    )));
    let grace = config.shutdown_grace;
    let signal = {
        let health = health.clone();
        let ready = ready.clone();
        let drain = drain.clone();
        async move {
            shutdown.await;
            info!("shutting down: refusing new requests, draining streams");
            ready.store(false, std::sync::atomic::Ordering::Relaxed);
            health
                .set_not_serving::<MediaCacheServiceServer<MediaHandlers>>()
                .await;
            let _ = stop_tx.send(true);
            // Requests in flight finish here, before the transport starts closing connections.
            if tokio::time::timeout(grace, drain.close()).await.is_err() {
                warn!(?grace, "drain grace period ran out; closing open streams");
            }
        }
    };

    let addr = listener.local_addr()?;
    let shard_count = ring.load().shards().len();
    info!(
        %addr,
        shards = shard_count,
        tls = tls.is_some(),
        client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
        tokens = auth.enabled(),
        "serving"
    );
    // TCP_NODELAY is set where connections are accepted (below and in `tls`):
    // `Server::tcp_nodelay` reaches only listeners tonic binds itself.
    let router = Server::builder()
        // A Put refused before its body was read (TOO_LARGE, UNAVAILABLE) resets the stream
        // while the client is still sending; h2 counts the frames that follow as errors and by
        // default ends the connection, with every other request on it, after 1024.
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_concurrent_streams(Some(config.limits.max_streams_per_connection))
        // Put chunks in few frames, as the client library does for Get (see `client`).
        .max_frame_size(Some(wire::MAX_FRAME_BYTES))
        .initial_stream_window_size(Some(wire::SERVER_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(wire::SERVER_CONNECTION_WINDOW_BYTES))
        // Finds peers that vanished without closing their connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(AuthLayer(auth))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(MediaCacheRoutes::new(
            MediaHandlers::new(
                store.clone(),
                config.max_object_bytes,
                metrics.clone(),
                drain,
                config.limits.clone(),
            ),
            MAX_MESSAGE_BYTES,
        ))
        .add_service(CacheAdminServiceServer::new(AdminHandlers::new(
            store.clone(),
            ring.clone(),
            reloads,
            metrics.clone(),
        )));
    let serve = async move {
        match tls {
            Some(tls) => {
                let incoming = tls.incoming(listener).map_ok(Coalesced::new);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            None => {
                // Without it, small replies wait on the peer's delayed ACK (40 ms on Linux).
                let incoming = TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .map_ok(Coalesced::new);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
        }
    };

    // A last bound, should the transport's own graceful close hang once requests are done.
    let mut stopped = stop_rx;
    let drain_deadline = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(grace + Duration::from_secs(5)).await;
    };
    tokio::select! {
        r = serve => r?,
        () = drain_deadline => warn!(?grace, "drain grace period ran out; closing open streams"),
    }
    // All at once: each shard that is down costs its whole wait.
    let ring = ring.load_full();
    futures_util::future::join_all(ring.shards().iter().map(|shard| shard.close())).await;
    info!("stopped");
    Ok(())
}

/// Aborts a background task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
