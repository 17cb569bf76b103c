//! A quarantine holds for its whole TTL whatever the shards do: under eviction pressure, after
//! the ring grows, and after a shard restarts empty. Real `redis-server` shards, real service.

mod common;

use std::time::Duration;

use common::{body, eventually, RedisShard, TestCluster};
use mediacache::client::{media_key, Client, Fetched};
use mediacache::config::ShardConfig;
use mediacache::proto::{MediaKey, PutOutcome};

async fn put_outcome(client: &mut Client, key: &MediaKey, seed: u64) -> PutOutcome {
    put_outcome_of(client, key, body(2000, seed)).await
}

async fn put_outcome_of(client: &mut Client, key: &MediaKey, data: bytes::Bytes) -> PutOutcome {
    let answer = client
        .put_bytes(key.clone(), Default::default(), data)
        .await
        .unwrap();
    PutOutcome::try_from(answer.outcome).unwrap()
}

/// The end of `field`'s quarantine in `shard`'s quarantine hash, if it holds it.
async fn held(shard: &RedisShard, field: &str) -> Option<i64> {
    let c = shard.client().await;
    let v: Option<i64> = fred::prelude::ClientLike::custom(
        &c,
        fred::types::CustomCommand::new_static("HGET", None, false),
        vec![mediacache::key::QUARANTINE_KEY, field],
    )
    .await
    .unwrap();
    let _ = fred::prelude::ClientLike::quit(&c).await;
    v
}

/// Waits until `shard` holds the quarantine of `origin/media_id` (`what` names the wait);
/// returns its end.
async fn held_eventually(shard: &RedisShard, origin: &str, media_id: &str, what: &str) -> i64 {
    let field = mediacache::key::quarantine_field(origin, media_id);
    eventually(what, Duration::from_secs(10), || held(shard, &field)).await
}

/// A replica started now learns the quarantine from the shards, and refuses the media too.
async fn refused_by_a_new_replica(cluster: &mut TestCluster, bad: &MediaKey) {
    let mut fresh = Client::connect(cluster.add_replica().await).await.unwrap();
    assert_eq!(
        put_outcome(&mut fresh, bad, 2).await,
        PutOutcome::Quarantined
    );
}

async fn quarantine(client: &mut Client, key: &MediaKey) {
    client.purge(key.clone(), false, true).await.unwrap();
    assert_eq!(put_outcome(client, key, 0).await, PutOutcome::Quarantined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_survives_a_shard_that_evicts_under_pressure() {
    let mut cluster = TestCluster::builder()
        .shards(1)
        .redis_args(&["--maxmemory", "24mb", "--maxmemory-policy", "allkeys-lfu"])
        .start()
        .await;
    let mut client = cluster.client().await;
    let bad = media_key("example.org", "quarantined", "");
    quarantine(&mut client, &bad).await;

    let mut stored = 0;
    for i in 0..90 {
        let key = media_key("example.org", &format!("filler{i}"), "");
        let answer = client
            .put_bytes(key, Default::default(), body(1_000_000, i))
            .await
            .unwrap();
        stored += u32::from(answer.stored);
    }
    assert!(
        stored > 40,
        "the shard took the fillers by evicting ({stored})"
    );
    assert_eq!(
        put_outcome(&mut client, &bad, 1).await,
        PutOutcome::Quarantined,
        "a Put after the evictions"
    );
    // Whatever the shard evicted, the replicas write the quarantine back.
    held_eventually(
        &cluster.shards[0],
        "example.org",
        "quarantined",
        "the shard holds the quarantine",
    )
    .await;
    refused_by_a_new_replica(&mut cluster, &bad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_reaches_a_shard_that_joins_the_ring() {
    let mut cluster = TestCluster::builder().shards(1).config_file().start().await;
    let joining = RedisShard::start("shard-new").await;
    let mut grown = cluster.config.clone();
    grown.shards.push(ShardConfig {
        name: joining.name.clone(),
        url: joining.url(),
        weight: 1,
    });
    // A media the grown ring places on the new shard.
    let placement =
        mediacache::ring::Placement::new(grown.shards.iter().map(|s| (s.name.as_str(), s.weight)));
    let id = (0..)
        .map(|i| format!("moves{i}"))
        .find(|id| placement.owner(&format!("example.org/{id}")) == Some(1))
        .unwrap();
    let bad = media_key("example.org", &id, "");
    let mut client = cluster.client().await;
    quarantine(&mut client, &bad).await;

    cluster.apply(grown).await;
    assert_eq!(
        put_outcome(&mut client, &bad, 1).await,
        PutOutcome::Quarantined,
        "a Put to the new owner"
    );
    cluster.shards.push(joining);
    held_eventually(
        &cluster.shards[1],
        "example.org",
        &id,
        "the new shard holds the quarantine",
    )
    .await;
    refused_by_a_new_replica(&mut cluster, &bad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_is_written_back_to_a_shard_restarted_empty() {
    let metrics = common::free_addr();
    let mut cluster = TestCluster::builder()
        .shards(2)
        .configure(|c| c.metrics_listen = Some(metrics))
        .start()
        .await;
    let mut client = cluster.client().await;
    let bad = media_key("example.org", "restarted", "");
    quarantine(&mut client, &bad).await;
    let field = mediacache::key::quarantine_field("example.org", "restarted");
    let owner = cluster.owner("example.org", "restarted");
    let before = held(&cluster.shards[owner], &field)
        .await
        .expect("quarantined on its shard");

    cluster.shards[owner].restart().await;
    assert_eq!(
        held(&cluster.shards[owner], &field).await,
        None,
        "restarted empty"
    );
    eventually(
        "the shard is back in the ring",
        Duration::from_secs(10),
        || async {
            let ring = cluster.ring_status().await;
            ring.shards.iter().all(|s| s.up).then_some(())
        },
    )
    .await;
    assert_eq!(
        put_outcome(&mut client, &bad, 1).await,
        PutOutcome::Quarantined,
        "a Put to the emptied shard"
    );
    let after = held_eventually(
        &cluster.shards[owner],
        "example.org",
        "restarted",
        "the quarantine written back",
    )
    .await;
    assert_eq!(after, before, "with its original end");
    // Counted once every shard's sync of that round has answered: a moment after the write.
    eventually(
        "the restored quarantine counted",
        Duration::from_secs(10),
        || async {
            let restored =
                common::metric_sum(metrics, "mediacache_quarantine_restored_total").await;
            (restored >= 1.0).then_some(())
        },
    )
    .await;
}

/// A replica learns of an origin's quarantine from the purge's own event, not at its next
/// quarantine sync: with the shard's record of it gone (restarted without persistence), the
/// other replica still refuses the origin's Puts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_quarantine_reaches_the_other_replicas_by_event() {
    let mut cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.quarantine_sync = Duration::from_secs(60))
        .start()
        .await;
    let second = cluster.add_replica().await;
    let mut first = cluster.client().await;
    let other = Client::connect(second).await.unwrap();
    first
        .purge_origin("spam.example", true, |_| {})
        .await
        .unwrap();
    cluster.shards[0].restart().await;
    assert_eq!(
        held(
            &cluster.shards[0],
            &mediacache::key::origin_quarantine_field("spam.example")
        )
        .await,
        None,
        "restarted empty"
    );
    let mut attempt = 0;
    eventually(
        "the other replica refusing the origin's Puts",
        Duration::from_secs(10),
        || {
            attempt += 1;
            let key = media_key("spam.example", &format!("m{attempt}"), "");
            let mut other = other.clone();
            async move {
                (put_outcome(&mut other, &key, 1).await == PutOutcome::Quarantined).then_some(())
            }
        },
    )
    .await;
}

/// Puts `key` through `client`, and returns the object's value as the shard holds it, to put
/// back later as a copy that escaped a purge.
async fn stored_value(client: &mut Client, shard: &RedisShard, key: &MediaKey) -> Vec<u8> {
    assert_eq!(put_outcome(client, key, 0).await, PutOutcome::Stored);
    let name = format!("mc:1:o:{}|{}|{}", key.origin, key.media_id, key.variant);
    shard.raw_get(&name).await.unwrap()
}

/// Puts `value` back under `key` with its variant index entry, as a Put stored while the shard
/// had lost the quarantine would have left it.
async fn plant(shard: &RedisShard, key: &MediaKey, value: Vec<u8>) {
    let name = format!("mc:1:o:{}|{}|{}", key.origin, key.media_id, key.variant);
    shard.raw_set(&name, value).await;
    let index = format!("mc:1:v:{}|{}", key.origin, key.media_id);
    shard.raw_command("SADD", vec![index, name]).await;
}

/// The shard forgets every quarantine (evicted, say).
async fn forget(shard: &RedisShard, key: &MediaKey) {
    shard
        .raw_command("DEL", vec![mediacache::key::QUARANTINE_KEY.into()])
        .await;
    shard
        .raw_command(
            "DEL",
            vec![format!("mc:1:q:{}|{}", key.origin, key.media_id)],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_holds_a_quarantine_its_shard_lost_at_once() {
    // No merge with the shards during the test (only the one at start): whatever B knows of
    // the quarantine, it heard with the purge.
    let mut cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.quarantine_sync = Duration::from_secs(60))
        .start()
        .await;
    let mut a = cluster.client().await;
    let mut b = Client::connect(cluster.add_replica().await).await.unwrap();
    let bad = media_key("example.org", "escaped", "");
    let value = stored_value(&mut a, &cluster.shards[0], &bad).await;
    a.purge(bad.clone(), false, true).await.unwrap();
    forget(&cluster.shards[0], &bad).await;
    // B refuses Puts of the media itself, as soon as the purge's event reached it (a Put
    // before that is stored: the shard no longer knows).
    let mut attempt = 0;
    eventually("B refuses the media", Duration::from_secs(10), || {
        attempt += 1;
        let variant = media_key("example.org", "escaped", &format!("thumb/{attempt}x1/crop"));
        let mut b = b.clone();
        async move {
            (put_outcome(&mut b, &variant, 1).await == PutOutcome::Quarantined).then_some(())
        }
    })
    .await;
    // A copy that got in is never served, through either replica.
    plant(&cluster.shards[0], &bad, value).await;
    for client in [&mut a, &mut b] {
        assert!(client.get_bytes(bad.clone()).await.unwrap().is_none());
        assert!(!client.stat(bad.clone()).await.unwrap().found);
        // Nor is anyone asked to fetch it from its origin.
        match client.get_or_lease(bad.clone(), true, 0).await.unwrap() {
            Fetched::Miss { lease_token } => assert!(lease_token.is_empty(), "a lease"),
            Fetched::Hit(_) => panic!("a quarantined media served"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_a_quarantine_back_deletes_the_copies_stored_meanwhile() {
    let cluster = TestCluster::builder().shards(1).start().await;
    let mut a = cluster.client().await;
    let bad = media_key("example.org", "escaped", "");
    let thumb = media_key("example.org", "escaped", "thumb/8x8/crop");
    let value = stored_value(&mut a, &cluster.shards[0], &bad).await;
    let thumb_value = stored_value(&mut a, &cluster.shards[0], &thumb).await;
    a.purge(bad.clone(), false, true).await.unwrap();
    // The copies a Put could store while the shard had lost the quarantine.
    plant(&cluster.shards[0], &bad, value).await;
    plant(&cluster.shards[0], &thumb, thumb_value).await;
    forget(&cluster.shards[0], &bad).await;
    held_eventually(
        &cluster.shards[0],
        "example.org",
        "escaped",
        "the quarantine written back",
    )
    .await;
    eventually(
        "the escaped copies deleted",
        Duration::from_secs(10),
        || async { cluster.shards[0].objects().await.is_empty().then_some(()) },
    )
    .await;
}

/// The shard checks its own quarantine at publish, atomically with the store, both for a value
/// stored by one script and for one published from a temporary key: a quarantine the replica
/// has not heard of refuses the Put all the same, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_refuses_a_put_of_media_only_its_own_hash_quarantines() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.quarantine_sync = Duration::from_secs(60))
        .start()
        .await;
    let shard = &cluster.shards[0];
    let mut client = cluster.client().await;
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000;
    // A thumbnail (one script) and a body of most of a megabyte (a temporary key and the
    // publish script).
    for (id, size) in [("thumbnail", 2_000), ("picture", 900_000)] {
        let field = mediacache::key::quarantine_field("example.org", id);
        shard
            .raw_command(
                "HSET",
                vec![
                    mediacache::key::QUARANTINE_KEY.into(),
                    field,
                    until.to_string(),
                ],
            )
            .await;
        let key = media_key("example.org", id, "");
        assert_eq!(
            put_outcome_of(&mut client, &key, body(size, 5)).await,
            PutOutcome::Quarantined,
            "{id}"
        );
    }
    let keys = shard.keys().await;
    assert_eq!(keys, vec![mediacache::key::QUARANTINE_KEY.to_owned()]);
}
