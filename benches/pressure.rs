//! Memory and purge figures under pressure, printed for BENCHMARKS.md and the README.
//!
//! `cargo bench --bench pressure` (about a minute; `--quick` for a smaller run).
//!
//! 1. Copies for the memory tier stay inside its budget: the release binary with
//!    `memory.max_bytes` 256 MiB serves 64 parallel Puts, then 64 parallel Gets, of 64 MiB objects
//!    whose keys are already popular (each would be copied into memory). Its peak RSS is printed
//!    next to the budget. `MEDIACACHE_BIN` runs another build of the binary instead (an older
//!    release, for a before/after figure).
//! 2. One media's purge on a shard holding a million keys: the purge through the service (which
//!    finds the media's variants in its index) next to a `SCAN MATCH` walk of the same shard (what
//!    a purge that searched for the variants would cost), measured in the same run.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{body, RedisShard};
use fred::prelude::ClientLike;
use mediacache::client::{media_key, Client};
use mediacache::proto::MediaInfo;
use support::{rss_bytes, sample_rss, Service};

const MIB: u64 = 1024 * 1024;

/// Runs `work` while sampling `pid`'s RSS; returns the peak.
async fn peak_rss<F: std::future::Future<Output = ()>>(pid: u32, work: F) -> u64 {
    let (stop, sampler) = sample_rss(pid);
    work.await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap().max(rss_bytes(pid))
}

async fn fill_budget(quick: bool) {
    let parallel: usize = if quick { 16 } else { 64 };
    let size = 64 * MIB as usize;
    let budget = 256 * MIB;
    let shard = RedisShard::start_with(
        "budget",
        &["--maxmemory", "12gb", "--maxmemory-policy", "allkeys-lfu"],
    )
    .await;
    let memory = format!(
        "max_object_bytes: {}\nmemory: {{ max_bytes: {budget}, max_object_bytes: {}, min_downloads: 1 }}",
        128 * MIB,
        64 * MIB
    );
    let keys: Vec<_> = (0..parallel)
        .map(|i| media_key("bench.example", &format!("big{i}"), ""))
        .collect();
    let bodies: Vec<_> = (0..parallel).map(|i| body(size, i as u64)).collect();

    // Puts of keys already downloaded once (a miss), so that each counts as popular.
    let service = Service::start(&[&shard], &memory).await;
    let pid = service.pid();
    let client = Client::connect(service.endpoint.clone()).await.unwrap();
    for key in &keys {
        assert!(client
            .clone()
            .get(key.clone(), 0, 0)
            .await
            .unwrap()
            .is_none());
    }
    let idle = rss_bytes(pid);
    let puts = peak_rss(pid, async {
        let tasks: Vec<_> = keys
            .iter()
            .zip(&bodies)
            .map(|(key, data)| {
                let mut client = client.clone();
                let (key, data) = (key.clone(), data.clone());
                tokio::spawn(async move {
                    client
                        .put_bytes(key, MediaInfo::default(), data)
                        .await
                        .expect("Put")
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().stored);
        }
    })
    .await;
    let after_puts = client.clone().stats().await.unwrap();
    drop(service);

    // Gets on a fresh replica: each read is its key's first download, popular at once, so each
    // would be copied into memory as it streams.
    let service = Service::start(&[&shard], &memory).await;
    let pid = service.pid();
    let client = Client::connect(service.endpoint.clone()).await.unwrap();
    let gets = peak_rss(pid, async {
        let tasks: Vec<_> = keys
            .iter()
            .map(|key| {
                let mut client = client.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let (_, got) = client.get_bytes(key).await.expect("Get").expect("hit");
                    got.len()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), size);
        }
    })
    .await;
    let stats = client.clone().stats().await.unwrap();
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "Copies for the memory tier ({parallel} parallel requests of 64 MiB objects, popular keys)"
    );
    println!(
        "  memory.max_bytes                 {:>8.0} MiB",
        mib(budget)
    );
    println!("  RSS idle                         {:>8.0} MiB", mib(idle));
    println!(
        "  peak RSS, {parallel} parallel Puts        {:>8.0} MiB",
        mib(puts)
    );
    println!(
        "  peak RSS, {parallel} parallel Gets        {:>8.0} MiB",
        mib(gets)
    );
    println!(
        "  memory tier after the Puts: {:.0} MiB in {} objects; after the Gets: {:.0} MiB in {}",
        mib(after_puts.memory_bytes),
        after_puts.memory_entries,
        mib(stats.memory_bytes),
        stats.memory_entries
    );
    println!(
        "  bytes through the service per phase: {:.0} MiB",
        mib((parallel * size) as u64)
    );
}

async fn purge_one_media(quick: bool) {
    let filler: u64 = if quick { 200_000 } else { 1_000_000 };
    let shard = RedisShard::start_with("purge", &["--enable-debug-command", "yes"]).await;
    let raw = shard.client().await;
    // Filler keys as a busy shard holds them (DEBUG POPULATE writes them server-side).
    let _: fred::prelude::Value = raw
        .custom(
            fred::types::CustomCommand::new_static("DEBUG", None, false),
            vec![
                "POPULATE".to_owned(),
                filler.to_string(),
                "filler".to_owned(),
            ],
        )
        .await
        .expect("DEBUG POPULATE");
    let service = Service::start(&[&shard], "").await;
    let mut client = Client::connect(service.endpoint.clone()).await.unwrap();
    let variants = [
        "",
        "thumb/32x32/crop",
        "thumb/96x96/crop",
        "thumb/320x240/scale",
    ];
    let mut purge_times = Vec::new();
    let mut scan_times = Vec::new();
    let rounds = 5;
    for round in 0..rounds {
        let id = format!("media{round}");
        for v in variants {
            let key = media_key("bench.example", &id, v);
            let data = body(10_000, round);
            assert!(
                client
                    .put_bytes(key, MediaInfo::default(), data)
                    .await
                    .unwrap()
                    .stored
            );
        }
        let started = Instant::now();
        let removed = client
            .purge(media_key("bench.example", &id, ""), true, false)
            .await
            .unwrap()
            .removed;
        purge_times.push(started.elapsed());
        assert_eq!(removed, variants.len() as u64);
        // The same question answered by a walk of the shard: every page of SCAN MATCH.
        let started = Instant::now();
        let mut cursor = "0".to_owned();
        loop {
            let reply: Vec<fred::prelude::Value> = raw
                .custom(
                    fred::types::CustomCommand::new_static("SCAN", None, false),
                    vec![
                        cursor.clone(),
                        "MATCH".into(),
                        format!("mc:1:o:bench.example|{id}|*"),
                        "COUNT".into(),
                        "500".into(),
                    ],
                )
                .await
                .unwrap();
            cursor = reply[0].as_string().unwrap();
            if cursor == "0" {
                break;
            }
        }
        scan_times.push(started.elapsed());
    }
    purge_times.sort();
    scan_times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (purge, scan) = (
        purge_times[rounds as usize / 2],
        scan_times[rounds as usize / 2],
    );
    println!(
        "\nOne media's purge (all {} variants) on a shard holding {filler} keys, median of {rounds}",
        variants.len()
    );
    println!(
        "  Purge through the service (variant index)   {:>9.2} ms",
        ms(purge)
    );
    println!(
        "  SCAN MATCH walk of the shard (no index)     {:>9.2} ms",
        ms(scan)
    );
    println!(
        "  walk ÷ purge                                {:>9.0}×",
        ms(scan) / ms(purge)
    );
    let _ = raw.quit().await;
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    fill_budget(quick).await;
    purge_one_media(quick).await;
}
