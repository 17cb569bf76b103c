//! Tests of the memory tier: its policy, its accounting under concurrency, and the refusal
//! of copies that an invalidation made stale.

use super::inner::{INVALIDATION_LOG, MAX_POPULARITY};
use super::*;
use crate::proto::MediaInfo;
use bytes::Bytes;

const MIN: Duration = Duration::from_secs(60);

fn config(max_bytes: u64) -> MemoryConfig {
    MemoryConfig {
        max_bytes,
        max_object_bytes: max_bytes,
        tracked_window: 30 * MIN,
        min_downloads: 3,
        min_cache_time: 5 * MIN,
        min_evicted_time: MIN,
    }
}

fn store(max_bytes: u64) -> (MemoryStore, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::default());
    clock.set_ms(1_000_000);
    (
        MemoryStore::with_clock(&config(max_bytes), clock.clone()),
        clock,
    )
}

fn obj(n: usize) -> Object {
    Object {
        info: MediaInfo {
            size: n as u64,
            ..Default::default()
        },
        body: Bytes::from(vec![1; n]),
        version: 0,
    }
}

fn key(i: u32) -> Key {
    Key::new("o", &format!("m{i}"), "").unwrap()
}

fn download(m: &MemoryStore, k: &Key, times: u32) -> u32 {
    (0..times).map(|_| m.record_download(k)).last().unwrap_or(0)
}

#[test]
fn window_counts_and_forgets() {
    let (m, clock) = store(1000);
    assert_eq!(download(&m, &key(1), 4), 4);
    clock.advance(20 * MIN);
    assert_eq!(download(&m, &key(1), 1), 5);
    // 31 minutes after the first four, only the later one is in the window.
    clock.advance(11 * MIN);
    assert_eq!(m.popularity(&key(1)), 1);
    clock.advance(30 * MIN);
    assert_eq!(m.popularity(&key(1)), 0);
    assert_eq!(m.stats().tracked_keys, 0, "forgotten keys take no memory");
}

#[test]
fn tracker_is_bounded_under_unique_keys() {
    let mut t = Tracker::default();
    let mut changed = Vec::new();
    for bucket in 0..3u64 {
        t.advance(bucket, &mut changed);
        for i in 0..(MAX_TRACKED_KEYS as u64 / 2 + 10) {
            t.record(bucket << 40 | i, &mut changed);
        }
        assert!(t.totals.len() <= MAX_TRACKED_KEYS);
    }
    let counted: usize = t.buckets.iter().map(|(_, c)| c.len()).sum();
    assert_eq!(counted, t.totals.len(), "totals agree with the buckets");
}

#[test]
fn admission_needs_downloads_and_size() {
    let (m, _) = store(1000);
    assert_eq!(m.admit(key(1), obj(10)), Admission::NotPopular);
    download(&m, &key(1), 2);
    assert!(!m.would_admit(&key(1), 10));
    assert_eq!(m.admit(key(1), obj(10)), Admission::NotPopular);
    download(&m, &key(1), 1);
    assert!(m.would_admit(&key(1), 10));
    assert_eq!(m.admit(key(1), obj(10)), Admission::Stored);
    download(&m, &key(2), 5);
    assert_eq!(m.admit(key(2), obj(1001)), Admission::TooLarge);
    assert_eq!(m.usage(), (10, 1));
}

#[test]
fn evicts_least_popular_then_smallest_only_when_that_makes_room() {
    let (m, clock) = store(100);
    for (i, (downloads, size)) in [(3, 30), (4, 20), (3, 10), (6, 40)].into_iter().enumerate() {
        download(&m, &key(i as u32), downloads);
        assert_eq!(m.admit(key(i as u32), obj(size)), Admission::Stored);
    }
    assert_eq!(m.usage(), (100, 4));
    clock.advance(6 * MIN); // all past min_cache_time
                            // Newcomer with 5 downloads and 35 bytes: candidates below 5 are (3,10), (3,30), (4,20).
    download(&m, &key(9), 5);
    assert_eq!(m.admit(key(9), obj(35)), Admission::Stored);
    // (3,10) then (3,30) freed 40 >= 35; (4,20) stays.
    assert!(m.get(&key(2)).is_none() && m.get(&key(0)).is_none());
    assert!(m.get(&key(1)).is_some() && m.get(&key(3)).is_some());
    assert_eq!(m.usage(), (95, 3));
    assert_eq!(m.stats().evicted_for_room, 2);
    m.check_invariants();

    // A newcomer that even all less popular entries cannot make room for evicts nothing.
    download(&m, &key(10), 5);
    assert_eq!(m.admit(key(10), obj(60)), Admission::NoRoom);
    assert_eq!(m.usage(), (95, 3));
    // Equally popular entries are not victims.
    download(&m, &key(11), 4);
    assert_eq!(m.admit(key(11), obj(30)), Admission::NoRoom);
    m.check_invariants();
}

#[test]
fn min_cache_time_protects_new_entries() {
    let (m, clock) = store(100);
    download(&m, &key(1), 3);
    assert_eq!(m.admit(key(1), obj(80)), Admission::Stored);
    download(&m, &key(2), 10);
    assert_eq!(
        m.admit(key(2), obj(50)),
        Admission::NoRoom,
        "key 1 is too young to evict"
    );
    clock.advance(5 * MIN - Duration::from_millis(1));
    assert_eq!(m.admit(key(2), obj(50)), Admission::NoRoom);
    clock.advance(Duration::from_millis(1));
    assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
    assert!(m.get(&key(1)).is_none());
}

#[test]
fn min_evicted_time_keeps_evicted_keys_out() {
    let (m, clock) = store(100);
    download(&m, &key(1), 3);
    m.admit(key(1), obj(80));
    clock.advance(5 * MIN);
    download(&m, &key(2), 10);
    assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
    // key 1 is excluded for a minute even though it is popular now.
    download(&m, &key(1), 20);
    clock.advance(MIN - Duration::from_millis(1));
    assert!(!m.would_admit(&key(1), 40));
    assert_eq!(m.admit(key(1), obj(40)), Admission::Excluded);
    clock.advance(Duration::from_millis(1));
    assert_eq!(m.admit(key(1), obj(40)), Admission::Stored);
    assert_eq!(m.stats().refused_excluded, 1);
}

#[test]
fn popularity_changes_reorder_the_victims() {
    let (m, clock) = store(100);
    download(&m, &key(1), 3);
    m.admit(key(1), obj(50));
    download(&m, &key(2), 3);
    m.admit(key(2), obj(50));
    clock.advance(6 * MIN);
    // key 1 becomes popular after it was indexed; key 2 is now the only victim below 8.
    download(&m, &key(1), 10);
    download(&m, &key(3), 8);
    assert_eq!(m.admit(key(3), obj(50)), Admission::Stored);
    assert!(m.get(&key(1)).is_some() && m.get(&key(2)).is_none());
    // As the window slides, key 1's downloads expire and it becomes evictable again.
    clock.advance(31 * MIN);
    download(&m, &key(4), 3);
    assert_eq!(m.admit(key(4), obj(50)), Admission::Stored);
    m.check_invariants();
}

#[test]
fn memory_only_puts_replace_entries_nobody_downloads() {
    let (m, clock) = store(100);
    assert_eq!(m.put(key(1), obj(60)), Admission::Stored);
    assert_eq!(m.put(key(2), obj(60)), Admission::NoRoom, "key 1 is young");
    clock.advance(6 * MIN);
    assert_eq!(
        m.put(key(2), obj(60)),
        Admission::Stored,
        "key 1 had no downloads"
    );
    clock.advance(6 * MIN);
    download(&m, &key(2), 2);
    assert_eq!(
        m.put(key(3), obj(60)),
        Admission::NoRoom,
        "key 2 is downloaded"
    );
    // Replacing a key with a new body is not an eviction.
    assert_eq!(m.put(key(2), obj(70)), Admission::Stored);
    assert_eq!(m.usage(), (70, 1));
    m.check_invariants();
}

#[test]
fn accounting_is_exact_under_concurrency() {
    let clock = Arc::new(ManualClock::default());
    let m = Arc::new(MemoryStore::with_clock(&config(50_000), clock.clone()));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let m = m.clone();
            let clock = clock.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t);
                for i in 0..20_000u32 {
                    // Skewed popularity, so that newcomers outrank some entries.
                    let k = key((rng.f64().powi(3) * 300.0) as u32);
                    match rng.u8(..10) {
                        0..=4 => {
                            m.record_download(&k);
                        }
                        5..=6 => {
                            m.admit(k, obj(rng.usize(1..2000)));
                        }
                        7 => {
                            m.put(k, obj(rng.usize(1..2000)));
                        }
                        8 => {
                            m.remove(&k);
                        }
                        _ => {
                            m.get(&k);
                        }
                    }
                    if i % 500 == 0 {
                        clock.advance(Duration::from_secs(30));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    m.check_invariants();
    let stats = m.stats();
    assert!(
        stats.admissions > 100 && stats.evicted_for_room > 0,
        "{stats:?}"
    );
}

#[test]
fn removes_all_variants_of_one_media() {
    let (m, _) = store(1000);
    m.put(Key::new("o", "m", "").unwrap(), obj(1));
    m.put(Key::new("o", "m", "thumb/1x1/crop").unwrap(), obj(1));
    m.put(Key::new("o", "n", "").unwrap(), obj(1));
    assert_eq!(m.remove_variants(&Key::new("o", "m", "x").unwrap()), 2);
    assert_eq!(m.usage(), (1, 1));
}

#[test]
fn keys_that_share_a_hash_never_see_each_other() {
    let clock = Arc::new(ManualClock::default());
    let m = MemoryStore::with_hasher(&config(1000), clock, |_| 42);
    let (a, b) = (key(1), key(2));
    assert_eq!(m.put(a.clone(), obj(10)), Admission::Stored);
    assert!(m.get(&a).is_some());
    assert!(m.get(&b).is_none(), "b shares a's hash but is not a");
    assert!(!m.remove(&b), "removing b leaves a alone");
    assert!(m.get(&a).is_some());
    assert_eq!(m.put(b.clone(), obj(20)), Admission::Stored);
    assert!(m.get(&a).is_none(), "one slot per hash: b replaced a");
    assert_eq!(m.get(&b).unwrap().body.len(), 20);
    m.check_invariants();
}

/// Counts `n` downloads under one lock (popularity far above the cap, quickly).
fn bulk_download(m: &MemoryStore, k: &Key, n: u32) {
    let h = (m.hasher)(k);
    let (mut inner, _) = m.lock();
    let mut changed = Vec::new();
    let mut last = 0;
    for _ in 0..n {
        last = inner.tracker.record(h, &mut changed).unwrap_or(0);
    }
    inner.repopularize(h, last);
}

#[test]
fn popularity_above_the_cap_never_overfills_the_tier() {
    let (m, clock) = store(100);
    bulk_download(&m, &key(1), 70_000);
    assert_eq!(m.admit(key(1), obj(50)), Admission::Stored);
    bulk_download(&m, &key(2), 66_000);
    assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
    clock.advance(6 * MIN);
    // As popular as the most popular entry once capped: neither is a victim.
    bulk_download(&m, &key(3), 70_000);
    assert_eq!(m.admit(key(3), obj(100)), Admission::NoRoom);
    m.check_invariants();
    assert_eq!(m.usage(), (100, 2));
}

#[test]
fn reservations_count_against_the_budget_until_used_or_dropped() {
    let (m, _) = store(100);
    let m = Arc::new(m);
    download(&m, &key(1), 3);
    download(&m, &key(2), 3);
    let r1 = m.reserve(&key(1), 60, false).expect("room for 60");
    assert_eq!(m.stats().reserved, 60);
    assert_eq!(
        m.reserve(&key(2), 60, false).unwrap_err(),
        Admission::NoRoom,
        "60 + 60 > 100"
    );
    assert_eq!(
        m.reserve(&key(3), 10, false).unwrap_err(),
        Admission::NotPopular
    );
    let since = m.epoch();
    assert_eq!(
        r1.offer(
            key(1),
            Object {
                version: 5,
                ..obj(60)
            },
            since
        ),
        Admission::Stored
    );
    assert_eq!(m.stats().reserved, 0);
    let r2 = m.reserve(&key(2), 40, false).expect("room for 40");
    drop(r2);
    assert_eq!(
        m.stats().reserved,
        0,
        "a dropped reservation gives its room back"
    );
    m.check_invariants();
}

#[test]
fn a_new_copy_never_evicts_the_old_copy_of_its_own_key() {
    let (m, clock) = store(100);
    let m = Arc::new(m);
    download(&m, &key(1), 3);
    assert_eq!(m.admit(key(1), obj(40)), Admission::Stored);
    download(&m, &key(2), 4);
    assert_eq!(m.admit(key(2), obj(50)), Admission::Stored);
    clock.advance(6 * MIN);
    // Key 1 grows popular; its new copy needs room, which key 2 makes, not key 1 itself.
    download(&m, &key(1), 3);
    let since = m.epoch();
    let r = m.reserve(&key(1), 40, false).expect("room");
    assert!(m.get(&key(1)).is_some(), "the old copy is served meanwhile");
    assert!(m.get(&key(2)).is_none());
    assert_eq!(
        r.offer(
            key(1),
            Object {
                version: 2,
                ..obj(40)
            },
            since
        ),
        Admission::Stored,
        "not refused as a key evicted moments ago"
    );
    m.check_invariants();
}

#[test]
fn a_reservation_that_cannot_fit_evicts_nothing() {
    let (m, clock) = store(100);
    let m = Arc::new(m);
    download(&m, &key(1), 5);
    assert_eq!(m.admit(key(1), obj(60)), Admission::Stored);
    download(&m, &key(2), 3);
    assert_eq!(m.admit(key(2), obj(30)), Admission::Stored);
    clock.advance(6 * MIN);
    // A new copy of key 1 while its old one is still served: 60 + 60 > 100 even with key 2
    // gone, so key 2 must stay.
    assert_eq!(
        m.reserve(&key(1), 60, false).unwrap_err(),
        Admission::NoRoom
    );
    assert!(
        m.get(&key(2)).is_some(),
        "nothing evicted for a refused reservation"
    );
    assert_eq!(m.stats().evicted_for_room, 0);
    m.check_invariants();
}

#[test]
fn a_copy_started_before_an_invalidation_is_refused() {
    let (m, _) = store(1000);
    let m = Arc::new(m);
    let k = Key::new("o", "m", "thumb/1x1/crop").unwrap();
    download(&m, &k, 3);
    let copy = |version: u64| Object { version, ..obj(10) };
    // A purge of the media, after the copy started: refused.
    let since = m.epoch();
    let r = m.reserve(&k, 10, false).unwrap();
    m.remove_variants(&Key::new("o", "m", "").unwrap());
    assert_eq!(r.offer(k.clone(), copy(1), since), Admission::Invalidated);
    // Another publish of the key: refused, unless the copy is of that very publish.
    let since = m.epoch();
    let r = m.reserve(&k, 10, false).unwrap();
    m.invalidate_except(&k, 2);
    assert_eq!(r.offer(k.clone(), copy(1), since), Admission::Invalidated);
    let since = m.epoch();
    let r = m.reserve(&k, 10, false).unwrap();
    m.invalidate_except(&k, 2);
    assert_eq!(r.offer(k.clone(), copy(2), since), Admission::Stored);
    // An event of this same publish keeps the copy; one of another drops it.
    assert!(!m.invalidate_except(&k, 2));
    assert!(m.get(&k).is_some());
    assert!(m.invalidate_except(&k, 3));
    assert!(m.get(&k).is_none());
    // Unrelated purges do not refuse it; a purge of its origin or a clear does.
    for (purge, refused) in [(0, false), (1, true), (2, true)] {
        let since = m.epoch();
        let r = m.reserve(&k, 10, false).unwrap();
        match purge {
            0 => {
                m.remove_origin("other");
            }
            1 => {
                m.remove_origin("o");
            }
            _ => {
                m.clear();
            }
        }
        let answer = r.offer(k.clone(), copy(4), since);
        assert_eq!(
            answer == Admission::Invalidated,
            refused,
            "{purge}: {answer:?}"
        );
        m.remove(&k);
    }
    // Older than every invalidation remembered: refused, it cannot be proven current.
    let since = m.epoch();
    let r = m.reserve(&k, 10, false).unwrap();
    for i in 0..INVALIDATION_LOG + 1 {
        m.remove(&key(i as u32 + 10));
    }
    assert_eq!(r.offer(k.clone(), copy(5), since), Admission::Invalidated);
    m.check_invariants();
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Download(u8, u32),
        Admit(u8, u16),
        Put(u8, u16),
        Reserve(u8, u16),
        Release,
        Remove(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), prop_oneof![1u32..5, Just(70_000u32)])
                .prop_map(|(k, n)| Op::Download(k % 16, n)),
            (any::<u8>(), 1u16..400).prop_map(|(k, s)| Op::Admit(k % 16, s)),
            (any::<u8>(), 1u16..400).prop_map(|(k, s)| Op::Put(k % 16, s)),
            (any::<u8>(), 1u16..400).prop_map(|(k, s)| Op::Reserve(k % 16, s)),
            Just(Op::Release),
            any::<u8>().prop_map(|k| Op::Remove(k % 16)),
            (0u16..600).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_operations_never_exceed_max_bytes(ops in proptest::collection::vec(op(), 1..60)) {
            let clock = Arc::new(ManualClock::default());
            let m = Arc::new(MemoryStore::with_clock(&config(1000), clock.clone()));
            let mut held = Vec::new();
            for op in ops {
                match op {
                    Op::Download(k, n) => bulk_download(&m, &key(k.into()), n),
                    Op::Admit(k, s) => {
                        m.admit(key(k.into()), obj(s.into()));
                    }
                    Op::Put(k, s) => {
                        m.put(key(k.into()), obj(s.into()));
                    }
                    Op::Reserve(k, s) => {
                        if let Ok(r) = m.reserve(&key(k.into()), s.into(), k % 2 == 0) {
                            held.push((k, r));
                        }
                    }
                    Op::Release => {
                        if let Some((k, r)) = held.pop() {
                            let size = r.size() as usize;
                            r.offer(key(k.into()), obj(size), m.epoch());
                        }
                    }
                    Op::Remove(k) => {
                        m.remove(&key(k.into()));
                    }
                    Op::Advance(s) => clock.advance(Duration::from_secs(s.into())),
                }
                m.check_invariants();
            }
        }
    }
}

#[test]
fn fenwick_prefix_sums() {
    let mut f = Fenwick::new();
    f.add(0, 5);
    f.add(3, 7);
    f.add(MAX_POPULARITY + 10, 11);
    assert_eq!(f.below(0), 0);
    assert_eq!(f.below(1), 5);
    assert_eq!(f.below(4), 12);
    assert_eq!(f.below(MAX_POPULARITY + 1), 23);
    f.add(3, -7);
    assert_eq!(f.below(4), 5);
}
