//! Round trips, ranges, misses, Stat and Purge, memory-only and over a ring of real shards.

mod common;

use common::{body, TestCluster};
use mediacache::client::media_key;
use mediacache::proto::{MediaInfo, MediaKey, PutOutcome};
use sha2::{Digest, Sha256};
use tonic::Code;

const CHUNK: usize = 64 * 1024;

/// Gets `key` and checks that it reads back as `data`.
async fn get_expecting(client: &mut mediacache::client::Client, key: &MediaKey, data: &[u8]) {
    let (_, got) = client
        .get_bytes(key.clone())
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(got, data);
}

fn sizes() -> Vec<usize> {
    vec![0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * 1024 * 1024 + 17]
}

async fn round_trips(cluster: &TestCluster, tier: &str) {
    let mut client = cluster.client().await;
    for (i, size) in sizes().into_iter().enumerate() {
        let key = media_key("example.org", &format!("size{i}"), "");
        let data = body(size, i as u64);
        let info = MediaInfo {
            content_type: "application/octet-stream".into(),
            file_name: format!("f{i}.bin"),
            ..Default::default()
        };
        let put = client
            .put_bytes(key.clone(), info, data.clone())
            .await
            .unwrap();
        assert!(put.stored, "size {size}: {put:?}");
        assert_eq!(put.outcome, PutOutcome::Stored as i32);

        let (got_info, got) = client.get_bytes(key.clone()).await.unwrap().expect("hit");
        assert_eq!(got.len(), size, "size {size}");
        assert!(got == data, "size {size}: bytes differ");
        assert_eq!(got_info.size, size as u64);
        assert_eq!(got_info.file_name, format!("f{i}.bin"));
        assert_eq!(
            got_info.sha256[..],
            Sha256::digest(&data)[..],
            "digest is filled in"
        );
        assert!(got_info.stored_at_unix_ms > 1_600_000_000_000);

        let stat = client.stat(key).await.unwrap();
        assert!(stat.found);
        assert_eq!(stat.tier, tier);
        assert_eq!(stat.info.unwrap().size, size as u64);
    }
}

async fn ranges(cluster: &TestCluster) {
    let mut client = cluster.client().await;
    let size = 2 * CHUNK + 100;
    let data = body(size, 99);
    let key = media_key("example.org", "ranged", "thumb/32x32/crop");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), data.clone())
            .await
            .unwrap()
            .stored
    );
    let cases: [(u64, u64); 9] = [
        (0, 0),
        (0, 1),
        (1, 10),
        (CHUNK as u64 - 3, 7),
        (CHUNK as u64, CHUNK as u64),
        (10, 0),
        (size as u64 - 1, 0),
        (size as u64 - 5, 1000),
        (size as u64, 0),
    ];
    for (offset, limit) in cases {
        let mut d = client
            .get(key.clone(), offset, limit)
            .await
            .unwrap()
            .expect("hit");
        assert_eq!(d.info.size, size as u64, "info is the whole object's");
        let mut got = Vec::new();
        while let Some(c) = d.next_chunk().await.unwrap() {
            assert!(c.len() <= CHUNK);
            got.extend_from_slice(&c);
        }
        let end = if limit == 0 {
            size
        } else {
            (offset + limit).min(size as u64) as usize
        };
        assert_eq!(
            got,
            data[offset as usize..end],
            "offset {offset} limit {limit}"
        );
    }
    let err = client
        .get(key, size as u64 + 1, 0)
        .await
        .err()
        .expect("past the end");
    assert!(
        matches!(err, mediacache::client::ClientError::Status(ref s) if s.code() == Code::OutOfRange),
        "{err}"
    );
}

async fn miss_then_purge(cluster: &TestCluster) {
    let mut client = cluster.client().await;
    let missing = media_key("example.org", "never-stored", "");
    assert!(client.get(missing.clone(), 0, 0).await.unwrap().is_none());
    assert!(!client.stat(missing.clone()).await.unwrap().found);
    assert_eq!(
        client.purge(missing, false, false).await.unwrap().removed,
        0
    );

    let original = media_key("example.org", "purged", "");
    let thumb = media_key("example.org", "purged", "thumb/1x1/crop");
    let other = media_key("example.org", "kept", "");
    for k in [&original, &thumb, &other] {
        assert!(
            client
                .put_bytes(k.clone(), Default::default(), body(10, 1))
                .await
                .unwrap()
                .stored
        );
    }
    assert_eq!(
        client
            .purge(thumb.clone(), false, false)
            .await
            .unwrap()
            .removed,
        1
    );
    assert!(client.get(thumb.clone(), 0, 0).await.unwrap().is_none());
    assert!(client.get(original.clone(), 0, 0).await.unwrap().is_some());
    assert!(
        client
            .put_bytes(thumb.clone(), Default::default(), body(10, 1))
            .await
            .unwrap()
            .stored
    );
    assert_eq!(
        client
            .purge(original.clone(), true, false)
            .await
            .unwrap()
            .removed,
        2
    );
    assert!(client.get(original, 0, 0).await.unwrap().is_none());
    assert!(client.get(thumb, 0, 0).await.unwrap().is_none());
    assert!(client.get(other, 0, 0).await.unwrap().is_some());
}

fn chunked(c: &mut mediacache::config::Config) {
    c.chunk_bytes = CHUNK as u64;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_only() {
    let cluster = TestCluster::builder().configure(chunked).start().await;
    round_trips(&cluster, "memory").await;
    ranges(&cluster).await;
    miss_then_purge(&cluster).await;
    let ring = cluster.client().await.ring_status().await.unwrap();
    assert!(ring.shards.is_empty());
    assert_eq!(ring.generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards() {
    let cluster = TestCluster::builder()
        .shards(3)
        .configure(chunked)
        .start()
        .await;
    round_trips(&cluster, "redis").await;
    ranges(&cluster).await;
    miss_then_purge(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_key_per_object_on_its_owner() {
    let cluster = TestCluster::builder()
        .shards(3)
        .configure(chunked)
        .start()
        .await;
    let mut client = cluster.client().await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let id = format!("m{i}");
        let variant = if i % 3 == 0 { "thumb/64x64/scale" } else { "" };
        let key = media_key("example.org", &id, variant);
        let size = [0, 5, CHUNK + 3][i % 3];
        assert!(
            client
                .put_bytes(key, Default::default(), body(size, i as u64))
                .await
                .unwrap()
                .stored
        );
        let shard = cluster.owner("example.org", &id);
        expected.push((shard, format!("mc:1:o:example.org|{id}|{variant}")));
        expected.push((shard, format!("mc:1:v:example.org|{id}")));
    }
    expected.sort();
    assert_eq!(
        cluster.all_keys().await,
        expected,
        "exactly one key per object and its media's variant index, on its owner, no temporary keys left"
    );

    // Stat names the owner shard, and variants share it.
    let stat = client
        .stat(media_key("example.org", "m3", "thumb/64x64/scale"))
        .await
        .unwrap();
    assert_eq!(
        stat.shard,
        cluster.shards[cluster.owner("example.org", "m3")].name
    );
    let ring = client.ring_status().await.unwrap();
    // 30 objects and a variant index for each media.
    assert_eq!(ring.shards.iter().map(|s| s.keys).sum::<u64>(), 60);
    assert!(ring.shards.iter().all(|s| s.up && s.used_memory_bytes > 0));
    assert!((ring.shards.iter().map(|s| s.share).sum::<f64>() - 1.0).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_reaches_copies_on_every_shard() {
    let cluster = TestCluster::builder()
        .shards(3)
        .configure(chunked)
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "spread", "");
    let thumb = media_key("example.org", "spread", "thumb/8x8/crop");
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(100, 3))
            .await
            .unwrap()
            .stored
    );
    assert!(
        client
            .put_bytes(thumb.clone(), Default::default(), body(50, 4))
            .await
            .unwrap()
            .stored
    );
    // Copies left on former owners by ring changes look exactly like this.
    let owner = cluster.owner("example.org", "spread");
    for name in [
        "mc:1:o:example.org|spread|",
        "mc:1:o:example.org|spread|thumb/8x8/crop",
    ] {
        let value = cluster.shards[owner].raw_get(name).await.unwrap();
        for (i, shard) in cluster.shards.iter().enumerate() {
            if i != owner {
                shard.raw_set(name, value.clone()).await;
                let index = "mc:1:v:example.org|spread".to_owned();
                shard
                    .raw_command("SADD", vec![index, name.to_owned()])
                    .await;
            }
        }
    }
    assert_eq!(cluster.all_objects().await.len(), 6);
    assert_eq!(
        client
            .purge(key.clone(), false, false)
            .await
            .unwrap()
            .removed,
        3
    );
    assert_eq!(cluster.all_objects().await.len(), 3);
    assert_eq!(client.purge(key, true, false).await.unwrap().removed, 3);
    assert!(cluster.all_keys().await.is_empty());
}

/// A thumbnail-sized object is stored by one script: its `SET` under the final name, no
/// temporary key (no `RENAME`, no `SETRANGE`). An object that fits the first write reaches its
/// shard in one round trip: one `SET` of the whole value and the publish script (its one
/// `RENAME`, and one `SETRANGE` of the header); no piece is written in place. A bigger one is
/// one `SET` too, streamed over a connection of its own, and the same publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_put_is_one_set_and_one_publish_and_a_big_one_streams() {
    let cluster = TestCluster::builder().shards(1).start().await;
    let shard = &cluster.shards[0];
    let mut client = cluster.client().await;
    assert_eq!(
        put_counting_calls(shard, &mut client, "thumbnail-put", body(10_000, 3)).await,
        [1, 0, 0, 0],
        "SET, RENAME, SETRANGE and APPEND calls of one thumbnail's Put"
    );
    assert!(shard.temp_keys().await.is_empty());
    assert_eq!(
        put_counting_calls(shard, &mut client, "small-put", body(900_000, 1)).await,
        [1, 1, 1, 0],
        "SET, RENAME, SETRANGE and APPEND calls of one small Put"
    );
    // Past the first write: one `SET` streamed to the shard, then the same publish.
    assert_eq!(
        put_counting_calls(shard, &mut client, "big-put", body(3_000_000, 2)).await,
        [1, 1, 1, 0],
        "SET, RENAME, SETRANGE and APPEND calls of one long Put"
    );
    assert!(shard.temp_keys().await.is_empty());
}

/// A value longer than `redis.upload_max_bytes` is written after its first megabyte a piece at
/// a time, each piece one `SETRANGE`, and reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_past_the_upload_limit_is_written_in_pieces() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| c.redis.upload_max_bytes = 2_000_000)
        .start()
        .await;
    let shard = &cluster.shards[0];
    let mut client = cluster.client().await;
    let under = put_counting_calls(shard, &mut client, "under", body(1_900_000, 5)).await;
    assert_eq!(under, [1, 1, 1, 0], "one SET under the limit");
    let over = put_counting_calls(shard, &mut client, "over", body(3_000_000, 6)).await;
    assert!(
        over[2] >= 3,
        "a body past the limit is written in pieces: {over:?}"
    );
    assert!(shard.temp_keys().await.is_empty());
}

/// A Get's first read (the window, the value's length and its variant index membership)
/// reaches the shard as one write of its three commands, which the shard reads at once: written
/// one command at a time it took a read each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gets_first_read_reaches_the_shard_in_one_write() {
    let cluster = TestCluster::builder()
        .shards(1)
        .configure(|c| {
            c.memory.max_bytes = 0;
            c.memory.max_object_bytes = 0;
        })
        .start()
        .await;
    let shard = &cluster.shards[0];
    let mut client = cluster.client().await;
    let key = media_key("example.org", "one-write", "");
    let data = body(5000, 7);
    let answer = client
        .put_bytes(key.clone(), Default::default(), data.clone())
        .await
        .unwrap();
    assert!(answer.stored, "{answer:?}");
    const GETS: u64 = 100;
    let before = shard.reads_processed().await;
    for _ in 0..GETS {
        get_expecting(&mut client, &key, &data).await;
    }
    let reads = shard.reads_processed().await - before;
    // The health check's pings and the counting connection's own commands add a few.
    assert!(
        (GETS..GETS * 3 / 2).contains(&reads),
        "the shard made {reads} reads for {GETS} Gets"
    );
}

/// Puts `data` under `id`, checks it reads back whole, and returns the `SET`, `RENAME`,
/// `SETRANGE` and `APPEND` calls the shard ran meanwhile.
async fn put_counting_calls(
    shard: &common::RedisShard,
    client: &mut mediacache::client::Client,
    id: &str,
    data: bytes::Bytes,
) -> [u64; 4] {
    const COMMANDS: [&str; 4] = ["set", "rename", "setrange", "append"];
    let mut before = [0; 4];
    for (n, command) in before.iter_mut().zip(COMMANDS) {
        *n = shard.command_calls(command).await;
    }
    let key = media_key("example.org", id, "");
    let answer = client
        .put_bytes(key.clone(), Default::default(), data.clone())
        .await
        .unwrap();
    assert!(answer.stored, "{id}");
    let mut calls = [0; 4];
    for ((n, command), then) in calls.iter_mut().zip(COMMANDS).zip(before) {
        *n = shard.command_calls(command).await - then;
    }
    let (_, got) = client.get_bytes(key).await.unwrap().expect("stored");
    assert_eq!(got, data, "{id}");
    calls
}

/// A client connection to `addr` that keeps its socket's descriptor, to read its `TCP_INFO`.
#[cfg(target_os = "linux")]
#[derive(Clone)]
struct Watched {
    addr: std::net::SocketAddr,
    fd: std::sync::Arc<std::sync::OnceLock<std::os::fd::RawFd>>,
}

#[cfg(target_os = "linux")]
impl tower_service::Service<tonic::codegen::http::Uri> for Watched {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let _ = this.fd.set(std::os::fd::AsRawFd::as_raw_fd(&tcp));
            Ok(hyper_util::rt::TokioIo::new(tcp))
        })
    }
}

/// TCP segments with data (not bare acknowledgements) the socket `fd` has received.
#[cfg(target_os = "linux")]
fn segments_in(fd: std::os::fd::RawFd) -> u32 {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let done = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(done, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_data_segs_in
}

/// A small Get's whole response (headers, messages and trailers) reaches the client in one TCP
/// segment; h2 alone sends the trailers in a write of their own (see `coalesce`).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_small_gets_response_reaches_the_client_in_one_segment() {
    let cluster = TestCluster::builder().shards(0).start().await;
    let key = media_key("example.org", "one-segment", "");
    let data = body(5000, 3);
    let put = cluster
        .client()
        .await
        .put_bytes(key.clone(), Default::default(), data.clone())
        .await
        .unwrap();
    assert!(put.stored, "{put:?}");
    let watched = Watched {
        addr: cluster.addr(),
        fd: Default::default(),
    };
    let channel = tonic::transport::Endpoint::from_shared(cluster.endpoint())
        .unwrap()
        .connect_with_connector(watched.clone())
        .await
        .unwrap();
    let mut client = mediacache::client::Client::from_channel(channel);
    let fd = *watched.fd.get().expect("connected");
    // The connection's start (settings, the first acknowledgements) is left out.
    const WARM_UP: u32 = 20;
    const GETS: u32 = 100;
    for _ in 0..WARM_UP {
        get_expecting(&mut client, &key, &data).await;
    }
    let before = segments_in(fd);
    for _ in 0..GETS {
        get_expecting(&mut client, &key, &data).await;
    }
    let segments = segments_in(fd) - before;
    // The server's answers to the client's pings and window updates add a few.
    assert!(
        (GETS..GETS * 3 / 2).contains(&segments),
        "{segments} segments reached the client for {GETS} Gets"
    );
}

/// A shard URL that names a database: the pool and an upload's own connection both select it,
/// so a long Put's temporary key and its object land there, and read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_urls_database_is_used_by_uploads_too() {
    let shard = common::RedisShard::start_with("db", &[]).await;
    let mut config = mediacache::config::Config::default();
    config.shards = vec![mediacache::config::ShardConfig {
        name: shard.name.clone(),
        url: format!("{}/2", shard.url()),
        weight: 1,
    }];
    let cluster = TestCluster::builder().with_config(config).start().await;
    let mut client = cluster.client().await;
    for (id, size) in [("whole", 700_000), ("uploaded", 3_000_000)] {
        let key = media_key("example.org", id, "");
        let answer = client
            .put_bytes(key.clone(), Default::default(), body(size, 3))
            .await
            .unwrap();
        assert!(answer.stored, "{id}: {answer:?}");
        let (_, got) = client.get_bytes(key).await.unwrap().expect("hit");
        assert_eq!(got, body(size, 3), "{id}");
    }
    let keys = shard.keys().await;
    assert!(keys.is_empty(), "nothing in database 0: {keys:?}");
}
