//! `mediacache.v1.CacheAdminService`: origin purges, the replica's counters, and the ring's state.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::error::ServiceError;
use super::stream::Outcome;
use crate::proto::{
    self, PurgeOriginRequest, PurgeOriginResponse, RingStatusRequest, RingStatusResponse,
    ShardStatus, StatsRequest, StatsResponse,
};
use crate::reload::ReloadStats;
use crate::ring::Ring;
use crate::store::Store;
use crate::telemetry::Metrics;

pub struct AdminHandlers {
    /// Purges and the memory tier's usage go through the store like every request.
    store: Arc<Store>,
    /// The ring now running, read for its status.
    ring: Arc<ArcSwap<Ring>>,
    /// Written by the reloader, reported by RingStatus.
    reloads: Arc<ReloadStats>,
    /// Shared with the media service, whose requests Stats counts.
    metrics: Arc<Metrics>,
    /// For Stats' uptime.
    started: Instant,
}

impl AdminHandlers {
    pub fn new(
        store: Arc<Store>,
        ring: Arc<ArcSwap<Ring>>,
        reloads: Arc<ReloadStats>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            ring,
            reloads,
            metrics,
            started: Instant::now(),
        }
    }
}

#[tonic::async_trait]
impl proto::cache_admin_service_server::CacheAdminService for AdminHandlers {
    type PurgeOriginStream =
        Pin<Box<dyn Stream<Item = Result<PurgeOriginResponse, Status>> + Send>>;

    /// Runs in its own task, so a slow purge neither blocks nor is cancelled by the caller;
    /// progress goes out as it is made (dropped, not queued, if the caller reads slowly).
    async fn purge_origin(
        &self,
        req: Request<PurgeOriginRequest>,
    ) -> Result<Response<Self::PurgeOriginStream>, Status> {
        let req = req.into_inner();
        crate::key::check_origin(&req.origin)?;
        self.metrics.purges.inc();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        let ring = self.ring.clone();
        tokio::spawn(async move {
            let progress = tx.clone();
            let (removed, failed) = store
                .purge_origin(
                    &req.origin,
                    req.quarantine,
                    |shard, removed, done, total| {
                        let _ = progress.try_send(Ok(PurgeOriginResponse {
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
                let shards = ring.load().shards().len();
                Ok(PurgeOriginResponse {
                    shard: String::new(),
                    removed,
                    shards_done: shards as u32,
                    shards_total: shards as u32,
                    done: true,
                })
            } else {
                Err(ServiceError::PurgeIncomplete {
                    shards: failed,
                    removed,
                }
                .into())
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
            get_hits: m.count("get", Outcome::Hit.as_str()),
            get_misses: m.count("get", Outcome::Miss.as_str()),
            bytes_served: m.bytes_sent.get(),
            bytes_received: m.bytes_received.get(),
            puts_stored: m.count("put", Outcome::Stored.as_str()),
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
        let ring = self.ring.load_full();
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
