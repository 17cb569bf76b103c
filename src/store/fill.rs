//! Copies into the memory tier: a whole-object read from Redis, or a Put, gathered into room
//! reserved for it and offered once complete, unless a purge or another publish of the key came
//! in between.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures_util::{stream, StreamExt};
use sha2::{Digest, Sha256};

use super::memory::{Admission, MemoryStore, Object, Reservation};
use super::types::{chunk_slices, ChunkStream, Range};
use crate::key::Key;
use crate::proto::MediaInfo;

/// A copy of an object being gathered for the memory tier: its room is reserved from the
/// tier's budget before any byte is buffered, and it remembers the invalidation epoch it started
/// at, so that a purge (or another publish of the key) that comes in between refuses it.
pub(super) struct Copy {
    reservation: Reservation,
    buf: BytesMut,
    since: u64,
}

impl Copy {
    /// `since` must be taken before the source of the copy is read.
    pub(super) fn start(
        memory: &Arc<MemoryStore>,
        key: &Key,
        size: u64,
        is_put: bool,
        since: u64,
    ) -> Result<Self, Admission> {
        let reservation = memory.reserve(key, size, is_put)?;
        Ok(Copy {
            buf: reservation.buffer(),
            reservation,
            since,
        })
    }

    pub(super) fn write(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Whether the copy holds exactly the object `info` describes: a read from Redis is checked
    /// before it is offered (a Put's body was already checked as it arrived).
    fn is_whole(&self, info: &MediaInfo) -> bool {
        self.buf.len() as u64 == info.size
            && (info.sha256.is_empty() || Sha256::digest(&self.buf)[..] == info.sha256[..])
    }

    /// Offers the complete copy.
    pub(super) fn offer(self, key: Key, info: MediaInfo, version: u64) -> Admission {
        let object = Object {
            info,
            body: self.buf.freeze(),
            version,
        };
        self.reservation.offer(key, object, self.since)
    }
}

/// Marks a key as being filled into memory; unmarks it when dropped.
pub(super) struct FillGuard {
    filling: Arc<Mutex<HashSet<Key>>>,
    key: Key,
}

impl FillGuard {
    pub(super) fn start(filling: &Arc<Mutex<HashSet<Key>>>, key: &Key) -> Option<Self> {
        let mut set = filling.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.clone()).then(|| FillGuard {
            filling: filling.clone(),
            key: key.clone(),
        })
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let mut set = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.key);
    }
}

/// Passes a whole-object read through to the client while gathering a copy into room reserved
/// for it; once the read completes and the digest matches, the copy is offered to the memory
/// tier, which refuses it if a purge or another publish of the key came meanwhile. A read that
/// fails or is dropped fills nothing and gives its room back.
pub(super) fn tee(
    body: ChunkStream,
    fill: FillGuard,
    copy: Copy,
    info: MediaInfo,
    version: u64,
) -> ChunkStream {
    let state = (body, Some((fill, copy, info)));
    stream::unfold(state, move |(mut body, mut pending)| async move {
        match body.next().await {
            Some(Ok(chunk)) => {
                if let Some((_, copy, _)) = pending.as_mut() {
                    copy.write(&chunk);
                }
                Some((Ok(chunk), (body, pending)))
            }
            Some(Err(e)) => Some((Err(e), (body, None))),
            None => {
                if let Some((fill, copy, info)) = pending.take() {
                    if copy.is_whole(&info) {
                        copy.offer(fill.key.clone(), info, version);
                    }
                }
                None
            }
        }
    })
    .boxed()
}

pub(super) fn memory_chunks(object: Arc<Object>, range: Range, chunk: u64) -> ChunkStream {
    stream::iter(chunk_slices(&object.body, range, chunk).map(Ok)).boxed()
}
