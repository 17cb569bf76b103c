//! The YAML configuration: a serde model with named defaults, then one validation step whose
//! messages name the key they are about (`shards[2].url: …`). The same file is the Helm ConfigMap.

use std::collections::HashSet;
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
    /// TTL of the temporary key a Put writes to; refreshed while the Put is alive, so a writer
    /// that crashed leaks nothing for longer than this.
    #[serde(default = "default_temp_key_ttl", with = "humantime_serde")]
    pub temp_key_ttl: Duration,
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

    /// Checks every rule and returns all problems, not only the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });

        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_bytes) {
            problem(
                "chunk_bytes".into(),
                format!(
                    "must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}, got {}",
                    self.chunk_bytes
                ),
            );
        }
        if self.max_object_bytes == 0 {
            problem("max_object_bytes".into(), "must be greater than 0".into());
        }
        if self.memory.max_object_bytes > self.memory.max_bytes {
            problem(
                "memory.max_object_bytes".into(),
                format!(
                    "must not exceed memory.max_bytes ({}), got {}",
                    self.memory.max_bytes, self.memory.max_object_bytes
                ),
            );
        }
        let m = &self.memory;
        if m.tracked_window < Duration::from_secs(1)
            || m.tracked_window > Duration::from_secs(7 * 24 * 3600)
        {
            problem(
                "memory.tracked_window".into(),
                format!("must be between 1s and 7d, got {:?}", m.tracked_window),
            );
        }
        if m.min_downloads == 0 {
            problem("memory.min_downloads".into(), "must be at least 1".into());
        }
        if self.metrics_listen.is_some() && self.metrics_listen == Some(self.listen) {
            problem("metrics_listen".into(), "must differ from listen".into());
        }

        let mut names = HashSet::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let at = format!("shards[{i}]");
            if shard.name.is_empty() {
                problem(format!("{at}.name"), "must not be empty".into());
            } else if shard.name.len() > 64
                || !shard
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                problem(
                    format!("{at}.name"),
                    format!(
                        "{:?}: use at most 64 characters from A-Z a-z 0-9 - _ .",
                        shard.name
                    ),
                );
            } else if !names.insert(shard.name.as_str()) {
                problem(
                    format!("{at}.name"),
                    format!(
                        "{:?} is used by an earlier shard; names must be unique",
                        shard.name
                    ),
                );
            }
            match check_shard_url(&shard.url) {
                Err(e) => problem(format!("{at}.url"), e),
                Ok(url) if url.scheme() == "rediss" && self.redis.tls_ca_file.is_none() => problem(
                    format!("{at}.url"),
                    "rediss:// needs redis.tls_ca_file, the CA the shard's certificate is \
                         verified against"
                        .into(),
                ),
                Ok(url) if url.password().is_some() && self.redis.password_file.is_some() => {
                    problem(
                        format!("{at}.url"),
                        "has a password while redis.password_file is set; use one of them".into(),
                    )
                }
                Ok(_) => {}
            }
            if shard.weight == 0 || shard.weight > 10_000 {
                problem(
                    format!("{at}.weight"),
                    format!("must be between 1 and 10000, got {}", shard.weight),
                );
            }
        }

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problem(
                "log.level".into(),
                format!(
                    "{:?} is not a tracing filter (try info, debug, mediacache=debug)",
                    self.log.level
                ),
            );
        }
        if self.reload.debounce > Duration::from_secs(10) {
            problem(
                "reload.debounce".into(),
                format!("must be at most 10s, got {:?}", self.reload.debounce),
            );
        }
        if !self.reload.interval.is_zero() && self.reload.interval < Duration::from_secs(1) {
            problem(
                "reload.interval".into(),
                format!(
                    "must be 0s (off) or at least 1s, got {:?}",
                    self.reload.interval
                ),
            );
        }

        if self.lease_ttl < Duration::from_millis(100) || self.lease_ttl > Duration::from_secs(600)
        {
            problem(
                "lease_ttl".into(),
                format!("must be between 100ms and 10m, got {:?}", self.lease_ttl),
            );
        }
        if self.quarantine_ttl < Duration::from_secs(1) {
            problem(
                "quarantine_ttl".into(),
                format!("must be at least 1s, got {:?}", self.quarantine_ttl),
            );
        }
        if self.quarantine_sync < Duration::from_millis(100)
            || self.quarantine_sync > Duration::from_secs(60)
        {
            problem(
                "quarantine_sync".into(),
                format!(
                    "must be between 100ms and 60s, got {:?}",
                    self.quarantine_sync
                ),
            );
        }

        let r = &self.redis;
        let timeouts = [
            ("redis.connect_timeout", r.connect_timeout),
            ("redis.command_timeout", r.command_timeout),
            ("redis.health_interval", r.health_interval),
        ];
        for (path, value) in timeouts {
            if value.is_zero() || value > Duration::from_secs(60) {
                problem(
                    path.into(),
                    format!("must be between 1ms and 60s, got {value:?}"),
                );
            }
        }
        if r.temp_key_ttl < Duration::from_secs(5) || r.temp_key_ttl > Duration::from_secs(3600) {
            problem(
                "redis.temp_key_ttl".into(),
                format!("must be between 5s and 1h, got {:?}", r.temp_key_ttl),
            );
        }
        if r.username.as_deref().is_some_and(|u| {
            u.is_empty() || u.len() > 128 || u.bytes().any(|b| b.is_ascii_whitespace())
        }) {
            problem(
                "redis.username".into(),
                "must be 1 to 128 characters without spaces".into(),
            );
        }
        let mut file = |path: String, value: &Path| {
            if value.as_os_str().is_empty() {
                problem(path, "must not be empty".into());
            }
        };
        if let Some(f) = &r.password_file {
            file("redis.password_file".into(), f);
        }
        if let Some(f) = &r.tls_ca_file {
            file("redis.tls_ca_file".into(), f);
        }
        for (i, f) in self.auth.token_files.iter().enumerate() {
            file(format!("auth.token_files[{i}]"), f);
        }
        for (i, f) in self.auth.read_only_token_files.iter().enumerate() {
            file(format!("auth.read_only_token_files[{i}]"), f);
        }
        if let Some(tls) = &self.tls {
            file("tls.cert_file".into(), &tls.cert_file);
            file("tls.key_file".into(), &tls.key_file);
            if let Some(ca) = &tls.client_ca_file {
                file("tls.client_ca_file".into(), ca);
            }
        }
        let l = &self.limits;
        if l.max_streams == 0 || l.max_streams > 1_000_000 {
            problem(
                "limits.max_streams".into(),
                format!("must be between 1 and 1000000, got {}", l.max_streams),
            );
        }
        if l.max_streams_per_connection == 0 || l.max_streams_per_connection > 100_000 {
            problem(
                "limits.max_streams_per_connection".into(),
                format!(
                    "must be between 1 and 100000, got {}",
                    l.max_streams_per_connection
                ),
            );
        }
        if l.request_timeout < Duration::from_secs(1)
            || l.request_timeout > Duration::from_secs(86_400)
        {
            problem(
                "limits.request_timeout".into(),
                format!("must be between 1s and 24h, got {:?}", l.request_timeout),
            );
        }
        if l.idle_timeout < Duration::from_millis(100) || l.idle_timeout > l.request_timeout {
            problem(
                "limits.idle_timeout".into(),
                format!(
                    "must be between 100ms and limits.request_timeout, got {:?}",
                    l.idle_timeout
                ),
            );
        }
        // A Put's temporary key is renewed by the first chunk that arrives a third of its TTL
        // after the last renewal, and a client may pause up to `idle_timeout` between chunks:
        // the TTL must outlast a third of itself plus one pause, so twice the pause is asked.
        if r.temp_key_ttl < 2 * l.idle_timeout {
            problem(
                "redis.temp_key_ttl".into(),
                format!(
                    "must be at least twice limits.idle_timeout ({:?}), got {:?}",
                    l.idle_timeout, r.temp_key_ttl
                ),
            );
        }
        if !(16..=1 << 20).contains(&r.event_buffer) {
            problem(
                "redis.event_buffer".into(),
                format!("must be between 16 and 1048576, got {}", r.event_buffer),
            );
        }
        if r.pool_size == 0 || r.pool_size > 64 {
            problem(
                "redis.pool_size".into(),
                format!("must be between 1 and 64, got {}", r.pool_size),
            );
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The parsed URL, if it is one a shard can have.
fn check_shard_url(raw: &str) -> Result<url::Url, String> {
    let url =
        url::Url::parse(raw).map_err(|e| format!("{:?} is not a URL: {e}", redact_url(raw)))?;
    match url.scheme() {
        "redis" | "rediss" => {}
        other => {
            return Err(format!(
                "scheme {other:?} is not supported; use redis:// or rediss:// (TLS)"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() && path.parse::<u8>().is_err() {
        return Err(format!("path {path:?} must be a database number (0-255)"));
    }
    Ok(url)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_the_memory_only_default() {
        let loaded = Config::from_yaml("").unwrap();
        assert_eq!(loaded.config, Config::default());
        assert!(loaded.config.shards.is_empty());
        assert_eq!(loaded.config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(loaded.config.chunk_bytes, 256 * 1024);
    }

    #[test]
    fn full_config_parses() {
        let text = r#"
listen: 0.0.0.0:7000
metrics_listen: 0.0.0.0:9100
chunk_bytes: 131072
max_object_bytes: 1048576
memory: { max_bytes: 2048000, max_object_bytes: 1024 }
failover: next
shards:
  - { name: a, url: "redis://10.0.0.1:6379" }
  - { name: b, url: "redis://user:secret@10.0.0.2:6380/2", weight: 3 }
redis: { connect_timeout: 250ms, command_timeout: 2s, pool_size: 2 }
"#;
        let c = Config::from_yaml(text).unwrap().config;
        assert_eq!(c.shards.len(), 2);
        assert_eq!(c.shards[0].weight, 1);
        assert_eq!(c.shards[1].weight, 3);
        assert_eq!(c.failover, Failover::Next);
        assert_eq!(c.redis.command_timeout, Duration::from_secs(2));
        assert_eq!(c.redis.temp_key_ttl, Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = Config::from_yaml("shards: []\nlisten_addr: 1.2.3.4:5\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = Config::from_yaml("memory: { max_byte: 3 }").unwrap_err();
        assert!(err.to_string().contains("max_byte"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
chunk_bytes: 10
shards:
  - { name: a, url: "redis://h:1" }
  - { name: a, url: "http://h:1" }
  - { name: "", url: "redis://h:1", weight: 0 }
  - { name: c, url: "not a url" }
  - { name: d, url: "rediss://h:1" }
  - { name: e, url: "tcp://h:1" }
redis: { pool_size: 0 }
"#;
        let problems = Config::from_yaml(text).unwrap_err().problems();
        let paths: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "chunk_bytes",
                "shards[1].name",
                "shards[1].url",
                "shards[2].name",
                "shards[2].weight",
                "shards[3].url",
                "shards[4].url",
                "shards[5].url",
                "redis.pool_size"
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn a_temp_key_ttl_must_outlast_a_client_pause() {
        let text =
            "redis: { temp_key_ttl: 59s }\nlimits: { idle_timeout: 30s }\nquarantine_sync: 10ms\n";
        let problems = Config::from_yaml(text).unwrap_err().problems();
        assert!(
            problems
                .iter()
                .any(|p| p
                    .starts_with("redis.temp_key_ttl: must be at least twice limits.idle_timeout")),
            "{problems:#?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("quarantine_sync:")),
            "{problems:#?}"
        );
        Config::from_yaml("redis: { temp_key_ttl: 60s }\nlimits: { idle_timeout: 30s }\n").unwrap();
    }

    #[test]
    fn digest_follows_the_text() {
        let a = Config::from_yaml("shards: []").unwrap();
        assert_eq!(a.digest, digest("shards: []"));
        let b = Config::from_yaml("shards: [] # comment").unwrap();
        assert_eq!(a.config, b.config);
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.digest.len(), 64);
    }

    #[test]
    fn restart_only_settings_are_named() {
        let running = Config::default();
        let mut next = running.clone();
        next.shards.push(ShardConfig {
            name: "a".into(),
            url: "redis://h:1".into(),
            weight: 1,
        });
        next.redis.pool_size = 9;
        next.failover = Failover::Next;
        assert!(
            next.needs_restart(&running).is_empty(),
            "shards, redis and failover are live"
        );
        next.listen = "127.0.0.1:1".parse().unwrap();
        next.memory.max_bytes = 1;
        assert_eq!(next.needs_restart(&running), ["listen", "memory"]);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://user:hunter2@host:6379/1"),
            "redis://user:REDACTED@host:6379/1"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert!(!redact_url("redis//user:hunter2@x").contains("hunter2"));
    }
}
