//! The shard ring: weighted rendezvous (highest random weight) hashing over shard *names*.
//!
//! For a route key `k` (`origin/media_id`) and a shard with name `n` and weight `w`:
//!
//! ```text
//! seed(n)  = XXH3-64(utf8(n), seed 0)
//! h        = XXH3-64(utf8(k), seed = seed(n))
//! u        = ((h >> 11) + 0.5) / 2^53          in (0, 1)
//! score    = w / -ln(u)
//! ```
//!
//! The shard with the highest score owns the key; ties (never seen in practice) go to the
//! smaller name. Sorting all shards by score gives the key's failover order. Because the name and
//! not the address is hashed, re-addressing a shard moves no keys; adding a shard moves only the
//! keys it wins, and removing one moves only its keys. The share of each shard is `w / Σw`.
//!
//! XXH3 is fixed by its specification; the golden vectors in the tests pin the mapping so that a
//! change of hash or crate version cannot silently remap a datacenter's cache.

use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::config::Failover;
use crate::shard::Shard;

/// The pure placement function over `(name, weight)` pairs, shared by the ring and its tests.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    seed: u64,
    weight: f64,
}

impl Placement {
    pub fn new<'a>(nodes: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        Self {
            nodes: nodes
                .into_iter()
                .map(|(name, weight)| Node {
                    name: name.to_owned(),
                    seed: xxh3_64(name.as_bytes()),
                    weight: f64::from(weight),
                })
                .collect(),
        }
    }

    fn score(node: &Node, key: &[u8]) -> f64 {
        let h = xxh3_64_with_seed(key, node.seed);
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        node.weight / -u.ln()
    }

    fn better(&self, a: (usize, f64), b: (usize, f64)) -> bool {
        a.1 > b.1 || (a.1 == b.1 && self.nodes[a.0].name < self.nodes[b.0].name)
    }

    /// Index of the node that owns `key`.
    pub fn owner(&self, key: &str) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, node) in self.nodes.iter().enumerate() {
            let s = (i, Self::score(node, key.as_bytes()));
            if best.is_none_or(|b| self.better(s, b)) {
                best = Some(s);
            }
        }
        best.map(|(i, _)| i)
    }

    /// Indices of all nodes, best first: the owner, then the failover order.
    pub fn ranked(&self, key: &str) -> Vec<usize> {
        let mut scored: Vec<(usize, f64)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (i, Self::score(n, key.as_bytes())))
            .collect();
        scored.sort_by(|a, b| {
            if self.better(*a, *b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        scored.into_iter().map(|(i, _)| i).collect()
    }

    /// Expected fraction of the key space owned by node `i`.
    pub fn share(&self, i: usize) -> f64 {
        let total: f64 = self.nodes.iter().map(|n| n.weight).sum();
        if total == 0.0 {
            0.0
        } else {
            self.nodes[i].weight / total
        }
    }
}

/// An immutable set of shards with their weights; a new ring is built and swapped in whole.
pub struct Ring {
    /// Increases by one with each published ring.
    pub generation: u64,
    /// Digest of the config text this ring was built from.
    pub digest: String,
    /// What to do while a key's owner is down; part of the ring so a reload changes it too.
    pub failover: Failover,
    placement: Placement,
    shards: Vec<Arc<Shard>>,
    weights: Vec<u32>,
}

impl Ring {
    /// `members` pairs each shard with its weight.
    pub fn new(
        generation: u64,
        digest: String,
        failover: Failover,
        members: Vec<(Arc<Shard>, u32)>,
    ) -> Self {
        let placement = Placement::new(members.iter().map(|(s, w)| (s.name(), *w)));
        let (shards, weights) = members.into_iter().unzip();
        Self {
            generation,
            digest,
            failover,
            placement,
            shards,
            weights,
        }
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    pub fn weight(&self, index: usize) -> u32 {
        self.weights[index]
    }

    /// The one way a ring is made from a config, at start and on every reload: connects each
    /// shard of `config` concurrently, waiting at most `wait` for a first connection (a shard
    /// that is down still gets a client, which keeps reconnecting), and reuses the shards of
    /// `previous` whose name, URL and `redis` settings did not change. The error names the
    /// shard whose client could not be made.
    pub async fn build(
        config: &crate::config::Config,
        generation: u64,
        digest: String,
        previous: Option<&Ring>,
        wait: std::time::Duration,
        subscription: &Arc<dyn crate::shard::Subscription>,
    ) -> Result<Ring, String> {
        let shards = futures_util::future::join_all(config.shards.iter().map(|cfg| {
            let reuse = previous
                .and_then(|ring| ring.find(&cfg.name))
                .filter(|(shard, _)| shard.serves(cfg, &config.redis))
                .map(|(shard, _)| shard.clone());
            async move {
                let shard = match reuse {
                    Some(shard) => shard,
                    None => Shard::connect(cfg, &config.redis, wait, subscription)
                        .await
                        .map_err(|e| format!("shards: {}: {e}", cfg.name))?,
                };
                Ok::<_, String>((shard, cfg.weight))
            }
        }))
        .await;
        let members = shards.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Ring::new(generation, digest, config.failover, members))
    }

    pub fn find(&self, name: &str) -> Option<(&Arc<Shard>, u32)> {
        self.shards
            .iter()
            .position(|s| s.name() == name)
            .map(|i| (&self.shards[i], self.weights[i]))
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn owner(&self, route_key: &str) -> Option<&Arc<Shard>> {
        self.placement.owner(route_key).map(|i| &self.shards[i])
    }

    /// Shards in the key's rendezvous order.
    pub fn ranked(&self, route_key: &str) -> impl Iterator<Item = &Arc<Shard>> {
        self.placement
            .ranked(route_key)
            .into_iter()
            .map(|i| &self.shards[i])
    }

    pub fn share(&self, index: usize) -> f64 {
        self.placement.share(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn five() -> Placement {
        Placement::new([("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)])
    }

    fn key(i: usize) -> String {
        format!("example{}.org/media{i}", i % 97)
    }

    /// Pins key → shard. If this test fails, the hash changed: every deployed cache would remap.
    #[test]
    fn golden_vectors() {
        let p = Placement::new([("shard-a", 1), ("shard-b", 1), ("shard-c", 2)]);
        let names = ["shard-a", "shard-b", "shard-c"];
        let cases = [
            ("matrix.org/AbCdEfGh", "shard-c"),
            ("example.com/xyz123", "shard-b"),
            ("example.com:8448/media_id", "shard-c"),
            ("[::1]/q", "shard-b"),
            ("a/b", "shard-a"),
            ("kde.org/0123456789", "shard-c"),
        ];
        let got: Vec<(&str, &str)> = cases
            .iter()
            .map(|(k, _)| (*k, names[p.owner(k).unwrap()]))
            .collect();
        assert_eq!(got, cases);
        // The published XXH3-64 value of the empty input, then a shard-name seed.
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(xxh3_64(b"shard-a"), 0x407b_dfb2_d8ee_1b1b);
        // Owners of 1000 keys, folded into one number.
        let fold = (0..1000).fold(0u64, |acc, i| {
            acc.wrapping_mul(31)
                .wrapping_add(p.owner(&key(i)).unwrap() as u64)
        });
        assert_eq!(fold, 16_360_723_435_120_292_322);
    }

    #[test]
    fn balance_over_equal_shards() {
        let p = five();
        let mut counts = [0usize; 5];
        let n = 100_000;
        for i in 0..n {
            counts[p.owner(&key(i)).unwrap()] += 1;
        }
        let mean = n as f64 / 5.0;
        let max = *counts.iter().max().unwrap() as f64;
        assert!(max / mean <= 1.1, "counts {counts:?}");
    }

    #[test]
    fn weights_set_the_share() {
        let p = Placement::new([("a", 1), ("b", 3)]);
        let n = 100_000;
        let b = (0..n).filter(|i| p.owner(&key(*i)) == Some(1)).count() as f64 / n as f64;
        assert!((b - 0.75).abs() < 0.01, "share of b {b}");
        assert_eq!(p.share(1), 0.75);
    }

    #[test]
    fn adding_a_shard_moves_only_what_it_takes() {
        let four = Placement::new([("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        let five = five();
        let n = 100_000;
        let mut moved = 0;
        for i in 0..n {
            let k = key(i);
            let before = four.owner(&k).unwrap();
            let after = five.owner(&k).unwrap();
            if before != after {
                assert_eq!(after, 4, "a key moved between old shards");
                moved += 1;
            }
        }
        let frac = moved as f64 / n as f64;
        assert!(frac <= 0.22, "moved {frac}");
        assert!(frac >= 0.18, "moved {frac}");
    }

    #[test]
    fn removing_a_shard_moves_only_its_keys() {
        let five = five();
        let four = Placement::new([("a", 1), ("b", 1), ("d", 1), ("e", 1)]);
        let names_five = ["a", "b", "c", "d", "e"];
        let names_four = ["a", "b", "d", "e"];
        for i in 0..50_000 {
            let k = key(i);
            let before = names_five[five.owner(&k).unwrap()];
            let after = names_four[four.owner(&k).unwrap()];
            if before != "c" {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn ranked_starts_with_the_owner_and_lists_all() {
        let p = five();
        for i in 0..1000 {
            let k = key(i);
            let r = p.ranked(&k);
            assert_eq!(r[0], p.owner(&k).unwrap());
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 4]);
        }
        assert!(Placement::default().owner("x").is_none());
    }
}
