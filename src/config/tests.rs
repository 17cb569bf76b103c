//! Tests of loading, defaults, validation messages and redaction.

use super::*;

#[test]
fn empty_document_is_the_memory_only_default() {
    let loaded = Config::from_yaml("").unwrap();
    assert_eq!(loaded.config, Config::default());
    assert!(loaded.config.shards.is_empty());
    assert_eq!(loaded.config.listen.to_string(), "127.0.0.1:50051");
    assert_eq!(loaded.config.chunk_bytes, 256 * 1024);
}

#[test]
fn full_config_parses() {
    let text = r#"
listen: 0.0.0.0:7000
metrics_listen: 0.0.0.0:9100
chunk_bytes: 131072
max_object_bytes: 1048576
memory: { max_bytes: 2048000, max_object_bytes: 1024 }
failover: next
shards:
  - { name: a, url: "redis://10.0.0.1:6379" }
  - { name: b, url: "redis://user:secret@10.0.0.2:6380/2", weight: 3 }
redis: { connect_timeout: 250ms, command_timeout: 2s, pool_size: 2 }
"#;
    let c = Config::from_yaml(text).unwrap().config;
    assert_eq!(c.shards.len(), 2);
    assert_eq!(c.shards[0].weight, 1);
    assert_eq!(c.shards[1].weight, 3);
    assert_eq!(c.failover, Failover::Next);
    assert_eq!(c.redis.command_timeout, Duration::from_secs(2));
    assert_eq!(c.redis.temp_key_ttl, Duration::from_secs(60));
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = Config::from_yaml("shards: []\nlisten_addr: 1.2.3.4:5\n").unwrap_err();
    assert!(err.to_string().contains("listen_addr"), "{err}");
    let err = Config::from_yaml("memory: { max_byte: 3 }").unwrap_err();
    assert!(err.to_string().contains("max_byte"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let text = r#"
chunk_bytes: 10
shards:
  - { name: a, url: "redis://h:1" }
  - { name: a, url: "http://h:1" }
  - { name: "", url: "redis://h:1", weight: 0 }
  - { name: c, url: "not a url" }
  - { name: d, url: "rediss://h:1" }
  - { name: e, url: "tcp://h:1" }
redis: { pool_size: 0 }
"#;
    let problems = Config::from_yaml(text).unwrap_err().problems();
    let paths: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "chunk_bytes",
            "shards[1].name",
            "shards[1].url",
            "shards[2].name",
            "shards[2].weight",
            "shards[3].url",
            "shards[4].url",
            "shards[5].url",
            "redis.pool_size"
        ],
        "{problems:#?}"
    );
}

#[test]
fn a_temp_key_ttl_must_outlast_a_client_pause() {
    let text =
        "redis: { temp_key_ttl: 59s }\nlimits: { idle_timeout: 30s }\nquarantine_sync: 10ms\n";
    let problems = Config::from_yaml(text).unwrap_err().problems();
    assert!(
        problems.iter().any(
            |p| p.starts_with("redis.temp_key_ttl: must be at least twice limits.idle_timeout")
        ),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("quarantine_sync:")),
        "{problems:#?}"
    );
    Config::from_yaml("redis: { temp_key_ttl: 60s }\nlimits: { idle_timeout: 30s }\n").unwrap();
}

#[test]
fn an_upload_limit_past_what_redis_takes_is_refused() {
    let problems = Config::from_yaml("redis: { upload_max_bytes: 536870913 }\n")
        .unwrap_err()
        .problems();
    assert_eq!(
        problems,
        vec!["redis.upload_max_bytes: must be at most 536870912 (Redis's default proto-max-bulk-len), got 536870913".to_owned()],
    );
    for ok in ["0", "536870912"] {
        let c = Config::from_yaml(&format!("redis: {{ upload_max_bytes: {ok} }}\n"))
            .unwrap()
            .config;
        assert_eq!(c.redis.upload_max_bytes.to_string(), ok);
    }
    assert_eq!(Config::default().redis.upload_max_bytes, MAX_UPLOAD_BYTES);
}

#[test]
fn digest_follows_the_text() {
    let a = Config::from_yaml("shards: []").unwrap();
    assert_eq!(a.digest, digest("shards: []"));
    let b = Config::from_yaml("shards: [] # comment").unwrap();
    assert_eq!(a.config, b.config);
    assert_ne!(a.digest, b.digest);
    assert_eq!(a.digest.len(), 64);
}

#[test]
fn restart_only_settings_are_named() {
    let running = Config::default();
    let mut next = running.clone();
    next.shards.push(ShardConfig {
        name: "a".into(),
        url: "redis://h:1".into(),
        weight: 1,
    });
    next.redis.pool_size = 9;
    next.failover = Failover::Next;
    assert!(
        next.needs_restart(&running).is_empty(),
        "shards, redis and failover are live"
    );
    next.listen = "127.0.0.1:1".parse().unwrap();
    next.memory.max_bytes = 1;
    assert_eq!(next.needs_restart(&running), ["listen", "memory"]);
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact_url("redis://user:hunter2@host:6379/1"),
        "redis://user:REDACTED@host:6379/1"
    );
    assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    assert!(!redact_url("redis//user:hunter2@x").contains("hunter2"));
}
