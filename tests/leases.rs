//! Fill leases across replicas (one origin fetch for N simultaneous misses), and purges and
//! quarantines that reach every copy. Real Redis, two service replicas on the same 3 shards.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{body, eventually, TestCluster};
use mediacache::client::{media_key, Client, ClientError, Fetched};
use mediacache::config::ShardConfig;
use mediacache::proto::{put_request, MediaInfo, MediaKey, PutHeader, PutOutcome, PutRequest};
use tokio::task::JoinHandle;

/// Gets waiting for a fill right now, over every replica.
async fn waiters(endpoints: &[String]) -> u64 {
    let mut n = 0;
    for e in endpoints {
        n += Client::connect(e.clone())
            .await
            .unwrap()
            .stats()
            .await
            .unwrap()
            .lease_waiters;
    }
    n
}

/// Waits until `n` Gets wait for a fill over `endpoints`.
async fn waiting(endpoints: &[String], n: u64) {
    eventually(
        "the other callers waiting",
        Duration::from_secs(20),
        || async { (waiters(endpoints).await == n).then_some(()) },
    )
    .await;
}

/// A Put of `key` under `lease_token` that fails after its first 3 bytes (`info` declares a body
/// they do not make): the way a holder's fetch from the origin fails.
async fn failing_put(cluster: &TestCluster, key: &MediaKey, info: MediaInfo, lease_token: String) {
    let header = PutRequest {
        kind: Some(put_request::Kind::Header(PutHeader {
            key: Some(key.clone()),
            info: Some(info),
            lease_token,
            ..Default::default()
        })),
    };
    let chunk = PutRequest {
        kind: Some(put_request::Kind::Chunk(Bytes::from_static(b"abc"))),
    };
    let mut raw = cluster.raw().await;
    assert!(raw
        .put(tokio_stream::iter(vec![header, chunk]))
        .await
        .is_err());
}

/// Waits until a new caller of `endpoint` gets the lease of `key`, long before its 60 s TTL.
async fn next_caller_gets_the_lease(endpoint: String, key: &MediaKey) {
    eventually(
        "the next caller gets the lease, long before its 60 s TTL",
        Duration::from_secs(10),
        || {
            let (endpoint, key) = (endpoint.clone(), key.clone());
            async move {
                let mut b = Client::connect(endpoint).await.ok()?;
                match b.get_or_lease(key, true, 0).await.ok()? {
                    Fetched::Miss { lease_token } if !lease_token.is_empty() => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
}

/// What one media repo does on a user's request: ask the cache, and on a miss that carries the
/// lease fetch from the origin and Put; returns the bytes it serves. The origin fetch of a
/// lease holder lasts until `others` callers wait for it, and without leases until every caller
/// missed (`asked`), so that every caller has asked before the object exists.
async fn serve_media(
    endpoints: Vec<String>,
    endpoint: String,
    key: MediaKey,
    (want_lease, wait_ms, others): (bool, u32, u64),
    (origin_fetches, asked): (Arc<AtomicU64>, Arc<tokio::sync::Barrier>),
    content: Bytes,
) -> Bytes {
    let mut client = Client::connect(endpoint).await.unwrap();
    match client
        .get_or_lease(key.clone(), want_lease, wait_ms)
        .await
        .unwrap()
    {
        Fetched::Hit(mut d) => {
            let mut got = Vec::new();
            while let Some(c) = d.next_chunk().await.unwrap() {
                got.extend_from_slice(&c);
            }
            got.into()
        }
        Fetched::Miss { lease_token } => {
            origin_fetches.fetch_add(1, Ordering::SeqCst);
            if !lease_token.is_empty() {
                waiting(&endpoints, others).await;
            } else if !want_lease {
                asked.wait().await;
            }
            let r = client
                .put_with_lease(key, MediaInfo::default(), content.clone(), &lease_token)
                .await
                .unwrap();
            assert!(r.stored, "{r:?}");
            content
        }
    }
}

/// N callers miss the same key at once, spread over the endpoints; returns origin fetches.
async fn simultaneous_misses(endpoints: &[String], id: &str, n: usize, leases: bool) -> u64 {
    let key = media_key("remote.example", id, "");
    let content = body(300_000, 42);
    let fetches = Arc::new(AtomicU64::new(0));
    let asked = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (wait, lease) = if leases { (30_000, true) } else { (0, false) };
            tokio::spawn(serve_media(
                endpoints.to_vec(),
                endpoints[i % endpoints.len()].clone(),
                key.clone(),
                (lease, wait, n as u64 - 1),
                (fetches.clone(), asked.clone()),
                content.clone(),
            ))
        })
        .collect();
    for t in tasks {
        assert!(
            t.await.unwrap() == content,
            "every caller serves the right bytes"
        );
    }
    fetches.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_simultaneous_misses_over_two_replicas_fetch_the_origin_once() {
    let mut cluster = TestCluster::builder().shards(3).start().await;
    let second = cluster.add_replica().await;
    let endpoints = [cluster.endpoint(), second];
    assert_eq!(simultaneous_misses(&endpoints, "twenty", 20, true).await, 1);

    let mut figures = Vec::new();
    for n in [2, 10, 50] {
        let with = simultaneous_misses(&endpoints, &format!("with{n}"), n, true).await;
        let without = simultaneous_misses(&endpoints, &format!("without{n}"), n, false).await;
        assert_eq!(with, 1, "N={n}");
        assert_eq!(
            without, n as u64,
            "N={n}: without leases every caller fetches"
        );
        figures.push(format!("N={n}: {with} with leases, {without} without"));
    }
    eprintln!(
        "origin fetches for N simultaneous misses: {}",
        figures.join("; ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_only_leases_coalesce_too() {
    let cluster = TestCluster::builder().start().await;
    assert_eq!(
        simultaneous_misses(&[cluster.endpoint()], "mem", 10, true).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_lease_passes_to_a_waiter_after_its_ttl() {
    let mut cluster = TestCluster::builder()
        .shards(3)
        .configure(|c| c.lease_ttl = Duration::from_secs(1))
        .start()
        .await;
    let second = cluster.add_replica().await;
    let key = media_key("remote.example", "abandoned", "");
    let mut a = cluster.client().await;
    let asked = Instant::now();
    let Fetched::Miss { lease_token } = a.get_or_lease(key.clone(), true, 0).await.unwrap() else {
        panic!("expected a miss");
    };
    assert!(!lease_token.is_empty());
    // Its holder never comes back; a waiter on the other replica inherits the lease.
    let mut b = Client::connect(second).await.unwrap();
    let Fetched::Miss { lease_token: next } =
        b.get_or_lease(key.clone(), true, 60_000).await.unwrap()
    else {
        panic!("expected a miss");
    };
    let since_first = asked.elapsed();
    assert!(!next.is_empty() && next != lease_token);
    // The first lease was set after `asked`, so it cannot have run out sooner than this.
    assert!(since_first >= Duration::from_millis(995), "{since_first:?}");
    // The waiter looked again when the lease ran out, not at the end of its 60 s wait.
    assert!(since_first < Duration::from_secs(30), "{since_first:?}");
    // A caller that does not want a lease and does not wait gets a plain miss.
    let Fetched::Miss { lease_token: none } = a.get_or_lease(key.clone(), false, 0).await.unwrap()
    else {
        panic!("expected a miss");
    };
    assert!(none.is_empty());
}

/// Three shards whose leases live 60 s, and a client holding the lease of `media_id`.
async fn leased(media_id: &str) -> (TestCluster, MediaKey, Client, String) {
    let cluster = TestCluster::builder()
        .shards(3)
        .configure(|c| c.lease_ttl = Duration::from_secs(60))
        .start()
        .await;
    let key = media_key("remote.example", media_id, "");
    let mut holder = cluster.client().await;
    let Fetched::Miss { lease_token } = holder.get_or_lease(key.clone(), true, 0).await.unwrap()
    else {
        panic!("expected a miss");
    };
    assert!(!lease_token.is_empty());
    (cluster, key, holder, lease_token)
}

/// A second caller waiting for the fill of `key`, once it waits.
async fn waiter(cluster: &TestCluster, key: &MediaKey) -> JoinHandle<(Fetched, Duration)> {
    let mut b = cluster.client().await;
    let key = key.clone();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let got = b.get_or_lease(key, true, 30_000).await.unwrap();
        (got, started.elapsed())
    });
    waiting(&[cluster.endpoint()], 1).await;
    waiter
}

/// The waiter got the next lease, long before the 60 s TTL of the one given up; its token.
async fn gets_the_next_lease(waiter: JoinHandle<(Fetched, Duration)>, given_up: &str) -> String {
    let (got, waited) = waiter.await.unwrap();
    let Fetched::Miss { lease_token: next } = got else {
        panic!("expected the lease");
    };
    assert!(!next.is_empty() && next != given_up);
    assert!(
        waited < Duration::from_secs(10),
        "released at once, not after the 60 s TTL: {waited:?}"
    );
    next
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_given_up_by_its_holder_passes_to_a_waiter_at_once() {
    let (cluster, key, mut a, lease_token) = leased("given-up").await;

    // No token, or a token that is not the lease: refused or ignored, the lease stays.
    let Err(err) = a.release_lease(key.clone(), "").await else {
        panic!("a release without a token is refused");
    };
    let ClientError::Status(status) = err else {
        panic!("expected a status: {err}");
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("lease_token:"), "{status:?}");
    let r = a.release_lease(key.clone(), "not-the-token").await.unwrap();
    assert_eq!(r.outcome(), PutOutcome::LeaseReleased);
    let owner = cluster.owner("remote.example", "given-up");
    let lease = cluster.shards[owner]
        .raw_get("mc:1:lease:remote.example|given-up|")
        .await
        .expect("the holder's lease is still there");
    assert_eq!(lease, lease_token.as_bytes());

    let waiting = waiter(&cluster, &key).await;
    let r = a.release_lease(key.clone(), &lease_token).await.unwrap();
    assert!(!r.stored);
    assert_eq!(r.outcome(), PutOutcome::LeaseReleased);
    gets_the_next_lease(waiting, &lease_token).await;
    // Nothing was stored.
    assert!(!a.stat(key).await.unwrap().found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_put_releases_its_lease_at_once_and_a_foreign_token_breaks_nothing() {
    let (cluster, key, mut a, lease_token) = leased("failing").await;
    let waiting = waiter(&cluster, &key).await;
    // The holder's Put fails (its body does not match the declared digest).
    let info = MediaInfo {
        size: 3,
        sha256: vec![0; 32].into(),
        ..Default::default()
    };
    failing_put(&cluster, &key, info, lease_token.clone()).await;
    let next = gets_the_next_lease(waiting, &lease_token).await;

    // A Put with a foreign token stores (the bytes are fine) and leaves the holder's lease alone.
    let r = a
        .put_with_lease(
            key.clone(),
            MediaInfo::default(),
            body(10, 1),
            "not-the-token",
        )
        .await
        .unwrap();
    assert!(r.stored);
    let owner = cluster.owner("remote.example", "failing");
    let lease = cluster.shards[owner]
        .raw_get("mc:1:lease:remote.example|failing|")
        .await
        .expect("the holder's lease is still there");
    assert_eq!(lease, next.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_quarantine_reach_every_copy() {
    let mut cluster = TestCluster::builder()
        .shards(3)
        .configure(|c| c.memory.min_downloads = 1)
        .start()
        .await;
    let second = cluster.add_replica().await;
    let mut r0 = cluster.client().await;
    let mut r1 = Client::connect(second).await.unwrap();
    let key = media_key("bad.example", "abuse", "");
    let thumb = media_key("bad.example", "abuse", "thumb/32x32/crop");
    let data = body(100_000, 5);
    for k in [&key, &thumb] {
        assert!(
            r0.put_bytes(k.clone(), Default::default(), data.clone())
                .await
                .unwrap()
                .stored
        );
        // A whole read through each replica fills its memory tier.
        for r in [&mut r0, &mut r1] {
            assert!(r.get_bytes(k.clone()).await.unwrap().is_some());
            assert_eq!(r.stat(k.clone()).await.unwrap().tier, "memory");
        }
    }
    // A stale copy on a former owner, as a ring change leaves behind.
    let owner = cluster.owner("bad.example", "abuse");
    let name = "mc:1:o:bad.example|abuse|";
    let value = cluster.shards[owner].raw_get(name).await.unwrap();
    cluster.shards[(owner + 1) % 3].raw_set(name, value).await;

    let started = Instant::now();
    let removed = r0.purge(key.clone(), true, true).await.unwrap().removed;
    assert!(
        removed >= 3,
        "two variants on the owner, one stale copy: {removed}"
    );
    let reached = eventually(
        "the other replica's memory tier dropped both",
        Duration::from_secs(1),
        || async {
            let mut r1 = r1.clone();
            let a = r1.stat(key.clone()).await.ok()?.found;
            let b = r1.stat(thumb.clone()).await.ok()?.found;
            (!a && !b).then(|| started.elapsed())
        },
    )
    .await;
    eprintln!("purge reached the other replica's memory tier in {reached:?}");
    assert!(!r0.stat(key.clone()).await.unwrap().found);
    let objects = cluster.all_objects().await;
    assert!(objects.is_empty(), "{objects:?}");

    // Quarantined: Puts of any variant are refused, through either replica.
    for (r, k) in [(&mut r0, &key), (&mut r1, &thumb)] {
        let answer = r
            .put_bytes(k.clone(), Default::default(), data.clone())
            .await
            .unwrap();
        assert!(!answer.stored);
        assert_eq!(answer.outcome, PutOutcome::Quarantined as i32);
    }

    // A Put already streaming when the quarantine arrives is not published.
    let late = media_key("bad.example", "late", "");
    let sent = common::STREAMED_AFTER;
    let put =
        common::OpenPut::start(cluster.raw().await, late.clone(), body(2 * sent, 6), sent).await;
    let late_owner = cluster.owner("bad.example", "late");
    common::put_under_way(&cluster.shards[late_owner]).await;
    r1.purge(late.clone(), false, true).await.unwrap();
    let answer = put.finish().await;
    assert_eq!(answer.outcome, PutOutcome::Quarantined as i32);
    // Only the quarantine itself is left (the hash, and the tombstones earlier releases read):
    // no object, no temporary key.
    let leftovers: Vec<_> = cluster
        .all_keys()
        .await
        .into_iter()
        .filter(|(_, k)| k != mediacache::key::QUARANTINE_KEY && !k.starts_with("mc:1:q:"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_origin_is_purged_and_quarantined_with_progress() {
    let mut cluster = TestCluster::builder()
        .shards(3)
        .configure(|c| c.memory.min_downloads = 1)
        .start()
        .await;
    let second = cluster.add_replica().await;
    let mut r0 = cluster.client().await;
    let mut r1 = Client::connect(second.clone()).await.unwrap();
    for i in 0..60 {
        let variant = if i % 2 == 0 { "thumb/8x8/crop" } else { "" };
        let key = media_key("spam.example", &format!("m{}", i / 2), variant);
        assert!(
            r0.put_bytes(key, Default::default(), body(2000, i))
                .await
                .unwrap()
                .stored
        );
    }
    for i in 0..5 {
        let key = media_key("good.example", &format!("g{i}"), "");
        assert!(
            r0.put_bytes(key, Default::default(), body(100, i))
                .await
                .unwrap()
                .stored
        );
    }
    // The other replica holds one of them in memory.
    let cached = media_key("spam.example", "m1", "");
    assert!(r1.get_bytes(cached.clone()).await.unwrap().is_some());
    assert_eq!(r1.stat(cached.clone()).await.unwrap().tier, "memory");

    let mut reports = Vec::new();
    let removed = r0
        .purge_origin("spam.example", true, |p| reports.push(p.clone()))
        .await
        .unwrap();
    assert_eq!(removed, 60);
    assert!(
        reports.len() >= 4,
        "a report per shard page and a final one: {reports:?}"
    );
    assert!(reports.last().unwrap().done);
    let left: Vec<_> = cluster
        .all_keys()
        .await
        .into_iter()
        .filter(|(_, k)| k.starts_with("mc:1:o:"))
        .collect();
    assert_eq!(left.len(), 5, "only the other origin is left: {left:?}");
    eventually(
        "the other replica dropped the origin",
        Duration::from_secs(1),
        || async {
            let mut r1 = r1.clone();
            (!r1.stat(cached.clone()).await.ok()?.found).then_some(())
        },
    )
    .await;
    let refused = r1
        .put_bytes(
            media_key("spam.example", "fresh", ""),
            Default::default(),
            body(10, 1),
        )
        .await
        .unwrap();
    assert_eq!(refused.outcome, PutOutcome::Quarantined as i32);

    // The same from the command line, without quarantine.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mediacache"))
        .args(["purge", "--addr", &second, "--origin", "good.example"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "removed 5");
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed so far"));
    assert!(
        r0.put_bytes(
            media_key("good.example", "again", ""),
            Default::default(),
            body(10, 1)
        )
        .await
        .unwrap()
        .stored
    );
}

/// A lease is released where it was taken. One taken in memory-only mode, whose holder gives it
/// up after the operator added a shard (and before they took it away again), leaves nothing
/// behind that would hold the next caller for the lease's whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_lease_given_up_after_a_reload_frees_the_key_at_once() {
    let mut cluster = TestCluster::builder()
        .shards(0)
        .config_file()
        .configure(|c| c.lease_ttl = Duration::from_secs(60))
        .start()
        .await;
    let key = media_key("remote.example", "reloaded", "");
    let mut a = cluster.client().await;
    let Fetched::Miss { lease_token } = a.get_or_lease(key.clone(), true, 0).await.unwrap() else {
        panic!("expected a miss");
    };
    assert!(!lease_token.is_empty(), "memory-only mode grants leases");

    let shard = common::RedisShard::start("added").await;
    let mut with_shard = cluster.config.clone();
    with_shard.shards = vec![ShardConfig {
        name: shard.name.clone(),
        url: shard.url(),
        weight: 1,
    }];
    cluster.apply(with_shard).await;
    // The holder's fetch failed: its Put ends short of the declared size, giving the lease up.
    let info = MediaInfo {
        size: 10,
        ..Default::default()
    };
    failing_put(&cluster, &key, info, lease_token).await;
    let mut without = cluster.config.clone();
    without.shards.clear();
    cluster.apply(without).await;

    next_caller_gets_the_lease(cluster.endpoint(), &key).await;
}

/// A lease taken on a shard is released on that shard even after a reload gave its key another
/// owner: it would otherwise sit there for its whole TTL, and hold the key again the moment the
/// ring went back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_released_on_its_shard_after_the_key_moved() {
    let mut cluster = TestCluster::builder()
        .shards(2)
        .config_file()
        .configure(|c| c.lease_ttl = Duration::from_secs(60))
        .start()
        .await;
    let both = cluster.config.clone();
    let id = (0..)
        .map(|i| format!("moving-{i}"))
        .find(|id| cluster.owner("remote.example", id) == 1)
        .unwrap();
    let key = media_key("remote.example", &id, "");
    let lease_key = format!("mc:1:lease:remote.example|{id}|");
    let mut first_only = both.clone();
    first_only.shards.truncate(1);
    cluster.apply(first_only).await;
    let mut a = cluster.client().await;
    let Fetched::Miss { lease_token } = a.get_or_lease(key.clone(), true, 0).await.unwrap() else {
        panic!("expected a miss");
    };
    assert!(cluster.shards[0].raw_get(&lease_key).await.is_some());

    cluster.apply(both).await;
    // The holder's fetch failed: its Put ends short of the declared size.
    let info = MediaInfo {
        size: 10,
        ..Default::default()
    };
    failing_put(&cluster, &key, info, lease_token).await;
    let first = &cluster.shards[0];
    eventually(
        "the lease gone from the shard it was taken on",
        Duration::from_secs(10),
        || async { first.raw_get(&lease_key).await.is_none().then_some(()) },
    )
    .await;
}

/// A Put refused before its body is read (too large) still gives its lease up at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_refused_as_too_large_releases_its_lease() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| {
            c.lease_ttl = Duration::from_secs(60);
            c.max_object_bytes = 1024 * 1024;
        })
        .start()
        .await;
    let key = media_key("remote.example", "huge", "");
    let mut a = cluster.client().await;
    let Fetched::Miss { lease_token } = a.get_or_lease(key.clone(), true, 0).await.unwrap() else {
        panic!("expected a miss");
    };
    let refused = a
        .put_with_lease(
            key.clone(),
            MediaInfo::default(),
            Bytes::from(vec![0u8; 2 * 1024 * 1024]),
            &lease_token,
        )
        .await
        .unwrap();
    assert_eq!(refused.outcome, PutOutcome::TooLarge as i32);
    next_caller_gets_the_lease(cluster.endpoint(), &key).await;
}
