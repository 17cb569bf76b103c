//! What the ring costs per request: loading the current ring from the `ArcSwap`, and finding a
//! key's owner for 1, 8 and 64 shards; and what publishing a new ring costs.
//!
//! `cargo bench --bench ring`

use std::sync::Arc;

use arc_swap::ArcSwap;
use divan::{black_box, Bencher};
use mediacache::config::Failover;
use mediacache::ring::{Placement, Ring};

fn main() {
    divan::main();
}

fn placement(shards: usize) -> Placement {
    let names: Vec<String> = (0..shards).map(|i| format!("shard-{i}")).collect();
    Placement::new(names.iter().map(|n| (n.as_str(), 1 + (n.len() as u32 % 3))))
}

fn keys() -> Vec<String> {
    (0..1024)
        .map(|i| format!("example{}.org/Media{i:08}", i % 31))
        .collect()
}

/// `load()`: the short borrow a unary request takes.
#[divan::bench]
fn ring_load(bencher: Bencher) {
    let ring = ArcSwap::from_pointee(Ring::new(1, String::new(), Failover::None, Vec::new()));
    bencher.bench(|| black_box(ring.load().generation));
}

/// `load_full()`: the owned `Arc` a streaming request moves into its stream.
#[divan::bench]
fn ring_load_full(bencher: Bencher) {
    let ring = ArcSwap::from_pointee(Ring::new(1, String::new(), Failover::None, Vec::new()));
    bencher.bench(|| black_box(ring.load_full()));
}

/// Finding a key's owner (rendezvous hashing is O(shards)).
#[divan::bench(args = [1, 8, 64])]
fn owner_lookup(bencher: Bencher, shards: usize) {
    let p = placement(shards);
    let keys = keys();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % keys.len();
        black_box(p.owner(&keys[i]))
    });
}

/// The failover order (all shards ranked), used only with `failover: next`.
#[divan::bench(args = [1, 8, 64])]
fn ranked_lookup(bencher: Bencher, shards: usize) {
    let p = placement(shards);
    let keys = keys();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % keys.len();
        black_box(p.ranked(&keys[i]))
    });
}

/// Publishing a new ring while readers hold the old one.
#[divan::bench]
fn ring_swap(bencher: Bencher) {
    let ring = ArcSwap::from_pointee(Ring::new(1, String::new(), Failover::None, Vec::new()));
    let mut generation = 1;
    bencher.bench_local(|| {
        generation += 1;
        ring.store(Arc::new(Ring::new(
            generation,
            String::new(),
            Failover::None,
            Vec::new(),
        )));
    });
}
