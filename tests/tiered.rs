//! The memory tier in front of the ring, on real Redis: popular keys are filled into memory by a
//! read and then served from it even with their shard dead.

mod common;

use common::{body, TestCluster};
use mediacache::client::media_key;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_popular_key_is_served_from_memory_with_its_shard_dead() {
    let mut cluster = TestCluster::builder()
        .shards(2)
        .configure(|c| {
            c.memory.min_downloads = 3;
            c.chunk_bytes = 64 * 1024;
        })
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "popular", "");
    let data = body(1024 * 1024 + 5, 7);
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), data.clone())
            .await
            .unwrap()
            .stored
    );
    assert_eq!(
        client.stat(key.clone()).await.unwrap().tier,
        "redis",
        "one Put does not make it popular"
    );

    for read in 1..=3 {
        let (_, got) = client.get_bytes(key.clone()).await.unwrap().unwrap();
        assert!(got == data);
        let tier = client.stat(key.clone()).await.unwrap().tier;
        // The third download reaches min_downloads: that read fills memory as it streams.
        assert_eq!(
            tier,
            if read < 3 { "redis" } else { "memory" },
            "after read {read}"
        );
    }

    let owner = cluster.owner("example.org", "popular");
    cluster.shards[owner].kill();
    let (info, got) = client
        .get_bytes(key.clone())
        .await
        .unwrap()
        .expect("served from memory");
    assert_eq!(Sha256::digest(&got)[..], Sha256::digest(&data)[..]);
    assert_eq!(info.sha256[..], Sha256::digest(&data)[..]);
    let mut part = client.get(key.clone(), 1000, 10).await.unwrap().unwrap();
    assert_eq!(
        part.next_chunk().await.unwrap().unwrap()[..],
        data[1000..1010]
    );

    // A key that is not popular is a miss while its shard is down.
    let cold = (0..)
        .map(|i| format!("cold{i}"))
        .find(|id| cluster.owner("example.org", id) == owner)
        .unwrap();
    assert!(client
        .get(media_key("example.org", &cold, ""), 0, 0)
        .await
        .unwrap()
        .is_none());

    cluster.shards[owner].restart().await;
    // Purge reaches the memory tier too.
    common::eventually(
        "purge with the shard back",
        std::time::Duration::from_secs(5),
        || {
            let mut client = client.clone();
            let key = key.clone();
            async move { client.purge(key, false, false).await.ok() }
        },
    )
    .await;
    assert!(!client.stat(key.clone()).await.unwrap().found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_of_a_key_already_popular_fills_memory_too() {
    let cluster = TestCluster::builder()
        .shards(2)
        .configure(|c| c.memory.min_downloads = 3)
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "wanted", "thumb/96x96/crop");
    // Three media repos ask for it and miss.
    for _ in 0..3 {
        assert!(client.get(key.clone(), 0, 0).await.unwrap().is_none());
    }
    let data = body(50_000, 3);
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), data.clone())
            .await
            .unwrap()
            .stored
    );
    let stat = client.stat(key.clone()).await.unwrap();
    assert_eq!(stat.tier, "memory");
    let owner = cluster.owner("example.org", "wanted");
    assert_eq!(
        cluster.shards[owner].objects().await.len(),
        1,
        "and it is in Redis as well"
    );
    assert_eq!(client.get_bytes(key).await.unwrap().unwrap().1, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_only_mode_refuses_what_it_cannot_make_room_for() {
    let cluster = TestCluster::builder()
        .configure(|c| {
            c.memory.max_bytes = 100_000;
            c.memory.max_object_bytes = 100_000;
        })
        .start()
        .await;
    let mut client = cluster.client().await;
    let first = client
        .put_bytes(media_key("o", "a", ""), Default::default(), body(80_000, 1))
        .await
        .unwrap();
    assert!(first.stored);
    // The first entry is inside min_cache_time: the newcomer is refused, not the entry evicted.
    let second = client
        .put_bytes(media_key("o", "b", ""), Default::default(), body(80_000, 2))
        .await
        .unwrap();
    assert!(!second.stored);
    assert_eq!(
        second.outcome,
        mediacache::proto::PutOutcome::NotAdmitted as i32
    );
    assert!(client
        .get(media_key("o", "a", ""), 0, 0)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_only_mode_quarantines_media_and_origins() {
    let cluster = TestCluster::builder().start().await;
    let mut client = cluster.client().await;
    let key = media_key("bad.example", "m", "");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(10, 1))
            .await
            .unwrap()
            .stored
    );
    assert_eq!(
        client.purge(key.clone(), true, true).await.unwrap().removed,
        1
    );
    let thumb = media_key("bad.example", "m", "thumb/1x1/crop");
    let answer = client
        .put_bytes(thumb, Default::default(), body(10, 1))
        .await
        .unwrap();
    assert_eq!(
        answer.outcome,
        mediacache::proto::PutOutcome::Quarantined as i32
    );
    assert!(
        client
            .put_bytes(
                media_key("bad.example", "other", ""),
                Default::default(),
                body(10, 1)
            )
            .await
            .unwrap()
            .stored
    );
    assert_eq!(
        client
            .purge_origin("bad.example", true, |_| {})
            .await
            .unwrap(),
        1
    );
    let answer = client
        .put_bytes(
            media_key("bad.example", "third", ""),
            Default::default(),
            body(10, 1),
        )
        .await
        .unwrap();
    assert_eq!(
        answer.outcome,
        mediacache::proto::PutOutcome::Quarantined as i32
    );
    assert!(
        client
            .put_bytes(
                media_key("good.example", "m", ""),
                Default::default(),
                body(10, 1)
            )
            .await
            .unwrap()
            .stored
    );
}
