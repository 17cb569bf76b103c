//! Every rule a config must follow, checked in one pass that reports all problems, each naming
//! its key.

use std::collections::HashSet;

use super::*;

impl Config {
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
        if r.upload_max_bytes > super::MAX_UPLOAD_BYTES {
            problem(
                "redis.upload_max_bytes".into(),
                format!(
                    "must be at most {} (Redis's default proto-max-bulk-len), got {}",
                    super::MAX_UPLOAD_BYTES,
                    r.upload_max_bytes
                ),
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
