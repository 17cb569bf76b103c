//! What the benchmarks share: the service as a separate process, and its resident memory.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mediacache::client::Client;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::{free_port, shards_up_within, RedisShard};

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Samples a process's RSS every 5 ms until the flag is set; the task returns the peak.
pub fn sample_rss(pid: u32) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        while !flag.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak
    });
    (stop, task)
}

/// A service process from the release binary (or the one `MEDIACACHE_BIN` names, e.g. an
/// older release for a before/after figure), on a free loopback port.
pub struct Service {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Serves `shards` with `extra` YAML (top-level keys such as `memory:`) added to the config.
    pub async fn start(shards: &[&RedisShard], extra: &str) -> Self {
        Self::start_under(shards, extra, &[]).await
    }

    /// [`Service::start`] with the binary run by `wrapper` (e.g. `valgrind --tool=callgrind`),
    /// given a minute to come up.
    pub async fn start_under(shards: &[&RedisShard], extra: &str, wrapper: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut yaml =
            format!("listen: 127.0.0.1:{port}\nlog: {{ level: warn }}\n{extra}\nshards:\n");
        for s in shards {
            yaml.push_str(&format!(
                "  - {{ name: {}, url: \"{}\" }}\n",
                s.name,
                s.url()
            ));
        }
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let bin = std::env::var("MEDIACACHE_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_mediacache").to_owned());
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the service");
        let endpoint = format!("http://127.0.0.1:{port}");
        let patience = if wrapper.is_empty() { 10 } else { 60 };
        shards_up_within(&endpoint, shards.len(), Duration::from_secs(patience)).await;
        Self {
            child,
            endpoint,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    #[allow(dead_code)]
    pub async fn clients(&self, n: usize) -> Vec<Client> {
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(
                Client::connect(self.endpoint.clone())
                    .await
                    .expect("connect"),
            );
        }
        clients
    }

    /// Plain channels to the service's gRPC health check, each on its own connection.
    #[allow(dead_code)]
    pub async fn health_clients(&self, n: usize) -> Vec<HealthClient<Channel>> {
        let mut clients = Vec::new();
        for _ in 0..n {
            let channel = Endpoint::from_shared(self.endpoint.clone())
                .expect("endpoint")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect");
            let mut client = HealthClient::new(channel);
            // A floor timed on answers other than SERVING would measure something else.
            let status = client
                .check(HealthCheckRequest::default())
                .await
                .expect("Check")
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "the service is not SERVING"
            );
            clients.push(client);
        }
        clients
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
