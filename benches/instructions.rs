//! Instructions the service executes per request, counted by callgrind: a figure that does not
//! move with the machine's noise, for before/after comparisons of the hot paths.
//!
//! `cargo bench --bench instructions` (needs `valgrind`; a minute or two). With
//! `MEDIACACHE_BIN=<path>` it counts another build, e.g. the previous release. It starts one
//! `redis-server` shard and the service under `valgrind --tool=callgrind` with instrumentation
//! off, then for each request kind turns it on, sends the requests one at a time, turns it off
//! and dumps: the dump's total divided by the request count is the figure printed.

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{body, RedisShard};
use mediacache::client::{media_key, Client};
use mediacache::proto::MediaInfo;
use support::Service;

/// Requests per measured kind; the first few are left out as a warm-up.
const REQUESTS: usize = 200;
const WARM_UP: usize = 20;

fn callgrind_control(args: &[&str]) {
    let status = Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("callgrind_control (from valgrind) runs");
    assert!(status.success(), "callgrind_control {args:?}");
}

/// The `totals:` line of the newest dump in `dir` (`summary:` where there is none).
fn newest_total(dir: &std::path::Path) -> u64 {
    let mut dumps: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("callgrind.out"))
        .collect();
    dumps.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    let text = std::fs::read_to_string(dumps.last().expect("a dump").path()).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    field("totals:")
        .or_else(|| field("summary:"))
        .expect("a total in the dump")
}

/// Instructions per request of `op`, run `REQUESTS` times one after another.
async fn count<F, Fut>(pid: u32, dir: &std::path::Path, mut op: F) -> f64
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for i in 0..WARM_UP {
        op(i).await;
    }
    let pid = pid.to_string();
    callgrind_control(&["--zero", &pid]);
    callgrind_control(&["--instr=on", &pid]);
    for i in WARM_UP..REQUESTS {
        op(i).await;
    }
    callgrind_control(&["--instr=off", &pid]);
    callgrind_control(&["--dump", &pid]);
    newest_total(dir) as f64 / (REQUESTS - WARM_UP) as f64
}

fn main() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed (apt-get install valgrind): nothing to count");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let shard = RedisShard::start("shard-0").await;
    let dir = tempfile::tempdir().unwrap();
    // `CALLGRIND_KEEP=<dir>` keeps the dumps there, for `callgrind_annotate`.
    let kept = std::env::var_os("CALLGRIND_KEEP").map(std::path::PathBuf::from);
    let dump_dir = kept.as_deref().unwrap_or(dir.path());
    let out = format!(
        "--callgrind-out-file={}/callgrind.out.%p",
        dump_dir.display()
    );
    let wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", &out];
    let mut rows = Vec::new();
    for (tier, memory) in [
        ("redis", "memory:\n  max_bytes: 0\n  max_object_bytes: 0\n"),
        (
            "memory",
            "memory:\n  max_bytes: 268435456\n  min_downloads: 1\n",
        ),
    ] {
        let service = Service::start_under(&[&shard], memory, &wrapper).await;
        let pid = service.pid();
        let client = Client::connect(service.endpoint.clone()).await.unwrap();
        for size in [8 * 1024, 64 * 1024] {
            let key = media_key("bench.example", &format!("{tier}-{size}"), "");
            let data: Bytes = body(size, size as u64);
            let mut c = client.clone();
            c.put_bytes(key.clone(), MediaInfo::default(), data.clone())
                .await
                .unwrap();
            // A read fills the memory tier where it is on.
            let _ = c.get_bytes(key.clone()).await.unwrap();
            let get = count(pid, dump_dir, |_| {
                let (mut c, key) = (client.clone(), key.clone());
                async move {
                    let (_, got) = c.get_bytes(key).await.unwrap().expect("a hit");
                    assert_eq!(got.len(), size);
                }
            })
            .await;
            rows.push((format!("Get {}K, {tier} tier", size / 1024), get));
            if tier == "redis" {
                let put = count(pid, dump_dir, |i| {
                    let mut c = client.clone();
                    let key = media_key("bench.example", &format!("put-{size}-{i}"), "");
                    let data = data.clone();
                    async move {
                        let r = c.put_bytes(key, MediaInfo::default(), data).await.unwrap();
                        assert!(r.stored);
                    }
                })
                .await;
                rows.push((format!("Put {}K", size / 1024), put));
            }
        }
        drop(service);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "\nInstructions the service executes per request (callgrind, {} requests each)",
        REQUESTS - WARM_UP
    );
    for (what, ir) in rows {
        println!("  {what:<24} {:>12.0}", ir);
    }
}
