//! Every bad input is an error status naming the field, and nothing is stored: checked in Redis
//! itself, including that no temporary key is left behind.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{body, eventually, TestCluster};
use mediacache::client::media_key;
use mediacache::proto::{
    put_request, GetRequest, MediaInfo, MediaKey, PutHeader, PutOutcome, PutRequest,
};
use sha2::{Digest, Sha256};
use tonic::Code;

fn header(key: MediaKey, info: MediaInfo) -> PutRequest {
    PutRequest {
        kind: Some(put_request::Kind::Header(PutHeader {
            key: Some(key),
            info: Some(info),
            ..Default::default()
        })),
    }
}

fn chunk(b: &[u8]) -> PutRequest {
    PutRequest {
        kind: Some(put_request::Kind::Chunk(Bytes::copy_from_slice(b))),
    }
}

fn sized(size: u64) -> MediaInfo {
    MediaInfo {
        size,
        ..Default::default()
    }
}

/// Sends `messages` as one Put; returns the status code and message of the error.
async fn put_err(cluster: &TestCluster, messages: Vec<PutRequest>) -> (Code, String) {
    let mut raw = cluster.raw().await;
    match raw.put(tokio_stream::iter(messages)).await {
        Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn assert_nothing_stored(cluster: &TestCluster) {
    eventually("no key on any shard", Duration::from_secs(5), || async {
        cluster.all_keys().await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_puts_are_errors_and_store_nothing() {
    let cluster = TestCluster::builder().shards(3).start().await;
    let key = || media_key("example.org", "bad", "");
    let data = body(1000, 5);
    let cases: Vec<(&str, Vec<PutRequest>, &str)> = vec![
        ("empty stream", vec![], "header"),
        ("chunk first", vec![chunk(&data)], "header"),
        ("no kind", vec![PutRequest { kind: None }], "header"),
        (
            "header twice",
            vec![
                header(key(), sized(1000)),
                chunk(&data[..10]),
                header(key(), sized(1000)),
            ],
            "header",
        ),
        (
            "body longer",
            vec![header(key(), sized(999)), chunk(&data)],
            "info.size",
        ),
        (
            "body shorter",
            vec![header(key(), sized(1001)), chunk(&data)],
            "info.size",
        ),
        (
            "sha256 mismatch",
            vec![
                header(
                    key(),
                    MediaInfo {
                        size: 1000,
                        sha256: vec![0; 32].into(),
                        ..Default::default()
                    },
                ),
                chunk(&data),
            ],
            "info.sha256",
        ),
        (
            "sha256 wrong length",
            vec![
                header(
                    key(),
                    MediaInfo {
                        size: 1000,
                        sha256: vec![1; 5].into(),
                        ..Default::default()
                    },
                ),
                chunk(&data),
            ],
            "info.sha256",
        ),
        (
            "bad origin",
            vec![
                header(media_key("bad origin", "m", ""), sized(1000)),
                chunk(&data),
            ],
            "key.origin",
        ),
        (
            "bad media id",
            vec![header(media_key("o", "a|b", ""), sized(1000)), chunk(&data)],
            "key.media_id",
        ),
        (
            "bad variant",
            vec![
                header(media_key("o", "m", "../x//"), sized(1000)),
                chunk(&data),
            ],
            "key.variant",
        ),
        (
            "no key",
            vec![
                PutRequest {
                    kind: Some(put_request::Kind::Header(PutHeader {
                        key: None,
                        info: Some(sized(1)),
                        ..Default::default()
                    })),
                },
                chunk(b"x"),
            ],
            "key",
        ),
        (
            "no info",
            vec![
                PutRequest {
                    kind: Some(put_request::Kind::Header(PutHeader {
                        key: Some(key()),
                        info: None,
                        ..Default::default()
                    })),
                },
                chunk(b"x"),
            ],
            "info",
        ),
        (
            "content type with newline",
            vec![
                header(
                    key(),
                    MediaInfo {
                        size: 1,
                        content_type: "text/plain\r\nX: y".into(),
                        ..Default::default()
                    },
                ),
                chunk(b"x"),
            ],
            "info.content_type",
        ),
    ];
    for (name, messages, field) in cases {
        let (code, message) = put_err(&cluster, messages).await;
        assert_eq!(code, Code::InvalidArgument, "{name}: {message}");
        assert!(
            message.starts_with(field),
            "{name}: message {message:?} should name {field}"
        );
        assert_nothing_stored(&cluster).await;
    }

    // A correct sha256 is accepted, and so is the same object afterwards.
    let mut raw = cluster.raw().await;
    let good = MediaInfo {
        size: 1000,
        sha256: Sha256::digest(&data).to_vec().into(),
        ..Default::default()
    };
    let r = raw
        .put(tokio_stream::iter(vec![
            header(key(), good),
            chunk(&data[..400]),
            chunk(&data[400..]),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.stored);
    assert_eq!(cluster.all_objects().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gets_are_errors() {
    let cluster = TestCluster::builder().shards(2).start().await;
    let mut raw = cluster.raw().await;
    let status = raw.get(GetRequest::default()).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("key"), "{}", status.message());
    let status = raw
        .get(GetRequest {
            key: Some(media_key("o", "", "")),
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("key.media_id"),
        "{}",
        status.message()
    );
    let mut client = cluster.client().await;
    for err in [
        client.stat(media_key("o", "m", "//")).await.err().unwrap(),
        client
            .purge(media_key("", "m", ""), true, false)
            .await
            .err()
            .unwrap(),
    ] {
        assert!(
            matches!(err, mediacache::client::ClientError::Status(ref s) if s.code() == Code::InvalidArgument),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_is_refused_without_reading_the_body() {
    let cluster = TestCluster::builder()
        .shards(2)
        .configure(|c| c.max_object_bytes = 1024 * 1024)
        .start()
        .await;
    let mut raw = cluster.raw().await;
    // Only the header is ever sent: the answer must come without waiting for a body.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(header(media_key("o", "huge", ""), sized(1024 * 1024 + 1)))
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        raw.put(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("answered before any body was sent")
    .unwrap()
    .into_inner();
    assert!(!answer.stored);
    assert_eq!(answer.outcome, PutOutcome::TooLarge as i32);
    drop(tx);
    assert_nothing_stored(&cluster).await;

    // Memory-only: the memory tier's own limit applies.
    let memory = TestCluster::builder()
        .configure(|c| c.memory.max_object_bytes = 1000)
        .start()
        .await;
    let answer = memory
        .client()
        .await
        .put_bytes(media_key("o", "m", ""), Default::default(), body(1001, 1))
        .await
        .unwrap();
    assert_eq!(answer.outcome, PutOutcome::TooLarge as i32);
}

/// The client process goes away mid-Put: its runtime (and so its connection) is torn down while
/// the body is still being sent. Streamed to its shard as one `SET`, the half-sent command is
/// dropped with its connection; written in pieces, the temporary key is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_put_leaves_nothing() {
    for upload_max_bytes in [mediacache::config::MAX_UPLOAD_BYTES, 0] {
        cancelled_put(upload_max_bytes).await;
    }
}

async fn cancelled_put(upload_max_bytes: u64) {
    let cluster = TestCluster::builder()
        .shards(3)
        .configure(|c| c.redis.upload_max_bytes = upload_max_bytes)
        .start()
        .await;
    let endpoint = cluster.endpoint();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let client_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut raw =
                mediacache::proto::media_cache_service_client::MediaCacheServiceClient::connect(
                    endpoint,
                )
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                raw.put(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            tx.send(header(
                media_key("example.org", "cancelled", ""),
                sized(10 * 1024 * 1024),
            ))
            .await
            .unwrap();
            // Past the first write, so that the upload or the temporary key exists.
            for part in body(6 * 256 * 1024, 8).chunks(256 * 1024) {
                tx.send(chunk(part)).await.unwrap();
            }
            let _ = stop_rx.await;
            drop(tx);
        });
        // Dropping the runtime drops every task of the client, and with them its connection.
        drop(rt);
    });
    let owner = cluster.owner("example.org", "cancelled");
    let shard = &cluster.shards[owner];
    if upload_max_bytes == 0 {
        common::temp_key_appears(shard).await;
    } else {
        common::uploads_under_way(shard, 1).await;
        let temp = shard.temp_keys().await;
        assert!(temp.is_empty(), "{temp:?}");
    }
    // Not the stream's end: the process stops before sending it.
    let _ = stop_tx.send(());
    client_thread.join().unwrap();
    assert_nothing_stored(&cluster).await;
    if upload_max_bytes != 0 {
        eventually(
            "the half-sent upload's connection closed",
            Duration::from_secs(5),
            || async { (shard.uploads_under_way().await == 0).then_some(()) },
        )
        .await;
    }
}
