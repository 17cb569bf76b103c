//! Making a shard's clients: the command pool and the subscriber, with TLS from our own CA
//! file, the password from a file, and a reconnect policy that never gives up.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::config::ServerConfig;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tracing::warn;

use super::upload::UPLOAD_MIB_PER_POOL_CONNECTION;
use super::{health_loop, Direct, Shard, Subscription};
use crate::config::{redact_url, RedisConfig, ShardConfig};

impl Shard {
    /// Creates the pool and starts connecting. Waits at most `wait` for a first connection; a
    /// shard that is down then starts as down and is retried in the background.
    pub async fn connect(
        cfg: &ShardConfig,
        redis: &RedisConfig,
        wait: Duration,
        subscription: &Arc<dyn Subscription>,
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
        let tls = if tls {
            let ca = redis.tls_ca_file.as_deref().ok_or_else(|| {
                Error::new(ErrorKind::Config, "rediss:// needs redis.tls_ca_file")
            })?;
            let tls = Arc::new(shard_tls(ca)?);
            config.tls = Some(tokio_rustls::TlsConnector::from(tls.clone()).into());
            Some(tls)
        } else {
            None
        };
        let ServerConfig::Centralized { server } = &config.server else {
            return Err(Error::new(ErrorKind::Config, "a shard is one Redis server"));
        };
        let direct = Direct {
            host: server.host.to_string(),
            port: server.port,
            tls,
            username: config.username.clone(),
            password: config.password.clone(),
            database: config.database,
            connect_timeout: redis.connect_timeout,
        };
        let subscriber = Builder::from_config(config.clone())
            .with_connection_config(|c| {
                c.connection_timeout = redis.connect_timeout;
                c.internal_command_timeout = redis.command_timeout;
            })
            // Pub/sub messages buffered between the connection and the task that applies them:
            // a burst of Puts from many replicas arrives faster than it is applied for a moment.
            // Should it still overflow, the replica treats it as lost events ([`Subscription::lost`]).
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
        tokio::spawn(super::subscription::listen(
            subscriber.clone(),
            cfg.name.clone(),
            messages,
            reconnects,
            Arc::downgrade(subscription),
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
            direct,
            upload_slots: Arc::new(tokio::sync::Semaphore::new(
                redis.pool_size * UPLOAD_MIB_PER_POOL_CONNECTION,
            )),
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
}

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

/// Retries forever, from 5 ms up to 2 s apart, with a little jitter so replicas do not reconnect
/// in lockstep. With `fail_fast` off the first connection also goes through this policy, so its
/// first delay is what a new shard waits before its first attempt: kept small.
fn reconnect_policy() -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new_exponential(0, 5, 2_000, 2);
    policy.set_jitter(20);
    policy
}
