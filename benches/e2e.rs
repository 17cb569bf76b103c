//! The service next to raw Redis and twemproxy, measured side by side in one run.
//!
//! `cargo bench --bench e2e` or `cargo bench --bench e2e -- --quick`; `--json PATH` moves the
//! JSON report from `target/bench/e2e.json`, and `--agree A.json B.json...` compares reports.
//! Each cell runs in rounds, every path once per round in turn, and a ratio is the median of its
//! rounds'. The rounds come in passes over all cells, and a cell whose medians are not yet known
//! to ±5 % (95 % interval) runs more of them, up to four times its least: this is what makes
//! runs in a row agree on a noisy machine, and why a run's length varies.
//!
//! Starts its own `redis-server` shards, two service processes from the release binary (one with
//! the memory tier off, one serving from it) and, when `nutcracker` is installed, a twemproxy in
//! front of the same shards. Then, for each object size and client concurrency, it drives every
//! path for a fixed time and prints one table: throughput, p50/p99 time to last byte, and ratios
//! to `redis-direct` from the same run. `grpc-floor` is a bodiless gRPC health check to the
//! memory-tier service, counted as one object: an approximate ceiling of a small-object Get. It
//! also measures the service's peak RSS under large and
//! slow downloads, and the CPU each process spends at 16 clients, per object for the 8 and 64 KiB
//! cells and per GiB for the larger ones (kernel user+system time, the counters `getrusage`
//! reports, read from `/proc/<pid>/stat` for the child processes).
//!
//! BENCHMARKS.md explains each path and holds the last run.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{body, free_port, RedisShard};
use fred::prelude::{Builder, ClientLike, Config as FredConfig, KeysInterface, Pool, Value};
use mediacache::client::{media_key, Client};
use mediacache::proto::{MediaInfo, MediaKey};
use serde::Serialize;
use support::{rss_bytes, sample_rss, Service};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The bench's own clients (fred for the baselines, tonic for the service paths) run on
/// mimalloc, with its defaults. On glibc's `malloc` what they cost depended on what the process
/// had freed before: until it freed a large block, as a whole run does while it loads 16 MiB
/// values, glibc kept giving the top of its heap back and faulting it in again, and a cell run
/// alone measured against a slower direct `GET` than the same cell in a whole run
/// (BENCHMARKS.md, "The bench's own allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const SHARDS: usize = 4;
/// Connections each path opens (fred pool per shard, twemproxy pool, gRPC channels).
const MAX_CONNECTIONS: usize = 8;
/// The most clients any cell runs at once.
const MAX_CONCURRENCY: usize = 64;
const ORIGIN: &str = "bench.example";
/// How many times its least rounds a cell may run before its ratios settle.
const MORE_ROUNDS: usize = 4;
/// Passes over all cells that share a cell's least rounds.
const PASSES: usize = 3;
/// The 95 % interval of a ratio's median, relative to it, that a cell runs rounds until.
const SETTLED_WITHIN: f64 = 0.05;

struct Opts {
    quick: bool,
    json: PathBuf,
    /// Measured time per path and cell at least, split over `rounds`; each visit of a cell in a
    /// pass warms up for a fifth of it over the passes.
    cell: Duration,
    /// Rounds per cell at least: each runs every path once, in turn, so that a slow moment of
    /// the machine falls on every path alike; a ratio is the median of its rounds'. A cell runs
    /// more rounds, up to [`MORE_ROUNDS`] times as many, until [`settled`] says its ratios are.
    rounds: usize,
    concurrency: Vec<usize>,
    /// Object size and how many distinct objects of it each path reads.
    sizes: Vec<(usize, usize)>,
    /// Paths to measure besides their baselines; empty: all.
    only: Vec<String>,
    rss: bool,
}

const USAGE: &str = "usage: e2e [--quick] [--json PATH] [--size 8K|64K|1M|16M] [--conc N] \
[--path NAME]... [--seconds S] [--rounds N] [--no-rss]\n       e2e --agree RUN.json RUN.json...";

fn parse_size(s: &str) -> Option<usize> {
    let (n, unit) = match s.strip_suffix(['K', 'M']) {
        Some(n) => (n, if s.ends_with('K') { KIB } else { MIB }),
        None => (s, 1),
    };
    n.parse::<usize>().ok().map(|n| n * unit)
}

fn opts() -> Opts {
    let mut quick = false;
    let mut json = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/bench/e2e.json"
    ));
    let (mut size, mut conc, mut seconds, mut rounds) = (None, None, None, None);
    let mut only = Vec::new();
    let mut rss = true;
    let mut args = std::env::args().skip(1);
    let bad = |what: &str| -> ! {
        eprintln!("{what}\n{USAGE}");
        std::process::exit(2)
    };
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| bad(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--quick" => quick = true,
            "--json" => json = PathBuf::from(value()),
            "--size" => {
                size =
                    Some(parse_size(&value()).unwrap_or_else(|| bad("--size: 8K, 64K, 1M or 16M")))
            }
            "--conc" => conc = Some(value().parse().unwrap_or_else(|_| bad("--conc: a number"))),
            "--seconds" => {
                seconds = Some(
                    value()
                        .parse::<f64>()
                        .unwrap_or_else(|_| bad("--seconds: a number")),
                )
            }
            "--rounds" => {
                rounds = Some(
                    value()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| bad("--rounds: a number above 0")),
                )
            }
            "--path" => {
                // Checked before any process starts: an exit later would leave them running.
                let name = value();
                if !PathKind::ALL.iter().any(|p| p.name() == name) {
                    let names: Vec<&str> = PathKind::ALL.iter().map(|p| p.name()).collect();
                    bad(&format!("--path: one of {}", names.join(", ")));
                }
                only.push(name)
            }
            "--no-rss" => rss = false,
            // Passed by `cargo bench` to every bench target.
            "--bench" => {}
            other => bad(&format!("unknown argument {other}")),
        }
    }
    let mut sizes = if quick {
        vec![(8 * KIB, 256), (64 * KIB, 64), (MIB, 16), (16 * MIB, 4)]
    } else {
        vec![(8 * KIB, 1024), (64 * KIB, 256), (MIB, 64), (16 * MIB, 16)]
    };
    if let Some(size) = size {
        sizes.retain(|&(s, _)| s == size);
        if sizes.is_empty() {
            bad("--size: 8K, 64K, 1M or 16M");
        }
    }
    let default_cell = if quick { 1.2 } else { 3.0 };
    Opts {
        quick,
        json,
        cell: Duration::from_secs_f64(seconds.unwrap_or(default_cell)),
        rounds: rounds.unwrap_or(if quick { 12 } else { 6 }),
        concurrency: conc.map_or_else(|| vec![1, 16, MAX_CONCURRENCY], |c| vec![c]),
        sizes,
        only,
        rss,
    }
}

/// User plus system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// twemproxy (`nutcracker`) in front of the shards, when it is installed.
struct Twemproxy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Twemproxy {
    fn start(shards: &[RedisShard]) -> Option<Self> {
        let binary = ["/usr/sbin/nutcracker", "/usr/bin/nutcracker"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut conf = format!(
            "bench:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  preconnect: true\n  auto_eject_hosts: false\n  servers:\n"
        );
        for s in shards {
            conf.push_str(&format!("    - 127.0.0.1:{}:1 {}\n", s.port, s.name));
        }
        let path = dir.path().join("nutcracker.yml");
        std::fs::write(&path, conf).expect("write nutcracker.yml");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .args(["-a", "127.0.0.1", "-s", &free_port().to_string()])
            .arg("-o")
            .arg(dir.path().join("nutcracker.log"))
            .spawn()
            .expect("start nutcracker");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nutcracker did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Twemproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain RESP2 connection for the twemproxy path: fred opens each connection with `CLIENT ID`
/// and `INFO`, which twemproxy answers by closing it. Only `GET` and `SET` are spoken.
struct Resp {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl Resp {
    async fn connect(port: u16) -> Self {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to twemproxy");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream: tokio::io::BufReader::with_capacity(256 * KIB, stream),
        }
    }

    async fn command(&mut self, parts: &[&[u8]]) {
        use tokio::io::AsyncWriteExt;
        let mut head = format!("*{}\r\n", parts.len()).into_bytes();
        for (i, part) in parts.iter().enumerate() {
            head.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
            if i + 1 < parts.len() {
                head.extend_from_slice(part);
                head.extend_from_slice(b"\r\n");
            }
        }
        let last = parts.last().expect("a command");
        let w = self.stream.get_mut();
        w.write_all(&head).await.expect("write");
        w.write_all(last).await.expect("write");
        w.write_all(b"\r\n").await.expect("write");
    }

    async fn line(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        self.stream.read_line(&mut line).await.expect("read");
        line.trim_end().to_string()
    }

    async fn get(&mut self, key: &str) -> Bytes {
        use tokio::io::AsyncReadExt;
        self.command(&[b"GET", key.as_bytes()]).await;
        let line = self.line().await;
        let len: usize = line
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("GET {key} answered {line:?}"));
        let mut value = bytes::BytesMut::zeroed(len + 2);
        self.stream.read_exact(&mut value).await.expect("read");
        value.truncate(len);
        value.freeze()
    }

    async fn set(&mut self, key: &str, value: &[u8]) {
        self.command(&[b"SET", key.as_bytes(), value]).await;
        let line = self.line().await;
        assert_eq!(line, "+OK", "SET {key}");
    }
}

async fn redis_pool(url: &str, size: usize) -> Pool {
    let pool = Builder::from_config(FredConfig::from_url(url).expect("redis url"))
        .build_pool(size)
        .expect("pool");
    pool.init().await.expect("connect to redis");
    pool
}

/// Everything the paths talk to. Fields drop in order: the services and twemproxy stop before
/// the shards they use.
struct Rig {
    direct: Vec<Pool>,
    /// One connection per client: the plain client does not pipeline.
    twemproxy: Option<(Twemproxy, Vec<tokio::sync::Mutex<Resp>>)>,
    service_redis: Service,
    service_memory: Service,
    redis_clients: Vec<Client>,
    memory_clients: Vec<Client>,
    /// gRPC health clients of the memory-tier service, for [`PathKind::GrpcFloor`].
    floor_clients: Vec<HealthClient<Channel>>,
    shards: Vec<RedisShard>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PathKind {
    RedisDirect,
    Twemproxy,
    ServiceRedis,
    ServiceMemory,
    GrpcFloor,
    RedisDirectSet,
    ServicePut,
}

impl PathKind {
    const ALL: [PathKind; 7] = [
        Self::RedisDirect,
        Self::Twemproxy,
        Self::ServiceRedis,
        Self::ServiceMemory,
        Self::GrpcFloor,
        Self::RedisDirectSet,
        Self::ServicePut,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::RedisDirect => "redis-direct",
            Self::Twemproxy => "twemproxy",
            Self::ServiceRedis => "service-redis",
            Self::ServiceMemory => "service-memory",
            Self::GrpcFloor => "grpc-floor",
            Self::RedisDirectSet => "redis-direct SET",
            Self::ServicePut => "service-put",
        }
    }

    /// Whether the path runs in cells of `size`: a bodiless round trip counted as an object
    /// bounds only the small ones, where the round trip and not the bytes takes the time.
    fn runs_at(self, size: usize) -> bool {
        self != Self::GrpcFloor || size < MIB
    }

    /// The path this one's ratios are taken against.
    fn baseline(self) -> Self {
        match self {
            Self::RedisDirectSet | Self::ServicePut => Self::RedisDirectSet,
            _ => Self::RedisDirect,
        }
    }
}

fn direct_key(size: usize, i: usize) -> String {
    format!("bench:{size}:{i}")
}

fn twemproxy_key(size: usize, i: usize) -> String {
    format!("twem:{size}:{i}")
}

fn service_key(size: usize, i: usize) -> MediaKey {
    media_key(ORIGIN, &format!("s{size}n{i}"), "")
}

/// Reads a whole object through the service; returns its length.
async fn service_get(client: &Client, key: MediaKey) -> usize {
    let mut client = client.clone();
    let mut download = client
        .get(key, 0, 0)
        .await
        .expect("Get")
        .expect("a hit for a loaded object");
    let mut n = 0;
    while let Some(chunk) = download.next_chunk().await.expect("chunk") {
        n += chunk.len();
    }
    n
}

impl Rig {
    async fn op(&self, path: PathKind, size: usize, objects: usize, client: usize, n: usize) {
        let i = (client * 7919 + n) % objects;
        let got = match path {
            PathKind::RedisDirect => {
                let v: Bytes = self.direct[i % SHARDS]
                    .get(direct_key(size, i))
                    .await
                    .expect("GET");
                v.len()
            }
            PathKind::Twemproxy => {
                let (_, conns) = self.twemproxy.as_ref().expect("twemproxy");
                let v = conns[client]
                    .lock()
                    .await
                    .get(&twemproxy_key(size, i))
                    .await;
                v.len()
            }
            PathKind::ServiceRedis => {
                let c = &self.redis_clients[client % self.redis_clients.len()];
                service_get(c, service_key(size, i)).await
            }
            PathKind::ServiceMemory => {
                let c = &self.memory_clients[client % self.memory_clients.len()];
                service_get(c, service_key(size, i)).await
            }
            PathKind::GrpcFloor => {
                // No body: counted as one object of the cell's size, the most a service could
                // deliver if a Get cost nothing but its round trip.
                let mut c = self.floor_clients[client % self.floor_clients.len()].clone();
                c.check(HealthCheckRequest::default()).await.expect("Check");
                size
            }
            PathKind::RedisDirectSet => {
                // One key per client, overwritten: a SET of a new value each time.
                let key = format!("put:{size}:{client}");
                let _: () = self.direct[client % SHARDS]
                    .set(key, Value::from(payload(size, i)), None, None, false)
                    .await
                    .expect("SET");
                size
            }
            PathKind::ServicePut => {
                let mut c = self.redis_clients[client % self.redis_clients.len()].clone();
                let key = media_key(ORIGIN, &format!("p{size}c{client}"), "");
                let answer = c
                    .put_bytes(key, MediaInfo::default(), payload(size, i))
                    .await
                    .expect("Put");
                assert!(answer.stored, "Put not stored: {answer:?}");
                size
            }
        };
        assert_eq!(got, size, "{} returned a short object", path.name());
    }
}

/// The bodies, made once per size: the clients send and compare these.
fn payload(size: usize, i: usize) -> Bytes {
    static CACHE: std::sync::Mutex<BTreeMap<(usize, usize), Bytes>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut cache = CACHE.lock().unwrap();
    cache
        .entry((size, i))
        .or_insert_with(|| body(size, (size + i) as u64))
        .clone()
}

#[derive(Serialize, Clone)]
struct Row {
    path: PathKind,
    size: usize,
    concurrency: usize,
    ops: usize,
    seconds: f64,
    mib_per_s: f64,
    objects_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Throughput divided by the baseline path's in the same round, median over the rounds.
    ratio: f64,
    /// Half the range of the rounds' ratios, relative to their median (0.05: ±5%).
    ratio_spread: f64,
    /// Half the 95 % interval of the median ratio, relative to it (see [`median_error`]).
    ratio_error: f64,
    /// Whether that interval is within [`SETTLED_WITHIN`]; a cell that ran its most rounds
    /// may stop with a ratio that is not.
    settled: bool,
    /// Rounds the cell ran.
    rounds: usize,
    /// p99 divided by the baseline path's p99 in the same cell.
    p99_ratio: f64,
    /// CPU seconds per GiB moved, by process.
    cpu_per_gib: BTreeMap<&'static str, f64>,
}

/// The processes whose CPU time is recorded for each cell.
fn watched(rig: &Rig, path: PathKind) -> Vec<(&'static str, Vec<u32>)> {
    let service = match path {
        PathKind::ServiceMemory | PathKind::GrpcFloor => rig.service_memory.pid(),
        _ => rig.service_redis.pid(),
    };
    let mut w = vec![
        ("service", vec![service]),
        (
            "redis",
            rig.shards.iter().filter_map(RedisShard::pid).collect(),
        ),
        ("bench clients", vec![std::process::id()]),
    ];
    if let Some((t, _)) = &rig.twemproxy {
        w.push(("twemproxy", vec![t.child.id()]));
    }
    w
}

fn cpu_now(watched: &[(&'static str, Vec<u32>)]) -> Vec<f64> {
    watched
        .iter()
        .map(|(_, pids)| pids.iter().map(|&p| cpu_seconds(p)).sum())
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx].as_secs_f64() * 1e3
}

/// Runs `conc` clients doing `op` back to back for `warm`, then for `time`, measured. Returns
/// the measured latencies and how long each span lasted (every client finishes at least one
/// request, so a span can outlast its time).
async fn measure<F, Fut>(
    conc: usize,
    warm: Duration,
    time: Duration,
    op: F,
) -> (Vec<Duration>, f64, f64)
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let op = Arc::new(op);
    let mut latencies = Vec::new();
    let (mut warmed, mut elapsed) = (0.0, 0.0);
    for (span, keep) in [(warm, false), (time, true)] {
        if span.is_zero() && !keep {
            continue;
        }
        let start = Instant::now();
        let deadline = start + span;
        let tasks: Vec<_> = (0..conc)
            .map(|c| {
                let op = op.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut n = 0;
                    while Instant::now() < deadline || n == 0 {
                        let t = Instant::now();
                        op(c, n).await;
                        lat.push(t.elapsed());
                        n += 1;
                    }
                    lat
                })
            })
            .collect();
        for t in tasks {
            let lat = t.await.expect("client task");
            if keep {
                latencies.extend(lat);
            }
        }
        if keep {
            elapsed = start.elapsed().as_secs_f64();
        } else {
            warmed = start.elapsed().as_secs_f64();
        }
    }
    latencies.sort();
    (latencies, warmed, elapsed)
}

/// One path of one cell for `time`, after `warm`.
async fn run_cell(
    rig: &Arc<Rig>,
    path: PathKind,
    (size, objects, conc): (usize, usize, usize),
    warm: Duration,
    time: Duration,
) -> Row {
    let watched = watched(rig, path);
    let before = cpu_now(&watched);
    let r = rig.clone();
    let (lat, warmed, seconds) = measure(conc, warm, time, move |c, n| {
        let r = r.clone();
        async move { r.op(path, size, objects, c, n).await }
    })
    .await;
    // The warm-up's CPU is in the counters too: scale it out by its share of the time.
    let after = cpu_now(&watched);
    let ops = lat.len();
    let bytes = (ops * size) as f64;
    let gib = bytes / (1u64 << 30) as f64;
    let total = seconds + warmed;
    let cpu_per_gib = watched
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((name, _), (b, a))| (*name, (a - b) * (seconds / total) / gib))
        .collect();
    Row {
        path,
        size,
        concurrency: conc,
        ops,
        seconds,
        mib_per_s: bytes / MIB as f64 / seconds,
        objects_per_s: ops as f64 / seconds,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        ratio: f64::NAN,
        ratio_spread: f64::NAN,
        ratio_error: f64::NAN,
        settled: false,
        rounds: 1,
        p99_ratio: f64::NAN,
        cpu_per_gib,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Half the 95 % interval of the median of `v`, relative to the median. The interval runs from
/// the k-th smallest to the k-th largest value, with k the largest for which the chance that
/// fewer than k of n values fall below the true median is at most 2.5 % (binomial, p = ½). It
/// assumes no shape of the rounds' ratios: rounds in two groups give a wide interval, and a few
/// rounds a full one. Below 6 rounds there is no such k, and the interval is infinite.
fn median_error(v: &[f64]) -> f64 {
    let n = v.len();
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    // `below` is P(B <= j) for B ~ Binomial(n, 1/2), built from its terms.
    let (mut k, mut below, mut term) = (0, 0.0, 0.5f64.powi(n as i32));
    for j in 0..n {
        below += term;
        if below > 0.025 {
            break;
        }
        k = j + 1;
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return f64::INFINITY;
    }
    (sorted[n - k] - sorted[k - 1]) / 2.0 / median(sorted)
}

fn row_of(round: &[Row], path: PathKind) -> Option<&Row> {
    round.iter().find(|r| r.path == path)
}

/// Each round's throughput of `path` over its baseline's in the same round.
fn ratios(rounds: &[Vec<Row>], path: PathKind) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|r| Some(row_of(r, path)?.mib_per_s / row_of(r, path.baseline())?.mib_per_s))
        .collect()
}

/// Whether every ratio of the cell is known to [`SETTLED_WITHIN`].
fn settled(paths: &[PathKind], rounds: &[Vec<Row>]) -> bool {
    combine(paths, rounds).iter().all(|r| r.settled)
}

/// One row per path from its rounds: throughput over all of them, p50 and p99 the rounds'
/// medians, and the ratio to the baseline the median of the rounds' ratios, with their spread.
fn combine(paths: &[PathKind], rounds: &[Vec<Row>]) -> Vec<Row> {
    paths
        .iter()
        .map(|&path| {
            let rows: Vec<Row> = rounds
                .iter()
                .filter_map(|r| row_of(r, path).cloned())
                .collect();
            let ratios = ratios(rounds, path);
            let ratio_error = median_error(&ratios);
            let p99_ratios: Vec<f64> = rounds
                .iter()
                .filter_map(|r| Some(row_of(r, path)?.p99_ms / row_of(r, path.baseline())?.p99_ms))
                .collect();
            let first = rows[0].clone();
            let ops: usize = rows.iter().map(|r| r.ops).sum();
            let seconds: f64 = rows.iter().map(|r| r.seconds).sum();
            let bytes = (ops * first.size) as f64;
            let gib_of = |r: &Row| (r.ops * r.size) as f64 / (1u64 << 30) as f64;
            let gib: f64 = rows.iter().map(gib_of).sum();
            let cpu_per_gib = first
                .cpu_per_gib
                .keys()
                .map(|&k| {
                    let cpu: f64 = rows.iter().map(|r| r.cpu_per_gib[k] * gib_of(r)).sum();
                    (k, cpu / gib)
                })
                .collect();
            let ratio = median(ratios.clone());
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            Row {
                ops,
                seconds,
                mib_per_s: bytes / MIB as f64 / seconds,
                objects_per_s: ops as f64 / seconds,
                p50_ms: median(rows.iter().map(|r| r.p50_ms).collect()),
                p99_ms: median(rows.iter().map(|r| r.p99_ms).collect()),
                ratio,
                ratio_spread: (hi - lo) / 2.0 / ratio,
                ratio_error,
                settled: path.baseline() == path || ratio_error <= SETTLED_WITHIN,
                rounds: rounds.len(),
                p99_ratio: median(p99_ratios),
                cpu_per_gib,
                ..first
            }
        })
        .collect()
}

async fn load(rig: &Rig, size: usize, objects: usize) {
    let mut service = rig.redis_clients[0].clone();
    for i in 0..objects {
        let value = payload(size, i);
        let _: () = rig.direct[i % SHARDS]
            .set(
                direct_key(size, i),
                Value::from(value.clone()),
                None,
                None,
                false,
            )
            .await
            .expect("SET");
        if let Some((_, conns)) = &rig.twemproxy {
            conns[0]
                .lock()
                .await
                .set(&twemproxy_key(size, i), &value)
                .await;
        }
        let answer = service
            .put_bytes(service_key(size, i), MediaInfo::default(), value)
            .await
            .expect("Put");
        assert!(answer.stored, "Put not stored: {answer:?}");
    }
    // Every path serves the same bytes.
    let check = payload(size, 0);
    let direct: Bytes = rig.direct[0].get(direct_key(size, 0)).await.unwrap();
    assert_eq!(direct, check, "redis-direct");
    if let Some((_, pool)) = &rig.twemproxy {
        let via = pool[0].lock().await.get(&twemproxy_key(size, 0)).await;
        assert_eq!(via, check, "twemproxy");
    }
    for clients in [&rig.redis_clients, &rig.memory_clients] {
        let (_, got) = clients[0]
            .clone()
            .get_bytes(service_key(size, 0))
            .await
            .expect("Get")
            .expect("hit");
        assert_eq!(got, check, "service");
    }
    // Fill the memory tier: the admission policy wants a few downloads first.
    let memory_entries = || async {
        let stats = rig.memory_clients[0].clone().stats().await;
        stats.expect("Stats").memory_entries
    };
    let before = memory_entries().await;
    for _ in 0..3 {
        for i in 0..objects {
            service_get(&rig.memory_clients[0], service_key(size, i)).await;
        }
    }
    let after = memory_entries().await;
    assert_eq!(
        after - before,
        objects as u64,
        "every {size}-byte object should be in the memory tier"
    );
}

#[derive(Serialize)]
struct RssPhase {
    phase: String,
    peak_rss_mib: f64,
    streamed_mib: f64,
}

/// `clients` readers of `size`-byte objects for `time`, each at most `rate` bytes/s when given.
async fn rss_phase(
    rig: &Arc<Rig>,
    phase: &str,
    size: usize,
    objects: usize,
    clients: usize,
    time: Duration,
    rate: Option<f64>,
) -> RssPhase {
    let pid = rig.service_redis.pid();
    let (stop, sampler) = sample_rss(pid);
    let streamed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + time;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let rig = rig.clone();
            let streamed = streamed.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    let mut client = rig.redis_clients[c % rig.redis_clients.len()].clone();
                    let key = service_key(size, (c + n) % objects);
                    let mut download = client.get(key, 0, 0).await.expect("Get").expect("hit");
                    let started = Instant::now();
                    let mut got = 0u64;
                    // Dropping the download part-way is a client that went away.
                    while Instant::now() < deadline {
                        let Some(chunk) = download.next_chunk().await.expect("chunk") else {
                            break;
                        };
                        got += chunk.len() as u64;
                        streamed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        if let Some(rate) = rate {
                            let due = started + Duration::from_secs_f64(got as f64 / rate);
                            tokio::time::sleep_until(due.into()).await;
                        }
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("reader");
    }
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    RssPhase {
        phase: phase.to_owned(),
        peak_rss_mib: peak as f64 / MIB as f64,
        streamed_mib: streamed.load(Ordering::Relaxed) as f64 / MIB as f64,
    }
}

#[derive(Serialize)]
struct Report {
    quick: bool,
    commit: String,
    machine: String,
    shards: usize,
    twemproxy: bool,
    rows: Vec<Row>,
    rss: Vec<RssPhase>,
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} cores, {cpu}, Linux {}",
        command_line("uname", &["-r"])
    )
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:>7} {:>4}  {:<17} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8}",
        "size",
        "conc",
        "path",
        "MiB/s",
        "obj/s",
        "p50 ms",
        "p99 ms",
        "× base",
        "±",
        "rounds",
        "p99 ×"
    );
    let mut last = (0, 0);
    for r in rows {
        if (r.size, r.concurrency) != last && last != (0, 0) {
            println!();
        }
        last = (r.size, r.concurrency);
        let size = if r.size >= MIB {
            format!("{}M", r.size / MIB)
        } else {
            format!("{}K", r.size / KIB)
        };
        println!(
            "{:>7} {:>4}  {:<17} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>5.0}% {:>6} {:>8.2}",
            size,
            r.concurrency,
            r.path.name(),
            r.mib_per_s,
            r.objects_per_s,
            r.p50_ms,
            r.p99_ms,
            r.ratio,
            r.ratio_error * 100.0,
            format!("{}{}", r.rounds, if r.settled { "" } else { "*" }),
            r.p99_ratio
        );
    }
    if rows.iter().any(|r| !r.settled) {
        println!(
            "* ran its most rounds with this ratio's interval still wider than ±{:.0}%",
            SETTLED_WITHIN * 100.0
        );
    }
}

/// A cell's rows as it finishes, so that a run stopped later keeps them.
fn print_cell(rows: &[Row]) {
    for row in rows {
        eprintln!(
            "{:>9} B × {:>2}  {:<17} {:>8.1} MiB/s  p99 {:.2} ms  × base {:.2} ±{:.0}% \
             ({} rounds{})",
            row.size,
            row.concurrency,
            row.path.name(),
            row.mib_per_s,
            row.p99_ms,
            row.ratio,
            row.ratio_error * 100.0,
            row.rounds,
            if row.settled { "" } else { ", not settled" }
        );
    }
}

fn print_cpu(rows: &[Row]) {
    let at16 = || rows.iter().filter(|r| r.concurrency == 16);
    let header = |title: &str| {
        println!("\n{title}");
        println!(
            "{:>7}  {:<17} {:>9} {:>9} {:>10} {:>14}",
            "size", "path", "service", "redis", "twemproxy", "bench clients"
        );
    };
    let line = |r: &Row, size: String, scale: f64| {
        let get = |k: &str| r.cpu_per_gib.get(k).copied().unwrap_or(f64::NAN) * scale;
        println!(
            "{:>7}  {:<17} {:>9.2} {:>9.2} {:>10.2} {:>14.2}",
            size,
            r.path.name(),
            get("service"),
            get("redis"),
            get("twemproxy"),
            get("bench clients")
        );
    };
    if at16().any(|r| r.size < MIB) {
        // Per object: what a small request costs each process, in microseconds.
        header("CPU microseconds per object, by process (concurrency 16)");
        for r in at16().filter(|r| r.size < MIB) {
            let scale = r.size as f64 / (1u64 << 30) as f64 * 1e6;
            line(r, format!("{}K", r.size / KIB), scale);
        }
    }
    if at16().any(|r| r.size >= MIB) {
        header("CPU seconds per GiB moved, by process (concurrency 16)");
        for r in at16().filter(|r| r.size >= MIB) {
            line(r, format!("{}M", r.size / MIB), 1.0);
        }
    }
}

fn main() {
    // `cargo bench` adds `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let Some(at) = args.iter().position(|a| a == "--agree") {
        agree(&args[at + 1..]);
        return;
    }
    let opts = opts();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if !runtime.block_on(run(opts)) {
        std::process::exit(2);
    }
}

/// Runs the bench; false when there was nothing to measure.
async fn run(opts: Opts) -> bool {
    let started = Instant::now();
    let shards: Vec<RedisShard> = (0..SHARDS)
        .map(|i| RedisShard::start_with_blocking(&format!("shard-{i}"), &["--maxmemory", "0"]))
        .collect();
    let mut direct = Vec::new();
    for s in &shards {
        direct.push(redis_pool(&s.url(), MAX_CONNECTIONS.div_ceil(SHARDS).max(2)).await);
    }
    let twemproxy = match Twemproxy::start(&shards) {
        Some(t) => {
            let mut conns = Vec::new();
            for _ in 0..MAX_CONCURRENCY {
                conns.push(tokio::sync::Mutex::new(Resp::connect(t.port).await));
            }
            Some((t, conns))
        }
        None => {
            eprintln!("nutcracker is not installed: the twemproxy path is left out");
            None
        }
    };
    let memory = |max: usize, object: usize| {
        format!("memory:\n  max_bytes: {max}\n  max_object_bytes: {object}\n")
    };
    let all: Vec<&RedisShard> = shards.iter().collect();
    let service_redis = Service::start(&all, &memory(0, 0)).await;
    let service_memory = Service::start(&all, &memory(2048 * MIB, 32 * MIB)).await;
    let redis_clients = service_redis.clients(MAX_CONNECTIONS).await;
    let memory_clients = service_memory.clients(MAX_CONNECTIONS).await;
    let floor_clients = service_memory.health_clients(MAX_CONNECTIONS).await;
    let rig = Arc::new(Rig {
        shards,
        direct,
        twemproxy,
        service_redis,
        service_memory,
        redis_clients,
        memory_clients,
        floor_clients,
    });

    // Every path in table order, twemproxy only when it is installed.
    let available: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|&p| p != PathKind::Twemproxy || rig.twemproxy.is_some())
        .collect();
    // `--path`: the paths asked for (every path when none is), with their baselines.
    let asked = |p: PathKind| opts.only.is_empty() || opts.only.iter().any(|o| o == p.name());
    let paths: Vec<PathKind> = available
        .iter()
        .copied()
        .filter(|&p| asked(p) || available.iter().any(|&q| asked(q) && q.baseline() == p))
        .collect();
    // The paths that run in cells of `size`.
    let paths_at = |size: usize| -> Vec<PathKind> {
        paths.iter().copied().filter(|p| p.runs_at(size)).collect()
    };
    // The cells where an asked-for path runs.
    let cells: Vec<(usize, usize, usize)> = opts
        .sizes
        .iter()
        .filter(|&&(size, _)| paths.iter().any(|&p| p.runs_at(size) && asked(p)))
        .flat_map(|&(size, objects)| opts.concurrency.iter().map(move |&c| (size, objects, c)))
        .collect();
    if cells.is_empty() {
        // Returning (not exiting) stops the processes this run started.
        eprintln!("--path: none of {:?} runs here at these sizes", opts.only);
        return false;
    }
    // For attaching a profiler to one cell.
    eprintln!(
        "service-redis pid {}, service-memory pid {}",
        rig.service_redis.pid(),
        rig.service_memory.pid()
    );

    // Every cell runs in several passes over all of them, so that a cell's rounds are spread
    // over the whole run and a slow minute of the machine falls on every cell a little.
    for &(size, objects) in &opts.sizes {
        if cells.iter().any(|c| c.0 == size) {
            load(&rig, size, objects).await;
        }
    }
    eprintln!("loaded after {:.0} s", started.elapsed().as_secs_f64());
    let mut rounds: Vec<Vec<Vec<Row>>> = vec![Vec::new(); cells.len()];
    let slice = opts.cell / opts.rounds as u32;
    let per_pass = opts.rounds.div_ceil(PASSES);
    let warm = opts.cell / 5 / PASSES as u32;
    let most = opts.rounds * MORE_ROUNDS;
    let enough = |paths: &[PathKind], done: &[Vec<Row>]| {
        done.len() >= most || (done.len() >= opts.rounds && settled(paths, done))
    };
    for pass in 0.. {
        let mut ran = 0;
        for (cell, done) in cells.iter().zip(rounds.iter_mut()) {
            let paths = &paths_at(cell.0);
            if enough(paths, done) {
                continue;
            }
            ran += 1;
            for k in 0..per_pass.min(most - done.len()) {
                let round = done.len();
                let warm = if k == 0 { warm } else { Duration::ZERO };
                // Each round starts at another path, so that none always runs first.
                let mut this = Vec::new();
                for j in 0..paths.len() {
                    let path = paths[(j + round) % paths.len()];
                    this.push(run_cell(&rig, path, *cell, warm, slice).await);
                }
                done.push(this);
            }
            if enough(paths, done) {
                print_cell(&combine(paths, done));
            }
        }
        if ran == 0 {
            break;
        }
        eprintln!("pass {}: {ran} of {} cells", pass + 1, cells.len());
    }
    let rows: Vec<Row> = rounds
        .iter()
        .zip(&cells)
        .flat_map(|(r, cell)| combine(&paths_at(cell.0), r))
        .collect();

    let rss = if opts.rss {
        rss_phases(&rig, &opts).await
    } else {
        Vec::new()
    };
    print_table(&rows);
    print_cpu(&rows);
    if !rss.is_empty() {
        println!("\nPeak RSS of the service (memory tier off)");
    }
    for p in &rss {
        println!(
            "  {:<44} {:>7.1} MiB   ({:.0} MiB streamed)",
            p.phase, p.peak_rss_mib, p.streamed_mib
        );
    }

    let report = Report {
        quick: opts.quick,
        commit: command_line("git", &["rev-parse", "--short", "HEAD"]),
        machine: machine(),
        shards: SHARDS,
        twemproxy: rig.twemproxy.is_some(),
        rows,
        rss,
    };
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir).expect("create the JSON report's directory");
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&report).unwrap())
        .expect("write the JSON report");
    println!(
        "\n{}; {} shards; {:.0} s in all; JSON: {}",
        report.machine,
        SHARDS,
        started.elapsed().as_secs_f64(),
        opts.json.display()
    );
    true
}

/// How far apart the ratios of several runs' JSON reports lie: for each ratio, each run's value
/// and the largest distance from their median, relative to it, and how many lie within ±10 %.
fn agree(files: &[String]) {
    let fail = |what: String| -> ! {
        eprintln!("--agree: {what}\n{USAGE}");
        std::process::exit(2)
    };
    if files.len() < 2 {
        fail("two reports or more".into());
    }
    let runs: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| fail(format!("{f}: {e}")));
            serde_json::from_str(&text)
                .unwrap_or_else(|e| fail(format!("{f} is not a report: {e}")))
        })
        .collect();
    let reports: Vec<&Vec<serde_json::Value>> = runs
        .iter()
        .zip(files)
        .map(|(run, f)| match run["rows"].as_array() {
            Some(rows) if !rows.is_empty() => rows,
            _ => fail(format!("{f} has no rows")),
        })
        .collect();
    let id = |r: &serde_json::Value| {
        (
            r["size"].as_u64().unwrap_or(0),
            r["concurrency"].as_u64().unwrap_or(0),
            r["path"].as_str().unwrap_or("?").to_owned(),
        )
    };
    // As the report names them (serde's spelling, not the table's).
    let baselines = [PathKind::RedisDirect, PathKind::RedisDirectSet]
        .map(|p| serde_json::to_value(p).expect("a path serializes"));
    let (mut within, mut all, mut missing) = (0, 0, 0);
    println!(
        "{:>9} {:>4}  {:<17} {:>26}  {:>6}",
        "bytes", "conc", "path", "ratio in each run", "apart"
    );
    for row in reports[0] {
        let (size, conc, path) = id(row);
        if baselines.iter().any(|b| b.as_str() == Some(path.as_str())) {
            continue;
        }
        let ratios: Vec<f64> = reports
            .iter()
            .filter_map(|rows| rows.iter().find(|r| id(r) == id(row)))
            .filter_map(|r| r["ratio"].as_f64())
            .collect();
        if ratios.len() < runs.len() {
            missing += 1;
            continue;
        }
        let m = median(ratios.clone());
        let apart = ratios.iter().map(|r| (r - m).abs() / m).fold(0.0, f64::max);
        all += 1;
        within += usize::from(apart <= 0.10);
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{size:>9} {conc:>4}  {path:<17} {:>26}  ±{:>4.0}%{}",
            each.join(" "),
            apart * 100.0,
            if apart > 0.10 { "  <" } else { "" }
        );
    }
    println!("\n{within} of {all} ratios within ±10 % of their median");
    if missing > 0 {
        println!("{missing} ratios of the first report are missing from another, left out");
    }
}

/// Peak RSS of the service (memory tier off) under big and slow downloads.
async fn rss_phases(rig: &Arc<Rig>, opts: &Opts) -> Vec<RssPhase> {
    let big = 64 * MIB;
    let big_objects = 4;
    let mut putter = rig.redis_clients[0].clone();
    for i in 0..big_objects {
        let answer = putter
            .put_bytes(
                service_key(big, i),
                MediaInfo::default(),
                body(big, i as u64),
            )
            .await
            .expect("Put 64 MiB");
        assert!(answer.stored);
    }
    let idle = rss_bytes(rig.service_redis.pid()) as f64 / MIB as f64;
    let phase = opts.cell * 4;
    let slow = if opts.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let (one_mib, one_mib_objects) = match opts.sizes.iter().find(|&&(s, _)| s == MIB) {
        Some(&loaded) => loaded,
        None => {
            let objects = 16;
            load(rig, MIB, objects).await;
            (MIB, objects)
        }
    };
    let mut rss = vec![RssPhase {
        phase: "idle, after loading".into(),
        peak_rss_mib: idle,
        streamed_mib: 0.0,
    }];
    let phases = [
        (
            "64 clients × 1 MiB objects",
            one_mib,
            one_mib_objects,
            phase,
            None,
        ),
        ("64 clients × 64 MiB objects", big, big_objects, phase, None),
        (
            "64 slow clients (1 MiB/s) × 64 MiB objects",
            big,
            big_objects,
            slow,
            Some(MIB as f64),
        ),
    ];
    for (name, size, objects, time, rate) in phases {
        rss.push(rss_phase(rig, name, size, objects, 64, time, rate).await);
    }
    rss
}
