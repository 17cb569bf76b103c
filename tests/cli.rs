//! The `mediacache` binary: config checking, refusing to serve a bad config, the memory-only
//! default, and the client subcommands against a served ring of real shards.

mod common;

use prost::Message;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{body, eventually, free_port, RedisShard};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mediacache"))
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn check_config_reports_every_problem_with_its_path() {
    let bad = write_config(
        r#"
chunk_bytes: 1
shards:
  - { name: a, url: "redis://127.0.0.1:1" }
  - { name: a, url: "redis://127.0.0.1:2" }
  - { name: b, url: "http://127.0.0.1:3" }
"#,
    );
    let out = bin().arg("check-config").arg(bad.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for path in ["chunk_bytes:", "shards[1].name:", "shards[2].url:"] {
        assert!(err.contains(path), "missing {path} in {err}");
    }

    let unknown = write_config("shards: []\nshard: []\n");
    let out = bin()
        .arg("check-config")
        .arg(unknown.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shard"));

    let good =
        write_config("shards:\n  - { name: a, url: \"redis://127.0.0.1:6379\", weight: 2 }\n");
    let out = bin().arg("check-config").arg(good.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (1 shards"));
}

/// Runs `serve` on the config `yaml` and returns how it exited and what it wrote to stderr.
fn serve_config(yaml: &str) -> (Option<i32>, String) {
    let file = write_config(yaml);
    let out = bin()
        .args(["serve", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_refuses_an_invalid_config_before_binding() {
    let port = free_port();
    let (code, err) = serve_config(&format!(
        "listen: 127.0.0.1:{port}\nshards:\n  - {{ name: '', url: 'redis://x:1' }}\n"
    ));
    assert_eq!(code, Some(2));
    assert!(err.contains("shards[0].name"));
    // The port was never taken.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");
}

/// Runs the served binary and kills it on drop.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str]) -> Served {
    Served(
        bin()
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn wait_serving(addr: &str) {
    eventually("server answers", Duration::from_secs(10), || async {
        mediacache::client::Client::connect(addr.to_owned())
            .await
            .ok()
    })
    .await;
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_subcommands_against_a_served_ring() {
    let mut shards = Vec::new();
    for i in 0..3 {
        shards.push(RedisShard::start(&format!("s{i}")).await);
    }
    let port = free_port();
    let mut config = format!("listen: 127.0.0.1:{port}\nshards:\n");
    for s in &shards {
        config.push_str(&format!(
            "  - {{ name: {}, url: \"{}\" }}\n",
            s.name,
            s.url()
        ));
    }
    let file = write_config(&config);
    let _server = serve(&["--config", file.path().to_str().unwrap()]);
    let addr = format!("http://127.0.0.1:{port}");
    wait_serving(&addr).await;

    let data = body(700_000, 11);
    let input = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(input.path(), &data).unwrap();
    let out = run(
        &[
            "put",
            "--addr",
            &addr,
            "example.org",
            "cli",
            "-i",
            input.path().to_str().unwrap(),
            "--content-type",
            "image/jpeg",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stored");

    let out = run(
        &[
            "put",
            "--addr",
            &addr,
            "example.org",
            "cli",
            "--variant",
            "thumb/8x8/crop",
        ],
        Some(b"tiny"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let output = tempfile::NamedTempFile::new().unwrap();
    let out = run(
        &[
            "get",
            "--addr",
            &addr,
            "example.org",
            "cli",
            "-o",
            output.path().to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(output.path()).unwrap() == data[..]);

    let out = run(
        &[
            "get",
            "--addr",
            &addr,
            "example.org",
            "cli",
            "--variant",
            "thumb/8x8/crop",
        ],
        None,
    );
    assert_eq!(out.stdout, b"tiny");
    let out = run(
        &[
            "get",
            "--addr",
            &addr,
            "example.org",
            "cli",
            "--offset",
            "5",
            "--limit",
            "3",
        ],
        None,
    );
    assert_eq!(out.stdout, data[5..8]);

    let out = run(&["stat", "--addr", &addr, "example.org", "cli"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tier:         redis") && text.contains("size:         700000"),
        "{text}"
    );
    assert!(text.contains("content_type: image/jpeg"), "{text}");

    let out = run(&["ring", "--addr", &addr], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("generation 1"), "{text}");
    for s in &shards {
        assert!(text.contains(&s.url()), "{text}");
    }
    assert_eq!(text.matches(" up ").count(), 3, "{text}");

    let out = run(
        &[
            "purge",
            "--addr",
            &addr,
            "example.org",
            "cli",
            "--all-variants",
        ],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "removed 2");
    let out = run(&["get", "--addr", &addr, "example.org", "cli"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("miss"));

    let out = run(&["stat", "--addr", &addr, "bad origin", "cli"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("key.origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_only_default_serves_without_a_config() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _server = serve(&["--listen", &listen]);
    let addr = format!("http://{listen}");
    wait_serving(&addr).await;
    let out = run(
        &["put", "--addr", &addr, "example.org", "mem"],
        Some(b"hello"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["get", "--addr", &addr, "example.org", "mem"], None);
    assert_eq!(out.stdout, b"hello");
    let out = run(&["stat", "--addr", &addr, "example.org", "mem"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tier:         memory"));
    let out = run(&["ring", "--addr", &addr], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("memory tier only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_clean_exit_on_sigterm() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = serve(&["--listen", &listen]);
    let addr = format!("http://{listen}");
    wait_serving(&addr).await;

    let channel = tonic::transport::Endpoint::from_shared(addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "mediacache.v1.MediaCacheService",
        "mediacache.v1.CacheAdminService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "mediacache.v1.MediaCacheService",
        "mediacache.v1.CacheAdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }

    // The same through v1alpha, which older grpcurl builds and GUI clients speak.
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let channel = tonic::transport::Endpoint::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "mediacache.v1.MediaCacheService".into(),
            )),
        };
        let answer = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
            panic!("unexpected v1alpha reflection answer: {answer:?}");
        };
        let file =
            prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..]).unwrap();
        assert_eq!(file.package(), "mediacache.v1");
        let services: Vec<&str> = file.service.iter().map(|s| s.name()).collect();
        assert!(services.contains(&"MediaCacheService"), "{services:?}");
    }

    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_counts_hits_and_json_logs_are_json() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = bin()
        .args(["serve", "--listen", &listen, "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("http://{listen}");
    wait_serving(&addr).await;
    run(
        &["put", "--addr", &addr, "example.org", "s"],
        Some(b"12345"),
    );
    run(&["get", "--addr", &addr, "example.org", "s"], None);
    run(&["get", "--addr", &addr, "example.org", "s"], None);
    run(&["get", "--addr", &addr, "example.org", "missing"], None);
    let out = run(&["stats", "--addr", &addr], None);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(row("get hits"), "2", "{text}");
    assert_eq!(row("get misses"), "1", "{text}");
    assert_eq!(row("hit ratio"), "66.7%", "{text}");
    assert_eq!(row("bytes served"), "10", "{text}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(logs.lines().count() >= 2, "{logs}");
    for line in logs.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\""),
            "{line}"
        );
    }
}

#[test]
fn serve_refuses_a_temp_key_ttl_shorter_than_two_client_pauses() {
    let port = free_port();
    let (code, err) = serve_config(&format!(
        "listen: 127.0.0.1:{port}\nredis: {{ temp_key_ttl: 45s }}\nlimits: {{ idle_timeout: 30s }}\n"
    ));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("redis.temp_key_ttl: must be at least twice limits.idle_timeout"),
        "{err}"
    );
}

/// A replica whose every shard is down still stops at SIGTERM, well within its drain grace:
/// closing the connections of a shard that never answers must not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_replica_whose_shards_are_all_down() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.yaml");
    let shards: String = (0..3)
        .map(|i| {
            format!(
                "  - name: s{i}\n    url: redis://127.0.0.1:{}\n",
                free_port()
            )
        })
        .collect();
    std::fs::write(&config, format!("listen: {listen}\nshards:\n{shards}")).unwrap();
    let mut server = serve(&["--config", config.to_str().unwrap()]);
    wait_serving(&format!("http://{listen}")).await;

    let stopping = std::time::Instant::now();
    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = eventually("the replica exits", Duration::from_secs(15), || {
        let status = server.0.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped in {:?}",
        stopping.elapsed()
    );
}
