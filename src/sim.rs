//! A cache policy simulator: replays an access trace through several policies with the same byte
//! budget and reports object and byte hit ratios, with Belady's MIN as the ceiling.
//!
//! Policies: the memory tier itself (the seed 001 strategy, driven by a simulated clock), plain
//! LRU, TinyLFU (the `moka` crate with a size weigher), and two offline references that know
//! the future: Belady's MIN, which evicts the object whose next use is furthest away, and a
//! size-aware variant. For objects of one size MIN is the optimum; for objects of different
//! sizes the optimum is NP-hard to compute, MIN bounds the byte hit ratio well but not the object
//! hit ratio, and the size-aware variant is the better reference for the latter. Traces come from
//! [`generate`], which models the room compositions of seed 001, or from a CSV file
//! (`timestamp_ms,key,size`) via [`read_csv`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::MemoryConfig;
use crate::key::Key;
use crate::proto::MediaInfo;
use crate::store::memory::{ManualClock, MemoryStore, Object};

/// One access: when, which object (an index into the trace's key table), how large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub t_ms: u64,
    pub key: u32,
    pub size: u64,
}

/// An access trace, in time order, with the names of its keys.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    pub accesses: Vec<Access>,
    pub keys: Vec<String>,
}

impl Trace {
    fn intern(&mut self, ids: &mut HashMap<String, u32>, name: &str) -> u32 {
        if let Some(id) = ids.get(name) {
            return *id;
        }
        let id = self.keys.len() as u32;
        self.keys.push(name.to_owned());
        ids.insert(name.to_owned(), id);
        id
    }

    /// Writes the trace as CSV (`timestamp_ms,key,size`).
    pub fn write_csv(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        writeln!(out, "timestamp_ms,key,size")?;
        for a in &self.accesses {
            writeln!(out, "{},{},{}", a.t_ms, self.keys[a.key as usize], a.size)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads `timestamp_ms,key,size` lines (a header line is skipped); sorts by time.
pub fn read_csv(input: impl BufRead) -> Result<Trace, TraceError> {
    let mut trace = Trace::default();
    let mut ids = HashMap::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = |message: String| TraceError::Line {
            line: i + 1,
            message,
        };
        if fields.len() != 3 {
            return Err(bad(format!(
                "expected timestamp_ms,key,size, got {} fields",
                fields.len()
            )));
        }
        let Ok(t_ms) = fields[0].parse::<u64>() else {
            if i == 0 {
                continue; // header
            }
            return Err(bad(format!("timestamp_ms {:?} is not a number", fields[0])));
        };
        let size = fields[2]
            .parse::<u64>()
            .map_err(|_| bad(format!("size {:?} is not a number", fields[2])))?;
        if fields[1].is_empty() {
            return Err(bad("key is empty".into()));
        }
        let key = trace.intern(&mut ids, fields[1]);
        trace.accesses.push(Access { t_ms, key, size });
    }
    trace.accesses.sort_by_key(|a| a.t_ms);
    Ok(trace)
}

/// The room compositions of seed 001, each with its own audience and download curve.
struct RoomKind {
    name: &'static str,
    rooms: usize,
    /// Viewers of each post, on average.
    viewers: f64,
    posts_per_hour: f64,
    /// Mean delay of a download after the post: a spike, then an exponential decay.
    decay: Duration,
}

const ROOM_KINDS: [RoomKind; 5] = [
    RoomKind {
        name: "private chats",
        rooms: 400,
        viewers: 3.0,
        posts_per_hour: 2.0,
        decay: Duration::from_secs(5 * 60),
    },
    RoomKind {
        name: "small communities",
        rooms: 100,
        viewers: 30.0,
        posts_per_hour: 3.0,
        decay: Duration::from_secs(20 * 60),
    },
    RoomKind {
        name: "large communities",
        rooms: 20,
        viewers: 150.0,
        posts_per_hour: 4.0,
        decay: Duration::from_secs(2 * 3600),
    },
    RoomKind {
        name: "announcement rooms",
        rooms: 30,
        viewers: 60.0,
        posts_per_hour: 0.3,
        decay: Duration::from_secs(3600),
    },
    RoomKind {
        name: "Matrix HQ-style rooms",
        rooms: 2,
        viewers: 400.0,
        posts_per_hour: 10.0,
        decay: Duration::from_secs(6 * 3600),
    },
];

/// Share of viewers who open the original after seeing the thumbnail.
const OPEN_ORIGINAL: f64 = 0.3;

fn exp(rng: &mut fastrand::Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.f64()).ln()
}

fn normal(rng: &mut fastrand::Rng) -> f64 {
    let (u1, u2) = (1.0 - rng.f64(), rng.f64());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn lognormal(rng: &mut fastrand::Rng, median: f64, sigma: f64, max: f64) -> u64 {
    (median * (sigma * normal(rng)).exp()).clamp(1.0, max) as u64
}

fn poisson(rng: &mut fastrand::Rng, mean: f64) -> usize {
    // Normal approximation above 30, exact product method below.
    if mean > 30.0 {
        return (mean + mean.sqrt() * normal(rng)).round().max(0.0) as usize;
    }
    let limit = (-mean).exp();
    let (mut k, mut p) = (0, rng.f64());
    while p > limit {
        k += 1;
        p *= rng.f64();
    }
    k
}

const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

/// Sizes with a heavy tail: thumbnails of tens of KiB, images of hundreds of KiB to a few MiB,
/// and videos of tens of MiB.
fn original_size(rng: &mut fastrand::Rng) -> u64 {
    match rng.u8(..100) {
        0..=79 => lognormal(rng, 600.0 * KIB, 0.9, 20.0 * MIB),
        80..=94 => lognormal(rng, 8.0 * MIB, 0.8, 100.0 * MIB),
        _ => lognormal(rng, 40.0 * MIB, 0.6, 100.0 * MIB),
    }
}

/// Generates `hours` of traffic for the room compositions of seed 001, reproducibly from `seed`.
/// Each post gets a thumbnail every viewer downloads and an original some open; downloads
/// follow a spike and an exponential decay whose height and length depend on the room kind.
pub fn generate(seed: u64, hours: f64) -> Trace {
    let mut rng = fastrand::Rng::with_seed(seed);
    let span_ms = (hours * 3_600_000.0) as u64;
    let mut trace = Trace::default();
    let mut ids = HashMap::new();
    for kind in &ROOM_KINDS {
        for room in 0..kind.rooms {
            let posts = poisson(&mut rng, kind.posts_per_hour * hours);
            for post in 0..posts {
                let at = rng.u64(..span_ms.max(1));
                let media = format!(
                    "{}-{room}-{post}",
                    kind.name.split(' ').next().unwrap_or("room")
                );
                let thumb = trace.intern(&mut ids, &format!("{media}/thumb"));
                let original = trace.intern(&mut ids, &format!("{media}/original"));
                let thumb_size = lognormal(&mut rng, 40.0 * KIB, 0.5, 400.0 * KIB);
                let original_size = original_size(&mut rng);
                let viewers = poisson(&mut rng, kind.viewers);
                for _ in 0..viewers {
                    let t = at + exp(&mut rng, kind.decay.as_millis() as f64) as u64;
                    if t >= span_ms {
                        continue;
                    }
                    trace.accesses.push(Access {
                        t_ms: t,
                        key: thumb,
                        size: thumb_size,
                    });
                    if rng.f64() < OPEN_ORIGINAL {
                        let later = t + exp(&mut rng, 30_000.0) as u64;
                        trace.accesses.push(Access {
                            t_ms: later.min(span_ms),
                            key: original,
                            size: original_size,
                        });
                    }
                }
            }
        }
    }
    trace.accesses.sort_by_key(|a| (a.t_ms, a.key));
    trace
}

/// Hits of one policy over a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyResult {
    pub policy: String,
    pub requests: u64,
    pub hits: u64,
    pub bytes: u64,
    pub hit_bytes: u64,
}

impl PolicyResult {
    pub fn object_hit_ratio(&self) -> f64 {
        self.hits as f64 / self.requests.max(1) as f64
    }
    pub fn byte_hit_ratio(&self) -> f64 {
        self.hit_bytes as f64 / self.bytes.max(1) as f64
    }
}

trait Policy {
    fn name(&self) -> String;
    /// Serves access `i`; true on a hit. A miss may cache the object.
    fn access(&mut self, i: usize, a: &Access) -> bool;
}

struct SeedPolicy {
    store: MemoryStore,
    clock: Arc<ManualClock>,
    keys: Vec<Key>,
    zeros: &'static [u8],
}

impl Policy for SeedPolicy {
    fn name(&self) -> String {
        "seed 001 (memory tier)".into()
    }
    fn access(&mut self, _: usize, a: &Access) -> bool {
        self.clock.set_ms(a.t_ms);
        let key = &self.keys[a.key as usize];
        self.store.record_download(key);
        if self.store.get(key).is_some() {
            return true;
        }
        if (a.size as usize) <= self.zeros.len() {
            let object = Object {
                info: MediaInfo {
                    size: a.size,
                    ..Default::default()
                },
                body: Bytes::from_static(&self.zeros[..a.size as usize]),
                version: 0,
            };
            self.store.admit(key.clone(), object);
        }
        false
    }
}

/// Least recently used, by bytes.
struct Lru {
    budget: u64,
    max_object: u64,
    bytes: u64,
    tick: u64,
    entries: HashMap<u32, (u64, u64)>,
    order: BTreeMap<u64, u32>,
}

impl Policy for Lru {
    fn name(&self) -> String {
        "LRU".into()
    }
    fn access(&mut self, _: usize, a: &Access) -> bool {
        self.tick += 1;
        if let Some((tick, _)) = self.entries.get_mut(&a.key) {
            self.order.remove(tick);
            *tick = self.tick;
            self.order.insert(self.tick, a.key);
            return true;
        }
        if a.size > self.max_object {
            return false;
        }
        while self.bytes + a.size > self.budget {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, size)) = self.entries.remove(&victim) {
                self.bytes -= size;
            }
        }
        self.bytes += a.size;
        self.entries.insert(a.key, (self.tick, a.size));
        self.order.insert(self.tick, a.key);
        false
    }
}

/// TinyLFU admission with an LRU window, as the `moka` crate implements it.
struct TinyLfu {
    cache: moka::sync::Cache<u32, u32>,
    max_object: u64,
}

impl Policy for TinyLfu {
    fn name(&self) -> String {
        "TinyLFU (moka)".into()
    }
    fn access(&mut self, _: usize, a: &Access) -> bool {
        if self.cache.get(&a.key).is_some() {
            return true;
        }
        if a.size <= self.max_object {
            self.cache.insert(a.key, a.size.min(u32::MAX as u64) as u32);
            self.cache.run_pending_tasks();
        }
        false
    }
}

/// The offline bound: on a miss, cache the object, then evict whatever is used furthest in the
/// future (possibly the newcomer itself) until the budget holds.
struct Belady {
    budget: u64,
    max_object: u64,
    bytes: u64,
    next_use: Vec<usize>,
    cached: HashMap<u32, (usize, u64)>,
    by_next: BTreeSet<(usize, u32)>,
}

impl Belady {
    fn new(trace: &Trace, budget: u64, max_object: u64) -> Self {
        let mut next_use = vec![usize::MAX; trace.accesses.len()];
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for (i, a) in trace.accesses.iter().enumerate().rev() {
            if let Some(n) = seen.insert(a.key, i) {
                next_use[i] = n;
            }
        }
        Self {
            budget,
            max_object,
            bytes: 0,
            next_use,
            cached: HashMap::new(),
            by_next: BTreeSet::new(),
        }
    }
}

impl Policy for Belady {
    fn name(&self) -> String {
        "Belady MIN (offline, by bytes)".into()
    }
    fn access(&mut self, i: usize, a: &Access) -> bool {
        let next = self.next_use[i];
        if let Some((n, _)) = self.cached.get_mut(&a.key) {
            self.by_next.remove(&(*n, a.key));
            *n = next;
            self.by_next.insert((next, a.key));
            return true;
        }
        if a.size > self.max_object || next == usize::MAX {
            return false;
        }
        self.cached.insert(a.key, (next, a.size));
        self.by_next.insert((next, a.key));
        self.bytes += a.size;
        while self.bytes > self.budget {
            let Some((_, victim)) = self.by_next.pop_last() else {
                break;
            };
            if let Some((_, size)) = self.cached.remove(&victim) {
                self.bytes -= size;
            }
        }
        false
    }
}

/// An offline variant for objects of different sizes: evicts the object with the largest
/// `distance to next use × size`, trading one large object for many small ones, so it bounds the
/// object hit ratio better than [`Belady`] (which bounds bytes better). It scans the cache per
/// eviction: fine for a simulator.
struct BeladySize {
    budget: u64,
    max_object: u64,
    bytes: u64,
    next_use: Vec<usize>,
    cached: HashMap<u32, (usize, u64)>,
}

impl Policy for BeladySize {
    fn name(&self) -> String {
        "Belady-Size (offline, by objects)".into()
    }
    fn access(&mut self, i: usize, a: &Access) -> bool {
        let next = self.next_use[i];
        if let Some((n, _)) = self.cached.get_mut(&a.key) {
            *n = next;
            return true;
        }
        if a.size > self.max_object || next == usize::MAX {
            return false;
        }
        self.cached.insert(a.key, (next, a.size));
        self.bytes += a.size;
        while self.bytes > self.budget {
            let victim = self
                .cached
                .iter()
                .max_by_key(|(k, (n, size))| ((n - i) as u128 * u128::from(*size), **k))
                .map(|(k, _)| *k);
            let Some(victim) = victim else { break };
            if let Some((_, size)) = self.cached.remove(&victim) {
                self.bytes -= size;
            }
        }
        false
    }
}

/// Replays `trace` through every policy with the byte budget and limits of `memory`.
pub fn run(trace: &Trace, memory: &MemoryConfig) -> Vec<PolicyResult> {
    let budget = memory.max_bytes;
    let max_object = memory.max_object_bytes.min(budget);
    let clock = Arc::new(ManualClock::default());
    let zeros: &'static [u8] = Box::leak(vec![0u8; max_object as usize].into_boxed_slice());
    let keys = (0..trace.keys.len())
        .map(|i| Key::new("sim", &format!("k{i}"), "").expect("valid key"))
        .collect();
    let mut policies: Vec<Box<dyn Policy>> = vec![
        Box::new(SeedPolicy {
            store: MemoryStore::with_clock(memory, clock.clone()),
            clock,
            keys,
            zeros,
        }),
        Box::new(Lru {
            budget,
            max_object,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }),
        Box::new(TinyLfu {
            cache: moka::sync::Cache::builder()
                .max_capacity(budget)
                .weigher(|_, size: &u32| *size)
                .build(),
            max_object,
        }),
        Box::new(Belady::new(trace, budget, max_object)),
    ];
    let next_use = Belady::new(trace, budget, max_object).next_use;
    policies.push(Box::new(BeladySize {
        budget,
        max_object,
        bytes: 0,
        next_use,
        cached: HashMap::new(),
    }));
    policies
        .iter_mut()
        .map(|p| {
            let mut out = PolicyResult {
                policy: p.name(),
                requests: 0,
                hits: 0,
                bytes: 0,
                hit_bytes: 0,
            };
            for (i, a) in trace.accesses.iter().enumerate() {
                out.requests += 1;
                out.bytes += a.size;
                if p.access(i, a) {
                    out.hits += 1;
                    out.hit_bytes += a.size;
                }
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(budget: u64) -> MemoryConfig {
        MemoryConfig {
            max_bytes: budget,
            max_object_bytes: budget,
            min_downloads: 2,
            ..MemoryConfig::default()
        }
    }

    fn trace(accesses: &[(u64, u32, u64)]) -> Trace {
        Trace {
            accesses: accesses
                .iter()
                .map(|&(t_ms, key, size)| Access { t_ms, key, size })
                .collect(),
            keys: (0..10).map(|i| format!("k{i}")).collect(),
        }
    }

    #[test]
    fn csv_round_trip_and_errors_name_the_line() {
        let text = "timestamp_ms,key,size\n20,b,5\n10,a,3\n30,a,3\n";
        let t = read_csv(text.as_bytes()).unwrap();
        assert_eq!(t.accesses.len(), 3);
        assert_eq!(
            t.accesses[0],
            Access {
                t_ms: 10,
                key: 1,
                size: 3
            }
        );
        let mut out = Vec::new();
        t.write_csv(&mut out).unwrap();
        let again = read_csv(out.as_slice()).unwrap();
        assert_eq!(again.accesses.len(), 3);
        let err = read_csv("1,a,2\n2,b\n".as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: expected timestamp_ms,key,size, got 2 fields"
        );
        let err = read_csv("1,a,x\n".as_bytes()).unwrap_err();
        assert!(err.to_string().starts_with("line 1: size"));
    }

    #[test]
    fn generator_is_reproducible_and_heavy_tailed() {
        let a = generate(7, 1.0);
        let b = generate(7, 1.0);
        assert_eq!(a.accesses, b.accesses);
        assert_ne!(generate(8, 1.0).accesses, a.accesses);
        assert!(a.accesses.len() > 10_000, "{}", a.accesses.len());
        assert!(a.accesses.windows(2).all(|w| w[0].t_ms <= w[1].t_ms));
        let max = a.accesses.iter().map(|x| x.size).max().unwrap();
        let min = a.accesses.iter().map(|x| x.size).min().unwrap();
        assert!(max > 10 * 1024 * 1024 && min < 100 * 1024, "{min}..{max}");
    }

    #[test]
    fn belady_is_the_ceiling_and_policies_count_hits() {
        // Budget of two unit objects; a cyclic pattern of three defeats LRU entirely.
        let mut t = Vec::new();
        for round in 0..20u64 {
            for k in 0..3u32 {
                t.push((round * 3 + k as u64, k, 1));
            }
        }
        let results = run(&trace(&t), &memory(2));
        let by_name = |n: &str| {
            results
                .iter()
                .find(|o| o.policy.starts_with(n))
                .unwrap()
                .clone()
        };
        assert_eq!(by_name("LRU").hits, 0);
        let belady = by_name("Belady MIN");
        assert!(belady.hits >= 25, "{belady:?}");
        // With one object size, MIN is the optimum: nothing beats it.
        for o in &results {
            assert_eq!(o.requests, 60);
            assert!(o.hits <= belady.hits, "{o:?} beats the bound");
        }
        assert_eq!(by_name("Belady-Size").hits, belady.hits);
    }

    #[test]
    fn seed_policy_needs_min_downloads() {
        // min_downloads 2: the second download of key 1 admits it, so its later reads hit.
        let t = trace(&[(0, 1, 10), (1, 1, 10), (2, 1, 10), (3, 2, 10), (4, 1, 10)]);
        let seed = run(&t, &memory(100)).remove(0);
        assert_eq!(seed.hits, 2, "{seed:?}");
    }
}
