//! Wall-clock time where it is shared with other processes: quarantine ends (compared by every
//! replica and every shard), stored objects' `stored_at_unix_ms`, and metrics timestamps.
//! Durations inside one process use `Instant` instead.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is set before it).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    (unix_ms() / 1000).max(0) as u64
}
