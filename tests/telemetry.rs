//! Metrics, probes and shutdown, observed from outside: scrape `/metrics` and check that the
//! counters move as the traffic and the ring do.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{body, eventually, free_port, TestCluster};
use mediacache::client::media_key;

/// One HTTP/1.0 GET; returns the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// Scrapes and parses `/metrics`; every sample as (name, labels, value).
fn scrape(addr: SocketAddr) -> Vec<prometheus_parse::Sample> {
    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("the exposition parses")
        .samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_traffic_shards_and_reloads() {
    let port = free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cluster = TestCluster::builder()
        .shards(2)
        .config_file()
        .configure(|c| {
            c.metrics_listen = Some(metrics);
            c.memory.min_downloads = 1;
        })
        .start()
        .await;
    assert_eq!(http_get(metrics, "/healthz").0, 200);
    assert_eq!(http_get(metrics, "/readyz").0, 200);
    assert_eq!(http_get(metrics, "/nope").0, 404);

    let mut client = cluster.client().await;
    let key = media_key("example.org", "counted", "");
    assert!(client.get(key.clone(), 0, 0).await.unwrap().is_none());
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(5000, 1))
            .await
            .unwrap()
            .stored
    );
    assert_eq!(
        client
            .get_bytes(key.clone())
            .await
            .unwrap()
            .unwrap()
            .1
            .len(),
        5000
    );

    let s = scrape(metrics);
    let requests = "mediacache_requests_total";
    assert_eq!(
        value(&s, requests, &[("rpc", "get"), ("outcome", "miss")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, requests, &[("rpc", "get"), ("outcome", "hit")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, requests, &[("rpc", "put"), ("outcome", "stored")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "mediacache_sent_bytes_total", &[]), Some(5000.0));
    assert_eq!(
        value(&s, "mediacache_received_bytes_total", &[]),
        Some(5000.0)
    );
    // The whole read filled the memory tier (min_downloads 1).
    assert_eq!(value(&s, "mediacache_memory_entries", &[]), Some(1.0));
    assert_eq!(value(&s, "mediacache_memory_bytes", &[]), Some(5000.0));
    assert_eq!(value(&s, "mediacache_ring_generation", &[]), Some(1.0));
    assert!(s
        .iter()
        .any(|x| x.metric == "mediacache_get_first_byte_seconds_count"));
    let reads: f64 = s
        .iter()
        .filter(|x| x.metric == "mediacache_shard_command_duration_seconds_count")
        .map(|x| match x.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => 0.0,
        })
        .sum();
    assert!(
        reads >= 2.0,
        "the miss, the Put and the hit went to a shard: {reads}"
    );
    for shard in ["shard-0", "shard-1"] {
        assert_eq!(
            value(&s, "mediacache_shard_up", &[("shard", shard)]),
            Some(1.0)
        );
    }
    // Real key counts read from the shards, on the poll interval.
    eventually("shard key counts", Duration::from_secs(10), || async {
        let s = scrape(metrics);
        let keys: f64 = ["shard-0", "shard-1"]
            .iter()
            .filter_map(|shard| value(&s, "mediacache_shard_keys", &[("shard", shard)]))
            .sum();
        // The object and its media's variant index.
        (keys == 2.0).then_some(())
    })
    .await;

    // A killed shard shows as down within seconds.
    cluster.shards[1].kill();
    eventually(
        "shard-1 down in /metrics",
        Duration::from_secs(5),
        || async {
            (value(
                &scrape(metrics),
                "mediacache_shard_up",
                &[("shard", "shard-1")],
            ) == Some(0.0))
            .then_some(())
        },
    )
    .await;

    // A reload moves the generation and counts as applied.
    let mut next = cluster.config.clone();
    next.shards[0].weight = 2;
    cluster.apply(next).await;
    let s = scrape(metrics);
    assert_eq!(value(&s, "mediacache_ring_generation", &[]), Some(2.0));
    assert_eq!(
        value(&s, "mediacache_reloads", &[("result", "applied")]),
        Some(1.0)
    );
    assert!(value(&s, "mediacache_last_reload_timestamp_seconds", &[]).unwrap() > 1.6e9);
}

#[test]
fn sigterm_fails_readiness_and_lets_a_long_get_finish() {
    use std::process::{Command, Stdio};
    let grpc_port = free_port();
    let metrics_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{grpc_port}\nmetrics_listen: 127.0.0.1:{metrics_port}\nchunk_bytes: 65536\nshutdown_grace: 30s\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mediacache"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = format!("http://127.0.0.1:{grpc_port}");
    let data = body(16 * 1024 * 1024, 3);
    rt.block_on(async {
        let mut client = eventually("serving", Duration::from_secs(10), || async {
            mediacache::client::Client::connect(addr.clone()).await.ok()
        })
        .await;
        let key = media_key("example.org", "long", "");
        assert!(
            client
                .put_bytes(key.clone(), Default::default(), data.clone())
                .await
                .unwrap()
                .stored
        );
        let mut download = client.get(key.clone(), 0, 0).await.unwrap().unwrap();
        let mut got = download.next_chunk().await.unwrap().unwrap().to_vec();

        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        eventually("readiness fails first", Duration::from_secs(5), || async {
            (http_get(metrics, "/readyz").0 == 503).then_some(())
        })
        .await;
        // A slow reader still gets every byte.
        while let Some(chunk) = download.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
            if got.len() % (4 << 20) < chunk.len() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(got == data[..], "the stream in flight completed");
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after draining: {status:?}");
}
