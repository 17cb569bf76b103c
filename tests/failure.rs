//! Shards dying, coming back, hanging, and holding values that are not ours: always a miss or a
//! clean answer, never an error for a read, never wrong bytes.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{body, eventually, TestCluster};
use fred::prelude::{ClientLike, KeysInterface};
use fred::types::CustomCommand;
use mediacache::client::{media_key, Client};
use mediacache::proto::{MediaKey, PutOutcome};

/// Puts `data` under `key` until a Put is stored, for `timeout` at most.
async fn eventually_stored(
    (what, timeout): (&str, Duration),
    client: &Client,
    key: &MediaKey,
    data: Bytes,
) {
    eventually(what, timeout, || {
        let mut client = client.clone();
        let (key, data) = (key.clone(), data.clone());
        async move {
            let answer = client.put_bytes(key, Default::default(), data).await.ok()?;
            answer.stored.then_some(())
        }
    })
    .await;
}

/// Finds a media id owned by shard `index`.
fn id_on(cluster: &TestCluster, index: usize, tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}{i}"))
        .find(|id| cluster.owner("example.org", id) == index)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shard_gives_fast_misses_and_comes_back() {
    let mut cluster = TestCluster::builder().shards(3).start().await;
    let mut client = cluster.client().await;
    let dead = 1;
    let on_dead = id_on(&cluster, dead, "d");
    let on_live = id_on(&cluster, 0, "l");
    for id in [&on_dead, &on_live] {
        let r = client
            .put_bytes(
                media_key("example.org", id, ""),
                Default::default(),
                body(1000, 1),
            )
            .await
            .unwrap();
        assert!(r.stored);
    }

    cluster.shards[dead].kill();
    // The first request after the crash may be the one that finds out; after that the shard is
    // skipped without touching the network.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let got = client
            .get(media_key("example.org", &on_dead, ""), 0, 0)
            .await
            .unwrap();
        assert!(got.is_none(), "a dead shard is a miss");
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("slowest of 20 misses with the owner shard killed: {slowest:?}");
    // Far below the 10 s a client with default timeouts would wait; generous for a noisy machine.
    assert!(
        slowest < Duration::from_secs(2),
        "slowest miss took {slowest:?}"
    );

    let r = client
        .put_bytes(
            media_key("example.org", &on_dead, "v2"),
            Default::default(),
            body(10, 2),
        )
        .await
        .unwrap();
    assert!(!r.stored);
    assert_eq!(
        r.outcome,
        PutOutcome::Unavailable as i32,
        "a Put to a dead shard is refused, not failed"
    );
    let stat = client
        .stat(media_key("example.org", &on_dead, ""))
        .await
        .unwrap();
    assert!(!stat.found);
    // Nobody can fill it through the cache now: a caller asking for the lease and willing to
    // wait is told so at once instead of waiting out wait_ms.
    let started = Instant::now();
    let fetched = client
        .get_or_lease(media_key("example.org", &on_dead, ""), true, 10_000)
        .await
        .unwrap();
    assert!(
        matches!(fetched, mediacache::client::Fetched::Miss { ref lease_token } if lease_token.is_empty())
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // The other shards carry on.
    assert!(client
        .get(media_key("example.org", &on_live, ""), 0, 0)
        .await
        .unwrap()
        .is_some());
    let ring = client.ring_status().await.unwrap();
    let state: Vec<bool> = ring.shards.iter().map(|s| s.up).collect();
    assert_eq!(state, [true, false, true]);
    // Purge cannot reach the dead shard: it says so instead of claiming success.
    let err = client
        .purge(media_key("example.org", &on_dead, ""), false, false)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("shard-1"), "{err}");

    // Restarted (empty): used again once the health check sees it.
    cluster.shards[dead].restart().await;
    let key = media_key("example.org", &on_dead, "");
    eventually_stored(
        ("puts to the restarted shard", Duration::from_secs(10)),
        &client,
        &key,
        body(500, 3),
    )
    .await;
    let (_, got) = client
        .get_bytes(key)
        .await
        .unwrap()
        .expect("hit after restart");
    assert_eq!(got, body(500, 3));
    assert_eq!(cluster.shards[dead].objects().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_shard_costs_a_bounded_wait() {
    let cluster = TestCluster::builder()
        .shards(2)
        .configure(|c| c.redis.command_timeout = Duration::from_millis(300))
        .start()
        .await;
    let mut client = cluster.client().await;
    let id = id_on(&cluster, 0, "h");
    let key = media_key("example.org", &id, "");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(100, 1))
            .await
            .unwrap()
            .stored
    );
    cluster.shards[0].pause(true);
    let started = Instant::now();
    assert!(client.get(key.clone(), 0, 0).await.unwrap().is_none());
    let first = started.elapsed();
    let started = Instant::now();
    assert!(client.get(key.clone(), 0, 0).await.unwrap().is_none());
    let second = started.elapsed();
    cluster.shards[0].pause(false);
    assert!(
        first < Duration::from_secs(3),
        "first miss waited {first:?}"
    );
    assert!(
        second < Duration::from_secs(1),
        "second miss waited {second:?}"
    );
    // Resumed: the same object is served again, intact.
    let got = eventually("hit after resume", Duration::from_secs(10), || {
        let mut client = client.clone();
        let key = key.clone();
        async move { client.get_bytes(key).await.ok().flatten() }
    })
    .await;
    assert_eq!(got.1, body(100, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_are_not_whole_objects_are_misses_and_deleted() {
    let cluster = TestCluster::builder().shards(2).start().await;
    let mut client = cluster.client().await;
    // Small enough to be read whole at once, and larger than the first read of a Get.
    for size in [5000, 700_000] {
        corrupt_values_are_misses(&cluster, &mut client, size).await;
    }
}

async fn corrupt_values_are_misses(cluster: &TestCluster, client: &mut Client, size: usize) {
    let good = body(size, 4);
    let id = &format!("corrupt-{size}");
    let owner = cluster.owner("example.org", id);
    let shard = &cluster.shards[owner];
    let name = format!("mc:1:o:example.org|{id}|");
    assert!(
        client
            .put_bytes(
                media_key("example.org", id, ""),
                Default::default(),
                good.clone()
            )
            .await
            .unwrap()
            .stored
    );
    let stored = shard.raw_get(&name).await.unwrap();

    let mut truncated = stored.clone();
    truncated.truncate(stored.len() - 1);
    let mut longer = stored.clone();
    longer.push(0);
    let mut bad_magic = stored.clone();
    bad_magic[0] ^= 0xff;
    let mut bad_layout = stored.clone();
    bad_layout[4] = 200;
    let header_only = stored[..20].to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "foreign text",
            b"hello, I belong to another program".to_vec(),
        ),
        ("truncated body", truncated),
        ("longer than declared", longer),
        ("bad magic", bad_magic),
        ("unknown layout", bad_layout),
        ("cut inside the header", header_only),
        ("one byte", vec![b'm']),
    ];
    for (what, value) in cases {
        shard.raw_set(&name, value).await;
        assert!(
            client
                .get(media_key("example.org", id, ""), 0, 0)
                .await
                .unwrap()
                .is_none(),
            "{what} ({size} B): must be a miss"
        );
        assert!(
            shard.raw_get(&name).await.is_none(),
            "{what} ({size} B): must be deleted"
        );
    }

    // A key of another type under our name.
    let raw = shard.client().await;
    let _: i64 = raw
        .custom(
            CustomCommand::new_static("HSET", None, false),
            vec![name.as_str(), "field", "value"],
        )
        .await
        .unwrap();
    assert!(client
        .get(media_key("example.org", id, ""), 0, 0)
        .await
        .unwrap()
        .is_none());
    assert!(
        !client
            .stat(media_key("example.org", id, ""))
            .await
            .unwrap()
            .found
    );
    let exists: u64 = raw.exists(&name).await.unwrap();
    assert_eq!(exists, 0, "a foreign hash is deleted too");

    // The shard is still healthy and the key can be stored again.
    assert!(
        client
            .put_bytes(
                media_key("example.org", id, ""),
                Default::default(),
                good.clone()
            )
            .await
            .unwrap()
            .stored
    );
    assert_eq!(
        client
            .get_bytes(media_key("example.org", id, ""))
            .await
            .unwrap()
            .unwrap()
            .1,
        good
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_replaced_mid_read_is_a_clean_error_not_mixed_bytes() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.chunk_bytes = 64 * 1024)
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "replaced", "");
    let a = body(8 * 1024 * 1024, 1);
    let b = body(8 * 1024 * 1024, 2);
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), a.clone())
            .await
            .unwrap()
            .stored
    );
    let mut download = client.get(key.clone(), 0, 0).await.unwrap().unwrap();
    let mut got = Vec::new();
    got.extend_from_slice(&download.next_chunk().await.unwrap().unwrap());
    // Replaced by a new publish of different bytes while the reader is part-way through.
    let mut writer = cluster.client().await;
    assert!(
        writer
            .put_bytes(key.clone(), Default::default(), b.clone())
            .await
            .unwrap()
            .stored
    );
    let outcome = loop {
        match download.next_chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match outcome {
        // The few windows read ahead before the replace are from A; what was read after it
        // must not be delivered.
        Err(e) => {
            assert!(e.to_string().contains("Aborted"), "{e}");
            assert_eq!(
                got[..],
                a[..got.len()],
                "every byte delivered is from the first object"
            );
        }
        Ok(()) => panic!(
            "a read spanning a replace must not complete ({} bytes)",
            got.len()
        ),
    }
    // A new read gets B whole.
    assert_eq!(client.get_bytes(key).await.unwrap().unwrap().1, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_next_writes_and_reads_the_next_live_shard() {
    let mut cluster = TestCluster::builder()
        .shards(3)
        .configure(|c| c.failover = mediacache::config::Failover::Next)
        .start()
        .await;
    let mut client = cluster.client().await;
    let id = id_on(&cluster, 2, "f");
    let key = media_key("example.org", &id, "");
    let ranked = mediacache::ring::Placement::new(
        cluster
            .config
            .shards
            .iter()
            .map(|s| (s.name.as_str(), s.weight)),
    )
    .ranked(&format!("example.org/{id}"));
    assert_eq!(ranked[0], 2);
    cluster.shards[2].kill();
    // The first request may be the one that finds the owner dead.
    eventually_stored(
        ("a put that fails over", Duration::from_secs(5)),
        &client,
        &key,
        body(300, 9),
    )
    .await;
    let stat = client.stat(key.clone()).await.unwrap();
    assert_eq!(stat.shard, cluster.shards[ranked[1]].name);
    assert_eq!(
        client.get_bytes(key).await.unwrap().unwrap().1,
        body(300, 9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_closing_connections_mid_reply_gives_clean_errors_and_recovers() {
    use common::{CuttingProxy, RedisShard, TestCluster};
    use mediacache::config::{Config, ShardConfig};
    use sha2::{Digest, Sha256};

    let shard = RedisShard::start("cut").await;
    let proxy = CuttingProxy::start(shard.port).await;
    let mut config = Config {
        chunk_bytes: 64 * 1024,
        ..Default::default()
    };
    config.shards = vec![ShardConfig {
        name: "cut".into(),
        url: proxy.url(),
        weight: 1,
    }];
    // Memory tier out of the way: every read goes to the shard.
    config.memory.min_downloads = 1_000;
    let cluster = TestCluster::builder().with_config(config).start().await;
    let mut client = cluster.client().await;
    let size = 2 * 1024 * 1024;
    let keys: Vec<_> = (0..4)
        .map(|i| media_key("example.org", &format!("cut-{i}"), ""))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        assert!(
            client
                .put_bytes(key.clone(), Default::default(), body(size, i as u64))
                .await
                .unwrap()
                .stored
        );
    }

    // Hostile: every connection is closed after 100 KB of replies, in the middle of a value.
    proxy.cut_replies_after(100_000);
    let (mut whole, mut clean_errors, mut misses) = (0, 0, 0);
    for round in 0..12 {
        let i = round % keys.len();
        match client.get(keys[i].clone(), 0, 0).await {
            Ok(None) => misses += 1,
            Err(_) => clean_errors += 1,
            Ok(Some(mut download)) => {
                let mut got = Vec::new();
                match download.write_to(&mut got).await {
                    // A stream that ends OK carries exactly the object.
                    Ok(_) => {
                        assert_eq!(
                            Sha256::digest(&got),
                            Sha256::digest(body(size, i as u64)),
                            "an OK stream must be the whole object"
                        );
                        whole += 1;
                    }
                    Err(_) => clean_errors += 1,
                }
            }
        }
    }
    println!("while cutting: {whole} whole, {clean_errors} clean errors, {misses} misses");
    assert!(clean_errors + misses > 0, "the cuts were felt");

    // Healthy again: every object is served whole, none was damaged.
    proxy.cut_replies_after(0);
    for (i, key) in keys.iter().enumerate() {
        let got = eventually(
            "whole object after recovery",
            Duration::from_secs(10),
            || {
                let mut client = client.clone();
                let key = key.clone();
                async move { client.get_bytes(key).await.ok().flatten() }
            },
        )
        .await;
        assert_eq!(got.1, body(size, i as u64));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_temporary_key_vanished_is_not_recreated() {
    // Written in pieces: a value sent as one `SET` has no temporary key until it is whole.
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.redis.upload_max_bytes = 0)
        .start()
        .await;
    let shard = &cluster.shards[0];
    let key = media_key("example.org", "vanished", "");
    // Past the first write: the temporary key holds the header and the first megabyte.
    let sent = common::STREAMED_AFTER;
    let put =
        common::OpenPut::start(cluster.raw().await, key.clone(), body(3 * sent, 8), sent).await;
    common::temp_key_appears(shard).await;
    let temp = shard.temp_keys().await;
    assert_eq!(temp.len(), 1, "{temp:?}");
    let writes = shard.command_calls("setrange").await;
    // The key expires (or the shard restarts) under the Put.
    shard.raw_command("DEL", temp).await;
    let answer = put.finish().await;
    assert!(!answer.stored);
    assert_eq!(answer.outcome, PutOutcome::Unavailable as i32);
    assert_eq!(
        shard.command_calls("setrange").await,
        writes,
        "no write recreated the key without its header"
    );
    assert!(shard.keys().await.is_empty(), "nothing left behind");
}

/// A long Put streamed to a shard that hangs part way (it stops reading, its connections stay
/// open) fails within about the command timeout instead of waiting on the shard, and one to a
/// shard that dies part way fails at once. Neither leaves anything behind, and Puts work again
/// once the shard is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_put_to_a_shard_that_hangs_or_dies_fails_in_bounded_time() {
    let mut cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.redis.command_timeout = Duration::from_millis(300))
        .start()
        .await;
    let client = cluster.client().await;
    let sent = common::STREAMED_AFTER;
    // Far more than the loopback socket buffers hold, so that the writes to a hung shard block.
    let size = 24 * 1024 * 1024;
    for (round, hang) in [(0, true), (1, false)] {
        let key = media_key("example.org", &format!("cut-{round}"), "");
        let put =
            common::OpenPut::start(cluster.raw().await, key.clone(), body(size, round), sent).await;
        common::put_under_way(&cluster.shards[0]).await;
        if hang {
            cluster.shards[0].pause(true);
        } else {
            cluster.shards[0].kill();
        }
        let started = Instant::now();
        let answer = put.finish().await;
        let waited = started.elapsed();
        assert!(!answer.stored, "round {round}: {answer:?}");
        assert_eq!(
            answer.outcome,
            PutOutcome::Unavailable as i32,
            "round {round}"
        );
        assert!(
            waited < Duration::from_secs(5),
            "round {round}: the Put waited {waited:?}"
        );
        if hang {
            cluster.shards[0].pause(false);
        } else {
            cluster.shards[0].restart().await;
        }
        eventually_stored(
            ("Puts work again", Duration::from_secs(15)),
            &client,
            &media_key("example.org", &format!("after-{round}"), ""),
            body(3 * sent, round + 10),
        )
        .await;
        let temp = cluster.shards[0].temp_keys().await;
        assert!(
            temp.is_empty(),
            "round {round}: nothing left behind: {temp:?}"
        );
    }
}

/// The uploads one replica has in flight to one shard hold at most 64 MiB per connection of its
/// pool, by the values' whole lengths (each holds its value's room on the shard from its start);
/// a Put past that is written in pieces, and all are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_their_limit_are_written_in_pieces() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.redis.pool_size = 1)
        .start()
        .await;
    let shard = &cluster.shards[0];
    let sent = common::STREAMED_AFTER;
    // Two of these fit in 64 MiB, a third does not.
    let size = 24 * 1024 * 1024;
    let mut puts = Vec::new();
    for i in 0..2 {
        let key = media_key("example.org", &format!("upload-{i}"), "");
        puts.push(common::OpenPut::start(cluster.raw().await, key, body(size, i), sent).await);
        common::uploads_under_way(shard, i as usize + 1).await;
    }
    assert!(
        shard.temp_keys().await.is_empty(),
        "uploads have no temporary key until they are whole"
    );
    let key = media_key("example.org", "in-pieces", "");
    puts.push(common::OpenPut::start(cluster.raw().await, key, body(size, 9), sent).await);
    common::temp_key_appears(shard).await;
    assert_eq!(
        shard.uploads_under_way().await,
        2,
        "the third is not uploaded"
    );
    for put in puts {
        let answer = put.finish().await;
        assert!(answer.stored, "{answer:?}");
    }
    let mut client = cluster.client().await;
    for (id, seed) in [("upload-0", 0), ("upload-1", 1), ("in-pieces", 9)] {
        let (_, got) = client
            .get_bytes(media_key("example.org", id, ""))
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(got, body(size, seed), "{id}");
    }
}

/// A shard that refuses an upload (here its `proto-max-bulk-len` is below the value) refuses
/// that Put, but the shard is not taken for down: its other requests go on, and no command
/// error of the pool is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_does_not_take_the_shard_down() {
    let metrics = common::free_addr();
    let cluster = TestCluster::builder()
        .shards(1)
        .redis_args(&["--proto-max-bulk-len", "2mb"])
        .configure(|c| c.metrics_listen = Some(metrics))
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "too-long-for-the-shard", "");
    let answer = client
        .put_bytes(key.clone(), Default::default(), body(3_000_000, 1))
        .await
        .unwrap();
    assert!(!answer.stored, "{answer:?}");
    assert_eq!(answer.outcome, PutOutcome::Unavailable as i32);
    let ring = cluster.ring_status().await;
    assert!(ring.shards[0].up, "{ring:?}");
    let errors = common::metric_sum(metrics, "mediacache_shard_command_errors").await;
    assert_eq!(errors, 0.0, "an upload's failure is not the pool's");
    let small = media_key("example.org", "fits", "");
    assert!(
        client
            .put_bytes(small.clone(), Default::default(), body(100_000, 2))
            .await
            .unwrap()
            .stored
    );
    assert!(cluster.shards[0].temp_keys().await.is_empty());
}

/// A shard that comes back with an older copy of a temporary key (a restart from a snapshot
/// taken mid-Put) holds a value with writes missing: the Put's next write notices, or its
/// publish when no write is left, and nothing with a hole in it is ever published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_temporary_key_went_back_in_time_is_not_published() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.redis.upload_max_bytes = 0)
        .start()
        .await;
    let shard = &cluster.shards[0];
    let sent = common::STREAMED_AFTER;
    // More to write after the rollback (the write notices), and nothing (the publish does).
    for (id, size) in [("rolled-back", 3 * sent), ("rolled-back-last", sent)] {
        let key = media_key("example.org", id, "");
        let put =
            common::OpenPut::start(cluster.raw().await, key.clone(), body(size, 9), sent).await;
        common::temp_key_appears(shard).await;
        let temp = shard.temp_keys().await.remove(0);
        // What the value looked like before its first megabyte was written: its write counter
        // at zero.
        shard
            .raw_command("SETRANGE", vec![temp, "0".into(), "000000000000".into()])
            .await;
        let answer = put.finish().await;
        assert!(!answer.stored, "{id}");
        assert_eq!(answer.outcome, PutOutcome::Unavailable as i32, "{id}");
        eventually(
            "nothing published, nothing left behind",
            Duration::from_secs(10),
            || async { shard.keys().await.is_empty().then_some(()) },
        )
        .await;
    }
}

/// A shard out of memory refuses a long Put, sent as one `SET` or a piece part way through the
/// value: the Put fails, no value with a hole where the piece should be is ever published,
/// nothing is left behind, and the refusal (a reply, not a fault) never marks the shard down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_the_shard_has_no_memory_for_is_not_published() {
    for upload_max_bytes in [mediacache::config::MAX_UPLOAD_BYTES, 0] {
        no_memory_for_a_put(upload_max_bytes).await;
    }
}

async fn no_memory_for_a_put(upload_max_bytes: u64) {
    let metrics = common::free_addr();
    let cluster = TestCluster::builder()
        .shards(1)
        .redis_args(&["--maxmemory", "6mb", "--maxmemory-policy", "noeviction"])
        .configure(|c| {
            c.metrics_listen = Some(metrics);
            c.redis.upload_max_bytes = upload_max_bytes;
        })
        .start()
        .await;
    let shard = &cluster.shards[0];
    let mut client = cluster.client().await;
    let key = media_key("example.org", "no-room", "");
    let answer = client
        .put_bytes(key.clone(), Default::default(), body(12_000_000, 3))
        .await
        .unwrap();
    assert!(!answer.stored, "{answer:?}");
    eventually("nothing left behind", Duration::from_secs(10), || async {
        shard.keys().await.is_empty().then_some(())
    })
    .await;
    assert!(client.get_bytes(key).await.unwrap().is_none());
    let errors = common::metric_sum(metrics, "mediacache_shard_command_errors").await;
    assert_eq!(errors, 0.0, "a refusal is not a shard fault");
    let small = media_key("example.org", "room", "");
    eventually_stored(
        ("a Put that fits", Duration::from_secs(10)),
        &client,
        &small,
        body(100_000, 4),
    )
    .await;
}

/// A read the shard refuses for a reason that says nothing against the value (here its ACL
/// forbids `STRLEN`, which the first read asks the value's length with) is a miss, and the
/// object is still there once the shard allows the read again: only a value of another type
/// under our name is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_shard_refuses_is_a_miss_that_deletes_nothing() {
    let cluster = TestCluster::builder().shards(1).start().await;
    let shard = &cluster.shards[0];
    let mut client = cluster.client().await;
    let key = media_key("example.org", "refused-read", "");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(5000, 6))
            .await
            .unwrap()
            .stored
    );
    let object = "mc:1:o:example.org|refused-read|".to_owned();
    let strlen_rule = |rule: &str| {
        shard.raw_command("ACL", vec!["SETUSER".into(), "default".into(), rule.into()])
    };
    strlen_rule("-strlen").await;
    assert!(client.get_bytes(key.clone()).await.unwrap().is_none());
    assert!(shard.keys().await.contains(&object), "the object is kept");
    strlen_rule("+strlen").await;
    let (_, got) = eventually("a hit again", Duration::from_secs(10), || {
        let mut client = client.clone();
        let key = key.clone();
        async move { client.get_bytes(key).await.ok().flatten() }
    })
    .await;
    assert_eq!(got, body(5000, 6));
}
