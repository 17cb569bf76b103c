//! A Put on its way to one shard, over one pinned connection. A body of up to
//! [`FIRST_WRITE_BYTES`] (with its header) is gathered here and stored in one round trip: the
//! whole value set on a temporary key and published at once. A longer one is sent as one `SET`
//! of the temporary key streamed over a connection of its own ([`Upload`]), starting with the
//! gathered megabyte; the publish follows on the pinned connection once the shard has it all.
//! A value longer than `redis.upload_max_bytes` starts the temporary key with its first
//! megabyte and writes the rest a megabyte at a time at its offset, the key grown by doubling
//! (see `scripts`). Either way it is published under its final name in one atomic step.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::debug;

use super::scripts::{self, Published};
use crate::key::Key;
use crate::object;
use crate::proto::{MediaInfo, PutOutcome};
use crate::shard::pinned::Pinned;
use crate::shard::upload::Upload;
use crate::store::types::{PutError, StoreError};

/// Deletes a temporary key that was never published, also when the Put's future is dropped
/// because the client went away. The delete goes over the write's own connection, so it lands
/// after any write still in flight.
pub(super) struct TempGuard {
    pub(super) conn: Option<Pinned>,
    pub(super) temp: String,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let temp = std::mem::take(&mut self.temp);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = conn.del(&temp).await {
                        // The key's TTL removes it anyway.
                        debug!(temp = %temp, error = %e, "temporary key left to expire");
                    }
                });
            }
        }
    }
}

/// Bytes (header and body) gathered before the temporary key is written at all: a body that
/// fits is stored in one round trip, and a longer one starts its upload (or, written in pieces,
/// its first `SET`) with this much.
pub const FIRST_WRITE_BYTES: usize = 1024 * 1024 + object::MAX_HEADER_LEN;

/// Body bytes a write in place carries at most: fewer, larger writes cost the shard less.
const WRITE_BYTES: usize = 1024 * 1024;

/// A Put in progress on one shard.
pub struct RedisWriter {
    pub(super) guard: TempGuard,
    pub(super) key: Key,
    pub(super) nonce: u64,
    pub(super) header_len: u64,
    /// Until the temporary key exists (or its upload began): the draft header and the body so
    /// far. After, written in pieces: client chunks gathered up to [`WRITE_BYTES`] before a
    /// write; uploaded: empty, chunks go out as they come.
    pub(super) pending: BytesMut,
    /// Length of the whole body.
    pub(super) size: u64,
    /// Whether the temporary key was written (or, with `upload`, its `SET` begun).
    pub(super) created: bool,
    /// The temporary key's `SET` in progress, for a value sent whole.
    pub(super) upload: Option<Upload>,
    /// Body bytes in the temporary key.
    pub(super) written: u64,
    pub(super) ttl: Duration,
    /// When the temporary key's TTL was last renewed.
    pub(super) refreshed: std::time::Instant,
}

impl RedisWriter {
    /// The nonce this write publishes under: the version of a memory-tier copy of it.
    pub fn version(&self) -> u64 {
        self.nonce
    }

    pub fn shard_name(&self) -> &str {
        self.guard.conn.as_ref().map_or("", |c| c.shard().name())
    }

    fn conn(&self) -> &Pinned {
        self.guard
            .conn
            .as_ref()
            .expect("writer has a connection until it is finished")
    }

    pub async fn write(&mut self, chunk: Bytes) -> Result<(), PutError> {
        if !self.created {
            self.pending.extend_from_slice(&chunk);
            if self.pending.len() >= FIRST_WRITE_BYTES {
                self.create().await?;
            }
            return Ok(());
        }
        if let Some(upload) = &mut self.upload {
            self.written = checked_total(self.written, chunk.len(), self.size)?;
            return Ok(upload.send(&chunk).await?);
        }
        if self.pending.is_empty() && chunk.len() >= WRITE_BYTES {
            return self.write_piece(chunk).await;
        }
        self.pending.extend_from_slice(&chunk);
        // A writer trickling small chunks still renews its TTL well before it runs out.
        if self.pending.len() >= WRITE_BYTES || self.refreshed.elapsed() > self.ttl / 3 {
            let data = self.pending.split().freeze();
            self.write_piece(data).await?;
        }
        Ok(())
    }

    /// Writes the temporary key with the draft header and the body so far, or begins its `SET`
    /// when the whole value fits in one.
    async fn create(&mut self) -> Result<(), PutError> {
        let body = self.pending.len() as u64 - self.header_len;
        let shard = self.conn().shard().clone();
        let slot = shard.upload_slot(self.header_len + self.size);
        // The write counter goes over the draft header's first bytes before the value is sent:
        // a key that vanishes after this write fails the next write's check of it. An uploaded
        // value reaches the shard whole or not at all, so it carries the whole body's.
        let counter = scripts::write_counter(if slot.is_some() { self.size } else { body });
        self.pending[..counter.len()].copy_from_slice(counter.as_bytes());
        if let Some(slot) = slot {
            checked_total(0, body as usize, self.size)?;
            let upload = shard
                .upload(slot, &self.guard.temp, self.ttl, &self.pending)
                .await?;
            self.upload = Some(upload);
            self.created = true;
            self.written = body;
            self.pending = BytesMut::new();
            return Ok(());
        }
        let first = self.pending.split().freeze();
        self.conn().set(&self.guard.temp, first, self.ttl).await?;
        self.created = true;
        self.written = body;
        self.refreshed = std::time::Instant::now();
        self.pending.reserve(WRITE_BYTES);
        Ok(())
    }

    /// Writes the next body bytes in place.
    async fn write_piece(&mut self, data: Bytes) -> Result<(), PutError> {
        let total = checked_total(self.written, data.len(), self.size)?;
        let at = (self.guard.temp.as_str(), self.ttl);
        let sizes = (self.header_len, self.header_len + self.size);
        let kept = scripts::write_piece(self.conn(), at, sizes, self.written, data).await?;
        if !kept {
            return Err(StoreError::Lost.into());
        }
        self.refreshed = std::time::Instant::now();
        self.written = total;
        Ok(())
    }

    /// Publishes under the final key with `info` (which now carries the digest), unless the
    /// media was quarantined meanwhile or the temporary key was lost.
    pub async fn commit(mut self, info: &MediaInfo) -> Result<(), PutError> {
        let header = object::encode_header(info, self.nonce).map_err(StoreError::from)?;
        if header.len() as u64 != self.header_len {
            return Err(PutError::Failed(StoreError::Internal(
                "header length changed between start and publish".into(),
            )));
        }
        let published = if self.created {
            if let Some(upload) = self.upload.take() {
                upload.finish().await?;
            } else if !self.pending.is_empty() {
                let data = self.pending.split().freeze();
                self.write_piece(data).await?;
            }
            scripts::publish(
                self.conn(),
                &self.guard.temp,
                &self.key,
                header,
                self.written,
                self.nonce,
            )
            .await?
        } else {
            self.pending[..header.len()].copy_from_slice(&header);
            let value = self.pending.split().freeze();
            scripts::store_whole(
                self.conn(),
                (&self.guard.temp, self.ttl),
                &self.key,
                value,
                header.len(),
                self.nonce,
            )
            .await?
        };
        // Published, or deleted by the script: nothing is left to clean up.
        self.guard.conn = None;
        match published {
            Published::Stored => Ok(()),
            Published::Lost => Err(StoreError::Lost.into()),
            Published::Quarantined => Err(PutError::Refused(PutOutcome::Quarantined)),
        }
    }
}

/// Body bytes written once `more` are added to `written`, or an error if that passes `size`.
fn checked_total(written: u64, more: usize, size: u64) -> Result<u64, PutError> {
    let total = written + more as u64;
    if total > size {
        return Err(PutError::Failed(StoreError::Internal(
            "more body than declared reached the writer".into(),
        )));
    }
    Ok(total)
}
