//! The `mediacache` command: `serve`, `check-config`, and client subcommands for operators.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mediacache::client::{media_key, Client, ConnectOptions};
use mediacache::config::{Config, Loaded, LogFormat};
use mediacache::proto::{MediaInfo, MediaKey, PutOutcome};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// mimalloc, not glibc's malloc: less CPU per small Get (BENCHMARKS.md, "One write per read").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
const _: () = assert!(libmimalloc_sys::_mi_option_last == 47); // the option numbers `main` uses

#[derive(Parser)]
#[command(
    name = "mediacache",
    version,
    about = "A shared gRPC cache tier for Matrix media repositories"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the cache. Without a config file: memory tier only, on 127.0.0.1:50051.
    Serve {
        /// YAML config file.
        #[arg(long, short, env = "MEDIACACHE_CONFIG")]
        config: Option<PathBuf>,
        /// gRPC listen address; overrides `listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log format; overrides `log.format` from the config.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Validate a config file and print every problem with its key path.
    CheckConfig { file: PathBuf },
    /// Fetch an object (or a byte range of it) to a file or stdout.
    Get {
        #[command(flatten)]
        target: Target,
        /// First body byte to fetch.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to fetch; 0 means to the end.
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Write the body here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Store an object read from a file, or from stdin with `-`.
    Put {
        #[command(flatten)]
        target: Target,
        /// File to upload; `-` reads stdin.
        #[arg(long, short, default_value = "-")]
        input: PathBuf,
        #[arg(long, default_value = "")]
        content_type: String,
        #[arg(long, default_value = "")]
        file_name: String,
    },
    /// Show whether and where an object is cached.
    Stat {
        #[command(flatten)]
        target: Target,
    },
    /// Remove an object (or all its variants, or a whole origin) from every shard and every
    /// replica's memory tier.
    Purge {
        #[command(flatten)]
        addr: Addr,
        /// ORIGIN MEDIA_ID of one media (omit with --origin).
        #[arg(num_args = 0..=2, value_names = ["ORIGIN", "MEDIA_ID"])]
        key: Vec<String>,
        #[arg(long, default_value = "")]
        variant: String,
        /// Purge every media of this origin server: scans every shard a page at a time (other
        /// traffic goes on) and shows progress.
        #[arg(long, conflicts_with = "key")]
        origin: Option<String>,
        /// Remove every variant of ORIGIN/MEDIA_ID.
        #[arg(long)]
        all_variants: bool,
        /// Also refuse Puts of this media (any variant) for `quarantine_ttl`.
        #[arg(long)]
        quarantine: bool,
    },
    /// Put a random object, read it back, compare its SHA-256, and purge it: an end-to-end check
    /// of a deployment (the Helm chart's `helm test` runs it). Exits non-zero on any failure.
    Smoke {
        #[command(flatten)]
        addr: Addr,
        /// Size of the object to round-trip, in bytes.
        #[arg(long, default_value_t = 1024 * 1024)]
        size: usize,
    },
    /// Print this replica's counters: hit ratio, bytes served from the cache, memory tier.
    Stats {
        #[command(flatten)]
        addr: Addr,
    },
    /// Print the ring: generation, config digest and each shard.
    Ring {
        #[command(flatten)]
        addr: Addr,
    },
    /// Replay an access trace through cache policies with one byte budget and compare hit ratios.
    Simulate(SimulateArgs),
}

#[derive(Args)]
struct SimulateArgs {
    /// CSV trace (`timestamp_ms,key,size`); without it a trace of seed 001's room compositions
    /// is generated.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Seed of the generated trace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hours of generated traffic.
    #[arg(long, default_value_t = 6.0)]
    hours: f64,
    /// Write the generated trace here as CSV.
    #[arg(long)]
    write_trace: Option<PathBuf>,
    /// Byte budgets to compare, in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1000])]
    budget_mib: Vec<u64>,
    /// Memory tier settings (default: the config defaults).
    #[arg(long)]
    min_downloads: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    tracked_window: Option<std::time::Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    min_cache_time: Option<std::time::Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    min_evicted_time: Option<std::time::Duration>,
    #[arg(long)]
    max_object_mib: Option<u64>,
}

#[derive(Args)]
struct Addr {
    /// Address of a mediacache server; https:// for TLS.
    #[arg(
        long,
        env = "MEDIACACHE_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// File holding a client token, sent as `authorization: Bearer TOKEN`.
    #[arg(long, env = "MEDIACACHE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify the server with (https:// addresses).
    #[arg(long, env = "MEDIACACHE_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for servers that want client certificates.
    #[arg(long, env = "MEDIACACHE_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, env = "MEDIACACHE_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Server name to verify the certificate against, when it differs from the address' host.
    #[arg(long)]
    tls_domain: Option<String>,
}

impl Addr {
    async fn connect(&self) -> anyhow::Result<Client> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
        };
        let mut options = ConnectOptions {
            domain: self.tls_domain.clone(),
            ..Default::default()
        };
        if let Some(path) = &self.token_file {
            let token = String::from_utf8(read("--token-file", path)?)
                .with_context(|| format!("--token-file: {} is not text", path.display()))?;
            options.token = Some(token.trim().to_owned());
        }
        if let Some(path) = &self.tls_ca_file {
            options.ca_pem = Some(read("--tls-ca-file", path)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options.identity_pem =
                Some((read("--tls-cert-file", cert)?, read("--tls-key-file", key)?));
        }
        Ok(Client::connect_with(self.addr.clone(), options).await?)
    }
}

#[derive(Args)]
struct Target {
    #[command(flatten)]
    addr: Addr,
    /// Server name the media belongs to, e.g. example.org.
    origin: String,
    media_id: String,
    /// Variant, e.g. thumb/320x240/scale; empty for the original.
    #[arg(long, default_value = "")]
    variant: String,
}

impl Target {
    fn key(&self) -> MediaKey {
        media_key(&self.origin, &self.media_id, &self.variant)
    }
    async fn client(&self) -> anyhow::Result<Client> {
        self.addr.connect().await
    }
}

fn main() -> ExitCode {
    // SAFETY: no other thread exists yet. 15 is `purge_delay`: freed memory goes back in 10 ms.
    unsafe { libmimalloc_sys::mi_option_set_default(15, 10) };
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Put, Get, compare and Purge one random object under a key of its own.
async fn smoke(addr: &Addr, size: usize) -> anyhow::Result<ExitCode> {
    use sha2::{Digest, Sha256};
    let mut client = addr.connect().await?;
    let key = media_key(
        "smoke.mediacache.invalid",
        &format!("smoke-{:016x}", fastrand::u64(..)),
        "",
    );
    let mut body = vec![0u8; size];
    fastrand::fill(&mut body);
    let sha256 = Sha256::digest(&body).to_vec();
    let info = MediaInfo {
        content_type: "application/octet-stream".into(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let put = client.put_bytes(key.clone(), info, body.into()).await?;
    if !put.stored {
        anyhow::bail!(
            "put of {size} bytes was not stored: {:?}",
            PutOutcome::try_from(put.outcome).unwrap_or(PutOutcome::Unspecified)
        );
    }
    let got = client.get_bytes(key.clone()).await?;
    let removed = client.purge(key.clone(), false, false).await?.removed;
    let Some((info, read)) = got else {
        anyhow::bail!("get after a stored put was a miss");
    };
    if read.len() != size || Sha256::digest(&read).as_slice() != sha256 || info.sha256 != sha256 {
        anyhow::bail!(
            "read back {} bytes with sha256 {}, expected {size} bytes with sha256 {}",
            read.len(),
            hex(&Sha256::digest(&read)),
            hex(&sha256)
        );
    }
    println!(
        "ok: put, get and purge of {size} bytes through {} in {:.0?} (sha256 {}, {removed} copies removed)",
        addr.addr,
        started.elapsed(),
        &hex(&sha256)[..16]
    );
    Ok(ExitCode::SUCCESS)
}

fn load_config(path: Option<&Path>) -> Result<Loaded, ExitCode> {
    let loaded = match path {
        Some(p) => Config::load(p),
        None => Config::from_yaml(""),
    };
    loaded.map_err(|e| {
        let source = path.map_or("built-in defaults".to_owned(), |p| p.display().to_string());
        eprintln!("{source}: invalid config");
        for problem in e.problems() {
            eprintln!("  {problem}");
        }
        ExitCode::from(2)
    })
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            config,
            listen,
            log_format,
        } => {
            let mut loaded = match load_config(config.as_deref()) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let log = &loaded.config.log;
            init_logging(log_format.unwrap_or(log.format), &log.level);
            if let Some(listen) = listen {
                loaded.config.listen = listen;
            }
            let shutdown = shutdown_signal()?;
            let listener = TcpListener::bind(loaded.config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", loaded.config.listen))?;
            mediacache::server::run(listener, loaded, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => Ok(match load_config(Some(&file)) {
            Ok(loaded) => {
                println!(
                    "{}: valid ({} shards, digest {})",
                    file.display(),
                    loaded.config.shards.len(),
                    &loaded.digest[..12]
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        }),
        Command::Get {
            target,
            offset,
            limit,
            output,
        } => {
            let mut client = target.client().await?;
            let Some(mut download) = client.get(target.key(), offset, limit).await? else {
                eprintln!("miss");
                return Ok(ExitCode::from(1));
            };
            let expected = download.info.size.saturating_sub(offset);
            let expected = if limit == 0 {
                expected
            } else {
                expected.min(limit)
            };
            let progress = progress_bar(expected);
            let n = match output {
                Some(path) => {
                    let file = tokio::fs::File::create(&path)
                        .await
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    download
                        .write_to(&mut progress.wrap_async_write(file))
                        .await?
                }
                None => {
                    download
                        .write_to(&mut progress.wrap_async_write(tokio::io::stdout()))
                        .await?
                }
            };
            progress.finish_and_clear();
            eprintln!(
                "hit: {n} of {} bytes, content_type {:?}, sha256 {}",
                download.info.size,
                download.info.content_type,
                hex(&download.info.sha256)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Put {
            target,
            input,
            content_type,
            file_name,
        } => {
            let mut client = target.client().await?;
            let info = MediaInfo {
                content_type,
                file_name,
                ..Default::default()
            };
            let answer = if input.as_os_str() == "-" {
                // The size must be declared up front, so stdin is read whole first.
                let mut body = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut body).await?;
                client.put_bytes(target.key(), info, body.into()).await?
            } else {
                let file = tokio::fs::File::open(&input)
                    .await
                    .with_context(|| format!("cannot open {}", input.display()))?;
                let size = file.metadata().await?.len();
                let info = MediaInfo { size, ..info };
                let progress = progress_bar(size);
                let answer = client
                    .put_reader(target.key(), info, progress.wrap_async_read(file))
                    .await?;
                progress.finish_and_clear();
                answer
            };
            let outcome = PutOutcome::try_from(answer.outcome).unwrap_or(PutOutcome::Unspecified);
            let name = outcome.as_str_name();
            println!("{}", name.trim_start_matches("PUT_OUTCOME_").to_lowercase());
            Ok(if answer.stored {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Stat { target } => {
            let mut client = target.client().await?;
            let s = client.stat(target.key()).await?;
            if !s.found {
                println!("not found");
                return Ok(ExitCode::from(1));
            }
            let info = s.info.unwrap_or_default();
            println!("tier:         {}", s.tier);
            if !s.shard.is_empty() {
                println!("shard:        {}", s.shard);
            }
            println!("size:         {}", info.size);
            println!("content_type: {}", info.content_type);
            println!("file_name:    {}", info.file_name);
            println!("sha256:       {}", hex(&info.sha256));
            println!("stored_at_ms: {}", info.stored_at_unix_ms);
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge {
            addr,
            key,
            variant,
            origin,
            all_variants,
            quarantine,
        } => {
            let mut client = addr.connect().await?;
            if let Some(origin) = origin {
                let removed = client
                    .purge_origin(&origin, quarantine, |p| {
                        if !p.done {
                            eprintln!(
                                "shard {} ({} of {} done): {} removed so far",
                                p.shard, p.shards_done, p.shards_total, p.removed
                            );
                        }
                    })
                    .await?;
                println!("removed {removed}");
                return Ok(ExitCode::SUCCESS);
            }
            let [origin, media_id] = key.as_slice() else {
                anyhow::bail!("give ORIGIN MEDIA_ID, or --origin ORIGIN for a whole origin");
            };
            let answer = client
                .purge(
                    media_key(origin, media_id, &variant),
                    all_variants,
                    quarantine,
                )
                .await?;
            println!("removed {}", answer.removed);
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => simulate(args),
        Command::Smoke { addr, size } => smoke(&addr, size).await,
        Command::Stats { addr } => {
            let mut client = addr.connect().await?;
            let s = client.stats().await?;
            let lookups = s.get_hits + s.get_misses;
            let ratio = if lookups == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}%", s.get_hits as f64 * 100.0 / lookups as f64)
            };
            let rows = [
                ["uptime".to_owned(), format!("{} s", s.uptime_seconds)],
                ["get hits".to_owned(), s.get_hits.to_string()],
                ["get misses".to_owned(), s.get_misses.to_string()],
                ["hit ratio".to_owned(), ratio],
                [
                    "bytes served (saved from origins)".to_owned(),
                    s.bytes_served.to_string(),
                ],
                ["bytes received".to_owned(), s.bytes_received.to_string()],
                ["puts stored".to_owned(), s.puts_stored.to_string()],
                [
                    "fill leases granted".to_owned(),
                    s.leases_granted.to_string(),
                ],
                [
                    "gets waiting for a fill".to_owned(),
                    s.lease_waiters.to_string(),
                ],
                ["memory tier bytes".to_owned(), s.memory_bytes.to_string()],
                [
                    "memory tier entries".to_owned(),
                    s.memory_entries.to_string(),
                ],
            ];
            print_table(["SINCE START", "VALUE"], &rows);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ring { addr } => {
            let mut client = addr.connect().await?;
            let ring = client.ring_status().await?;
            println!(
                "generation {}  config {}",
                ring.generation,
                ring.config_digest.get(..12).unwrap_or(&ring.config_digest)
            );
            println!(
                "reloads applied {}  rejected {}",
                ring.reloads_applied, ring.reloads_failed
            );
            if !ring.last_reload_error.is_empty() {
                println!("last rejected reload: {}", ring.last_reload_error);
            }
            if ring.shards.is_empty() {
                println!("no shards: memory tier only");
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<[String; 7]> = ring
                .shards
                .iter()
                .map(|s| {
                    [
                        s.name.clone(),
                        s.address.clone(),
                        s.weight.to_string(),
                        if s.up { "up" } else { "DOWN" }.to_owned(),
                        s.used_memory_bytes.to_string(),
                        s.keys.to_string(),
                        format!("{:.1}%", s.share * 100.0),
                    ]
                })
                .collect();
            print_table(
                [
                    "NAME",
                    "ADDRESS",
                    "WEIGHT",
                    "STATE",
                    "USED_BYTES",
                    "KEYS",
                    "SHARE",
                ],
                &rows,
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    use mediacache::sim;
    let trace = match &args.trace {
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            sim::read_csv(std::io::BufReader::new(file))
                .with_context(|| format!("{}", path.display()))?
        }
        None => sim::generate(args.seed, args.hours),
    };
    if let Some(path) = &args.write_trace {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        trace.write_csv(&mut out)?;
    }
    let bytes: u64 = trace.accesses.iter().map(|a| a.size).sum();
    println!(
        "trace: {} requests, {} objects, {:.1} GiB requested",
        trace.accesses.len(),
        trace.keys.len(),
        bytes as f64 / (1u64 << 30) as f64
    );
    let defaults = mediacache::config::MemoryConfig::default();
    for budget in &args.budget_mib {
        let memory = mediacache::config::MemoryConfig {
            max_bytes: budget << 20,
            max_object_bytes: args
                .max_object_mib
                .map_or(defaults.max_object_bytes, |m| m << 20)
                .min(budget << 20),
            tracked_window: args.tracked_window.unwrap_or(defaults.tracked_window),
            min_downloads: args.min_downloads.unwrap_or(defaults.min_downloads),
            min_cache_time: args.min_cache_time.unwrap_or(defaults.min_cache_time),
            min_evicted_time: args.min_evicted_time.unwrap_or(defaults.min_evicted_time),
        };
        println!(
            "\nbudget {budget} MiB (min_downloads {}, tracked_window {:?}, min_cache_time {:?}, min_evicted_time {:?})",
            memory.min_downloads, memory.tracked_window, memory.min_cache_time, memory.min_evicted_time
        );
        let rows: Vec<[String; 3]> = sim::run(&trace, &memory)
            .iter()
            .map(|o| {
                [
                    o.policy.clone(),
                    format!("{:.3}", o.object_hit_ratio()),
                    format!("{:.3}", o.byte_hit_ratio()),
                ]
            })
            .collect();
        print_table(["POLICY", "OBJECT_HIT_RATIO", "BYTE_HIT_RATIO"], &rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// A byte progress bar on stderr when it is a terminal; hidden otherwise, so pipes and logs get
/// plain output.
fn progress_bar(len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Logs to stderr; `RUST_LOG` wins over the configured level.
fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn print_table<const N: usize>(head: [&str; N], rows: &[[String; N]]) {
    let mut widths = head.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "-".to_owned()
    } else {
        hex::encode(bytes)
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are in place when this returns, so a signal
/// that arrives as soon as the port listens stops the service gracefully instead of killing it.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
