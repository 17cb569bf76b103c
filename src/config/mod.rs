//! The YAML configuration: a serde model with named defaults, then one validation step whose
//! messages name the key they are about (`shards[2].url: …`). The same file is the Helm ConfigMap.
//!
//! This file holds the model, its defaults and loading; `validate` holds the rules.

#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Largest chunk the service sends or buffers: tonic decodes at most 4 MiB per message by default,
/// and a chunk well under that keeps per-stream memory small.
pub const MAX_CHUNK_BYTES: u64 = MIB;
/// Smallest useful chunk; below this, per-message overhead dominates.
pub const MIN_CHUNK_BYTES: u64 = 4 * KIB;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP listen address for metrics and health; none when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Size of the body chunks the service streams to readers and writes to Redis.
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u64,
    /// Largest object the tier stores at all; larger Puts answer `TOO_LARGE`.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    #[serde(default)]
    pub memory: MemoryConfig,
    /// The Redis shards of the ring. Empty: the service runs on its memory tier alone.
    #[serde(default)]
    pub shards: Vec<ShardConfig>,
    /// What a Put does when the owner shard of its key is down.
    #[serde(default)]
    pub failover: Failover,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub reload: ReloadConfig,
    /// How long a fill lease lasts if its holder never Puts.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long a quarantined media's Puts are refused.
    #[serde(default = "default_quarantine_ttl", with = "humantime_serde")]
    pub quarantine_ttl: Duration,
    /// How often each replica merges its quarantines with every shard's, writing back those a
    /// shard lost (eviction, restart, or joining the ring) and learning those made elsewhere.
    #[serde(default = "default_quarantine_sync", with = "humantime_serde")]
    pub quarantine_sync: Duration,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Client tokens; none configured means no authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// TLS on the gRPC port; none means plain text.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How long streams in flight may run after SIGTERM before they are cut.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// Logging; `RUST_LOG` and `--log-format` take precedence. Needs a restart to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `mediacache=debug,warn`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

/// Bounds that keep one misbehaving client from exhausting the tier. Need a restart to change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests in flight on this replica (a Get counts until its stream ends); more answer
    /// `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Concurrent HTTP/2 streams one client connection may open.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Longest one Get or Put may run, start to end; then `DEADLINE_EXCEEDED`.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A Put whose client sends nothing, or a Get whose client reads nothing, for this long is
    /// cut off with `DEADLINE_EXCEEDED` and its buffers are freed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

fn default_max_streams() -> usize {
    4096
}
fn default_max_streams_per_connection() -> u32 {
    512
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_streams: default_max_streams(),
            max_streams_per_connection: default_max_streams_per_connection(),
            request_timeout: default_request_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

/// Bearer tokens clients must send (`authorization: Bearer TOKEN`), one per file so that each
/// can be mounted from a Kubernetes Secret. The files are re-read while the service runs, so a
/// token is rotated by adding the new file's token, moving clients, then removing the old one.
/// Which files are read needs a restart to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens that may call every RPC.
    #[serde(default)]
    pub token_files: Vec<PathBuf>,
    /// Tokens that may only read: `Get`, `Stat`, `RingStatus`, `Stats`.
    #[serde(default)]
    pub read_only_token_files: Vec<PathBuf>,
}

impl AuthConfig {
    /// Whether any token is configured, and so every RPC but health needs one.
    pub fn enabled(&self) -> bool {
        !self.token_files.is_empty() || !self.read_only_token_files.is_empty()
    }
}

/// TLS on the gRPC port. The files are PEM and are re-read when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// How `serve --config FILE` notices changes to FILE. Needs a restart to change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the file's directory (a ConfigMap volume swaps a `..data` symlink there).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// Quiet time after a file event before re-reading; one update is a burst of events.
    #[serde(default = "default_debounce", with = "humantime_serde")]
    pub debounce: Duration,
    /// Periodic re-read, a safety net for missed events; 0s disables it.
    #[serde(default = "default_reread", with = "humantime_serde")]
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of object bodies the memory tier may hold.
    #[serde(default = "default_memory_max_bytes")]
    pub max_bytes: u64,
    /// Largest object the memory tier holds.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Span over which downloads per key are counted.
    #[serde(default = "default_tracked_window", with = "humantime_serde")]
    pub tracked_window: Duration,
    /// Downloads in the window before a key is admitted (when shards are configured).
    #[serde(default = "default_min_downloads")]
    pub min_downloads: u32,
    /// A newly cached entry cannot be evicted for this long.
    #[serde(default = "default_min_cache_time", with = "humantime_serde")]
    pub min_cache_time: Duration,
    /// An evicted key is not admitted again for this long.
    #[serde(default = "default_min_evicted_time", with = "humantime_serde")]
    pub min_evicted_time: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Stable identity of the shard: the ring hashes this name, not the URL, so re-addressing a
    /// shard moves no keys.
    pub name: String,
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Where a Put goes, and where a Get looks, while a key's owner shard is down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failover {
    /// Only the owner: a Put answers `UNAVAILABLE`, a Get misses. The default, because a copy
    /// written elsewhere is not found once the owner is back, and is left behind as a stray copy.
    #[default]
    None,
    /// The next live shard in the key's rendezvous order takes the Put, and Gets look there too
    /// while the owner is down.
    Next,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Time allowed to open a connection (TCP and TLS).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for one command; a cache answers a miss rather than wait longer.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Connections per shard.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How often a shard is pinged to learn whether it is up.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    /// Event messages buffered per shard before the replica counts them as lost (and drops its
    /// memory tier). Preallocated: about 0.7 MiB per 1024 per shard.
    #[serde(default = "default_event_buffer")]
    pub event_buffer: usize,
    /// TTL of the temporary key a Put writes to; refreshed while a Put written in pieces is
    /// alive, so a writer that crashed leaks nothing for longer than this.
    #[serde(default = "default_temp_key_ttl", with = "humantime_serde")]
    pub temp_key_ttl: Duration,
    /// Longest value (header and body) a Put sends its shard as one `SET`, streamed over a
    /// connection of its own as the body arrives; a longer one is written a megabyte at a
    /// time. 0 writes every value past its first megabyte in pieces. A shard's
    /// `proto-max-bulk-len` and `client-query-buffer-limit` must be at least this; it counts
    /// the whole value in its memory from the upload's start.
    #[serde(default = "default_upload_max_bytes")]
    pub upload_max_bytes: u64,
    /// Redis ACL user of every shard; none means the default user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the password of every shard (e.g. mounted from a Secret), so that it never
    /// appears in this config. Read when a shard's connection is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) that `rediss://` shards are verified against; required by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_chunk_bytes() -> u64 {
    256 * KIB
}
/// Redis refuses a bulk string longer than its `proto-max-bulk-len`, 512 MiB unless configured
/// otherwise: the most `redis.upload_max_bytes` may be.
pub const MAX_UPLOAD_BYTES: u64 = 512 * MIB;
fn default_upload_max_bytes() -> u64 {
    MAX_UPLOAD_BYTES
}
fn default_max_object_bytes() -> u64 {
    100 * MIB
}
fn default_memory_max_bytes() -> u64 {
    1000 * MIB
}
fn default_tracked_window() -> Duration {
    Duration::from_secs(30 * 60)
}
/// Seed 001 suggests 5; the simulator's generated trace of its room compositions shows 2 ahead
/// on object and byte hit ratio at every budget tried (README, "Cache strategy").
fn default_min_downloads() -> u32 {
    2
}
fn default_min_cache_time() -> Duration {
    Duration::from_secs(300)
}
fn default_min_evicted_time() -> Duration {
    Duration::from_secs(60)
}
fn default_weight() -> u32 {
    1
}
fn default_connect_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_command_timeout() -> Duration {
    Duration::from_millis(1000)
}
fn default_pool_size() -> usize {
    4
}
fn default_event_buffer() -> usize {
    8192
}
fn default_health_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_temp_key_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_quarantine_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_quarantine_sync() -> Duration {
    Duration::from_secs(2)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_true() -> bool {
    true
}
fn default_debounce() -> Duration {
    Duration::from_millis(200)
}
fn default_reread() -> Duration {
    Duration::from_secs(30)
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: default_debounce(),
            interval: default_reread(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            metrics_listen: None,
            chunk_bytes: default_chunk_bytes(),
            max_object_bytes: default_max_object_bytes(),
            memory: MemoryConfig::default(),
            shards: Vec::new(),
            failover: Failover::default(),
            redis: RedisConfig::default(),
            reload: ReloadConfig::default(),
            lease_ttl: default_lease_ttl(),
            quarantine_ttl: default_quarantine_ttl(),
            quarantine_sync: default_quarantine_sync(),
            shutdown_grace: default_shutdown_grace(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_memory_max_bytes(),
            max_object_bytes: default_max_object_bytes(),
            tracked_window: default_tracked_window(),
            min_downloads: default_min_downloads(),
            min_cache_time: default_min_cache_time(),
            min_evicted_time: default_min_evicted_time(),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            command_timeout: default_command_timeout(),
            pool_size: default_pool_size(),
            health_interval: default_health_interval(),
            event_buffer: default_event_buffer(),
            temp_key_ttl: default_temp_key_ttl(),
            upload_max_bytes: default_upload_max_bytes(),
            username: None,
            password_file: None,
            tls_ca_file: None,
        }
    }
}

/// One problem found in a config, with the path of the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid config:\n{}", .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem, one per line, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(problems) => problems.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// A validated config together with the digest of the text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub config: Config,
    /// SHA-256 (hex) of the source text; identifies the config in RingStatus.
    pub digest: String,
    /// The file it was read from, watched for changes; none for the built-in default.
    pub path: Option<std::path::PathBuf>,
}

/// SHA-256 (hex) of a config text.
pub fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Config {
    /// Parses and validates YAML text. An empty document is the default config.
    pub fn from_yaml(text: &str) -> Result<Loaded, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            yaml_serde::from_str(text).map_err(|e| ConfigError::Parse(parse_message(&e)))?
        };
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(Loaded {
            config,
            digest: digest(text),
            path: None,
        })
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut loaded = Self::from_yaml(&text)?;
        loaded.path = Some(path.to_owned());
        Ok(loaded)
    }

    /// Names of the settings that differ from `running` and only take effect after a restart.
    pub fn needs_restart(&self, running: &Config) -> Vec<&'static str> {
        // Destructured, so that a new field cannot be added without deciding here whether it
        // is live.
        let Config {
            listen,
            metrics_listen,
            chunk_bytes,
            max_object_bytes,
            memory,
            shards: _,
            failover: _,
            redis: _,
            reload,
            lease_ttl,
            quarantine_ttl,
            quarantine_sync,
            log,
            limits,
            auth,
            tls,
            shutdown_grace,
        } = self;
        let mut changed = Vec::new();
        let mut check = |name: &'static str, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("listen", *listen != running.listen);
        check("metrics_listen", *metrics_listen != running.metrics_listen);
        check("chunk_bytes", *chunk_bytes != running.chunk_bytes);
        check(
            "max_object_bytes",
            *max_object_bytes != running.max_object_bytes,
        );
        check("memory", *memory != running.memory);
        check("reload", *reload != running.reload);
        check("lease_ttl", *lease_ttl != running.lease_ttl);
        check("quarantine_ttl", *quarantine_ttl != running.quarantine_ttl);
        check(
            "quarantine_sync",
            *quarantine_sync != running.quarantine_sync,
        );
        check("shutdown_grace", *shutdown_grace != running.shutdown_grace);
        check("log", *log != running.log);
        check("limits", *limits != running.limits);
        check("auth", *auth != running.auth);
        check("tls", *tls != running.tls);
        changed
    }
}

/// The URL with any password replaced, for logs and status output.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("REDACTED"));
            }
            url.to_string()
        }
        // Not a URL: it may still hold a secret, so show only its scheme-like prefix.
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…"),
            None => "…".to_string(),
        },
    }
}

fn parse_message(e: &yaml_serde::Error) -> String {
    match e.location() {
        Some(loc) => format!("line {} column {}: {e}", loc.line(), loc.column()),
        None => e.to_string(),
    }
}
