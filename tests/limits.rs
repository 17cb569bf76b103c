//! Limits that keep one client from exhausting the tier: message size, requests in flight,
//! idle and overlong streams. Each is hit by a real client against the real server.

mod common;

use std::time::Duration;

use common::{body, eventually, TestCluster};
use futures_util::StreamExt;
use mediacache::client::media_key;
use mediacache::proto::{get_response, put_request, GetRequest, MediaInfo, PutHeader, PutRequest};
use tonic::Code;

fn header(media_id: &str, size: u64) -> PutRequest {
    PutRequest {
        kind: Some(put_request::Kind::Header(PutHeader {
            key: Some(media_key("example.org", media_id, "")),
            info: Some(MediaInfo {
                size,
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn chunk(bytes: bytes::Bytes) -> PutRequest {
    PutRequest {
        kind: Some(put_request::Kind::Chunk(bytes)),
    }
}

fn get(media_id: &str) -> GetRequest {
    GetRequest {
        key: Some(media_key("example.org", media_id, "")),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_stores_nothing() {
    let cluster = TestCluster::builder().shards(1).start().await;
    let big = 2 * 1024 * 1024;
    let messages = vec![header("big-msg", big as u64), chunk(body(big, 1))];
    let err = cluster
        .raw()
        .await
        .put(futures_util::stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    eventually("no key left", Duration::from_secs(5), || async {
        cluster.shards[0].keys().await.is_empty().then_some(())
    })
    .await;
    // The connection and the service are fine afterwards.
    let mut client = cluster.client().await;
    let key = media_key("example.org", "after", "");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(1000, 2))
            .await
            .unwrap()
            .stored
    );
}

#[tokio::test]
async fn a_put_that_goes_quiet_is_cut_off_and_leaves_nothing() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.limits.idle_timeout = Duration::from_millis(400))
        .start()
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header("quiet", 100_000)).await.unwrap();
    tx.send(chunk(body(10_000, 3))).await.unwrap();
    let mut raw = cluster.raw().await;
    let started = std::time::Instant::now();
    let put = tokio::spawn(async move {
        raw.put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let err = put.await.unwrap().unwrap_err();
    let took = started.elapsed();
    drop(tx);
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("limits.idle_timeout"),
        "{}",
        err.message()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    eventually(
        "the temporary key removed",
        Duration::from_secs(5),
        || async { cluster.shards[0].keys().await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_reader_that_stops_is_cut_off_and_frees_its_place() {
    let cluster = TestCluster::builder()
        .configure(|c| {
            c.limits.idle_timeout = Duration::from_millis(500);
            c.limits.max_streams = 2;
        })
        .start()
        .await;
    let size = 16 * 1024 * 1024;
    let mut client = cluster.client().await;
    for id in ["stalled-a", "stalled-b"] {
        let stored = client
            .put_bytes(
                media_key("example.org", id, ""),
                Default::default(),
                body(size, 4),
            )
            .await
            .unwrap();
        assert!(stored.stored);
    }

    // Two readers take the info message and then stop reading; each holds a place.
    let mut a = cluster
        .raw()
        .await
        .get(get("stalled-a"))
        .await
        .unwrap()
        .into_inner();
    let mut b = cluster
        .raw()
        .await
        .get(get("stalled-b"))
        .await
        .unwrap()
        .into_inner();
    for s in [&mut a, &mut b] {
        let first = s.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(get_response::Kind::Info(_))));
    }
    // The replica is full: a third request is refused at once, naming the limit.
    let err = cluster
        .raw()
        .await
        .get(get("stalled-a"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.max_streams"),
        "{}",
        err.message()
    );

    // After the idle timeout the stalled streams are cut and their places free again.
    eventually("places freed", Duration::from_secs(10), || async {
        cluster
            .raw()
            .await
            .get(get("missing"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;

    // The stalled reader, reading again, gets what was already on its way and then an error:
    // never a body that ends early with OK.
    let mut received = 0usize;
    let end = loop {
        match a.message().await {
            Ok(Some(m)) => {
                if let Some(get_response::Kind::Chunk(c)) = m.kind {
                    received += c.len();
                }
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert!(received < size, "received {received} of {size}");
    let status = end.expect("an error, not a clean end");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("limits.idle_timeout"));
}

#[tokio::test]
async fn a_get_slower_than_the_request_timeout_ends_with_an_error() {
    let cluster = TestCluster::builder()
        .configure(|c| {
            c.limits.request_timeout = Duration::from_secs(1);
            c.limits.idle_timeout = Duration::from_secs(1);
            c.chunk_bytes = 64 * 1024;
        })
        .start()
        .await;
    let size = 4 * 1024 * 1024;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "slow-read", "");
    assert!(
        client
            .put_bytes(key, Default::default(), body(size, 5))
            .await
            .unwrap()
            .stored
    );
    let mut stream = cluster
        .raw()
        .await
        .get(get("slow-read"))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0usize;
    let mut messages = 0;
    let end = loop {
        // 64 KiB every 50 ms is about 1.3 MiB/s: 4 MiB would take 3 s.
        tokio::time::sleep(Duration::from_millis(50)).await;
        match stream.next().await {
            Some(Ok(m)) => {
                messages += 1;
                if let Some(get_response::Kind::Chunk(c)) = m.kind {
                    received += c.len();
                }
            }
            Some(Err(status)) => break Some(status),
            None => break None,
        }
    };
    let status = end.expect("cut off by the request timeout");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("limits.request_timeout"),
        "{}",
        status.message()
    );
    assert!(
        received < size && messages > 5,
        "received {received} in {messages} messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_for_one_hot_object_shares_its_redis_reads() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| {
            // Keep the memory tier out: every Get goes to the shard.
            c.memory.min_downloads = 1_000_000;
            c.chunk_bytes = 256 * 1024;
        })
        .start()
        .await;
    let size = 1024 * 1024;
    let key = media_key("example.org", "hot", "");
    let client = cluster.client().await;
    assert!(
        client
            .clone()
            .put_bytes(key.clone(), Default::default(), body(size, 6))
            .await
            .unwrap()
            .stored
    );
    let before = cluster.shards[0].command_calls("getrange").await;
    let storm = 50;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(storm));
    let gets: Vec<_> = (0..storm)
        .map(|_| {
            let mut client = client.clone();
            let key = key.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                client.get_bytes(key).await.unwrap().expect("hit").1
            })
        })
        .collect();
    for get in gets {
        assert_eq!(get.await.unwrap(), body(size, 6));
    }
    let calls = cluster.shards[0].command_calls("getrange").await - before;
    // Alone, one Get of 1 MiB in 256 KiB windows costs 7 GETRANGEs: the header with the first
    // window, then 3 windows each checked against the value's prefix.
    let alone = 7 * storm as u64;
    println!("{storm} concurrent Gets of one 1 MiB object: {calls} GETRANGE calls (without sharing: {alone})");
    assert!(
        calls * 2 <= alone,
        "{calls} GETRANGE calls for {storm} Gets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_may_open_only_so_many_streams() {
    let cluster = TestCluster::builder()
        .configure(|c| c.limits.max_streams_per_connection = 2)
        .start()
        .await;
    let size = 16 * 1024 * 1024;
    let mut client = cluster.client().await;
    let stored = client
        .put_bytes(
            media_key("example.org", "wide", ""),
            Default::default(),
            body(size, 8),
        )
        .await
        .unwrap();
    assert!(stored.stored);

    // One connection: two streams open and left unread hold both of its slots.
    let conn = cluster.raw().await;
    let mut a = conn.clone().get(get("wide")).await.unwrap().into_inner();
    let mut b = conn.clone().get(get("wide")).await.unwrap().into_inner();
    for s in [&mut a, &mut b] {
        assert!(s.message().await.unwrap().is_some());
    }
    // A third stream on it waits for a slot (the server advertised 2) ...
    let third = tokio::spawn({
        let mut conn = conn.clone();
        async move { conn.get(get("wide")).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third stream was let in");
    // ... while another connection is served at once.
    let mut other = cluster.raw().await;
    tokio::time::timeout(Duration::from_secs(5), other.get(get("missing")))
        .await
        .expect("another connection is not held up")
        .unwrap();
    // Closing one stream lets the waiting one in.
    drop(a);
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third stream got a slot")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_get_whose_request_never_arrives_holds_a_place_only_until_the_idle_timeout() {
    let cluster = TestCluster::builder()
        .configure(|c| {
            c.limits.idle_timeout = Duration::from_secs(1);
            c.limits.max_streams = 1;
        })
        .start()
        .await;
    // A Get whose request message is never sent: headers only, the body stays open.
    let channel = tonic::transport::Endpoint::from_shared(cluster.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let silent = tokio::spawn(async move {
        grpc.streaming::<_, _, mediacache::proto::GetResponse, _>(
            tonic::Request::new(futures_util::stream::pending::<GetRequest>()),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/mediacache.v1.MediaCacheService/Get",
            ),
            tonic_prost::ProstCodec::default(),
        )
        .await
    });
    // While its body is awaited it holds the one place: another request is refused.
    let mut client = cluster.client().await;
    let key = media_key("example.org", "anything", "");
    eventually(
        "the silent Get holds the place",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            let key = key.clone();
            async move {
                match client.stat(key).await {
                    Err(mediacache::client::ClientError::Status(s))
                        if s.code() == Code::ResourceExhausted =>
                    {
                        Some(())
                    }
                    _ => None,
                }
            }
        },
    )
    .await;
    let err = silent.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("limits.idle_timeout"),
        "{}",
        err.message()
    );
    assert!(client.stat(key).await.is_ok(), "its place is free again");
}
