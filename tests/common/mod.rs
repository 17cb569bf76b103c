//! The shared integration-test harness: real `redis-server` shards on free loopback ports and
//! the service on port 0, with handles to kill and restart shards. Everything is cleaned up on
//! drop. Readiness is awaited by polling, never by fixed sleeps.

#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fred::prelude::{Builder, ClientLike, Config as FredConfig, FromValue, KeysInterface, Value};
use mediacache::client::Client;
use mediacache::config::{Config, ShardConfig};
use mediacache::proto::media_cache_service_client::MediaCacheServiceClient;
use mediacache::ring::Placement;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Ports handed out by [`free_port`] lie just below the kernel's ephemeral range (read from
/// `ip_local_port_range`; 32768 and up by default), so no socket bound to port 0, and no
/// outgoing connection, ever takes one; each process starts at its own offset in them and never
/// hands out a port twice.
fn ports() -> std::ops::Range<u32> {
    static PORTS: std::sync::OnceLock<std::ops::Range<u32>> = std::sync::OnceLock::new();
    PORTS
        .get_or_init(|| {
            let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
                .unwrap_or(32_768);
            let end = ephemeral.clamp(2_048, 32_768);
            end.saturating_sub(16_384).max(1_024)..end
        })
        .clone()
}
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A loopback port for a server a test starts itself (a shard, a metrics listener). Unique in
/// this process; a port another process holds right now is skipped. A server that still finds
/// its port taken (another test process bound it in between) fails to start, which
/// [`RedisShard`] detects and retries.
pub fn free_port() -> u16 {
    use std::sync::atomic::Ordering;
    let ports = ports();
    let span = ports.end - ports.start;
    let offset = std::process::id().wrapping_mul(2_654_435_761) % span;
    loop {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (ports.start + (offset + n) % span) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback address for a listener a test's service binds itself (e.g. `metrics_listen`).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Whether process `pid` holds the listening socket of loopback `port`: an answer on the port
/// could come from another process, never from this one's child unless it is listening.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Field 3 is the state: 0A is LISTEN; field 9 the socket's inode.
            let listening = fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A");
            listening.then(|| format!("socket:[{}]", fields.get(9).unwrap_or(&"?")))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One real `redis-server` process.
pub struct RedisShard {
    pub name: String,
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments, kept for restarts.
    extra: Vec<String>,
}

/// Where a starting `redis-server` is.
enum Launch {
    Ready,
    Starting,
    /// It exited: its port was taken.
    Failed,
}

impl RedisShard {
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, &[]).await
    }

    /// Starts with more `redis-server` arguments, e.g. `["--requirepass", "secret"]`.
    pub async fn start_with(name: &str, extra: &[&str]) -> Self {
        let mut shard = Self::new(name, extra);
        loop {
            shard.launch();
            if shard.wait_async().await {
                return shard;
            }
            shard.port = free_port();
        }
    }

    /// [`RedisShard::start`] outside async code.
    pub fn start_blocking(name: &str) -> Self {
        Self::start_with_blocking(name, &[])
    }

    /// [`RedisShard::start_with`] outside async code.
    pub fn start_with_blocking(name: &str, extra: &[&str]) -> Self {
        let mut shard = Self::new(name, extra);
        loop {
            shard.launch();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match shard.poll_launch() {
                    Launch::Ready => return shard,
                    Launch::Failed => break,
                    Launch::Starting => {
                        assert!(Instant::now() < deadline, "redis-server did not start");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            shard.port = free_port();
        }
    }

    fn new(name: &str, extra: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .args(["--maxmemory", "512mb"])
            .args(["--maxmemory-policy", "allkeys-lfu"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
    }

    /// Ready once our own child listens on the port and answers there.
    fn poll_launch(&mut self) -> Launch {
        let Some(child) = self.child.as_mut() else {
            return Launch::Failed;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            self.child = None;
            return Launch::Failed;
        }
        if listens_on(child.id(), self.port) && self.answers_ping() {
            Launch::Ready
        } else {
            Launch::Starting
        }
    }

    /// Waits for the launch without blocking the runtime; false when it failed.
    async fn wait_async(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.poll_launch() {
                Launch::Ready => return true,
                Launch::Failed => return false,
                Launch::Starting => {
                    assert!(
                        Instant::now() < deadline,
                        "redis-server on {} did not start",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        // A shard with a password answers -NOAUTH, which still means it is up.
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id while the shard runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crashed shard.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a shard that hangs without closing connections.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let sig = if paused { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status();
        }
    }

    /// Starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch();
        assert!(
            self.wait_async().await,
            "redis-server could not take its port {} again",
            self.port
        );
    }

    /// A direct client, for looking at and tampering with what the service stored.
    pub async fn client(&self) -> fred::prelude::Client {
        let client = Builder::from_config(FredConfig::from_url(&self.url()).unwrap())
            .build()
            .unwrap();
        client.init().await.expect("connect to shard");
        client
    }

    /// Runs one command on a connection of its own and returns its answer.
    async fn run<R: FromValue>(&self, command: &'static str, args: Vec<&str>) -> R {
        let c = self.client().await;
        let reply: R = c
            .custom(
                fred::types::CustomCommand::new_static(command, None, false),
                args,
            )
            .await
            .unwrap();
        let _ = c.quit().await;
        reply
    }

    /// Every key on the shard.
    pub async fn keys(&self) -> Vec<String> {
        self.run("KEYS", vec!["*"]).await
    }

    /// Temporary keys of Puts in progress (or abandoned and not yet expired).
    pub async fn temp_keys(&self) -> Vec<String> {
        let mut keys = self.keys().await;
        keys.retain(|k| k.starts_with("mc:1:tmp:"));
        keys
    }

    /// The stored objects on the shard (not leases, indexes or quarantines).
    pub async fn objects(&self) -> Vec<String> {
        let mut keys = self.keys().await;
        keys.retain(|k| k.starts_with("mc:1:o:"));
        keys
    }

    pub async fn raw_get(&self, key: &str) -> Option<Vec<u8>> {
        let c = self.client().await;
        let v: Option<Vec<u8>> = c.get(key).await.unwrap();
        let _ = c.quit().await;
        v
    }

    /// A section of the shard's `INFO`, on a connection of its own.
    async fn info(&self, section: &str) -> String {
        self.run("INFO", vec![section]).await
    }

    /// How many reads of its clients' sockets the shard has made (`total_reads_processed`):
    /// commands that arrive in one write are read in one.
    pub async fn reads_processed(&self) -> u64 {
        let info = self.info("stats").await;
        info.lines()
            .find_map(|l| l.strip_prefix("total_reads_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO stats has total_reads_processed")
    }

    /// How many times the shard has run `command` (e.g. `getrange`) without an error, from
    /// `INFO commandstats`; commands run inside scripts count too.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let info = self.info("commandstats").await;
        let prefix = format!("cmdstat_{command}:");
        let Some(stats) = info.lines().find_map(|l| l.strip_prefix(prefix.as_str())) else {
            return 0;
        };
        let field = |name: &str| -> u64 {
            stats
                .split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        field("calls") - field("failed_calls")
    }

    /// Connections of the shard with half a megabyte or more of a command still arriving: the
    /// service's uploads under way.
    pub async fn uploads_under_way(&self) -> usize {
        self.query_buffers()
            .await
            .into_iter()
            .filter(|&q| q >= 512 * 1024)
            .count()
    }

    /// The query buffers of the shard's connections (`CLIENT LIST`'s `qbuf`): commands still
    /// arriving.
    async fn query_buffers(&self) -> Vec<u64> {
        let list: String = self.run("CLIENT", vec!["LIST"]).await;
        list.lines()
            .filter_map(|l| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix("qbuf="))
                    .and_then(|v| v.parse().ok())
            })
            .collect()
    }

    /// Clients subscribed to the event channel: one per replica once it hears this shard.
    pub async fn subscribers(&self) -> u64 {
        let reply: Vec<Value> = self.run("PUBSUB", vec!["NUMSUB", "mc:1:events"]).await;
        reply.get(1).and_then(Value::as_u64).unwrap_or(0)
    }

    /// Any command, for state the service's own writes would leave (e.g. `SADD`).
    pub async fn raw_command(&self, command: &'static str, args: Vec<String>) {
        let _: Value = self
            .run(command, args.iter().map(String::as_str).collect())
            .await;
    }

    pub async fn raw_set(&self, key: &str, value: Vec<u8>) {
        let c = self.client().await;
        let _: () = c
            .set(
                key,
                Value::from(bytes::Bytes::from(value)),
                None,
                None,
                false,
            )
            .await
            .unwrap();
        let _ = c.quit().await;
    }
}

impl Drop for RedisShard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub type ServiceHandle = (
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<anyhow::Result<()>>,
);

/// Runs the service on a free loopback port until the sender is used or dropped.
async fn spawn_service(loaded: mediacache::config::Loaded) -> ServiceHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(mediacache::server::run(listener, loaded, async {
        let _ = rx.await;
    }));
    (addr, tx, server)
}

/// Serves `config`, passed through YAML so that it meets the same validation as a real one.
async fn serve(config: &Config) -> ServiceHandle {
    let yaml = yaml_serde::to_string(config).unwrap();
    spawn_service(Config::from_yaml(&yaml).expect("test config is valid")).await
}

/// Waits until the service at `endpoint` runs a ring of `n` shards, all up; returns a client
/// and that ring. Tests get this from [`TestCluster`]; the benchmarks call
/// [`shards_up_within`] for the service process they start from the release binary.
pub async fn shards_up(
    endpoint: &str,
    n: usize,
) -> (Client, mediacache::proto::RingStatusResponse) {
    shards_up_within(endpoint, n, Duration::from_secs(10)).await
}

/// [`shards_up`] with its own patience (a service under valgrind starts slowly).
pub async fn shards_up_within(
    endpoint: &str,
    n: usize,
    within: Duration,
) -> (Client, mediacache::proto::RingStatusResponse) {
    eventually("service up with all shards up", within, || async move {
        let mut c = Client::connect(endpoint.to_owned()).await.ok()?;
        let ring = c.ring_status().await.ok()?;
        (ring.shards.len() == n && ring.shards.iter().all(|s| s.up)).then_some((c, ring))
    })
    .await
}

/// The chunk size of an [`OpenPut`]'s messages: the client library's.
const PUT_PIECE: usize = mediacache::client::PUT_CHUNK_BYTES;

/// The body bytes a Put must have sent before its temporary key exists on the shard: smaller
/// objects are stored whole in one round trip at the end (the service gathers the first 1 MiB
/// and a header of up to 4 KiB).
pub const STREAMED_AFTER: usize = 1024 * 1024 + 4200;

/// A Put of `body` that sends its header and the first `sent` bytes, then waits: send the rest
/// through [`OpenPut::finish`]. For what must happen while a Put is under way.
pub struct OpenPut {
    tx: tokio::sync::mpsc::Sender<mediacache::proto::PutRequest>,
    rest: bytes::Bytes,
    answer: JoinHandle<Result<tonic::Response<mediacache::proto::PutResponse>, tonic::Status>>,
}

impl OpenPut {
    pub async fn start(
        mut raw: MediaCacheServiceClient<Channel>,
        key: mediacache::proto::MediaKey,
        body: bytes::Bytes,
        sent: usize,
    ) -> Self {
        use mediacache::proto::{put_request, MediaInfo, PutHeader, PutRequest};
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let header = PutHeader {
            key: Some(key),
            info: Some(MediaInfo {
                size: body.len() as u64,
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = tokio::spawn(async move {
            raw.put(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        tx.send(PutRequest {
            kind: Some(put_request::Kind::Header(header)),
        })
        .await
        .unwrap();
        for start in (0..sent).step_by(PUT_PIECE) {
            let piece = body.slice(start..(start + PUT_PIECE).min(sent));
            tx.send(PutRequest {
                kind: Some(put_request::Kind::Chunk(piece)),
            })
            .await
            .unwrap();
        }
        Self {
            tx,
            rest: body.slice(sent..),
            answer,
        }
    }

    /// Sends the rest of the body and returns the answer.
    pub async fn finish(self) -> mediacache::proto::PutResponse {
        use mediacache::proto::{put_request, PutRequest};
        for start in (0..self.rest.len()).step_by(PUT_PIECE) {
            let piece = self
                .rest
                .slice(start..(start + PUT_PIECE).min(self.rest.len()));
            // The service may answer before the end (the Put failed): the rest goes nowhere.
            let sent = self
                .tx
                .send(PutRequest {
                    kind: Some(put_request::Kind::Chunk(piece)),
                })
                .await;
            if sent.is_err() {
                break;
            }
        }
        drop(self.tx);
        self.answer.await.unwrap().unwrap().into_inner()
    }
}

/// The text of `/metrics` at `addr`.
pub async fn scrape_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}

/// Scrapes `/metrics` and sums the samples of `name`.
pub async fn metric_sum(addr: SocketAddr, name: &str) -> f64 {
    scrape_metrics(addr)
        .await
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until a Put is streaming into a temporary key on `shard`.
pub async fn temp_key_appears(shard: &RedisShard) {
    eventually(
        "a temporary key of a Put in progress",
        Duration::from_secs(5),
        || async { (!shard.temp_keys().await.is_empty()).then_some(()) },
    )
    .await;
}

/// Waits until `n` of the service's uploads are under way on `shard`.
pub async fn uploads_under_way(shard: &RedisShard, n: usize) {
    eventually("uploads under way", Duration::from_secs(5), || async {
        (shard.uploads_under_way().await >= n).then_some(())
    })
    .await;
}

/// Waits until a Put of more than its first write is under way on `shard`: a value sent as one
/// streamed `SET` is half-read in a connection's query buffer (`CLIENT LIST`'s `qbuf`), one
/// written in pieces has its temporary key.
pub async fn put_under_way(shard: &RedisShard) {
    eventually(
        "a Put under way on the shard",
        Duration::from_secs(5),
        || async {
            let temp = !shard.temp_keys().await.is_empty();
            (temp || shard.uploads_under_way().await > 0).then_some(())
        },
    )
    .await;
}

/// The one way a test starts the service: [`TestCluster::builder`], then what the test needs.
pub struct TestClusterBuilder {
    shards: usize,
    config: Config,
    config_file: bool,
    redis_args: Vec<String>,
    wait_ready: bool,
    config_at: Option<std::path::PathBuf>,
}

impl TestClusterBuilder {
    /// Starts from `config` as it is, with the shards it names (ones the test started itself,
    /// behind a proxy or over TLS); shards from [`TestClusterBuilder::shards`] are added to them.
    /// It replaces the builder's config: call it before [`TestClusterBuilder::configure`].
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Serves the config file at `path` as the test lays it out (a ConfigMap volume, say), which
    /// must describe the builder's config; the harness neither writes nor watches it itself.
    pub fn config_at(mut self, path: std::path::PathBuf) -> Self {
        self.config_at = Some(path);
        self
    }

    /// Returns once the service listens, without waiting for its shards to be up (they may never
    /// be) or calling it without a token (it may require one, or speak TLS).
    pub fn unready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// More `redis-server` arguments for every shard, e.g. `["--maxmemory", "24mb"]`.
    pub fn redis_args(mut self, args: &[&str]) -> Self {
        self.redis_args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Serve from a config file (watched for changes) instead of an in-memory config.
    pub fn config_file(mut self) -> Self {
        self.config_file = true;
        self
    }

    pub async fn start(self) -> TestCluster {
        let args: Vec<&str> = self.redis_args.iter().map(String::as_str).collect();
        let mut shards = Vec::new();
        for i in 0..self.shards {
            shards.push(RedisShard::start_with(&format!("shard-{i}"), &args).await);
        }
        let mut config = self.config;
        config.shards.extend(shards.iter().map(|s| ShardConfig {
            name: s.name.clone(),
            url: s.url(),
            weight: 1,
        }));
        let config_dir = self.config_file.then(|| tempfile::tempdir().unwrap());
        let mut cluster = TestCluster {
            shards,
            config,
            config_dir,
            addr: None,
            shutdown: None,
            server: None,
            replicas: Vec::new(),
            config_at: self.config_at,
        };
        cluster.start_service(self.wait_ready).await;
        cluster
    }
}

pub struct TestCluster {
    pub shards: Vec<RedisShard>,
    pub config: Config,
    config_dir: Option<tempfile::TempDir>,
    addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// More service replicas on the same shards (stopped on drop).
    replicas: Vec<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    /// A config file laid out by the test (see [`TestClusterBuilder::config_at`]).
    config_at: Option<std::path::PathBuf>,
}

impl TestCluster {
    /// Starts one more service replica on the same shards and config; returns its endpoint.
    pub async fn add_replica(&mut self) -> String {
        self.add_replica_with(|_| {}).await
    }

    /// [`TestCluster::add_replica`] with its own changes to the config (a replica cannot share
    /// the first one's `metrics_listen`, for one).
    pub async fn add_replica_with(&mut self, change: impl FnOnce(&mut Config)) -> String {
        let mut config = self.config.clone();
        change(&mut config);
        let (addr, tx, server) = serve(&config).await;
        let endpoint = format!("http://{addr}");
        self.replicas.push((tx, server));
        shards_up(&endpoint, self.config.shards.len()).await;
        // Ready once it hears every shard's events, like every replica before it.
        let replicas = self.replicas.len() as u64 + 1;
        for shard in &self.shards {
            eventually(
                "the new replica subscribed",
                Duration::from_secs(10),
                || async { (shard.subscribers().await >= replicas).then_some(()) },
            )
            .await;
        }
        endpoint
    }

    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder {
            shards: 0,
            config: Config::default(),
            config_file: false,
            redis_args: Vec::new(),
            wait_ready: true,
            config_at: None,
        }
    }

    async fn start_service(&mut self, wait_ready: bool) {
        // Logs of the service under test, shown for failing tests; RUST_LOG sets the level.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        // Through YAML, so the test config passes the same validation as a real one.
        let yaml = yaml_serde::to_string(&self.config).unwrap();
        let loaded = match self.config_path() {
            Some(path) if self.config_at.is_some() => {
                Config::load(&path).expect("test config is valid")
            }
            Some(path) => {
                std::fs::write(&path, &yaml).unwrap();
                Config::load(&path).expect("test config is valid")
            }
            None => Config::from_yaml(&yaml).expect("test config is valid"),
        };
        let (addr, tx, server) = spawn_service(loaded).await;
        self.addr = Some(addr);
        self.shutdown = Some(tx);
        self.server = Some(server);
        if !wait_ready {
            return;
        }
        shards_up(&self.endpoint(), self.config.shards.len()).await;
        for shard in &self.shards {
            eventually(
                "the service subscribed",
                Duration::from_secs(10),
                || async { (shard.subscribers().await >= 1).then_some(()) },
            )
            .await;
        }
    }

    /// The watched config file, when the cluster was built with `config_file()`.
    pub fn config_path(&self) -> Option<std::path::PathBuf> {
        self.config_at.clone().or_else(|| {
            self.config_dir
                .as_ref()
                .map(|d| d.path().join("config.yaml"))
        })
    }

    /// Writes `config` over the config file the way most tools do (a new file renamed over the
    /// old one), waits until the service runs a ring built from it, and returns its generation.
    pub async fn apply(&mut self, config: Config) -> u64 {
        assert!(
            self.config_at.is_none(),
            "a config laid out by the test is changed by the test"
        );
        let text = yaml_serde::to_string(&config).unwrap();
        let path = self
            .config_path()
            .expect("cluster serves from a config file");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        self.config = config;
        self.wait_for_digest(&mediacache::config::digest(&text))
            .await
    }

    /// Waits until the running ring was built from the config text with this digest.
    pub async fn wait_for_digest(&self, digest: &str) -> u64 {
        let endpoint = self.endpoint();
        eventually("ring from the new config", Duration::from_secs(10), || {
            let endpoint = endpoint.clone();
            async move {
                let ring = Client::connect(endpoint)
                    .await
                    .ok()?
                    .ring_status()
                    .await
                    .ok()?;
                (ring.config_digest == digest).then_some(ring.generation)
            }
        })
        .await
    }

    pub async fn ring_status(&self) -> mediacache::proto::RingStatusResponse {
        self.client().await.ring_status().await.unwrap()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Where the service listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("service started")
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.endpoint()).await.unwrap()
    }

    /// The generated stub, for sending messages the typed client never would.
    pub async fn raw(&self) -> MediaCacheServiceClient<Channel> {
        MediaCacheServiceClient::connect(self.endpoint())
            .await
            .unwrap()
    }

    /// Index in [`TestCluster::shards`] of the shard that owns `origin/media_id` in this
    /// cluster's ring.
    pub fn owner(&self, origin: &str, media_id: &str) -> usize {
        let placement = Placement::new(
            self.config
                .shards
                .iter()
                .map(|s| (s.name.as_str(), s.weight)),
        );
        let owner = placement
            .owner(&format!("{origin}/{media_id}"))
            .expect("cluster has shards");
        let name = &self.config.shards[owner].name;
        self.shards
            .iter()
            .position(|s| &s.name == name)
            .expect("the owner is a shard the harness started")
    }

    /// Every key on every shard, as (shard index, key).
    pub async fn all_keys(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            for k in shard.keys().await {
                out.push((i, k));
            }
        }
        out.sort();
        out
    }

    /// Every stored object on every shard, as (shard index, key): what `all_keys` holds but
    /// leases, variant indexes and quarantines.
    pub async fn all_objects(&self) -> Vec<(usize, String)> {
        let mut keys = self.all_keys().await;
        keys.retain(|(_, k)| k.starts_with("mc:1:o:"));
        keys
    }

    /// Stops the service and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
        for (_, server) in self.replicas.drain(..) {
            server.abort();
        }
    }
}

/// Deterministic test bytes.
pub fn body(len: usize, seed: u64) -> bytes::Bytes {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v.into()
}

/// A TCP proxy in front of a real `redis-server` that can turn hostile: once told to, it closes
/// each connection after passing on a given number of reply bytes, in the middle of a reply.
pub struct CuttingProxy {
    pub port: u16,
    cut_after: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start(target_port: u16) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_after = std::sync::Arc::new(AtomicUsize::new(0));
        let limit = cut_after.clone();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let limit = limit.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut up_read, mut up_write) = upstream.into_split();
                    let requests = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
                    });
                    let mut passed = 0usize;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match up_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let cut = limit.load(Ordering::Relaxed);
                        if cut > 0 && passed + n >= cut {
                            let _ = client_write.write_all(&buf[..cut - passed]).await;
                            break;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        passed += n;
                    }
                    requests.abort();
                });
            }
        });
        Self {
            port,
            cut_after,
            accepted,
            accept,
        }
    }

    /// Connections accepted since the proxy started.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// From now on, every connection is closed after passing `bytes` reply bytes (0: never).
    pub fn cut_replies_after(&self, bytes: usize) {
        self.cut_after
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
