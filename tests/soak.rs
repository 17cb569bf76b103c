//! A bounded soak: random Puts and Gets of random sizes from several clients while shards are
//! killed, paused and restarted and the ring changes under them. Every object read is checked
//! byte for byte; a corrupt read fails the test.
//!
//! Ignored in a plain `cargo test`; `scripts/test.sh` runs it when `CI` is set (or
//! `MEDIACACHE_SOAK` is), for `MEDIACACHE_SOAK_SECS` seconds (60 by default):
//! `cargo test --test soak -- --ignored --nocapture`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TestCluster;
use mediacache::client::{media_key, Client};
use sha2::{Digest, Sha256};

const KEYS: u64 = 300;
const CLIENTS: usize = 8;

#[derive(Default)]
struct Tally {
    puts_stored: AtomicU64,
    puts_refused: AtomicU64,
    reads_whole: AtomicU64,
    read_bytes: AtomicU64,
    misses: AtomicU64,
    failed_rpcs: AtomicU64,
    corrupt: AtomicU64,
}

/// A body that carries its own seed in its first 8 bytes, so any read can be checked alone.
fn object(seed: u64, size: usize) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; size.max(8)];
    out[..8].copy_from_slice(&seed.to_be_bytes());
    rng.fill(&mut out[8..]);
    out.into()
}

fn intact(read: &[u8]) -> bool {
    if read.len() < 8 {
        return false;
    }
    let seed = u64::from_be_bytes(read[..8].try_into().unwrap());
    object(seed, read.len())[..] == *read
}

/// Sizes skewed small, as media are: mostly thumbnails, some images, a few large files.
fn size(rng: &mut fastrand::Rng) -> usize {
    match rng.u32(0..100) {
        0..=59 => rng.usize(8..64 * 1024),
        60..=94 => rng.usize(64 * 1024..1024 * 1024),
        _ => rng.usize(1024 * 1024..4 * 1024 * 1024),
    }
}

async fn client_loop(endpoint: String, worker: u64, until: Instant, tally: Arc<Tally>) {
    let mut rng = fastrand::Rng::with_seed(worker);
    let mut client = loop {
        if let Ok(c) = Client::connect(endpoint.clone()).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while Instant::now() < until {
        let key = media_key("soak.example", &format!("m{}", rng.u64(0..KEYS)), "");
        if rng.u32(0..100) < 30 {
            let body = object(rng.u64(..), size(&mut rng));
            match client.put_bytes(key, Default::default(), body).await {
                Ok(r) if r.stored => tally.puts_stored.fetch_add(1, Ordering::Relaxed),
                Ok(_) => tally.puts_refused.fetch_add(1, Ordering::Relaxed),
                Err(_) => tally.failed_rpcs.fetch_add(1, Ordering::Relaxed),
            };
        } else {
            match client.get(key, 0, 0).await {
                Ok(None) => {
                    tally.misses.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(mut download)) => {
                    let mut read = Vec::new();
                    match download.write_to(&mut read).await {
                        Ok(_) => {
                            let ok = read.len() as u64 == download.info.size
                                && Sha256::digest(&read)[..] == download.info.sha256[..]
                                && intact(&read);
                            if ok {
                                tally.reads_whole.fetch_add(1, Ordering::Relaxed);
                                tally
                                    .read_bytes
                                    .fetch_add(read.len() as u64, Ordering::Relaxed);
                            } else {
                                tally.corrupt.fetch_add(1, Ordering::Relaxed);
                                eprintln!(
                                    "CORRUPT read: {} bytes, info {:?}",
                                    read.len(),
                                    download.info
                                );
                            }
                        }
                        // A stream cut by a shard failure: a clean error, the bytes discarded.
                        Err(_) => {
                            tally.failed_rpcs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => {
                    tally.failed_rpcs.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by scripts/test.sh in CI, or with --ignored"]
async fn soak_with_shard_chaos_and_ring_changes() {
    let secs: u64 = std::env::var("MEDIACACHE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut cluster = TestCluster::builder()
        .shards(4)
        .config_file()
        .configure(|c| {
            c.redis.command_timeout = Duration::from_millis(500);
            c.memory.max_bytes = 64 * 1024 * 1024;
            c.memory.max_object_bytes = 4 * 1024 * 1024;
        })
        .start()
        .await;
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            tokio::spawn(client_loop(
                cluster.endpoint(),
                w as u64 + 1,
                until,
                tally.clone(),
            ))
        })
        .collect();

    let full = cluster.config.clone();
    let mut rng = fastrand::Rng::with_seed(99);
    let mut events = Vec::new();
    while Instant::now() + Duration::from_secs(4) < until {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let victim = rng.usize(0..cluster.shards.len());
        match rng.u32(0..4) {
            0 => {
                cluster.shards[victim].kill();
                tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
                cluster.shards[victim].restart().await;
                events.push("kill+restart");
            }
            1 => {
                cluster.shards[victim].pause(true);
                tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
                cluster.shards[victim].pause(false);
                events.push("pause+resume");
            }
            _ => {
                let mut smaller = full.clone();
                smaller.shards.remove(victim);
                cluster.apply(smaller).await;
                tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
                cluster.apply(full.clone()).await;
                events.push("ring shrink+grow");
            }
        }
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    let t = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let count = |name: &str| events.iter().filter(|e| **e == name).count();
    println!(
        "soak {:.0?}: {} clients, {} keys; chaos: {} kill+restart, {} pause+resume, {} ring shrink+grow",
        elapsed,
        CLIENTS,
        KEYS,
        count("kill+restart"),
        count("pause+resume"),
        count("ring shrink+grow")
    );
    println!(
        "objects read whole: {} ({:.1} MiB), misses: {}, puts stored: {}, puts refused: {}, \
         failed RPCs: {}, corrupt reads: {}, peak RSS of the test process (service included): {} MiB",
        t(&tally.reads_whole),
        t(&tally.read_bytes) as f64 / (1024.0 * 1024.0),
        t(&tally.misses),
        t(&tally.puts_stored),
        t(&tally.puts_refused),
        t(&tally.failed_rpcs),
        t(&tally.corrupt),
        peak_rss_kib() / 1024
    );
    assert_eq!(t(&tally.corrupt), 0, "corrupt reads");
    assert!(t(&tally.reads_whole) > 0 && t(&tally.puts_stored) > 0);
    assert!(!events.is_empty());
}
