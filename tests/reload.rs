//! Runtime ring changes driven by the config file: every way the file can change, bad configs,
//! placement after changes, in-flight streams, connection reuse, and a load test across 50+
//! ring changes with zero failed requests.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{body, eventually, RedisShard, TestCluster};
use fred::prelude::ClientLike;
use fred::types::CustomCommand;
use mediacache::client::media_key;
use mediacache::config::{digest, Config, ShardConfig};
use mediacache::ring::Placement;
use sha2::{Digest, Sha256};

fn shard_cfg(shard: &RedisShard) -> ShardConfig {
    ShardConfig {
        name: shard.name.clone(),
        url: shard.url(),
        weight: 1,
    }
}

async fn generation(cluster: &TestCluster) -> u64 {
    cluster.ring_status().await.generation
}

/// Waits for the generation after `before`; returns how long it took from `since`.
async fn next_generation(cluster: &TestCluster, before: u64, since: Instant) -> Duration {
    eventually("a new generation", Duration::from_secs(5), || async {
        (generation(cluster).await > before).then_some(())
    })
    .await;
    since.elapsed()
}

fn text_with_weight(cluster: &TestCluster, weight: u32) -> String {
    let mut c = cluster.config.clone();
    c.shards[0].weight = weight;
    yaml_serde::to_string(&c).unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A ConfigMap volume as the kubelet writes it: `config.yaml -> ..data/config.yaml`,
/// `..data -> ..<timestamp>`, and an update swaps `..data` atomically.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    version: u32,
}

impl ConfigMapDir {
    fn new(text: &str) -> Self {
        let mut this = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        this.update(text);
        std::os::unix::fs::symlink("..data/config.yaml", this.dir.path().join("config.yaml"))
            .unwrap();
        this
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn update(&mut self, text: &str) {
        let root = self.dir.path();
        self.version += 1;
        let name = format!("..2026_11_22_{:04}", self.version);
        std::fs::create_dir(root.join(&name)).unwrap();
        std::fs::write(root.join(&name).join("config.yaml"), text).unwrap();
        let tmp = root.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        let old = std::fs::read_link(root.join("..data")).ok();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_in_place_and_rename_over_are_seen_within_two_seconds() {
    let cluster = TestCluster::builder().shards(2).config_file().start().await;
    let path = cluster.config_path().unwrap();
    let mut in_place = Vec::new();
    let mut renamed = Vec::new();
    for i in 0..20u32 {
        let before = generation(&cluster).await;
        let started = Instant::now();
        // Truncate and rewrite the same inode, as an editor saving in place does.
        std::fs::write(&path, text_with_weight(&cluster, 2 + 2 * i)).unwrap();
        in_place.push(next_generation(&cluster, before, started).await);

        let before = generation(&cluster).await;
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text_with_weight(&cluster, 3 + 2 * i)).unwrap();
        let started = Instant::now();
        std::fs::rename(&tmp, &path).unwrap();
        renamed.push(next_generation(&cluster, before, started).await);
    }
    let (a, b) = (median(in_place.clone()), median(renamed.clone()));
    eprintln!(
        "file change to new generation, median of 20: edit in place {a:?}, rename over {b:?}"
    );
    assert!(
        in_place
            .iter()
            .chain(&renamed)
            .all(|d| *d < Duration::from_secs(2)),
        "{in_place:?} {renamed:?}"
    );
    let ring = cluster.ring_status().await;
    assert_eq!(ring.generation, 41);
    assert_eq!(ring.shards[0].weight, 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_seen_within_two_seconds() {
    let mut shards = Vec::new();
    for i in 0..2 {
        shards.push(RedisShard::start(&format!("s{i}")).await);
    }
    let mut config = Config {
        shards: shards.iter().map(shard_cfg).collect(),
        ..Config::default()
    };
    let mut volume = ConfigMapDir::new(&yaml_serde::to_string(&config).unwrap());
    let mut cluster = TestCluster::builder()
        .with_config(config.clone())
        .config_at(volume.path())
        .start()
        .await;
    let endpoint = cluster.endpoint();
    let status = || {
        let endpoint = endpoint.clone();
        async move {
            mediacache::client::Client::connect(endpoint)
                .await
                .ok()?
                .ring_status()
                .await
                .ok()
        }
    };
    let mut took = Vec::new();
    for i in 0..20u32 {
        config.shards[1].weight = 2 + i;
        let text = yaml_serde::to_string(&config).unwrap();
        let started = Instant::now();
        volume.update(&text);
        let want = digest(&text);
        eventually("the swapped config", Duration::from_secs(5), || async {
            let ring = status().await?;
            (ring.config_digest == want).then_some(())
        })
        .await;
        took.push(started.elapsed());
    }
    eprintln!(
        "ConfigMap ..data swap to new generation, median of 20: {:?}",
        median(took.clone())
    );
    assert!(took.iter().all(|d| *d < Duration::from_secs(2)), "{took:?}");
    let ring = status().await.unwrap();
    assert_eq!(ring.generation, 21);
    assert_eq!(ring.shards[1].weight, 21);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_keep_the_running_ring_and_the_next_good_one_applies() {
    let mut cluster = TestCluster::builder().shards(2).config_file().start().await;
    let path = cluster.config_path().unwrap();
    let good = cluster.ring_status().await;
    let dup = format!(
        "shards:\n  - {{ name: a, url: \"{0}\" }}\n  - {{ name: a, url: \"{0}\" }}\n",
        cluster.shards[0].url()
    );
    let cases = [
        (
            "unparseable",
            "shards: [ {name: a, url: \n".to_owned(),
            "line",
        ),
        ("duplicate names", dup, "shards[1].name"),
        (
            "bad url",
            "shards:\n  - { name: a, url: \"http://127.0.0.1:1\" }\n".to_owned(),
            "shards[0].url",
        ),
        ("unknown key", "shardz: []\n".to_owned(), "shardz"),
    ];
    for (i, (what, text, names)) in cases.into_iter().enumerate() {
        std::fs::write(&path, text).unwrap();
        let ring = eventually("the rejection", Duration::from_secs(5), || async {
            let ring = cluster.ring_status().await;
            (ring.reloads_failed == i as u64 + 1).then_some(ring)
        })
        .await;
        assert!(
            ring.last_reload_error.contains(names),
            "{what}: {}",
            ring.last_reload_error
        );
        assert_eq!(ring.generation, good.generation, "{what}");
        assert_eq!(ring.config_digest, good.config_digest, "{what}");
        assert_eq!(ring.shards.len(), 2, "{what}");
    }
    // The shards still serve.
    let mut client = cluster.client().await;
    assert!(
        client
            .put_bytes(media_key("o", "m", ""), Default::default(), body(10, 1))
            .await
            .unwrap()
            .stored
    );
    // The next good config applies and clears the error.
    let mut next = cluster.config.clone();
    next.shards[1].weight = 5;
    let generation = cluster.apply(next).await;
    assert_eq!(generation, good.generation + 1);
    let ring = cluster.ring_status().await;
    assert!(ring.last_reload_error.is_empty());
    assert_eq!(ring.reloads_applied, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_shard_misses_only_the_keys_that_move() {
    let mut cluster = TestCluster::builder().shards(3).config_file().start().await;
    let spare = RedisShard::start("shard-3").await;
    let mut client = cluster.client().await;
    let ids: Vec<String> = (0..400).map(|i| format!("k{i}")).collect();
    for id in &ids {
        assert!(
            client
                .put_bytes(
                    media_key("example.org", id, ""),
                    Default::default(),
                    body(200, 1)
                )
                .await
                .unwrap()
                .stored
        );
    }
    let mut next = cluster.config.clone();
    next.shards.push(shard_cfg(&spare));
    cluster.apply(next.clone()).await;

    let placement = Placement::new(next.shards.iter().map(|s| (s.name.as_str(), s.weight)));
    let mut hits = 0;
    let mut moved = 0;
    for id in &ids {
        let new_owner = placement.owner(&format!("example.org/{id}")).unwrap();
        let hit = client
            .get(media_key("example.org", id, ""), 0, 0)
            .await
            .unwrap()
            .is_some();
        if new_owner == 3 {
            moved += 1;
            assert!(!hit, "{id} moved to the new shard: a miss");
        } else {
            assert!(hit, "{id} did not move: still a hit");
            hits += 1;
        }
    }
    eprintln!(
        "after adding a 4th shard: hit ratio {:.3} ({hits} of {}), {moved} keys moved",
        hits as f64 / ids.len() as f64,
        ids.len()
    );
    assert!(
        (60..=140).contains(&moved),
        "about a quarter moves: {moved}"
    );
    // Refilled on the new owner, everything hits again.
    for id in &ids {
        if client
            .get(media_key("example.org", id, ""), 0, 0)
            .await
            .unwrap()
            .is_none()
        {
            assert!(
                client
                    .put_bytes(
                        media_key("example.org", id, ""),
                        Default::default(),
                        body(200, 1)
                    )
                    .await
                    .unwrap()
                    .stored
            );
        }
    }
    assert_eq!(spare.objects().await.len(), moved);
    for id in &ids {
        assert!(client
            .get(media_key("example.org", id, ""), 0, 0)
            .await
            .unwrap()
            .is_some());
    }

    // Re-weighting moves only keys HRW says move; re-addressing moves none.
    let mut reweighted = next.clone();
    reweighted.shards[0].weight = 3;
    let before = Placement::new(next.shards.iter().map(|s| (s.name.as_str(), s.weight)));
    let after = Placement::new(
        reweighted
            .shards
            .iter()
            .map(|s| (s.name.as_str(), s.weight)),
    );
    cluster.apply(reweighted.clone()).await;
    let mut moved_back = 0;
    for id in &ids {
        let k = format!("example.org/{id}");
        let hit = client
            .get(media_key("example.org", id, ""), 0, 0)
            .await
            .unwrap()
            .is_some();
        if before.owner(&k) == after.owner(&k) {
            assert!(hit, "{id} did not move: still a hit");
        } else {
            // A key that moves back to a shard it lived on before finds its old copy there.
            assert_eq!(
                after.owner(&k),
                Some(0),
                "re-weighting shard 0 up only moves keys to it"
            );
            moved_back += usize::from(hit);
        }
    }
    eprintln!("re-weighting shard 0 to 3: {moved_back} moved keys found an earlier copy");
    let mut readdressed = reweighted.clone();
    readdressed.shards[1].url = format!("{}/0", readdressed.shards[1].url);
    cluster.apply(readdressed).await;
    for id in &ids {
        let k = format!("example.org/{id}");
        if after.owner(&k) == Some(1) {
            assert!(
                client
                    .get(media_key("example.org", id, ""), 0, 0)
                    .await
                    .unwrap()
                    .is_some(),
                "{id}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_from_a_removed_shard_completes() {
    let mut cluster = TestCluster::builder()
        .shards(2)
        .config_file()
        .configure(|c| c.chunk_bytes = 64 * 1024)
        .start()
        .await;
    let mut client = cluster.client().await;
    let id = (0..)
        .map(|i| format!("long{i}"))
        .find(|id| cluster.owner("example.org", id) == 1)
        .unwrap();
    let key = media_key("example.org", &id, "");
    let data = body(24 * 1024 * 1024, 5);
    assert!(
        client
            .put_bytes(key.clone(), Default::default(), data.clone())
            .await
            .unwrap()
            .stored
    );
    let mut download = client.get(key.clone(), 0, 0).await.unwrap().unwrap();
    let mut hasher = Sha256::new();
    let mut n = 0;
    let first = download.next_chunk().await.unwrap().unwrap();
    hasher.update(&first);
    n += first.len();

    let mut next = cluster.config.clone();
    next.shards.remove(1);
    cluster.apply(next).await;
    assert_eq!(cluster.ring_status().await.shards.len(), 1);
    while let Some(chunk) = download.next_chunk().await.unwrap() {
        hasher.update(&chunk);
        n += chunk.len();
        // A slow reader.
        if n % (4 * 1024 * 1024) < chunk.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(n, data.len());
    assert_eq!(hasher.finalize()[..], Sha256::digest(&data)[..]);
    // The removed shard is no longer used for new requests.
    assert!(client.get(key, 0, 0).await.unwrap().is_none());
}

/// Ids of the service's connections to a shard (the inspecting connection excluded).
async fn connection_ids(shard: &RedisShard) -> Vec<u64> {
    let c = shard.client().await;
    let list: String = c
        .custom(
            CustomCommand::new_static("CLIENT", None, false),
            vec!["LIST"],
        )
        .await
        .unwrap();
    let me: u64 = c
        .custom(CustomCommand::new_static("CLIENT", None, false), vec!["ID"])
        .await
        .unwrap();
    let _ = c.quit().await;
    let mut ids: Vec<u64> = list
        .lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|id| *id != me)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_shards_keep_their_connections_and_unchanged_content_does_nothing() {
    let mut cluster = TestCluster::builder().shards(2).config_file().start().await;
    // Every connection of each pool (pool_size 4) and the event subscriber (1) is open.
    let before: Vec<Vec<u64>> =
        eventually("all pools connected", Duration::from_secs(5), || async {
            let ids =
                futures_util::future::join_all(cluster.shards.iter().map(connection_ids)).await;
            ids.iter().all(|ids| ids.len() == 5).then_some(ids)
        })
        .await;
    let start = generation(&cluster).await;

    // The same content written again: no new generation. Then a real change: exactly one more.
    let path = cluster.config_path().unwrap();
    let same = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &same).unwrap();
    let extra = RedisShard::start("extra").await;
    let mut next = cluster.config.clone();
    next.shards.push(shard_cfg(&extra));
    next.shards[1].weight = 4;
    let generation_now = cluster.apply(next).await;
    assert_eq!(
        generation_now,
        start + 1,
        "rewriting the same content published nothing"
    );

    let after: Vec<Vec<u64>> =
        futures_util::future::join_all(cluster.shards.iter().map(connection_ids)).await;
    assert_eq!(
        before, after,
        "added shard and re-weighting kept every existing connection"
    );

    // Changing a shard's address (or the redis settings) does reconnect it.
    let mut readdressed = cluster.config.clone();
    readdressed.shards[0].url = format!("{}/0", readdressed.shards[0].url);
    cluster.apply(readdressed).await;
    let ids0 = eventually(
        "old connections of shard 0 closed",
        Duration::from_secs(5),
        || async {
            let ids = connection_ids(&cluster.shards[0]).await;
            (ids.len() == 5).then_some(ids)
        },
    )
    .await;
    assert!(
        ids0.iter().all(|id| !before[0].contains(id)),
        "{ids0:?} vs {:?}",
        before[0]
    );
    assert_eq!(connection_ids(&cluster.shards[1]).await, before[1]);
}

/// Content of a load-test object, derived from its id so any reader can check it.
fn load_object(id: usize) -> bytes::Bytes {
    let size = match id % 8 {
        0 => 3 * 1024 * 1024 + id,
        1 => 700 * 1024 + id,
        _ => 1000 + 37 * id,
    };
    body(size, id as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_ring_changes_under_load_fail_no_request() {
    let mut cluster = TestCluster::builder()
        .shards(3)
        .config_file()
        .configure(|c| {
            c.chunk_bytes = 64 * 1024;
            c.reload.debounce = Duration::from_millis(50);
        })
        .start()
        .await;
    let spare = RedisShard::start("shard-3").await;
    let base = cluster.config.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let mut client = cluster.client().await;
        let (stop, failures, hits, misses) =
            (stop.clone(), failures.clone(), hits.clone(), misses.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w as u64);
            let ids: Vec<usize> = (0..12).map(|i| w * 100 + i).collect();
            while !stop.load(Ordering::Relaxed) {
                let id = ids[rng.usize(..ids.len())];
                let key = media_key("load.example", &format!("obj{id}"), "");
                match client.get_bytes(key.clone()).await {
                    Ok(Some((info, got))) => {
                        let want = load_object(id);
                        assert_eq!(got.len(), want.len(), "object {id}");
                        assert_eq!(
                            Sha256::digest(&got)[..],
                            Sha256::digest(&want)[..],
                            "object {id}"
                        );
                        assert_eq!(info.sha256[..], Sha256::digest(&want)[..]);
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        misses.fetch_add(1, Ordering::Relaxed);
                        match client
                            .put_bytes(key, Default::default(), load_object(id))
                            .await
                        {
                            Ok(r) if r.stored => {}
                            Ok(r) => {
                                eprintln!("put of {id} not stored: {r:?}");
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("put of {id} failed: {e}");
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("get of {id} failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // Add, remove, re-weight, re-address, and back again, over and over.
    type Step<'a> = Box<dyn Fn(&mut Config) + 'a>;
    let steps: Vec<Step> = vec![
        Box::new(|c| c.shards.push(shard_cfg(&spare))),
        Box::new(|c| c.shards[0].weight = 3),
        Box::new(|c| {
            c.shards.remove(1);
        }),
        Box::new(|c| {
            let last = c.shards.len() - 1;
            c.shards[last].url = format!("{}/0", c.shards[last].url);
        }),
        Box::new(|c| c.failover = mediacache::config::Failover::Next),
    ];
    let started = Instant::now();
    let mut changes = 0;
    let mut config = base.clone();
    for round in 0..9 {
        for step in &steps {
            step(&mut config);
            cluster.apply(config.clone()).await;
            changes += 1;
        }
        config = base.clone();
        if round % 2 == 1 {
            config.shards[2].weight = 2;
        }
        cluster.apply(config.clone()).await;
        changes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("a worker saw wrong bytes");
    }
    let (f, h, m) = (
        failures.load(Ordering::Relaxed),
        hits.load(Ordering::Relaxed),
        misses.load(Ordering::Relaxed),
    );
    eprintln!(
        "load test: {changes} ring changes in {:?}; {h} hits, {m} misses, {f} failed requests",
        started.elapsed()
    );
    assert!(changes >= 50);
    assert_eq!(f, 0, "failed requests");
    assert!(
        h > 50 && m > 0,
        "the load did real work: {h} hits, {m} misses"
    );
    assert_eq!(cluster.ring_status().await.generation, 1 + changes as u64);
}

#[test]
fn sighup_reloads_when_watching_is_off() {
    use std::process::{Command, Stdio};
    let shard = RedisShard::start_blocking("a");
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("config.yaml");
    let port = common::free_port();
    let write = |weight: u32| {
        std::fs::write(
            path,
            format!(
                "listen: 127.0.0.1:{port}\nreload: {{ watch: false, interval: 0s }}\nshards:\n  - {{ name: a, url: \"{}\", weight: {weight} }}\n",
                shard.url()
            ),
        )
        .unwrap();
    };
    write(1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mediacache"))
        .args(["serve", "--config"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = format!("http://127.0.0.1:{port}");
    let status = || async {
        mediacache::client::Client::connect(addr.clone())
            .await
            .ok()?
            .ring_status()
            .await
            .ok()
    };
    rt.block_on(async {
        eventually("serving", Duration::from_secs(10), status).await;
        write(7);
        let pid = child.id().to_string();
        Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        let ring = eventually(
            "generation 2 after SIGHUP",
            Duration::from_secs(5),
            || async {
                let ring = status().await?;
                (ring.generation == 2).then_some(ring)
            },
        )
        .await;
        assert_eq!(ring.shards[0].weight, 7);
    });
    let _ = child.kill();
    let _ = child.wait();
}
