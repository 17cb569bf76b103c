//! The per-replica memory tier: whole objects held as shared `Bytes`, bounded by a byte budget,
//! least recently used evicted first. Accounting of bytes and entries is exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::key::Key;
use crate::proto::MediaInfo;

/// One cached object; readers clone the `Arc` and stream slices of `body` without copying.
#[derive(Debug)]
pub struct Object {
    pub info: MediaInfo,
    pub body: Bytes,
}

#[derive(Debug)]
pub struct MemoryStore {
    max_bytes: u64,
    max_object_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Last-use tick → key, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    object: Arc<Object>,
    tick: u64,
}

impl Inner {
    fn touch(&mut self, key: &Key) -> Option<Arc<Object>> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, key.clone());
        Some(entry.object.clone())
    }

    fn remove(&mut self, key: &Key) -> bool {
        match self.entries.remove(key) {
            Some(entry) => {
                self.order.remove(&entry.tick);
                self.bytes -= entry.object.body.len() as u64;
                true
            }
            None => false,
        }
    }
}

impl MemoryStore {
    pub fn new(max_bytes: u64, max_object_bytes: u64) -> Self {
        Self {
            max_bytes,
            max_object_bytes: max_object_bytes.min(max_bytes),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn max_object_bytes(&self) -> u64 {
        self.max_object_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (every mutation is complete
        // before the next can panic), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Object>> {
        self.lock().touch(key)
    }

    /// Looks without counting as a use.
    pub fn peek(&self, key: &Key) -> Option<Arc<Object>> {
        self.lock().entries.get(key).map(|e| e.object.clone())
    }

    /// Stores an object, evicting the least recently used ones to make room. False when it is
    /// larger than the tier allows.
    pub fn insert(&self, key: Key, object: Object) -> bool {
        let size = object.body.len() as u64;
        if size > self.max_object_bytes {
            return false;
        }
        let mut inner = self.lock();
        inner.remove(&key);
        while inner.bytes + size > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(entry) = inner.entries.remove(&oldest) {
                inner.bytes -= entry.object.body.len() as u64;
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, key.clone());
        inner.bytes += size;
        inner.entries.insert(
            key,
            Entry {
                object: Arc::new(object),
                tick,
            },
        );
        true
    }

    pub fn remove(&self, key: &Key) -> bool {
        self.lock().remove(key)
    }

    /// Removes every variant of `key`'s media; returns how many.
    pub fn remove_variants(&self, key: &Key) -> u64 {
        let mut inner = self.lock();
        let doomed: Vec<Key> = inner
            .entries
            .keys()
            .filter(|k| k.origin() == key.origin() && k.media_id() == key.media_id())
            .cloned()
            .collect();
        doomed.iter().filter(|k| inner.remove(k)).count() as u64
    }

    /// Bytes of bodies held and number of entries.
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.bytes, inner.entries.len() as u64)
    }
}

/// Collects a Put's body for the memory tier; nothing is visible until [`MemoryWriter::body`]
/// is taken and inserted.
#[derive(Debug)]
pub struct MemoryWriter {
    buf: BytesMut,
}

impl MemoryWriter {
    pub fn new(size: u64) -> Self {
        Self {
            buf: BytesMut::with_capacity(size as usize),
        }
    }

    pub fn write(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    pub fn body(self) -> Bytes {
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(n: usize) -> Object {
        Object {
            info: MediaInfo {
                size: n as u64,
                ..Default::default()
            },
            body: Bytes::from(vec![1; n]),
        }
    }

    fn key(i: u32) -> Key {
        Key::new("o", &format!("m{i}"), "").unwrap()
    }

    #[test]
    fn evicts_least_recently_used_and_accounts_exactly() {
        let m = MemoryStore::new(100, 60);
        assert!(m.insert(key(1), obj(40)));
        assert!(m.insert(key(2), obj(40)));
        assert!(m.get(&key(1)).is_some()); // 2 is now the oldest
        assert!(m.insert(key(3), obj(40)));
        assert!(m.get(&key(2)).is_none());
        assert!(m.get(&key(1)).is_some());
        assert_eq!(m.usage(), (80, 2));
        assert!(!m.insert(key(4), obj(61)), "over max_object_bytes");
        assert!(m.insert(key(1), obj(10)), "replace");
        assert_eq!(m.usage(), (50, 2));
        assert!(m.remove(&key(1)));
        assert!(!m.remove(&key(1)));
        assert_eq!(m.usage(), (40, 1));
    }

    #[test]
    fn removes_all_variants_of_one_media() {
        let m = MemoryStore::new(1000, 100);
        m.insert(Key::new("o", "m", "").unwrap(), obj(1));
        m.insert(Key::new("o", "m", "thumb/1x1/crop").unwrap(), obj(1));
        m.insert(Key::new("o", "n", "").unwrap(), obj(1));
        assert_eq!(m.remove_variants(&Key::new("o", "m", "x").unwrap()), 2);
        assert_eq!(m.usage(), (1, 1));
    }
}
