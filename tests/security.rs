//! Client tokens (full and read-only, rotated by rewriting their files), TLS on the gRPC port
//! with certificates reloaded from disk, mutual TLS, and Redis ACL credentials from a file: all
//! against the real server, real `redis-server` shards and the `mediacache` binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{body, eventually, RedisShard, TestCluster};
use mediacache::client::{media_key, Client, ClientError, ConnectOptions, Fetched};
use mediacache::config::{AuthConfig, Config, ShardConfig, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::Code;

const FULL: &str = "full-token-0123456789abcdef";
const NEXT: &str = "next-token-fedcba9876543210";
const READER: &str = "read-token-aaaabbbbccccdddd";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Renamed into place, as a Secret volume update appears to the reader.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn code(result: Result<impl Sized, ClientError>) -> Option<Code> {
    match result {
        Ok(_) => None,
        Err(ClientError::Status(s)) => Some(s.code()),
        Err(e) => panic!("expected a gRPC status, got {e}"),
    }
}

async fn connect(addr: &str, token: Option<&str>) -> Client {
    let options = ConnectOptions {
        token: token.map(str::to_owned),
        ..Default::default()
    };
    Client::connect_with(addr, options).await.unwrap()
}

#[tokio::test]
async fn tokens_gate_every_rpc_but_health_and_rotate_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        auth: AuthConfig {
            token_files: vec![write(dir.path(), "full", &format!("{FULL}\n"))],
            read_only_token_files: vec![write(dir.path(), "reader", READER)],
        },
        ..Default::default()
    };
    let cluster = TestCluster::builder()
        .with_config(config)
        .unready()
        .start()
        .await;
    let endpoint = cluster.endpoint();
    let key = media_key("example.org", "tokened", "");

    // Health needs no token: probes and load balancers call it.
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1, "SERVING");

    let mut anonymous = connect(&endpoint, None).await;
    assert_eq!(
        code(anonymous.get_bytes(key.clone()).await),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(anonymous.ring_status().await),
        Some(Code::Unauthenticated)
    );
    let mut wrong = connect(&endpoint, Some("wrong-token-wrong-token")).await;
    assert_eq!(
        code(
            wrong
                .put_bytes(key.clone(), Default::default(), body(10, 1))
                .await
        ),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        code(wrong.stat(key.clone()).await),
        Some(Code::Unauthenticated)
    );

    let mut full = connect(&endpoint, Some(FULL)).await;
    let stored = full
        .put_bytes(key.clone(), Default::default(), body(1000, 2))
        .await
        .unwrap();
    assert!(stored.stored);

    let mut reader = connect(&endpoint, Some(READER)).await;
    let (_, got) = reader.get_bytes(key.clone()).await.unwrap().expect("hit");
    assert_eq!(got, body(1000, 2));
    assert!(reader.stat(key.clone()).await.unwrap().found);
    assert!(reader.ring_status().await.is_ok());
    assert_eq!(
        code(
            reader
                .put_bytes(key.clone(), Default::default(), body(5, 3))
                .await
        ),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(reader.purge(key.clone(), false, false).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(reader.purge_origin("example.org", false, |_| {}).await),
        Some(Code::PermissionDenied)
    );
    // The refused Put stored nothing: the object is unchanged.
    let (_, got) = full.get_bytes(key.clone()).await.unwrap().expect("hit");
    assert_eq!(got, body(1000, 2));

    // Rotation: the Secret's file now holds the next token. The old one stops working and the
    // new one starts, with no restart.
    write(dir.path(), "full", NEXT);
    let mut next = connect(&endpoint, Some(NEXT)).await;
    eventually(
        "the rotated token accepted",
        Duration::from_secs(10),
        || {
            let mut next = next.clone();
            let key = key.clone();
            async move { next.stat(key).await.ok() }
        },
    )
    .await;
    assert_eq!(
        code(full.stat(key.clone()).await),
        Some(Code::Unauthenticated)
    );
    assert!(next.purge(key.clone(), false, false).await.is_ok());

    // A token file that turns unreadable keeps its token in use; one that is deleted revokes
    // its token. Both change before one re-read, so seeing the revocation proves that the
    // re-read that kept the other token has run.
    let ro = dir.path().join("reader");
    assert!(ro.exists(), "the read-only token's file");
    std::fs::remove_file(&ro).unwrap();
    std::fs::create_dir(&ro).unwrap();
    std::fs::remove_file(dir.path().join("full")).unwrap();
    eventually(
        "the deleted file's token revoked",
        Duration::from_secs(10),
        || {
            let mut next = next.clone();
            let key = key.clone();
            async move { (code(next.stat(key).await) == Some(Code::Unauthenticated)).then_some(()) }
        },
    )
    .await;
    assert!(
        reader.stat(key).await.is_ok(),
        "the unreadable file's token kept"
    );
}

#[tokio::test]
async fn a_read_only_caller_waits_for_fills_but_never_takes_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        auth: AuthConfig {
            token_files: vec![write(dir.path(), "full", FULL)],
            read_only_token_files: vec![write(dir.path(), "reader", READER)],
        },
        ..Default::default()
    };
    let cluster = TestCluster::builder()
        .with_config(config)
        .unready()
        .start()
        .await;
    let endpoint = cluster.endpoint();
    let key = media_key("example.org", "leased", "");
    let mut reader = connect(&endpoint, Some(READER)).await;
    match reader.get_or_lease(key.clone(), true, 0).await.unwrap() {
        Fetched::Miss { lease_token } => {
            assert!(lease_token.is_empty(), "a read-only caller got a lease")
        }
        Fetched::Hit(_) => panic!("nothing was stored"),
    }
    // The lease is still free for a caller that can fill it.
    let mut full = connect(&endpoint, Some(FULL)).await;
    match full.get_or_lease(key.clone(), true, 0).await.unwrap() {
        Fetched::Miss { lease_token } => assert!(!lease_token.is_empty()),
        Fetched::Hit(_) => panic!("nothing was stored"),
    }
}

#[test]
fn a_missing_token_file_stops_serve_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "config.yaml",
        "listen: 127.0.0.1:0\nauth:\n  token_files: [/nonexistent/token]\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_mediacache"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("auth.token_files[0]: cannot read /nonexistent/token"),
        "{err}"
    );
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, valid for server and client
/// authentication.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, format!("{name} leaf"));
        leaf.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn options(&self, identity: Option<&Pki>) -> ConnectOptions {
        ConnectOptions {
            ca_pem: Some(self.ca_pem.clone().into_bytes()),
            identity_pem: identity.map(|p| {
                (
                    p.cert_pem.clone().into_bytes(),
                    p.key_pem.clone().into_bytes(),
                )
            }),
            domain: Some("localhost".into()),
            ..Default::default()
        }
    }
}

#[tokio::test]
async fn tls_serves_reloads_its_certificate_and_can_require_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pki::new("first");
    let clients = Pki::new("clients");
    let tls = TlsConfig {
        cert_file: write(dir.path(), "tls.crt", &first.cert_pem),
        key_file: write(dir.path(), "tls.key", &first.key_pem),
        client_ca_file: None,
    };
    let config = Config {
        tls: Some(tls),
        ..Default::default()
    };
    let cluster = TestCluster::builder()
        .with_config(config)
        .unready()
        .start()
        .await;
    let endpoint = format!("https://127.0.0.1:{}", cluster.addr().port());
    let key = media_key("example.org", "over-tls", "");

    let mut client = Client::connect_with(&endpoint, first.options(None))
        .await
        .unwrap();
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), body(300_000, 4))
            .await
            .unwrap()
            .stored
    );
    let (_, got) = client.get_bytes(key.clone()).await.unwrap().expect("hit");
    assert_eq!(got, body(300_000, 4));

    // Plain text to a TLS port fails; so does a client that trusts another CA.
    let mut plain = Client::connect(cluster.endpoint()).await.ok();
    if let Some(plain) = plain.as_mut() {
        assert!(plain.stat(key.clone()).await.is_err());
    }
    assert!(Client::connect_with(&endpoint, clients.options(None))
        .await
        .is_err());

    // A renewed certificate from another CA is picked up without a restart.
    let second = Pki::new("second");
    write(dir.path(), "tls.key", &second.key_pem);
    write(dir.path(), "tls.crt", &second.cert_pem);
    eventually(
        "the renewed certificate served",
        Duration::from_secs(15),
        || {
            let endpoint = endpoint.clone();
            let options = second.options(None);
            let key = key.clone();
            async move {
                let mut c = Client::connect_with(&endpoint, options).await.ok()?;
                c.stat(key).await.ok()
            }
        },
    )
    .await;
    // The connection made before the renewal goes on working.
    assert!(client.stat(key.clone()).await.unwrap().found);

    // Mutual TLS: only clients with a certificate from the client CA get in.
    let dir2 = tempfile::tempdir().unwrap();
    let config = Config {
        tls: Some(TlsConfig {
            cert_file: write(dir2.path(), "tls.crt", &first.cert_pem),
            key_file: write(dir2.path(), "tls.key", &first.key_pem),
            client_ca_file: Some(write(dir2.path(), "client-ca.crt", &clients.ca_pem)),
        }),
        ..Default::default()
    };
    let mutual = TestCluster::builder()
        .with_config(config)
        .unready()
        .start()
        .await;
    let endpoint = format!("https://127.0.0.1:{}", mutual.addr().port());
    let mut with_cert = Client::connect_with(&endpoint, first.options(Some(&clients)))
        .await
        .unwrap();
    assert!(!with_cert.stat(key.clone()).await.unwrap().found);
    let without = Client::connect_with(&endpoint, first.options(None)).await;
    if let Ok(mut without) = without {
        // TLS 1.3 reports a refused client certificate on the first request.
        assert!(without.stat(key.clone()).await.is_err());
    }
    let foreign = Client::connect_with(&endpoint, first.options(Some(&second))).await;
    if let Ok(mut foreign) = foreign {
        assert!(foreign.stat(key).await.is_err());
    }
}

#[test]
fn the_cli_smoke_check_runs_over_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("smoke");
    let port = common::free_port();
    let config = format!(
        "listen: 127.0.0.1:{port}\nauth:\n  token_files: [{}]\ntls:\n  cert_file: {}\n  key_file: {}\n",
        write(dir.path(), "token", FULL).display(),
        write(dir.path(), "tls.crt", &pki.cert_pem).display(),
        write(dir.path(), "tls.key", &pki.key_pem).display(),
    );
    let config = write(dir.path(), "config.yaml", &config);
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let token = dir.path().join("token");
    let mut server = Command::new(env!("CARGO_BIN_EXE_mediacache"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let smoke = |token: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mediacache"));
        cmd.args(["smoke", "--size", "300000", "--tls-domain", "localhost"])
            .arg("--addr")
            .arg(format!("https://127.0.0.1:{port}"))
            .arg("--tls-ca-file")
            .arg(&ca);
        if let Some(token) = token {
            cmd.arg("--token-file").arg(token);
        }
        cmd.output().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = smoke(Some(&token));
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let refused = smoke(None);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok: put, get and purge of 300000 bytes")
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn shards_with_an_acl_user_and_a_password_file() {
    let password = "shard-password-9f8e7d";
    let secret = format!(">{password}");
    let acl = [
        "--user",
        "default",
        "off",
        "--user",
        "mediacache",
        "on",
        &secret,
        "~*",
        "&*",
        "+@all",
    ];
    let mut shards = Vec::new();
    for i in 0..2 {
        shards.push(RedisShard::start_with(&format!("auth-{i}"), &acl).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.redis.username = Some("mediacache".into());
    config.redis.password_file = Some(write(dir.path(), "password", &format!("{password}\n")));
    config.shards = shards
        .iter()
        .map(|s| ShardConfig {
            name: s.name.clone(),
            url: s.url(),
            weight: 1,
        })
        .collect();
    let cluster = TestCluster::builder()
        .with_config(config.clone())
        .start()
        .await;
    let mut client = cluster.client().await;
    let ring = cluster.ring_status().await;
    // The password shows nowhere in what the service reports.
    assert!(!format!("{ring:?}").contains(password));
    for i in 0..8 {
        let key = media_key("example.org", &format!("acl-{i}"), "");
        // The first is long enough to be streamed over a connection of its own, which logs in
        // as the pool's do.
        let size = if i == 0 { 3_000_000 } else { 2000 };
        assert!(
            client
                .put_bytes(key.clone(), Default::default(), body(size, i))
                .await
                .unwrap()
                .stored
        );
        let (_, got) = client.get_bytes(key).await.unwrap().expect("hit");
        assert_eq!(got, body(size, i));
    }

    // A wrong password: the shards stay down and Puts are refused, nothing is written. The
    // service reaches the first shard through a proxy that counts its connections: it keeps
    // dialling again, as every login fails (a login that worked would keep its connection).
    let proxy = common::CuttingProxy::start(shards[0].port).await;
    let mut wrong = config;
    wrong.redis.password_file = Some(write(dir.path(), "wrong", "not-the-password"));
    wrong.shards[0].url = proxy.url();
    let wrong = TestCluster::builder()
        .with_config(wrong)
        .unready()
        .start()
        .await;
    let mut client = wrong.client().await;
    eventually(
        "repeated failed logins",
        Duration::from_secs(10),
        || async { (proxy.accepted() >= 20).then_some(()) },
    )
    .await;
    let ring = client.ring_status().await.unwrap();
    assert!(ring.shards.iter().all(|s| !s.up), "{ring:?}");
    let answer = client
        .put_bytes(
            media_key("example.org", "refused", ""),
            Default::default(),
            body(10, 9),
        )
        .await
        .unwrap();
    assert!(!answer.stored);
}

#[test]
fn a_password_in_the_url_and_a_password_file_are_refused_together() {
    let text = "redis:\n  password_file: /run/secrets/redis\nshards:\n  - { name: a, url: \"redis://:hunter2@10.0.0.1:6379\" }\n";
    let err = Config::from_yaml(text).unwrap_err().to_string();
    assert!(err.contains("shards[0].url: has a password while redis.password_file is set"));
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn rediss_shards_are_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("redis");
    let cert = write(dir.path(), "redis.crt", &pki.cert_pem);
    let key = write(dir.path(), "redis.key", &pki.key_pem);
    let ca = write(dir.path(), "ca.crt", &pki.ca_pem);
    let tls_port = common::free_port();
    // The plain port stays open for the harness' readiness check; the service uses TLS only.
    let shard = RedisShard::start_with(
        "tls",
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ],
    )
    .await;
    let mut config = Config::default();
    config.redis.tls_ca_file = Some(ca.clone());
    config.shards = vec![ShardConfig {
        name: shard.name.clone(),
        url: format!("rediss://127.0.0.1:{tls_port}"),
        weight: 1,
    }];
    let cluster = TestCluster::builder()
        .with_config(config.clone())
        .start()
        .await;
    let mut client = cluster.client().await;
    let key = media_key("example.org", "over-rediss", "");
    // One value sent with the publish, and one streamed over a TLS connection of its own.
    for (id, size) in [
        ("over-rediss", 700_000),
        ("streamed-over-rediss", 3_000_000),
    ] {
        let key = media_key("example.org", id, "");
        assert!(
            client
                .put_bytes(key.clone(), Default::default(), body(size, 7))
                .await
                .unwrap()
                .stored,
            "{id}"
        );
        let (_, got) = client.get_bytes(key).await.unwrap().expect("hit");
        assert_eq!(got, body(size, 7), "{id}");
    }
    // It really went over TLS to that shard: the objects are there.
    let objects = shard.keys().await;
    assert_eq!(
        objects.iter().filter(|k| k.starts_with("mc:1:o:")).count(),
        2,
        "{objects:?}"
    );

    // A CA that did not sign the shard's certificate: the shard is never used.
    let other = Pki::new("other");
    let mut wrong = config.clone();
    wrong.redis.tls_ca_file = Some(write(dir.path(), "other-ca.crt", &other.ca_pem));
    // The service dials the shard through a proxy that counts its connections.
    let proxy = common::CuttingProxy::start(tls_port).await;
    wrong.shards[0].url = format!("rediss://127.0.0.1:{}", proxy.port);
    let wrong = TestCluster::builder()
        .with_config(wrong)
        .unready()
        .start()
        .await;
    let mut client = wrong.client().await;
    // It keeps dialling the shard again, as every handshake fails: verified connections would
    // be kept, and the count would stop at the pool's size.
    eventually(
        "repeated failed handshakes with the shard",
        Duration::from_secs(10),
        || async { (proxy.accepted() >= 20).then_some(()) },
    )
    .await;
    assert!(client
        .ring_status()
        .await
        .unwrap()
        .shards
        .iter()
        .all(|s| !s.up));
    assert!(client.get_bytes(key.clone()).await.unwrap().is_none());

    // rediss:// without a CA file is refused by validation, naming the key.
    let mut no_ca = config;
    no_ca.redis.tls_ca_file = None;
    let err = Config::from_yaml(&yaml_serde::to_string(&no_ca).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shards[0].url: rediss:// needs redis.tls_ca_file"),
        "{err}"
    );
}
