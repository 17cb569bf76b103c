//! Purges and publishes reach every replica's memory tier, on real Redis with two replicas: a
//! burst of events or a reconnect never silences a replica, a copy being gathered when a purge
//! arrives is never admitted, and a new publish or a quarantine leaves no stale copy behind.

mod common;

use std::time::Duration;

use common::{body, eventually, TestCluster};
use fred::interfaces::PubsubInterface;
use mediacache::client::{media_key, Client};
use mediacache::proto::{get_response, GetRequest, MediaKey};

/// Reads `key` through `client` until its replica serves it from memory.
async fn fill_memory(client: &mut Client, key: &MediaKey) {
    for _ in 0..10 {
        client
            .get_bytes(key.clone())
            .await
            .unwrap()
            .expect("stored");
        if client.stat(key.clone()).await.unwrap().tier == "memory" {
            return;
        }
    }
    panic!("{key:?} never reached the memory tier");
}

async fn tier(client: &mut Client, key: &MediaKey) -> String {
    client.stat(key.clone()).await.unwrap().tier
}

async fn two_replicas(shards: usize, min_downloads: u32) -> (TestCluster, Client, Client) {
    let mut cluster = TestCluster::builder()
        .shards(shards)
        .configure(|c| c.memory.min_downloads = min_downloads)
        .start()
        .await;
    let a = cluster.client().await;
    let b = Client::connect(cluster.add_replica().await).await.unwrap();
    (cluster, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_events_does_not_silence_a_replica() {
    // A small buffer, so that the burst below overflows it for certain.
    let metrics = common::free_addr();
    let mut cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| {
            c.memory.min_downloads = 1;
            c.redis.event_buffer = 16;
            c.metrics_listen = Some(metrics);
        })
        .start()
        .await;
    let mut a = cluster.client().await;
    let b = cluster.add_replica_with(|c| c.metrics_listen = None).await;
    let mut b = Client::connect(b).await.unwrap();
    let key = media_key("example.org", "burst", "");
    let data = body(10_000, 1);
    assert!(
        b.put_bytes(key.clone(), Default::default(), data)
            .await
            .unwrap()
            .stored
    );
    fill_memory(&mut a, &key).await;

    // Far more messages than the buffer holds, as fast as the shard takes them.
    let shard = cluster.shards[0].client().await;
    for _ in 0..20 {
        let pipeline = shard.pipeline();
        for i in 0..10_000u32 {
            let _: () = pipeline
                .publish("mc:1:events", format!("noise {i}"))
                .await
                .unwrap();
        }
        let _: Vec<fred::prelude::Value> = pipeline.all().await.unwrap();
    }
    eventually("the lag counted", Duration::from_secs(10), || async {
        let text = common::scrape_metrics(metrics).await;
        let lagged = text.lines().any(|l| {
            l.starts_with("mediacache_events_lost_total{")
                && l.contains("reason=\"lagged\"")
                && !l.ends_with(" 0")
        });
        lagged.then_some(())
    })
    .await;

    // The subscription goes on: a purge after the burst still reaches A.
    assert!(
        b.put_bytes(key.clone(), Default::default(), body(10_000, 1))
            .await
            .unwrap()
            .stored
    );
    fill_memory(&mut a, &key).await;
    let purged = b.purge(key.clone(), false, false).await.unwrap();
    assert_eq!(purged.removed, 1, "{purged:?}");
    eventually("A drops the purged object", Duration::from_secs(10), || {
        let mut a = a.clone();
        let key = key.clone();
        async move { (a.get_bytes(key).await.unwrap().is_none()).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_subscription_drops_the_memory_tier_and_is_counted() {
    let metrics = common::free_addr();
    let mut cluster = TestCluster::builder()
        .shards(2)
        .configure(|c| {
            c.memory.min_downloads = 1;
            c.metrics_listen = Some(metrics);
        })
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "reconnect", "");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(5000, 2))
            .await
            .unwrap()
            .stored
    );
    fill_memory(&mut client, &key).await;
    assert_eq!(
        common::metric_sum(metrics, "mediacache_events_lost_total").await,
        0.0
    );

    // The shard that does not hold the object: what it may have announced while its
    // subscription was down is unknown, so nothing in memory can be proven fresh.
    let other = 1 - cluster.owner("example.org", "reconnect");
    cluster.shards[other].restart().await;
    eventually(
        "the reconnect is counted",
        Duration::from_secs(10),
        || async {
            (common::metric_sum(metrics, "mediacache_events_lost_total").await >= 1.0).then_some(())
        },
    )
    .await;
    assert_ne!(tier(&mut client, &key).await, "memory");
    assert!(
        client.get_bytes(key.clone()).await.unwrap().is_some(),
        "still in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_flight_does_not_bring_purged_media_back() {
    // A 1 MiB object: read from Redis whole, windows ahead, before the purge, but more than
    // the service can push into a reader's small HTTP/2 window and its own send buffer, so the
    // copy is complete only once the reader has read on, after the purge.
    let mut cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| {
            c.memory.min_downloads = 2;
            c.chunk_bytes = 16 * 1024;
        })
        .start()
        .await;
    let mut a = cluster.client().await;
    let mut b = Client::connect(cluster.add_replica().await).await.unwrap();
    let _cluster = cluster;
    let size = 1024 * 1024;
    let key = media_key("example.org", "inflight", "");
    let data = body(size, 3);
    assert!(
        b.put_bytes(key.clone(), Default::default(), data)
            .await
            .unwrap()
            .stored
    );
    let before = _cluster.shards[0].command_calls("getrange").await;
    a.get_bytes(key.clone()).await.unwrap().expect("first read");
    let after = _cluster.shards[0].command_calls("getrange").await;

    // The second read fills A's memory as it streams; its client reads one message, then waits.
    let channel = tonic::transport::Endpoint::from_shared(_cluster.endpoint())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let mut raw =
        mediacache::proto::media_cache_service_client::MediaCacheServiceClient::new(channel);
    let mut stream = raw
        .get(GetRequest {
            key: Some(key.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(get_response::Kind::Info(_))));
    // The first window's chunks, which sets off the reads of the windows after it; then every
    // window has been read from Redis (as many reads as the first read took).
    let mut read = 0;
    while read < 256 * 1024 {
        if let Some(get_response::Kind::Chunk(c)) = stream.message().await.unwrap().unwrap().kind {
            read += c.len();
        }
    }
    eventually(
        "the second read's Redis reads",
        Duration::from_secs(10),
        || async {
            (_cluster.shards[0].command_calls("getrange").await >= after + (after - before))
                .then_some(())
        },
    )
    .await;

    // A plain purge: with `quarantine` the media would be a miss here anyway, copy or not.
    let purged = b.purge(key.clone(), false, false).await.unwrap();
    assert_eq!(purged.removed, 1);
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(get_response::Kind::Chunk(c)) = m.kind {
            read += c.len();
        }
    }
    assert_eq!(read, size, "the read already under way completes");
    assert_ne!(
        tier(&mut a, &key).await,
        "memory",
        "the purged copy was admitted"
    );
    assert!(a.get_bytes(key.clone()).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_of_one_key_drops_every_variant_everywhere() {
    let (_cluster, mut a, mut b) = two_replicas(2, 1).await;
    let original = media_key("example.org", "quarantined", "");
    let thumb = media_key("example.org", "quarantined", "thumb/32x32/crop");
    for (i, key) in [&original, &thumb].into_iter().enumerate() {
        assert!(
            b.put_bytes(key.clone(), Default::default(), body(3000, i as u64))
                .await
                .unwrap()
                .stored
        );
        fill_memory(&mut a, key).await;
    }
    let purged = b.purge(original.clone(), false, true).await.unwrap();
    assert_eq!(purged.removed, 2, "both variants from the shard");
    eventually("A drops the thumbnail", Duration::from_secs(10), || {
        let mut a = a.clone();
        let thumb = thumb.clone();
        async move { a.get_bytes(thumb).await.unwrap().is_none().then_some(()) }
    })
    .await;
    assert!(a.get_bytes(original.clone()).await.unwrap().is_none());
    let again = a
        .put_bytes(thumb.clone(), Default::default(), body(3000, 9))
        .await
        .unwrap();
    assert!(
        !again.stored,
        "a quarantine covers every variant: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_publish_drops_other_replicas_stale_copies() {
    let (_cluster, mut a, mut b) = two_replicas(2, 1).await;
    let key = media_key("example.org", "replaced", "");
    let old = body(4000, 1);
    let new = body(4000, 2);
    assert!(
        b.put_bytes(key.clone(), Default::default(), old.clone())
            .await
            .unwrap()
            .stored
    );
    fill_memory(&mut a, &key).await;
    assert!(
        b.put_bytes(key.clone(), Default::default(), new.clone())
            .await
            .unwrap()
            .stored
    );
    eventually("A serves the new bytes", Duration::from_secs(10), || {
        let mut a = a.clone();
        let key = key.clone();
        let new = new.clone();
        async move {
            let (_, got) = a.get_bytes(key).await.unwrap()?;
            (got == new).then_some(())
        }
    })
    .await;
    // The replica that published keeps serving its own copy: its own event does not drop it.
    fill_memory(&mut b, &key).await;
    b.put_bytes(
        media_key("example.org", "other", ""),
        Default::default(),
        old,
    )
    .await
    .unwrap();
    assert_eq!(tier(&mut b, &key).await, "memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_in_flight_does_not_fill_memory_past_a_purge() {
    let (cluster, mut a, mut b) = two_replicas(1, 1).await;
    let key = media_key("example.org", "putting", "");
    // Downloaded once (a miss): popular, so A's Put gathers a copy for its memory tier.
    assert!(a.get_bytes(key.clone()).await.unwrap().is_none());
    let sent = common::STREAMED_AFTER;
    let put =
        common::OpenPut::start(cluster.raw().await, key.clone(), body(2 * sent, 5), sent).await;
    common::put_under_way(&cluster.shards[0]).await;
    // The purge comes while A's copy is being gathered.
    b.purge(key.clone(), false, false).await.unwrap();
    let answer = put.finish().await;
    assert!(answer.stored, "published after the purge: {answer:?}");
    assert_eq!(
        tier(&mut a, &key).await,
        "redis",
        "the copy started before the purge is not admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variant_out_of_its_media_index_is_never_served() {
    let (cluster, mut a, _b) = two_replicas(1, 100).await;
    let original = media_key("example.org", "indexed", "");
    let thumb = media_key("example.org", "indexed", "thumb/32x32/crop");
    for (i, key) in [&original, &thumb].into_iter().enumerate() {
        assert!(
            a.put_bytes(key.clone(), Default::default(), body(3000, i as u64))
                .await
                .unwrap()
                .stored
        );
    }
    // The shard evicts the media's index (here: deletes it).
    cluster.shards[0]
        .raw_command("DEL", vec!["mc:1:v:example.org|indexed".into()])
        .await;
    // A purge of every variant could no longer find the thumbnail: it is never served.
    assert!(a.get_bytes(thumb.clone()).await.unwrap().is_none());
    assert!(!a.stat(thumb.clone()).await.unwrap().found);
    // A new publish indexes again.
    assert!(
        a.put_bytes(thumb.clone(), Default::default(), body(3000, 9))
            .await
            .unwrap()
            .stored
    );
    assert!(a.get_bytes(thumb.clone()).await.unwrap().is_some());
    // The new index lists the thumbnail; the original is deleted as the key asked for.
    assert_eq!(a.purge(original, true, false).await.unwrap().removed, 2);
    assert!(a.get_bytes(thumb).await.unwrap().is_none());
}
