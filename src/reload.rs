//! Runtime changes of the shard ring: watch the config file's directory, debounce, re-read on
//! SIGHUP and periodically, validate, then build the next ring and publish it with `arc-swap`.
//!
//! A ConfigMap volume updates by writing a new timestamped directory and swapping the `..data`
//! symlink, so the config file itself (a symlink through `..data`) never changes in place: the
//! directory is watched, any event means "maybe changed", and the content hash decides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigError};
use crate::ring::Ring;
use crate::shard::Subscription;

/// How long a reload waits for a new shard's first connection before publishing the ring with
/// it. The running ring serves meanwhile, so waiting costs nothing but a later switch, while a
/// shard published before it connected would answer misses and `UNAVAILABLE` until it does.
const NEW_SHARD_WAIT: Duration = Duration::from_secs(2);

/// What reloads did, for RingStatus and logs.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Configs that were read but not applied (unreadable, unparseable or invalid).
    pub failed: AtomicU64,
    /// Rings published by reloads (not counting the first one).
    pub applied: AtomicU64,
    /// The last rejection, empty once a good config was applied after it.
    pub last_error: Mutex<String>,
    /// Unix seconds when the running config was applied (at start, or by the last reload).
    pub last_applied_unix: AtomicU64,
}

impl ReloadStats {
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }
}

/// Result of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Same content as the running ring (or as the last rejected text): nothing to do.
    Unchanged,
    /// A new ring was published with this generation.
    Applied(u64),
    /// The file could not be used; the running ring stays.
    Rejected(String),
}

pub struct Reloader {
    path: PathBuf,
    ring: Arc<ArcSwap<Ring>>,
    /// The config the process started with, for settings that need a restart.
    running: Config,
    stats: Arc<ReloadStats>,
    /// Handed to new shards, whose subscriptions deliver cluster events.
    subscription: Arc<dyn Subscription>,
    /// Serializes reloads and remembers what was last applied and last rejected.
    state: tokio::sync::Mutex<State>,
}

struct State {
    applied: Config,
    applied_digest: String,
    rejected_digest: Option<String>,
}

/// The shard changes between two configs, for the one log line a reload writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub reweighted: Vec<String>,
    pub readdressed: Vec<String>,
}

impl Changes {
    pub fn between(old: &Config, new: &Config) -> Self {
        let before: HashMap<&str, &config::ShardConfig> =
            old.shards.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut changes = Changes::default();
        for s in &new.shards {
            match before.get(s.name.as_str()) {
                None => changes.added.push(s.name.clone()),
                Some(prev) => {
                    if prev.weight != s.weight {
                        changes
                            .reweighted
                            .push(format!("{} {}→{}", s.name, prev.weight, s.weight));
                    }
                    if prev.url != s.url {
                        changes.readdressed.push(s.name.clone());
                    }
                }
            }
        }
        for s in &old.shards {
            if !new.shards.iter().any(|n| n.name == s.name) {
                changes.removed.push(s.name.clone());
            }
        }
        changes
    }
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        ring: Arc<ArcSwap<Ring>>,
        running: Config,
        digest: String,
        stats: Arc<ReloadStats>,
        subscription: Arc<dyn Subscription>,
    ) -> Self {
        Self {
            path,
            ring,
            stats,
            subscription,
            state: tokio::sync::Mutex::new(State {
                applied: running.clone(),
                applied_digest: digest,
                rejected_digest: None,
            }),
            running,
        }
    }

    fn reject(&self, state: &mut State, digest: Option<String>, message: String) -> Outcome {
        if digest.is_some() && state.rejected_digest == digest {
            return Outcome::Unchanged;
        }
        error!(path = %self.path.display(), error = %message, "config reload rejected; keeping the running ring");
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.stats.last_error.lock() {
            last.clone_from(&message);
        }
        state.rejected_digest = digest;
        Outcome::Rejected(message)
    }

    /// Re-reads the file and publishes a new ring when its content changed and is valid.
    pub async fn reload(&self) -> Outcome {
        let mut state = self.state.lock().await;
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                let message = format!("{}: cannot read: {e}", self.path.display());
                return self.reject(&mut state, None, message);
            }
        };
        let digest = config::digest(&text);
        if digest == state.applied_digest {
            state.rejected_digest = None;
            return Outcome::Unchanged;
        }
        let next = match Config::from_yaml(&text) {
            Ok(loaded) => loaded.config,
            Err(e) => {
                let message = match e {
                    ConfigError::Invalid(_) => e.problems().join("; "),
                    other => other.to_string(),
                };
                return self.reject(&mut state, Some(digest), message);
            }
        };
        let restart = next.needs_restart(&self.running);
        if !restart.is_empty() {
            warn!(settings = ?restart, "needs restart: these settings keep their running values");
        }

        let current = self.ring.load_full();
        let generation = current.generation + 1;
        let wait = NEW_SHARD_WAIT.max(next.redis.connect_timeout);
        let ring = match Ring::build(
            &next,
            generation,
            digest.clone(),
            Some(&current),
            wait,
            &self.subscription,
        )
        .await
        {
            Ok(ring) => ring,
            Err(message) => return self.reject(&mut state, Some(digest), message),
        };
        self.ring.store(Arc::new(ring));
        drop(current);
        let changes = Changes::between(&state.applied, &next);
        info!(
            generation,
            added = ?changes.added,
            removed = ?changes.removed,
            reweighted = ?changes.reweighted,
            readdressed = ?changes.readdressed,
            failover = ?next.failover,
            "ring reloaded"
        );
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_applied_unix
            .store(crate::clock::unix_secs(), Ordering::Relaxed);
        if let Ok(mut last) = self.stats.last_error.lock() {
            last.clear();
        }
        state.applied = next;
        state.applied_digest = digest;
        state.rejected_digest = None;
        Outcome::Applied(generation)
    }

    /// Starts watching the config now (so that a change made the moment after this returns is
    /// seen), and returns the task that reloads on file events (debounced), on SIGHUP, and every
    /// `reload.interval`, until it is dropped.
    pub fn start(self: Arc<Self>) -> impl std::future::Future<Output = ()> {
        let reload = &self.running.reload;
        let (tx, events) = mpsc::unbounded_channel::<()>();
        let dir = watch_dir(&self.path);
        let watcher = if reload.watch {
            match notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
                let _ = tx.send(());
            }) {
                Ok(mut w) => {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; relying on SIGHUP and re-reads");
                    }
                    Some(w)
                }
                Err(e) => {
                    warn!(error = %e, "no file watcher; relying on SIGHUP and re-reads");
                    None
                }
            }
        } else {
            drop(tx);
            None
        };
        let hangup = hangup_signal();
        self.run(watcher, dir, events, hangup)
    }

    async fn run(
        self: Arc<Self>,
        mut watcher: Option<notify::RecommendedWatcher>,
        dir: PathBuf,
        mut events: mpsc::UnboundedReceiver<()>,
        mut hangup: mpsc::UnboundedReceiver<()>,
    ) {
        let reload = &self.running.reload;
        let period = if reload.interval.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            reload.interval
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(()) = events.recv() => {
                    // One update is a burst of events: wait until it has been quiet a while.
                    loop {
                        tokio::select! {
                            Some(()) = events.recv() => continue,
                            () = tokio::time::sleep(reload.debounce) => break,
                        }
                    }
                    // Re-add the watch: the watched directory itself may have been replaced.
                    if let Some(w) = watcher.as_mut() {
                        let _ = w.unwatch(&dir);
                        if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                            warn!(dir = %dir.display(), error = %e, "cannot re-watch the config directory");
                        }
                    }
                    self.reload().await;
                }
                Some(()) = hangup.recv() => {
                    info!("SIGHUP: reloading config");
                    self.reload().await;
                }
                _ = tick.tick() => {
                    self.reload().await;
                }
            }
        }
    }
}

/// The directory holding the config file, as given (not resolved through symlinks: the
/// ConfigMap's `..data` swap happens in this directory).
fn watch_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// SIGHUP as a stream of unit events; never fires where signals are unavailable.
fn hangup_signal() -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShardConfig;

    fn shard(name: &str, url: &str, weight: u32) -> ShardConfig {
        ShardConfig {
            name: name.into(),
            url: url.into(),
            weight,
        }
    }

    #[test]
    fn changes_name_what_moved() {
        let old = Config {
            shards: vec![
                shard("a", "redis://h:1", 1),
                shard("b", "redis://h:2", 1),
                shard("c", "redis://h:3", 1),
            ],
            ..Config::default()
        };
        let new = Config {
            shards: vec![
                shard("a", "redis://h:1", 2),
                shard("b", "redis://x:2", 1),
                shard("d", "redis://h:4", 1),
            ],
            ..Config::default()
        };
        let c = Changes::between(&old, &new);
        assert_eq!(c.added, ["d"]);
        assert_eq!(c.removed, ["c"]);
        assert_eq!(c.reweighted, ["a 1→2"]);
        assert_eq!(c.readdressed, ["b"]);
        assert_eq!(Changes::between(&new, &new), Changes::default());
    }

    #[test]
    fn watches_the_directory_of_the_file() {
        assert_eq!(
            watch_dir(Path::new("/etc/mediacache/config.yaml")),
            Path::new("/etc/mediacache")
        );
        assert_eq!(watch_dir(Path::new("config.yaml")), Path::new("."));
    }
}
